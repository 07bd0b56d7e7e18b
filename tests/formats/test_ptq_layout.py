"""ptq's own layout and the format descriptor: bit-exact round trips."""

from __future__ import annotations

import pytest
import torch

from ptq.formats import (
    FP6_E3M2,
    INT5,
    INT6,
    UINT8,
    FloatFormat,
    PerBlock,
    PerGroup,
    QuantFormat,
    dequantize,
    preset,
    preset_names,
    quantize,
)
from ptq.formats.descriptor import descriptor_from_tensor, from_descriptor, to_descriptor
from ptq.formats.ptq_layout import from_ptq_layout, to_ptq_layout

EXTRA = [
    QuantFormat(INT5, PerGroup(32)),
    QuantFormat(INT6, PerGroup(64), symmetric=False, scale_format="bf16"),
    QuantFormat(UINT8, PerGroup(64), symmetric=False),
    QuantFormat(FP6_E3M2, PerGroup(32), scale_format="ue5m3"),
    QuantFormat(FloatFormat(3, 0, 3), PerGroup(16), scale_format="e4m3", global_scale=True),
    QuantFormat(FloatFormat(1, 2, 1), PerBlock(8, 8), scale_format="fp16"),
]


def _all_formats() -> list[QuantFormat]:
    return [preset(n) for n in preset_names()] + EXTRA


@pytest.mark.parametrize("fmt", _all_formats(), ids=lambda f: f.name or f.element.name)
def test_round_trip_bit_exact(fmt: QuantFormat) -> None:
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(5))
    q = quantize(x, fmt)
    d = to_ptq_layout(q)
    assert d["weight_packed"].dtype == torch.uint8
    assert d["weight_packed"].shape == (40, (256 * fmt.element.bits + 7) // 8)
    back = from_ptq_layout(d)
    assert back.fmt == fmt
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(dequantize(back).view(torch.int32), dequantize(q).view(torch.int32))


def test_descriptor_round_trip_and_strictness() -> None:
    for fmt in _all_formats():
        assert from_descriptor(to_descriptor(fmt)) == fmt
    d = to_descriptor(preset("nvfp4"))
    assert d["version"] == 2
    with pytest.raises(ValueError, match="unknown weight format key"):
        from_descriptor({**d, "color": "red"})
    with pytest.raises(ValueError, match="version"):
        from_descriptor({**d, "version": 99})
    with pytest.raises(ValueError, match="element kind"):
        from_descriptor({**d, "element": {"kind": "posit"}})
    with pytest.raises(ValueError, match="unknown float element key"):
        from_descriptor({**d, "element": {**d["element"], "colour": 1}})


# Descriptors as version 1 wrote them (files on disk must keep loading).
_V1_GOLDEN = {
    "nvfp4": '{"channel_scale":false,"clip":"none","element":{"bias":1,"exp_bits":2,'
    '"inf_nan":"none","kind":"float","man_bits":1,"name":"fp4_e2m1","signed":true},'
    '"global_scale":true,"granularity":{"kind":"group","size":16},"name":"nvfp4",'
    '"nonfinite":"raise","scale_format":"e4m3","scale_rule":"amax","symmetric":true,"version":1}',
    "int4_g64": '{"channel_scale":false,"clip":"none","element":{"bits":4,"kind":"int",'
    '"restricted":false,"signed":true},"global_scale":false,"granularity":{"kind":"group",'
    '"size":64},"name":"int4_g64","nonfinite":"raise","scale_format":"fp16",'
    '"scale_rule":"amax","symmetric":true,"version":1}',
    "fp8_e4m3_channel": '{"channel_scale":false,"clip":"none","element":{"bias":7,'
    '"exp_bits":4,"inf_nan":"fn","kind":"float","man_bits":3,"name":"fp8_e4m3",'
    '"signed":true},"global_scale":false,"granularity":{"axis":0,"kind":"channel"},'
    '"name":"fp8_e4m3_channel","nonfinite":"raise","scale_format":"fp32",'
    '"scale_rule":"amax","symmetric":true,"version":1}',
}


@pytest.mark.parametrize("name", sorted(_V1_GOLDEN))
def test_version_1_descriptors_still_decode(name: str) -> None:
    stored = torch.tensor(list(_V1_GOLDEN[name].encode("utf-8")), dtype=torch.uint8)
    fmt = descriptor_from_tensor(stored)
    assert fmt == preset(name)
    assert fmt.element.name == preset(name).element.name


def test_missing_tensor_is_named() -> None:
    d = to_ptq_layout(quantize(torch.randn(4, 32), preset("mxfp4")))
    del d["weight_scale"]
    with pytest.raises(ValueError, match="weight_scale"):
        from_ptq_layout(d)
