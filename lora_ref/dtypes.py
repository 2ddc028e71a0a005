"""Supported dtypes, unit roundoffs, and correctly rounded conversion from float64.

The reference computes in float64 and rounds once to the output dtype with
round-to-nearest-even. NumPy rounds float64 -> float32 and float64 -> float16 correctly,
but ml_dtypes converts float64 -> bfloat16 through float32, which rounds twice
(1 + 2^-8 + 2^-30 becomes 1.0 instead of 1 + 2^-7). :func:`round_to` therefore goes
through float32 with *round-to-odd*, which makes the second rounding correct (Boldo and
Melquiond, "When double rounding is odd", 2005: needs p + 2 bits, float32 has 24 >= 8 + 2).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from .errors import DTypeError

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)

#: Storage dtypes of weights, adapters and activations, by their user-facing name.
STORAGE_DTYPES: dict[str, np.dtype] = {"float32": float32, "float16": float16, "bfloat16": bfloat16}
#: Storage dtypes plus the float64 oracle.
FLOAT_DTYPES: dict[str, np.dtype] = {**STORAGE_DTYPES, "float64": float64}

#: Unit roundoff u = 2^-p (p = significand bits including the hidden bit) of each dtype.
UNIT_ROUNDOFF: dict[np.dtype, float] = {
    float64: 2.0**-53,
    float32: 2.0**-24,
    float16: 2.0**-11,
    bfloat16: 2.0**-8,
}
#: Smallest positive subnormal of each dtype: the absolute error floor of one rounding is half of it.
SMALLEST_SUBNORMAL: dict[np.dtype, float] = {
    float64: 2.0**-1074,
    float32: 2.0**-149,
    float16: 2.0**-24,
    bfloat16: 2.0**-133,
}
#: Unsigned integer type with the same width, used to compare and store raw bits.
BITS_VIEW: dict[np.dtype, np.dtype] = {
    float64: np.dtype(np.uint64),
    float32: np.dtype(np.uint32),
    float16: np.dtype(np.uint16),
    bfloat16: np.dtype(np.uint16),
}


def resolve_dtype(dtype: object, *, allow_float64: bool = True) -> np.dtype:
    """Return the numpy dtype for a name (``"bfloat16"``) or dtype-like; raise DTypeError otherwise."""
    table = FLOAT_DTYPES if allow_float64 else STORAGE_DTYPES
    if isinstance(dtype, str):
        if dtype not in table:
            raise DTypeError(f"unsupported dtype {dtype!r}; expected one of {sorted(table)}")
        return table[dtype]
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise DTypeError(f"unsupported dtype {dtype!r}") from exc
    if resolved not in table.values():
        raise DTypeError(f"unsupported dtype {resolved}; expected one of {sorted(table)}")
    return resolved


def dtype_name(dtype: np.dtype) -> str:
    """The user-facing name of a supported dtype (``bfloat16`` rather than numpy's repr)."""
    for name, candidate in FLOAT_DTYPES.items():
        if candidate == dtype:
            return name
    return str(dtype)


def check_float_array(array: np.ndarray, what: str, *, allow_float64: bool = True) -> np.dtype:
    """Raise DTypeError unless ``array`` has a supported floating dtype; return that dtype."""
    dtype = np.asarray(array).dtype
    table = FLOAT_DTYPES if allow_float64 else STORAGE_DTYPES
    if dtype not in table.values():
        raise DTypeError(f"{what}: unsupported dtype {dtype}; expected one of {sorted(table)}")
    return dtype


def _round_to_odd_float32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd: truncate toward zero, then set the last bit if inexact."""
    with np.errstate(over="ignore"):
        nearest = x.astype(float32)
    inexact = (nearest.astype(float64) != x) & ~np.isnan(x)
    bits = nearest.view(np.uint32).copy()
    # Where nearest rounded away from zero, step one ulp toward zero (the magnitude bits are
    # monotone in |value|, so subtracting one from the bit pattern does exactly that), then set
    # the last bit of every inexact result. Arithmetic on 0/1 arrays, not masked assignment: the
    # same bits, several times faster on large blocks.
    away = inexact & ((nearest.astype(float64) > x) != (x < 0))  # |nearest| > |x| where inexact
    bits -= away.astype(np.uint32)
    bits |= inexact.astype(np.uint32)
    return bits.view(float32)


def round_to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round float64 ``x`` once, to nearest-even, into ``dtype`` (float64/32/16 or bfloat16).

    Overflow gives +-inf, NaN stays NaN, signed zeros and subnormals are kept.
    """
    dtype = resolve_dtype(dtype)
    x = np.asarray(x, dtype=float64)
    if dtype == float64:
        return x.copy()
    if dtype == bfloat16:
        return _round_to_odd_float32(x).astype(bfloat16)
    with np.errstate(over="ignore"):
        return x.astype(dtype)


#: NumPy's own (exact) float32 value of every float16 bit pattern: :func:`widen_to_float32`'s table.
with np.errstate(invalid="ignore"):
    _FLOAT16_AS_FLOAT32 = np.arange(2**16, dtype=np.uint16).view(float16).astype(float32)


def widen_to_float32(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` (float32, x's shape) := x (float32, float16 or bfloat16), exactly; returns ``out``.

    float16 through a 64 Ki-entry table (NumPy's own widening of every bit pattern, looked up:
    several times faster than NumPy's float16 cast); bfloat16 is the top half of a float32, so its
    bits shifted left by 16 (NaN payloads kept). Bit for bit ``x.astype(float32)`` (tests/test_dtypes.py
    checks all 2^16 patterns of both).
    """
    if x.dtype == float16:
        return np.take(_FLOAT16_AS_FLOAT32, x.view(np.uint16), out=out)
    if x.dtype == bfloat16:
        bits = out.view(np.uint32)
        np.copyto(bits, x.view(np.uint16), casting="unsafe")
        bits <<= np.uint32(16)
        return out
    np.copyto(out, x)
    return out


#: (precision p incl. the hidden bit, smallest normal exponent) of the formats :func:`round_to_grid` takes.
_GRID = {float32: (24, -126), float16: (11, -14), bfloat16: (8, -126)}
#: 2^e_min of each format: the smallest normal number.
SMALLEST_NORMAL = {dtype: 2.0**emin for dtype, (_, emin) in _GRID.items()}
_EXPONENT_BITS = np.uint64(0x7FF0000000000000)


def round_to_grid(x: np.ndarray, dtype: np.dtype, scratch: np.ndarray, *, normal: bool = False) -> np.ndarray:
    """In place: x (float64) := RN_t(x) as a float64 value, to nearest, ties to even; returns ``x``.

    t is float32, float16 or bfloat16 (p significand bits, smallest normal exponent e_min). With
    2^e ≤ |x| < 2^(e+1) (e from x's exponent bits), c = 1.5 · 2^(max(e, e_min) + 53 − p): x + c lies in
    c's binade (|x| < 2^(e+1) ≤ c/3 as p ≤ 51), where float64's spacing is 2^(max(e, e_min) + 1 − p),
    t's spacing at x, and c is an even multiple of it; so fl(x + c) is c plus x rounded to t's grid,
    ties to the even multiple, and subtracting c is exact. A result of 0 is +0 whatever x's sign;
    past t's range the result is a finite multiple of the top binade's spacing (≥ 2^(e_max+1): it
    casts to ±inf); ±inf, NaN and |x| near float64's range (c overflows) give NaN. ``scratch`` is
    a float64 array like x. ``normal=True`` promises |x| ≥ 2^e_min for every x (or NaN): then
    max(e, e_min) = e, and the slowest of the five in-place passes is skipped.
    """
    p, emin = _GRID[np.dtype(dtype)]
    c = scratch
    np.bitwise_and(x.view(np.uint64), _EXPONENT_BITS, out=c.view(np.uint64))  # 2^e (0 below float64's normals)
    with np.errstate(over="ignore", invalid="ignore"):
        c *= 1.5 * 2.0 ** (53 - p)
        if not normal:
            np.maximum(c, 1.5 * 2.0 ** (emin + 53 - p), out=c)
        x += c
        x -= c
    return x


def round_scalar(x: float, dtype: np.dtype) -> np.generic:
    """RN_t(x) for one Python float x (t float32, float16 or bfloat16), to nearest, ties to even.

    NumPy's scalar casts for float32 and float16 (correctly rounded from float64); bfloat16 by
    :func:`round_to_grid`'s formula in Python floats (exact, then exactly representable in float32),
    with x's sign kept on a rounded 0. Microseconds, where an array call costs tens of them: the
    exact resolution rounds one element at a time.
    """
    dtype = np.dtype(dtype)
    if dtype != bfloat16 or not math.isfinite(x):
        with np.errstate(over="ignore"):
            return np.array(x).astype(dtype)[()]
    p, emin = _GRID[bfloat16]
    binade = math.frexp(x)[1] - 1  # 2^binade ≤ |x| < 2^(binade+1) (frexp: x = m·2^e, 1/2 ≤ |m| < 1)
    if binade >= 128:  # |x| ≥ 2^128, past bfloat16's largest finite (2 − 2^-7)·2^127: ±inf (and c would overflow)
        return np.array(math.copysign(math.inf, x)).astype(bfloat16)[()]
    c = 1.5 * 2.0 ** (max(binade, emin) + 53 - p)
    with np.errstate(over="ignore"):
        return np.float32(math.copysign((x + c) - c, x)).astype(bfloat16)[()]


def narrow_view(array: np.ndarray, dtype: np.dtype, part: int = 0) -> np.ndarray:
    """A ``dtype`` array shaped like ``array`` in the ``part``-th piece of its memory (``array`` of a wider dtype)."""
    flat = array.reshape(-1).view(dtype)
    return flat[part * array.size:(part + 1) * array.size].reshape(array.shape)


def store_exact(values: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """out (float16 or bfloat16) := values (float64 values of out's dtype, or beyond its range: ±inf).

    The values are exact, so they pass through float32 exactly (values beyond bfloat16's range
    become ±inf there) and only bits move: bfloat16 is float32's top 16 bits; a float16 value v
    times 2^-112 is a float32 whose bits are float16's exponent and fraction shifted left by 13
    (float16's subnormals land on float32's subnormals; 65536 · 2^-112 = 2^-96 has float16's
    infinity pattern, and larger values are clamped to it), its sign bit is float16's moved by 16.
    ``scratch`` is a float64 array like values (its memory holds two 32-bit temporaries).
    """
    scratch32 = narrow_view(scratch, float32)
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(scratch32, values, casting="unsafe")
    bits = scratch32.view(np.uint32)
    if out.dtype == bfloat16:
        bits >>= np.uint32(16)
        np.copyto(out.view(np.uint16), bits, casting="unsafe")
        return
    scratch32 *= np.float32(2.0**-112)
    magnitude = narrow_view(scratch, np.dtype(np.uint32), 1)
    np.bitwise_and(bits, np.uint32(0x7FFFFFFF), out=magnitude)
    magnitude >>= np.uint32(13)
    np.minimum(magnitude, np.uint32(0x7C00), out=magnitude)
    bits >>= np.uint32(16)
    bits &= np.uint32(0x8000)
    magnitude |= bits
    np.copyto(out.view(np.uint16), magnitude, casting="unsafe")


def bits_of(array: np.ndarray) -> np.ndarray:
    """The raw bit patterns of a float array as unsigned integers of the same width."""
    array = np.ascontiguousarray(array)
    return array.view(BITS_VIEW[array.dtype])


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise distance in units in the last place between two arrays of one float dtype.

    Uses the monotone integer mapping of IEEE bit patterns (+0 and -0 are 0 apart).
    NaN positions give 0 when both are NaN, and the maximum int64 otherwise.
    """
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b, dtype=a.dtype)
    width = a.dtype.itemsize * 8

    def ordered(v: np.ndarray) -> np.ndarray:
        raw = bits_of(v).astype(np.uint64)
        magnitude = (raw & np.uint64((1 << (width - 1)) - 1)).astype(np.int64)  # < 2^63: fits
        return np.where(raw >> np.uint64(width - 1), -magnitude, magnitude)

    dist = np.abs(ordered(a) - ordered(b))
    a_nan, b_nan = np.isnan(a.astype(float64)), np.isnan(b.astype(float64))
    return np.where(a_nan & b_nan, 0, np.where(a_nan | b_nan, np.iinfo(np.int64).max, dist))
