"""validate: declared shape/dtype before allocation, then the values of a map."""

import numpy as np
import pytest

from defectscope.errors import DtypeNotAllowed, LowSignal, NonFinite, ShapeMismatch, TooLarge
from defectscope.preprocessing.config import Limits, PipelineConfig
from defectscope.preprocessing.validate import check_declared, check_values

CONFIG = PipelineConfig()


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


def peaked_map(seed=0, shape=(20, 24, 28), peak=5000.0):
    rng = np.random.default_rng(seed)
    volume = rng.poisson(2.0, size=shape).astype(np.float32)
    volume[7, 11, 5] = peak
    return volume


# --- check_declared ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<u2", "<u4", "<i4", np.float32, np.dtype("<u2")])
def test_allowed_dtypes_pass(dtype):
    shape, dt = check_declared([64, 64, 64], dtype)
    assert shape == (64, 64, 64) and dt.str in Limits().allowed_dtypes


@pytest.mark.parametrize("dtype", [">f4", "|u1", "<i8", "<f2", "<c8", "|b1", "O", "|V12", "<U4", "[('a', '<f4')]", "float128x"])
def test_other_dtypes_refused(dtype):
    with pytest.raises(DtypeNotAllowed) as info:
        check_declared([8, 8, 8], dtype)
    one_line(info)


def test_big_endian_allowed_only_from_files():
    # A file declares its byte order, so >f4 there is unambiguous; on the wire the header is literal.
    assert check_declared([8, 8, 8], ">f4", any_byte_order=True)[1] == np.dtype("<f4")
    with pytest.raises(DtypeNotAllowed, match=">f4"):
        check_declared([8, 8, 8], ">f4")


@pytest.mark.parametrize("shape", [[64, 64], [1, 2, 3, 4, 5], [], [64, 0, 64], [64, -1, 64], [64, 64.0, 64], "64,64,64", 64, [True, 4, 4]])
def test_bad_shapes_refused(shape):
    with pytest.raises(ShapeMismatch) as info:
        check_declared(shape, "<f4")
    one_line(info)


def test_batch_rank_only_where_allowed():
    assert check_declared([3, 16, 16, 16], "<f4")[0] == (3, 16, 16, 16)
    with pytest.raises(ShapeMismatch):
        check_declared([3, 16, 16, 16], "<f4", allow_batch=False)


def test_too_large_refused_before_allocation():
    # 10^12 voxels would be 4 TB: refused from the numbers alone.
    with pytest.raises(TooLarge) as info:
        check_declared([10_000, 10_000, 10_000], "<f4")
    assert "1000000000000 voxels" in one_line(info)
    with pytest.raises(TooLarge, match="batch of 65"):
        check_declared([65, 8, 8, 8], "<f4")
    small = Limits(max_message_bytes=1000)
    with pytest.raises(TooLarge, match="bytes"):
        check_declared([8, 8, 8], "<f4", small)


# --- check_values --------------------------------------------------------------------------------
def test_good_map_passes_unchanged():
    volume = peaked_map()
    out, warnings = check_values(volume, CONFIG)
    assert warnings == [] and np.array_equal(out, volume)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(bad):
    volume = peaked_map()
    volume[3, 4, 5] = bad
    volume[0, 0, 0] = bad
    with pytest.raises(NonFinite) as info:
        check_values(volume, CONFIG)
    assert "2 non-finite voxels" in one_line(info)


def test_small_negatives_clipped_with_warning_and_input_untouched():
    volume = peaked_map()
    volume[1, 2, 3] = -40.0  # 0.8 % of the 5000-count maximum: background subtraction
    volume[2, 2, 2] = -1.0
    before = volume.copy()
    out, warnings = check_values(volume, CONFIG)
    assert [w["reason"] for w in warnings] == ["NEGATIVE_CLIPPED"]
    assert "2 negative voxels" in warnings[0]["message"] and "-40" in warnings[0]["message"]
    assert out.min() == 0 and out[1, 2, 3] == 0 and out[7, 11, 5] == 5000
    assert np.array_equal(volume, before)


def test_in_place_clipping_edits_the_buffer():
    volume = peaked_map()
    volume[1, 2, 3] = -4.0
    out, _ = check_values(volume, CONFIG, in_place=True)
    assert out is volume and volume[1, 2, 3] == 0


def test_deep_negatives_are_not_intensities():
    volume = peaked_map()
    volume[1, 2, 3] = -100.0  # 2 % of the maximum
    with pytest.raises(NonFinite) as info:
        check_values(volume, CONFIG)
    message = one_line(info)
    assert "negative counts are not intensities" in message and "-100" in message and "5000" in message


def test_negative_integer_map_refused():
    volume = peaked_map().astype(np.int32)
    volume[0, 0, 0] = -3000
    with pytest.raises(NonFinite, match="negative counts"):
        check_values(volume, CONFIG)


def test_all_zero_refused():
    with pytest.raises(LowSignal, match="all zero"):
        check_values(np.zeros((8, 8, 8), np.float32), CONFIG)


def test_constant_refused():
    with pytest.raises(LowSignal) as info:
        check_values(np.full((8, 8, 8), 7.0, np.float32), CONFIG)
    assert "constant" in one_line(info) and "7" in str(info.value)


def test_peak_below_minimum_refused():
    volume = peaked_map(peak=9.0)
    volume[volume > 9] = 9
    with pytest.raises(LowSignal) as info:
        check_values(volume, CONFIG)
    assert "below min_peak_counts 10" in one_line(info)
    # The threshold is the config's: a model trained on normalised maps may lower it.
    check_values(volume, PipelineConfig(min_peak_counts=1.0))


@pytest.mark.parametrize("dtype, peak", [("<f4", 1e37), ("<f4", 3.4e38), ("<f8", 1e300)])
def test_values_beyond_the_pipeline_range_are_refused_with_the_reason(dtype, peak):
    """Finite but huge maps are refused NON_FINITE saying why (an f8 map once got '187907 non-finite voxels')."""
    from defectscope.errors import NonFinite
    from defectscope.preprocessing.pipeline import prepare

    volume = np.zeros((16, 16, 16), dtype=dtype)
    volume[6:10, 6:10, 6:10] = peak
    with pytest.raises(NonFinite, match="beyond 1e\\+30"):
        prepare(volume)
