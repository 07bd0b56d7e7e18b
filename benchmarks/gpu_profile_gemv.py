"""Run the batch-1 GEMV kernels a few times so Nsight Compute can profile them.

Usage on a GPU machine (ptq importable, see ``benchmarks/gpu_check.sh``)::

    ncu --clock-control none --kernel-name regex:qgemv --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy \
        python3 -P benchmarks/gpu_profile_gemv.py int4
"""

from __future__ import annotations

import sys

import torch


def main() -> None:
    fmt = sys.argv[1] if len(sys.argv) > 1 else "int4"
    sys.path.insert(0, "benchmarks")
    from gpu_kernels import call, make_weight

    from ptq.exporters.cuda.build import load_extension

    load_extension()
    dev = torch.device("cuda")
    p = make_weight(fmt, 11008, 4096, dev, real=False)
    x = torch.randn(1, 4096, device=dev, dtype=torch.float16)
    for _ in range(6):
        call(p, x, "w", torch.float16)
    torch.cuda.synchronize()
    print("done", fmt)


if __name__ == "__main__":
    main()
