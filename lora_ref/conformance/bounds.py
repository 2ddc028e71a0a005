"""Forward error bounds and the per-element conformance check (SPEC section C.3).

An implementation receives inputs stored in the storage dtype t, may compute in any
precision at least as fine as a *compute dtype* c (unit roundoff u_c), in any order, and
returns outputs rounded to t. Each output element y is a sum of products of inputs (and the
scale s); K is the longest chain of roundings any one product term can go through in a
sensible evaluation (the contraction lengths along its path, plus the multiplications, the
computation of s from alpha and r, and the final additions: see ``operations.py`` for each
operation's K). The standard model of floating-point arithmetic gives, for every ordering
(Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1 and Lemma 3.1):

    |ŷ_c − y| ≤ E := γ_K(u_c) · M + K · η_c,       γ_K(u) = K u / (1 − K u),

where M is the same expression evaluated on the absolute values of the inputs and |s|
(stored per element as ``<name>.magnitude``), and η_c is c's smallest subnormal (each
operation that underflows adds at most η_c / 2). Rounding ŷ_c once more to t adds at most
half an ulp of t at |ŷ_c| ≤ |y| + E, so the tolerance is

    tol = E + ½ ulp_t(|y| + E).

A correctly rounded implementation has error ≤ ½ ulp_t(|y|), i.e. at most about half the
tolerance; an implementation that rounds an intermediate to t (double rounding, a delta cast
to the weight dtype, a product accumulated in fp16 when c = float32) exceeds it wherever the
extra rounding moves the result to the wrong neighbour. The report gives max |ŷ − y| / tol
(the fraction of the bound used) and the distance in ulps of t from round_t(y).

A profile may also allow j intermediate roundings to t on each product term's path (the
``ggml`` profile: ggml_mul_mat rounds its float32 input to the weight's type, so llama.cpp's
rank-r intermediate A x is rounded to lora_b's type; SPEC G.5). Where t is coarser than c
(u_t > u_c) each such rounding multiplies a term by (1 + δ), |δ| ≤ u_t, and underflows by at
most η_t / 2 (the same first-order convention as for c), so

    E = ((1 + u_t)^j (1 + γ_K(u_c)) − 1) · M + K · η_c + j · η_t;

where t is no coarser than c the rounding is exact (the value is already in c ⊆ t) and E is
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..dtypes import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, bfloat16, bits_of, float16, float32, float64, round_to, ulp_distance

#: Significand bits (with the hidden bit) and minimum normal exponent of each storage dtype.
_PRECISION: dict[np.dtype, tuple[int, int]] = {
    float64: (53, -1022),
    float32: (24, -126),
    float16: (11, -14),
    bfloat16: (8, -126),
}


def gamma(k: int, u: float) -> float:
    """γ_k = k u / (1 − k u); raises ValueError when k u ≥ 1 (the bound says nothing then)."""
    if k * u >= 1.0:
        raise ValueError(f"gamma_{k} undefined for u={u}: k*u >= 1")
    return k * u / (1.0 - k * u)


def ulp_at(magnitude: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The spacing of dtype t at |value| = ``magnitude`` (>= 0): 2^(max(floor(log2 a), emin) − p + 1)."""
    p, emin = _PRECISION[np.dtype(dtype)]
    a = np.asarray(magnitude, dtype=float64)
    with np.errstate(divide="ignore"):
        _, e = np.frexp(a)  # a = m 2^e with m in [0.5, 1): floor(log2 a) = e - 1
    exponent = np.maximum(np.where(a > 0, e - 1, emin), emin)
    return np.ldexp(1.0, (exponent - (p - 1)).astype(np.int32))


