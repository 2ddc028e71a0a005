"""round_to is correctly rounded (nearest, ties to even) into float32 / float16 / bfloat16.

The oracle is exact rational arithmetic (``fractions.Fraction``) on the IEEE parameters of
each format, independent of NumPy's and ml_dtypes' conversions: it finds the two
representable neighbours of x by scaling to the format's quantum at x's binade and rounds
the exact quotient. Inputs are drawn where rounding is hard: exact ties and values a few
float64 ulps (or 2^-k relative) either side of a tie, subnormals, the overflow threshold,
NaN, infinities and signed zeros.

ulp_distance is checked against an independent rank oracle: for the 16-bit formats, the
position of each value in the sorted list of all finite and infinite values (±0 share
one position); for float32, steps of ``np.nextafter``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lora_ref.dtypes import (
    BITS_VIEW,
    SMALLEST_SUBNORMAL,
    UNIT_ROUNDOFF,
    bfloat16,
    bits_of,
    check_float_array,
    float16,
    float32,
    float64,
    resolve_dtype,
    round_to,
    ulp_distance,
)
from lora_ref.errors import DTypeError, LoraRefError

#: (precision p incl. hidden bit, minimum normal exponent, maximum exponent) of each format.
FORMATS = {float32: (24, -126, 127), float16: (11, -14, 15), bfloat16: (8, -126, 127)}
TARGETS = list(FORMATS)
IDS = ["float32", "float16", "bfloat16"]


def oracle_round(x: float, dtype: np.dtype) -> float:
    """Round float64 ``x`` to nearest-even in ``dtype`` with exact rationals; return it as float64.

    |x| in [2^e, 2^(e+1)) has quantum q = 2^(max(e, emin) - p + 1) (the max makes the
    subnormal range share emin's quantum). n = |x|/q is rounded to the nearest integer, ties
    to even; n·q >= 2^(emax+1) overflows to infinity (this includes the tie at the largest
    finite value + half a quantum, whose even neighbour is 2^(emax+1)).
    """
    p, emin, emax = FORMATS[dtype]
    if math.isnan(x) or math.isinf(x) or x == 0.0:
        return x
    exact = abs(Fraction(x))
    e = math.frexp(abs(x))[1] - 1  # |x| in [2^e, 2^(e+1))
    quantum = Fraction(2) ** (max(e, emin) - p + 1)
    n_floor, rest = divmod(exact, quantum)
    frac = rest / quantum
    n = int(n_floor)
    if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and n % 2 == 1):
        n += 1
    magnitude = n * quantum
    if magnitude >= Fraction(2) ** (emax + 1):
        return math.copysign(math.inf, x)
    return math.copysign(float(magnitude), x)  # exact: n·q has at most p significant bits


def assert_correctly_rounded(xs: list[float], dtype: np.dtype) -> None:
    got = round_to(np.array(xs, dtype=float64), dtype)
    assert got.dtype == dtype
    for x, g in zip(xs, got):
        want = oracle_round(x, dtype)
        if math.isnan(want):
            assert np.isnan(np.float64(g)), f"round_to({x!r}) = {g!r}, want NaN"
            continue
        # the oracle's value is representable in dtype, so converting it is exact; compare bits
        want_bits = np.array([want], dtype=float64).astype(dtype).view(BITS_VIEW[dtype])[0]
        got_bits = np.array([g], dtype=dtype).view(BITS_VIEW[dtype])[0]
        assert got_bits == want_bits, f"{dtype}: round_to({x!r} = {x.hex()}) = {float(g)!r}, want {want!r}"


def representable(dtype: np.dtype) -> st.SearchStrategy[float]:
    """Any finite value of ``dtype`` (drawn by bit pattern, so subnormals are common), as float64."""
    width = BITS_VIEW[dtype].itemsize * 8

    def to_value(raw: int) -> float:
        return float(np.array([raw], dtype=BITS_VIEW[dtype]).view(dtype).astype(float64)[0])

    return st.integers(0, 2**width - 1).map(to_value).filter(math.isfinite)


def next_up(value: float, dtype: np.dtype) -> float:
    """The next larger value of ``dtype`` after representable ``value`` (by bit pattern)."""
    if value == 0.0:
        return SMALLEST_SUBNORMAL[dtype]
    raw = int(np.array([value], dtype=float64).astype(dtype).view(BITS_VIEW[dtype])[0])
    raw = raw + 1 if value > 0 else raw - 1  # magnitude up for positives, down for negatives
    return float(np.array([raw], dtype=BITS_VIEW[dtype]).view(dtype).astype(float64)[0])


@st.composite
def hard_cases(draw: st.DrawFn, dtype: np.dtype) -> float:
    """A tie between two neighbours in ``dtype``, or a value a tiny distance either side of it."""
    low = draw(representable(dtype))
    high = next_up(low, dtype)
    if math.isinf(high):  # above the largest finite value the overflow threshold plays the tie
        high = float(Fraction(2) ** (FORMATS[dtype][2] + 1))
    tie = (low + high) / 2  # exact in float64: p + 1 <= 53 bits
    kind = draw(st.sampled_from(["tie", "ulps", "relative"]))
    if kind == "tie":
        return tie
    if kind == "ulps":
        steps = draw(st.integers(-4, 4))
        value = tie
        for _ in range(abs(steps)):
            value = math.nextafter(value, math.copysign(math.inf, steps))
        return value
    k = draw(st.integers(9, 60))
    return tie * (1 + draw(st.sampled_from([-1, 1])) * 2.0**-k)


@pytest.mark.parametrize("dtype", TARGETS, ids=IDS)
@given(data=st.data())
def test_round_to_matches_exact_oracle_on_hard_cases(dtype: np.dtype, data: st.DataObject) -> None:
    xs = data.draw(st.lists(hard_cases(dtype), min_size=1, max_size=16))
    assert_correctly_rounded(xs, dtype)


@pytest.mark.parametrize("dtype", TARGETS, ids=IDS)
@given(xs=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=32))
def test_round_to_matches_exact_oracle_on_any_float64(dtype: np.dtype, xs: list[float]) -> None:
    assert_correctly_rounded(xs, dtype)


@pytest.mark.parametrize("dtype", TARGETS, ids=IDS)
@given(x=st.floats(min_value=-1e-30, max_value=1e-30))
def test_round_to_tiny_values_and_subnormals(dtype: np.dtype, x: float) -> None:
    scale = SMALLEST_SUBNORMAL[dtype] * 2**8  # scale into the subnormal range of each format
    assert_correctly_rounded([x * 1e30 * scale], dtype)


@pytest.mark.parametrize("dtype", TARGETS, ids=IDS)
def test_round_to_known_hard_points(dtype: np.dtype) -> None:
    p, emin, emax = FORMATS[dtype]
    u = UNIT_ROUNDOFF[dtype]
    largest = float((2 - Fraction(2) ** (1 - p)) * Fraction(2) ** emax)
    threshold = float((2 - Fraction(2) ** -p) * Fraction(2) ** emax)  # largest + half a quantum
    eta = SMALLEST_SUBNORMAL[dtype]
    xs = [
        1 + u,  # tie between 1 and 1 + 2u: even is 1
        1 + 3 * u,  # tie between 1 + 2u and 1 + 4u: even is 1 + 4u
        1 + u + 2.0**-50,  # just above the tie (the double-rounding trap for bfloat16 via float32)
        1 + u - 2.0**-50,
        1 + u + 2.0**-30,
        largest, threshold, math.nextafter(threshold, 0), math.nextafter(threshold, math.inf), 1e300, -1e300,
        eta, eta / 2, math.nextafter(eta / 2, 1), 3 * eta / 2, eta / 4, 2.0**emin, 2.0**emin - eta / 2,
        0.0, -0.0, math.inf, -math.inf, math.nan, -eta / 2, -math.nextafter(eta / 2, 1),
    ]
    assert_correctly_rounded(xs, dtype)


@pytest.mark.parametrize("dtype", TARGETS, ids=IDS)
def test_round_to_keeps_signed_zero_nan_and_infinity(dtype: np.dtype) -> None:
    got = round_to(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -SMALLEST_SUBNORMAL[dtype] / 4]), dtype)
    bits = bits_of(got)
    sign = BITS_VIEW[dtype].type(1) << (BITS_VIEW[dtype].itemsize * 8 - 1)
    assert bits[0] == 0 and bits[1] == sign and bits[5] == sign  # +0, -0, and a negative underflow to -0
    assert np.isinf(got[2].astype(float64)) and got[2] > 0 and np.isinf(got[3].astype(float64)) and got[3] < 0
    assert np.isnan(got[4].astype(float64))


def test_round_to_float64_is_an_exact_copy() -> None:
    x = np.array([1 / 3, -0.0, np.nan, 5e-324])
    y = round_to(x, "float64")
    assert y is not x and np.array_equal(bits_of(y), bits_of(x))


@pytest.mark.parametrize("bad", ["int8", "float8", np.int32, np.complex64, object, "bfloat17"])
def test_resolve_dtype_refuses_unsupported(bad: object) -> None:
    with pytest.raises(DTypeError):
        resolve_dtype(bad)
    with pytest.raises(LoraRefError):
        round_to(np.zeros(2), bad)


def test_resolve_dtype_names_and_float64_switch() -> None:
    assert resolve_dtype("bfloat16") == bfloat16 and resolve_dtype(np.float16) == float16
    assert resolve_dtype(ml_dtypes.bfloat16) == bfloat16
    with pytest.raises(DTypeError):
        resolve_dtype("float64", allow_float64=False)
    with pytest.raises(DTypeError, match="x"):
        check_float_array(np.zeros(2, np.int64), "x")


# -- ulp_distance ------------------------------------------------------------------------------


def _rank_table(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Every non-NaN value of a 16-bit format, sorted and de-duplicated (±0 -> one entry)."""
    with np.errstate(invalid="ignore"):  # signalling-NaN patterns
        every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(dtype).astype(float64)
    return np.unique(every[~np.isnan(every)]), every


@pytest.mark.parametrize("dtype", [float16, bfloat16], ids=["float16", "bfloat16"])
@given(a=st.integers(0, 2**16 - 1), b=st.integers(0, 2**16 - 1))
def test_ulp_distance_is_rank_difference_16bit(dtype: np.dtype, a: int, b: int) -> None:
    table, every = _RANKS[dtype]
    va, vb = every[a], every[b]
    assume(not (np.isnan(va) or np.isnan(vb)))
    want = abs(int(np.searchsorted(table, va)) - int(np.searchsorted(table, vb)))
    got = ulp_distance(np.array([a], np.uint16).view(dtype), np.array([b], np.uint16).view(dtype))
    assert int(got[0]) == want


_RANKS = {dtype: _rank_table(dtype) for dtype in (float16, bfloat16)}


@given(x=st.floats(width=32, allow_nan=False, allow_infinity=False), steps=st.integers(0, 40),
       direction=st.sampled_from([-np.inf, np.inf]))
def test_ulp_distance_counts_nextafter_steps_float32(x: float, steps: int, direction: float) -> None:
    # np.nextafter visits every float32 once (from -2^-149 it goes to -0, then to +2^-149), and
    # -0 and +0 count as one value, so the distance is the number of steps that moved.
    a = np.array([x], dtype=float32)
    b, moved = a.copy(), 0
    for _ in range(steps):
        with np.errstate(over="ignore"):  # stepping past the largest float32 gives inf
            step = np.nextafter(b, np.float32(direction))
        moved += int(step[0] != b[0])
        b = step
    assert int(ulp_distance(a, b)[0]) == moved == int(ulp_distance(b, a)[0])


@pytest.mark.parametrize("dtype", TARGETS + [float64], ids=IDS + ["float64"])
def test_ulp_distance_special_values(dtype: np.dtype) -> None:
    a = np.array([0.0, np.nan, np.nan, 1.0, np.inf], dtype=float64).astype(dtype)
    b = np.array([-0.0, np.nan, 1.0, np.nan, np.inf], dtype=float64).astype(dtype)
    got = ulp_distance(a, b)
    big = np.iinfo(np.int64).max
    assert list(got) == [0, 0, big, big, 0]
