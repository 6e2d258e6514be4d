import pytest

from lowbit.errors import LowbitError
from lowbit.formats import PRESETS, parse_format, parse_formats


def test_presets_cover_the_issue_formats():
    for name in ("W8A8", "W8A16", "W4A16", "W4A8-FP8", "W8A8-FP8"):
        assert name in PRESETS
    w4a8 = parse_format("w4a8-fp8")
    assert (w4a8.weight.dtype, w4a8.weight.granularity, w4a8.act.dtype) == ("int4", "per_channel", "fp8")
    assert parse_format("W8A16").act is None and parse_format("W8A16").w_bits == 8


@pytest.mark.parametrize("spec,gran,block", [("W4A16:pt", "per_tensor", None), ("W8A8:per-channel", "per_channel", None),
                                             ("W4A16:b64", "block", 64), ("W4A16:block128", "block", 128)])
def test_granularity_suffix(spec, gran, block):
    f = parse_format(spec)
    assert f.weight.granularity == gran and f.weight.block_size == block
    cfg = f.weight.to_modelopt()
    assert cfg["num_bits"] == (4 if spec.startswith("W4") else 8)
    if block:
        assert cfg["block_sizes"] == {1: block}
    else:
        assert cfg["axis"] == (0 if gran == "per_channel" else None)


def test_fp8_maps_to_e4m3():
    assert parse_format("W8A8-FP8").act.to_modelopt() == {"num_bits": (4, 3), "axis": None}


@pytest.mark.parametrize("bad", ["W3A8", "W4A16:b1", "W4A16:pz", "FP16:pc", ""])
def test_bad_format_names_say_what_is_known(bad):
    with pytest.raises(LowbitError, match="format|granularity|block|float"):
        parse_format(bad)


def test_parse_formats_list():
    assert [f.name for f in parse_formats("W8A8, W4A16:b32")] == ["W8A8", "W4A16:b32"]
