"""Optional numba kernels of the correctly rounded merge's elementwise work (``pip install lora-ref[fast]``).

:func:`lora_ref.merge._bracket` is the reference: about a dozen NumPy passes over float64 blocks
per bracket. The kernels here do the same float64 operations, in the same order, on one element
at a time in one pass, so their results are *bitwise* those of the NumPy path (merged weights,
residuals and undecided masks; tests/test_kernels.py checks it on adversarial values), at memory
speed:

:func:`bracket`
    y = fl(w ± p); E = fl(fl(λ_i·ρ_j) + fl(|y|·4u)); the ends fl(y − E), fl(y + E) rounded to t;
    undecided where the rounded ends differ (bits for float32; values for float16/bfloat16, whose
    rounded 0 is undecided too: its sign needs the exact sum), NaN included. float16 and bfloat16
    round with :func:`lora_ref.dtypes.round_to_grid`'s formula (c = 1.5·2^(max(e, e_min) + 53 − p),
    fl(fl(x + c) − c)) and store with :func:`lora_ref.dtypes.store_exact`'s bit moves; NumPy's
    ``normal`` shortcut only skips the max(e, e_min) where it provably changes nothing, so the
    kernel always takes it.
:func:`merge_step`
    an exact merge's block in one pass: the merge's bracket, then, where it decides, the bracket of
    the residual's unmerge on the merged value (same product) and the bitwise comparison with W.
    Elements either bracket leaves undecided come back coded; the caller resolves them exactly.
    The result is the correctly rounded value wherever it is decided, so it is the NumPy path's.

No fastmath and no FMA contraction (numba's default: LLVM contracts nothing without fast-math
flags): every float64 operation is one IEEE operation, rounded to nearest. The kernels release
the GIL (``nogil``), so :func:`lora_ref.merge._map_row_blocks`' threads run them in parallel, and
are compiled lazily, for the signatures used, into numba's on-disk cache (``cache=True``; where the
cache directory is not writable numba compiles in memory and says nothing).

Shapes: ``[k, n, c]`` blocks (k stacked weights, n rows, c columns), norms ``[k, n]`` and ``[k, c]``.
Weights travel as their bits: uint32 for float32, uint16 for float16/bfloat16 (``kind`` 0, 1, 2).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .dtypes import _FLOAT16_AS_FLOAT32, bfloat16, float16, float32

#: ``kind`` of each storage dtype in the kernels: how its bits widen, round and store.
KIND = {float32: 0, float16: 1, bfloat16: 2}
#: float16's bits -> exact float32 value (NumPy's own widening, the table of lora_ref.dtypes).
FLOAT16_TABLE = _FLOAT16_AS_FLOAT32
#: Codes of :func:`merge_step`: unmerge restores W / misses W (residual) / merge undecided / unmerge undecided.
RESTORED, MISSED, MERGE_UNDECIDED, UNMERGE_UNDECIDED = 0, 1, 2, 3

_EXPONENT_BITS = np.uint64(0x7FF0000000000000)
_SHIFT16 = np.uint32(16)


@njit(nogil=True, cache=True)
def _widen(bits, kind, table):
    """The float64 value of one weight element given by its bits (exact)."""
    if kind == 0:
        return np.float64(np.uint32(bits).view(np.float32))
    if kind == 1:
        return np.float64(table[bits])
    return np.float64(np.uint32(np.uint32(bits) << _SHIFT16).view(np.float32))


@njit(nogil=True, cache=True)
def _grid(x, kind):
    """RN_t(x) as a float64 value for t float16 (kind 1) or bfloat16 (2): round_to_grid's formula, NaN
    for ±inf and NaN (c = inf), +0 for a rounded 0."""
    if kind == 1:
        spacing, floor = 1.5 * 2.0 ** (53 - 11), 1.5 * 2.0 ** (-14 + 53 - 11)
    else:
        spacing, floor = 1.5 * 2.0 ** (53 - 8), 1.5 * 2.0 ** (-126 + 53 - 8)
    c = np.uint64(np.float64(x).view(np.uint64) & _EXPONENT_BITS).view(np.float64) * spacing
    if not c >= floor:  # c is never NaN (±inf, NaN x: c = inf)
        c = floor
    return (x + c) - c


@njit(nogil=True, cache=True)
def _store(value, kind):
    """The bits of t for ``value`` (float32: any float64, rounded; 16-bit: a grid value or beyond t's
    range, then ±inf), as store_exact moves them; a uint32 (16-bit bits in its low half)."""
    single = np.float32(value)
    bits = single.view(np.uint32)
    if kind == 0:
        return bits
    if kind == 2:
        return np.uint32(bits >> _SHIFT16)
    scaled = np.float32(single * np.float32(2.0**-112)).view(np.uint32)
    magnitude = np.uint32(np.uint32(scaled & np.uint32(0x7FFFFFFF)) >> np.uint32(13))
    if magnitude > np.uint32(0x7C00):
        magnitude = np.uint32(0x7C00)
    return np.uint32(magnitude | np.uint32(np.uint32(scaled >> _SHIFT16) & np.uint32(0x8000)))


@njit(nogil=True, cache=True)
def _decide(w, p, cross, spread, sign, kind):
    """(the low end y − E rounded to t, as t's bits; undecided) for y = fl(w ± p), E = cross + |y|·spread."""
    y = w + p if sign > 0 else w - p
    bound = cross + abs(y) * spread
    high = y + bound
    low = y - bound
    if kind == 0:
        low_bits = np.float32(low).view(np.uint32)
        high32 = np.float32(high)
        return low_bits, low_bits != high32.view(np.uint32) or np.isnan(high32)
    low = _grid(low, kind)
    high = _grid(high, kind)
    return _store(low, kind), not (low == high) or low == 0.0


@njit(nogil=True, cache=True)
def bracket(base, product, left_norms, right_norms, spread, sign, out, undecided, kind, table):
    """out := the bits of RN_t(fl(y − E)), undecided := where that may not be RN_t(base ± s·L R)
    (module doc); base, out: weight bits [k, n, c]; product float64 [k, n, c]; undecided bool [k, n, c]."""
    for s in range(base.shape[0]):
        for i in range(base.shape[1]):
            left = left_norms[s, i]
            for j in range(base.shape[2]):
                bits, unsure = _decide(_widen(base[s, i, j], kind, table), product[s, i, j], left * right_norms[s, j],
                                       spread, sign, kind)
                out[s, i, j] = bits
                undecided[s, i, j] = unsure


@njit(nogil=True, cache=True)
def merge_step(base, product, left_norms, right_norms, spread, sign, out, codes, kind, table):
    """The exact merge of a block in one pass: out := merge's bracket (as :func:`bracket`), codes :=
    RESTORED where the unmerge of the merged value (same product, opposite sign) gives base's bits,
    MISSED where it gives others, MERGE_UNDECIDED / UNMERGE_UNDECIDED where a bracket does not decide
    (the caller resolves those exactly). Shapes as :func:`bracket`; codes uint8 [k, n, c]."""
    for s in range(base.shape[0]):
        for i in range(base.shape[1]):
            left = left_norms[s, i]
            for j in range(base.shape[2]):
                original = base[s, i, j]
                p = product[s, i, j]
                cross = left * right_norms[s, j]
                bits, unsure = _decide(_widen(original, kind, table), p, cross, spread, sign, kind)
                out[s, i, j] = bits
                if unsure:
                    codes[s, i, j] = MERGE_UNDECIDED
                    continue
                back, unsure = _decide(_widen(bits, kind, table), p, cross, spread, -sign, kind)
                if unsure:
                    codes[s, i, j] = UNMERGE_UNDECIDED
                elif back != original:
                    codes[s, i, j] = MISSED
                else:
                    codes[s, i, j] = RESTORED
