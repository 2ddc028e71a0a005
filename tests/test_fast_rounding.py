"""The merge's conversion kernels (lora_ref.dtypes) against independent references.

* widen_to_float32: every one of the 2^16 float16 and bfloat16 bit patterns against NumPy's and
  ml_dtypes' own widening;
* round_to_grid (RN_t as a float64 value, the bracket ends of SPEC 3.2): the exact rational oracle
  of test_dtypes on ties, near-ties (a few float64 ulps and 2^-k relative away), subnormals of t,
  the overflow threshold, signed zeros, ±inf and NaN; and, with store_exact, against ml_dtypes'
  float32 -> bfloat16 cast and NumPy's float32 -> float16 cast on float32 bit patterns: a sample of
  2^22 patterns plus every tie and its neighbours by default, all 2^32 patterns in chunks with
  LORA_REF_EXHAUSTIVE=1 (minutes);
* store_exact: every finite float16 / bfloat16 value back to its own bits, values past the range
  to ±inf.
"""

from __future__ import annotations

import math
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.dtypes import (
    SMALLEST_NORMAL, bfloat16, float16, float32, float64, round_scalar, round_to_grid, store_exact, widen_to_float32,
)
from test_dtypes import FORMATS, hard_cases, oracle_round

GRID_TARGETS = [float32, float16, bfloat16]
GRID_IDS = ["float32", "float16", "bfloat16"]
NARROW = [float16, bfloat16]
NARROW_IDS = ["float16", "bfloat16"]


def _all_patterns(dtype: np.dtype) -> np.ndarray:
    return np.arange(2**16, dtype=np.uint16).view(dtype)


@pytest.mark.parametrize("dtype", NARROW, ids=NARROW_IDS)
def test_widen_to_float32_matches_the_casts_on_every_bit_pattern(dtype: np.dtype) -> None:
    x = _all_patterns(dtype)
    with np.errstate(invalid="ignore"):
        want = x.astype(np.float32)  # NumPy's float16 cast; ml_dtypes' bfloat16 cast
    got = widen_to_float32(x, np.empty(x.shape, np.float32))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def _grid(xs: np.ndarray, dtype: np.dtype, normal: bool = False) -> np.ndarray:
    out = np.array(xs, dtype=float64)
    return round_to_grid(out, dtype, np.empty_like(out), normal=normal)


def _check_grid(xs: list[float], dtype: np.dtype) -> None:
    got = _grid(np.array(xs), dtype)
    largest = 2.0 ** (FORMATS[dtype][2] + 1)
    for x, g in zip(xs, got.tolist()):
        if not math.isfinite(x):
            assert math.isnan(g), (x, g)
            continue
        want = oracle_round(x, dtype)
        if math.isinf(want):  # past the range: a finite multiple at or beyond 2^(e_max+1), x's sign
            assert math.isnan(g) or (abs(g) >= largest and math.copysign(1, g) == math.copysign(1, x)), (x, g)
            continue
        if want == 0:  # a rounded 0 is +0 whatever x's sign (the merge treats it as undecided)
            assert g == 0 and math.copysign(1, g) == 1, (x, g)
            continue
        assert g == want, f"{dtype}: round_to_grid({x!r} = {x.hex()}) = {g!r}, want {want!r}"
        if abs(x) >= SMALLEST_NORMAL[dtype]:  # the promise normal=True relies on
            assert _grid(np.array([x]), dtype, normal=True)[0] == want


@pytest.mark.parametrize("dtype", GRID_TARGETS, ids=GRID_IDS)
@given(data=st.data())
def test_round_to_grid_matches_the_exact_oracle_on_hard_cases(dtype: np.dtype, data: st.DataObject) -> None:
    _check_grid(data.draw(st.lists(hard_cases(dtype), min_size=1, max_size=16)), dtype)


@pytest.mark.parametrize("dtype", GRID_TARGETS, ids=GRID_IDS)
@given(xs=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=32))
def test_round_to_grid_matches_the_exact_oracle_on_any_float64(dtype: np.dtype, xs: list[float]) -> None:
    _check_grid(xs, dtype)


@pytest.mark.parametrize("dtype", GRID_TARGETS, ids=GRID_IDS)
@given(x=st.floats(min_value=-1.0, max_value=1.0), binade=st.integers(-30, 30))
def test_round_to_grid_in_the_subnormal_range_of_t(dtype: np.dtype, x: float, binade: int) -> None:
    _check_grid([x * SMALLEST_NORMAL[dtype] * 2.0 ** (binade / 3)], dtype)


@pytest.mark.parametrize("dtype", GRID_TARGETS, ids=GRID_IDS)
def test_round_to_grid_named_points(dtype: np.dtype) -> None:
    p, emin, emax = FORMATS[dtype]
    eta = 2.0 ** (emin - p + 1)
    largest = (2 - 2.0 ** (1 - p)) * 2.0**emax
    threshold = (2 - 2.0**-p) * 2.0**emax
    _check_grid([1 + 2.0**-p, 1 + 3 * 2.0**-p, 1 + 2.0**-p + 2.0**-52, 1 - 2.0 ** (-p - 1), largest, threshold,
                 math.nextafter(threshold, 0), 2.0 ** (emax + 1), 1e300, -1e300, 2.0**1020, eta, eta / 2, -eta / 2,
                 3 * eta / 2, eta / 4, 2.0**emin, 2.0**emin - eta / 2, 0.0, -0.0, math.inf, -math.inf, math.nan,
                 5e-324, -5e-324], dtype)