def tolerance(expected: np.ndarray, magnitude: np.ndarray, depth: int, storage: np.dtype, compute: np.dtype,
              roundings: int = 0) -> np.ndarray:
    """tol = E + ½ ulp_t(|y| + E), E = ((1 + u_t)^j (1 + γ_K(u_c)) − 1) M + K η_c + j η_t (module docstring).

    ``roundings`` is j, the intermediate roundings to t a term may see (counted only where
    u_t > u_c; j = 0 gives E = γ_K(u_c) M + K η_c). Where K u_c ≥ 1 the standard model bounds
    nothing (e.g. a combine.svd case under the ``storage`` profile in bfloat16): the tolerance is
    then infinite, and such a profile does not constrain that output.
    """
    compute, storage = np.dtype(compute), np.dtype(storage)
    if depth * UNIT_ROUNDOFF[compute] >= 1.0:
        return np.full(np.shape(expected), np.inf)
    j = roundings if UNIT_ROUNDOFF[storage] > UNIT_ROUNDOFF[compute] else 0
    g = gamma(depth, UNIT_ROUNDOFF[compute])
    relative = g + ((1.0 + UNIT_ROUNDOFF[storage]) ** j - 1.0) * (1.0 + g)  # = (1 + u_t)^j (1 + γ_K) − 1; γ_K when j = 0
    error = (relative * np.asarray(magnitude, dtype=float64) + depth * SMALLEST_SUBNORMAL[compute]
             + j * SMALLEST_SUBNORMAL[storage])
    with np.errstate(invalid="ignore"):  # NaN expected elements (special values) are checked by class, not by tol
        return error + 0.5 * ulp_at(np.abs(expected) + error, storage)


@dataclass(frozen=True)
class OutputCheck:
    """The verdict for one output tensor of one case."""

    name: str
    ok: bool
    ratio: float  # max |ŷ − y| / tol over the elements (0 for an exact match; inf for a class mismatch)
    ulps: int  # max distance in ulps of t from round_t(y) (or from the expected bits)
    detail: str = ""


def check_bounded(name: str, actual: np.ndarray, expected: np.ndarray, tol: np.ndarray, storage: np.dtype) -> OutputCheck:
    """Pass when every finite element is within ``tol`` of the float64 oracle and non-finite ones match.

    Where round_t(y) is NaN or ±inf (special values, overflow), the output must be NaN, or the
    same infinity; everywhere else it must be finite and |ŷ − y| ≤ tol.
    """
    rounded = round_to(expected, storage)
    with np.errstate(invalid="ignore"):  # a signaling NaN is quieted by the cast; only its NaN-ness matters here
        got = np.asarray(actual).astype(float64)
    special = ~np.isfinite(rounded.astype(float64))
    same_special = np.where(np.isnan(rounded.astype(float64)), np.isnan(got), got == rounded.astype(float64))
    bad_special = special & ~same_special
    finite = ~special
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(finite, np.abs(got - expected), 0.0)
        err = np.where(finite & ~np.isfinite(got), np.inf, err)
        ratio_elems = np.where(finite, err / tol, 0.0)
    ratio_elems = np.where(bad_special, np.inf, ratio_elems)
    ratio = float(ratio_elems.max()) if ratio_elems.size else 0.0
    with np.errstate(invalid="ignore"):
        ulps = int(ulp_distance(np.asarray(actual), rounded).max()) if rounded.size else 0
    ok = bool(ratio <= 1.0)
    detail = ""
    if not ok:
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(ratio_elems)), ratio_elems.shape))
        detail = (f"{name}{list(where)}: got {float(got[where])!r}, exact {float(expected[where])!r}, "
                  f"|error| {float(err[where]):.3g} > bound {float(tol[where]):.3g} ({int((ratio_elems > 1).sum())} of {ratio_elems.size} elements out of bound)")
        if bad_special[where]:
            detail = f"{name}{list(where)}: got {float(got[where])!r}, expected {float(rounded.astype(float64)[where])!r} (special value)"
    return OutputCheck(name, ok, ratio, ulps, detail)


def check_bitwise(name: str, actual: np.ndarray, expected: np.ndarray) -> OutputCheck:
    """Pass only when ``actual`` has exactly the bits of ``expected`` (NaN payloads, signed zeros)."""
    actual = np.ascontiguousarray(actual)
    differs = bits_of(actual) != bits_of(np.ascontiguousarray(expected))
    with np.errstate(invalid="ignore"):  # signaling NaNs: compared by bits above
        ulps = int(ulp_distance(actual, expected).max()) if actual.size else 0
    if not differs.any():
        return OutputCheck(name, True, 0.0, ulps)
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(differs)), differs.shape))
    detail = (f"{name}{list(where)}: bits {int(bits_of(actual)[where]):#x} differ from expected "
              f"{int(bits_of(np.ascontiguousarray(expected))[where]):#x} ({int(differs.sum())} of {differs.size} elements)")
    return OutputCheck(name, False, float("inf"), ulps, detail)
