"""Front end: capture (:mod:`~ptq.frontend.capture`), quantizable-op discovery
(:mod:`~ptq.frontend.quantizable`), pattern groups (:mod:`~ptq.frontend.patterns`),
conv-BN folding (:mod:`~ptq.frontend.fold`), quantized convs (:mod:`~ptq.frontend.qconv`)
and MoE calibration inputs (:mod:`~ptq.frontend.moe`).
"""
