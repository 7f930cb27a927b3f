"""Tests of the flag registry pydriftn.flags."""

import itertools

import numpy as np
import pytest

from pydriftn import flags
from pydriftn.flags import PixelFlag, SampleFlag

REQUIRED_PIXEL = ["BAD_PIXEL", "SATURATED", "BLEED", "COSMIC_RAY", "LOW_WEIGHT", "TRANSIENT", "STREAK", "EDGE"]
REQUIRED_SAMPLE = ["TRUNCATED", "SATURATED", "MASKED_PIXELS", "COSMIC_RAY", "DEBLENDED", "BLENDED",
                   "NEAR_EDGE", "SHUTTER_RAMP", "FEW_VALID_SAMPLES", "SATELLITE", "UNMATCHED", "BLEND_MINOR"]


@pytest.mark.parametrize("cls, required", [(PixelFlag, REQUIRED_PIXEL), (SampleFlag, REQUIRED_SAMPLE)])
def test_registry_single_bits_unique_and_described(cls, required):
    members = list(cls)
    assert set(required) <= set(cls.__members__)
    values = [int(m) for m in members]
    # each flag is one distinct bit: no aliases, no multi-bit members
    assert all(v > 0 and v & (v - 1) == 0 for v in values)
    assert len(set(values)) == len(values) == len(cls.__members__)
    assert all(m.description and isinstance(m.description, str) for m in members)
    table = flags.flag_table(cls)
    assert list(table["name"]) == [m.name for m in members]
    assert (table["value"] == 2 ** table["bit"]).all()


def test_pixel_flags_fit_the_mask_dtype():
    total = 0
    for m in PixelFlag:
        total |= int(m)
    assert total <= np.iinfo(flags.PIXEL_DTYPE).max


def test_decode_encode_round_trip_all_subsets():
    members = list(SampleFlag)
    rng = np.random.default_rng(3)
    for _ in range(200):
        k = rng.integers(0, len(members) + 1)
        chosen = [members[i] for i in sorted(rng.choice(len(members), size=k, replace=False))]
        value = 0
        for m in chosen:
            value |= int(m)
        names = flags.decode_flags(value)
        assert names == [m.name for m in chosen]  # bit order
        assert flags.encode_flags(names) == value
        assert flags.encode_flags("|".join(names)) == value


def test_decode_uses_the_right_registry():
    v = PixelFlag.SATURATED | PixelFlag.BLEED
    assert flags.decode_flags(v) == ["SATURATED", "BLEED"]  # inferred from the member's class
    assert flags.decode_flags(int(v), "pixel") == ["SATURATED", "BLEED"]
    assert flags.decode_flags(int(SampleFlag.TRUNCATED | SampleFlag.UNMATCHED)) == ["TRUNCATED", "UNMATCHED"]
    # a pixel value decoded with the sample registry means something else
    assert flags.decode_flags(int(PixelFlag.BLEED), "pixel") == ["BLEED"]
    assert flags.decode_flags(int(PixelFlag.BLEED), "sample") == [SampleFlag(int(PixelFlag.BLEED)).name]


def test_decode_keeps_unknown_bits_and_rejects_negative():
    top = 1 << 20
    assert flags.decode_flags(int(SampleFlag.BLENDED) | top) == ["BLENDED", "BIT20"]
    with pytest.raises(ValueError):
        flags.decode_flags(-1)


def test_encode_unknown_name_lists_known():
    with pytest.raises(ValueError, match="SATURATED"):
        flags.encode_flags(["SATURATD"], "pixel")
    with pytest.raises(ValueError, match="registry"):
        flags.encode_flags(["SATURATED"], "nonsense")


def test_module_constants_are_sample_flags():
    for name in REQUIRED_SAMPLE:
        assert getattr(flags, name) is SampleFlag[name]


def test_default_bad_pixel_flags():
    bad = flags.DEFAULT_BAD_PIXEL_FLAGS
    for name in ["BAD_PIXEL", "SATURATED", "BLEED", "COSMIC_RAY", "STREAK"]:
        assert bad & PixelFlag[name]
    # a transient is the signal we look for; edges and interpolated pixels stay usable
    for name in ["TRANSIENT", "EDGE", "INTERPOLATED"]:
        assert not bad & PixelFlag[name]


def test_has_any_and_count_flags_vectorised():
    m = np.array([0, int(PixelFlag.SATURATED), int(PixelFlag.SATURATED | PixelFlag.BLEED),
                  int(PixelFlag.COSMIC_RAY)], dtype=np.uint16)
    assert flags.has_any(m, "SATURATED|BLEED", "pixel").tolist() == [False, True, True, False]
    assert flags.has_any(m, int(PixelFlag.COSMIC_RAY)).tolist() == [False, False, False, True]
    counts = flags.count_flags(m, "pixel")
    assert counts["SATURATED"] == 2 and counts["BLEED"] == 1 and counts["COSMIC_RAY"] == 1
    assert counts["BAD_PIXEL"] == 0
    with pytest.raises(TypeError):
        flags.has_any(np.array([1.0]), 1)


def test_flags_combine_with_numpy_columns():
    col = np.zeros(5, dtype=np.int64)
    col[[1, 3]] |= SampleFlag.COSMIC_RAY
    col[3] |= SampleFlag.SATELLITE
    sel = (col & (SampleFlag.COSMIC_RAY | SampleFlag.SATELLITE)) != 0
    assert sel.tolist() == [False, True, False, True, False]
    assert [flags.decode_flags(v) for v in col[[1, 3]]] == [["COSMIC_RAY"], ["COSMIC_RAY", "SATELLITE"]]


def test_sample_flag_names_disjoint_bits_for_all_pairs():
    for a, b in itertools.combinations(SampleFlag, 2):
        assert int(a) & int(b) == 0
