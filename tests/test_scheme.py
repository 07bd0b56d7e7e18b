import pytest

from ptq.formats import FP8_E4M3, INT4, INT8, PerChannel, PerGroup
from ptq.scheme import PRESETS, ActivationScheme, Scheme, get_scheme, matches_any


def test_presets_match_the_documented_layouts() -> None:
    w4a8 = get_scheme("w4a8")
    assert w4a8.weight.element == INT4 and w4a8.weight.granularity == PerGroup(128)
    assert w4a8.weight.symmetric
    assert w4a8.activation == ActivationScheme(element=FP8_E4M3, granularity="token", dynamic=True)
    w8a8 = get_scheme("w8a8")
    assert w8a8.weight.element == INT8 and w8a8.weight.granularity == PerChannel()
    assert w8a8.activation is not None and w8a8.activation.element == INT8
    assert get_scheme("w4a16").activation is None
    fp8 = get_scheme("fp8")
    assert fp8.weight.element == FP8_E4M3 and fp8.activation is not None


def test_group_size_is_a_ceiling_for_presets() -> None:
    s = get_scheme("w4a16")
    assert s.weight_format_for("q_proj", 576).granularity == PerGroup(64)  # 576 = 9 * 64
    assert s.weight_format_for("down_proj", 1536).granularity == PerGroup(128)
    with pytest.raises(ValueError, match="odd_proj"):
        s.weight_format_for("odd_proj", 24)  # largest power of two is 8 < 16


def test_explicit_group_size_must_divide() -> None:
    s = get_scheme("w4a16").with_overrides(group_size=128)
    with pytest.raises(ValueError, match=r"q_proj.*pick a divisor|does not divide.*q_proj"):
        s.weight_format_for("model.layers.0.q_proj", 576)
    assert s.weight_format_for("x", 256).granularity == PerGroup(128)


def test_unknown_scheme_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="w4a8"):
        get_scheme("w5a5")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_scheme_round_trips_through_dict(name: str) -> None:
    s = PRESETS[name]
    assert Scheme.from_dict(s.to_dict()) == s


def test_from_dict_rejects_unknown_keys() -> None:
    d = get_scheme("w4a8").to_dict()
    d["wieght"] = 1
    with pytest.raises(ValueError, match="wieght"):
        Scheme.from_dict(d)
    d = get_scheme("w4a8").to_dict()
    d["weight"]["element"]["bitz"] = 4
    with pytest.raises(ValueError, match="bitz"):
        Scheme.from_dict(d)


def test_ignore_patterns() -> None:
    assert matches_any("lm_head", ["lm_head"])
    assert matches_any("model.layers.3.mlp.down_proj", ["down_proj"])
    assert not matches_any("model.layers.3.mlp.down_proj_x", ["down_proj"])
    assert matches_any("model.layers.3.mlp.up_proj", [r"re:.*layers\.3\..*"])
    assert not matches_any("model.layers.13.mlp.up_proj", [r"re:.*\.layers\.3\..*"])