@pytest.mark.parametrize("dtype", NARROW, ids=NARROW_IDS)
def test_store_exact_keeps_every_value_and_overflows_to_inf(dtype: np.dtype) -> None:
    x = _all_patterns(dtype)
    finite = np.isfinite(x.astype(np.float32))
    top = 2.0 ** (FORMATS[dtype][2] + 1)  # round_to_grid's values past the range: multiples of the top spacing from here
    beyond = np.array([top, -top, top * (1 + 2.0 ** (1 - FORMATS[dtype][0])), 1e300, -1e300, 2.0**200])
    values = np.concatenate([x[finite].astype(float64), beyond])
    out = np.empty(values.shape, dtype)
    store_exact(values, out, np.empty_like(values))
    n = int(finite.sum())
    assert np.array_equal(out[:n].view(np.uint16), x[finite].view(np.uint16))
    tail = out[n:].astype(np.float32)
    assert np.all(np.isinf(tail)) and np.array_equal(np.sign(tail), np.sign(beyond))


def _float32_patterns() -> list[np.ndarray]:
    """Chunks of float32 bit patterns: all 2^32 with LORA_REF_EXHAUSTIVE=1, else a sample and every tie."""
    if os.environ.get("LORA_REF_EXHAUSTIVE") == "1":
        step = 1 << 24
        return [np.arange(start, start + step, dtype=np.uint64).astype(np.uint32) for start in range(0, 1 << 32, step)]
    rng = np.random.default_rng(13)
    sample = rng.integers(0, 2**32, 1 << 22, dtype=np.uint64).astype(np.uint32)
    ties16 = np.arange(2**16, dtype=np.uint32) << np.uint32(16) | np.uint32(0x8000)  # every bfloat16 tie
    ties13 = rng.integers(0, 2**19, 1 << 18, dtype=np.uint64).astype(np.uint32) << np.uint32(13) | np.uint32(0x1000)
    edges = [ties - np.uint32(1) for ties in (ties16, ties13)] + [ties + np.uint32(1) for ties in (ties16, ties13)]
    return [sample, ties16, ties13, *edges]


@pytest.mark.parametrize("dtype", NARROW, ids=NARROW_IDS)
def test_grid_and_store_match_the_float32_casts(dtype: np.dtype) -> None:
    """RN_t of float32 inputs through the merge's path (widen to float64, round_to_grid, store_exact)
    against ml_dtypes' float32 -> bfloat16 and NumPy's float32 -> float16 casts (one rounding from
    float32 is correct there, so these peers compute RN_t too). ±inf and NaN inputs are left out:
    round_to_grid gives NaN for them by design, and a rounded 0 is +0 (the merge resolves those
    elements exactly)."""
    peer = ml_dtypes.bfloat16 if dtype == bfloat16 else np.float16
    for bits in _float32_patterns():
        x = bits.view(np.float32)
        x = x[np.isfinite(x)]
        wide = x.astype(float64)
        scratch = np.empty_like(wide)
        with np.errstate(over="ignore"):
            round_to_grid(wide, dtype, scratch)
            want = x.astype(peer)
        got = np.empty(x.shape, dtype)
        store_exact(wide, got, scratch)
        zero = want.astype(np.float32) == 0  # a rounded 0 is +0 whatever the sign (undecided in the merge)
        assert not got.view(np.uint16)[zero].any()
        mismatch = np.flatnonzero((got.view(np.uint16) != want.view(np.uint16)) & ~zero)
        assert mismatch.size == 0, f"{dtype}: float32 {x[mismatch[:3]].view(np.uint32)} -> {got[mismatch[:3]]}, want {want[mismatch[:3]]}"


@pytest.mark.parametrize("dtype", GRID_TARGETS, ids=GRID_IDS)
@given(data=st.data())
def test_round_scalar_matches_the_exact_oracle(dtype: np.dtype, data: st.DataObject) -> None:
    """round_scalar (the exact resolution's one-element rounding) on ties, near-ties, subnormals,
    overflow, signed zeros and non-finite values, bit for bit against the oracle."""
    x = data.draw(st.one_of(hard_cases(dtype), st.floats(allow_nan=True, allow_infinity=True, width=64),
                            st.floats(-1.0, 1.0).map(lambda v: v * SMALLEST_NORMAL[dtype])))
    got = round_scalar(x, dtype)
    assert got.dtype == dtype
    want = oracle_round(x, dtype)
    if math.isnan(want):
        assert np.isnan(np.float64(got))
        return
    width = {float32: np.uint32}.get(dtype, np.uint16)
    assert np.array(got).view(width) == np.array(want).astype(dtype).view(width), (x, got, want)


@pytest.mark.parametrize("dtype", GRID_TARGETS, ids=GRID_IDS)
@pytest.mark.parametrize("x", [5.109351192408883e294, -1e300, 2.0**128, -(2.0**1023), 1.7e308])
def test_round_scalar_past_every_storage_range_is_signed_inf(dtype: np.dtype, x: float) -> None:
    """Finite float64 values far past t's range (where round_to_grid's c would overflow) round to ±inf,
    as the oracle says (found by hypothesis: bfloat16 at 5.1e294 raised OverflowError)."""
    want = np.array(oracle_round(x, dtype)).astype(dtype)
    got = round_scalar(x, dtype)
    assert np.isinf(np.float64(want)) and np.array(got).tobytes() == want.tobytes()
