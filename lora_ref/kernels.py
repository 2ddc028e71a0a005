"""Optional numba kernels of the correctly rounded merge's elementwise work (``pip install lora-ref[fast]``).

:func:`lora_ref.merge._bracket` is the reference: about a dozen NumPy passes over float64 blocks
per bracket. The kernels here do the same float64 operations, in the same order, on one element
at a time in one pass, so their results are *bitwise* those of the NumPy path (merged weights,
residuals, and :func:`_bracket`'s undecided masks; tests/test_kernels.py checks it on adversarial
values), at memory speed:

:func:`_bracket`
    y = fl(w ± p); E = fl(fl(λ_i·ρ_j) + fl(|y|·4u)); the ends fl(y − E), fl(y + E) rounded to t;
    undecided where the rounded ends differ (bits for float32; values for float16/bfloat16, whose
    rounded 0 is undecided too: its sign needs the exact sum), NaN included. float16 and bfloat16
    round with :func:`lora_ref.dtypes.round_to_grid`'s formula (c = 1.5·2^(max(e, e_min) + 53 − p),
    fl(fl(x + c) − c)) and store with :func:`lora_ref.dtypes.store_exact`'s bit moves; NumPy's
    ``normal`` shortcut only skips the max(e, e_min) where it provably changes nothing, so the
    kernel always takes it.
:func:`_merge_rows`
    a merge's block, fast or exact, in one pass, with the rank-r product computed row by row in the
    kernel (a sequential float64 sum: within SPEC 3.2's bound, so no BLAS call and no float64 block
    of the product in memory): the merge's bracket and, exact, the bracket of the residual's unmerge
    on the merged value (same product, opposite sign) and the bitwise comparison with W; the flat
    positions the residual keeps and those either bracket leaves undecided come back compacted (the
    caller resolves the latter exactly). Brackets give correctly rounded values wherever they decide,
    so the merged block and the residual are the NumPy path's, bit for bit; the undecided positions
    may differ on rare elements (another product rounding), which only moves work to the resolver.
    float16 and bfloat16 weights are bracketed in float32 arithmetic first (:func:`_ends32`, SPEC 3.2:
    twice the lanes of a float64 vector; an exact merge takes about three quarters of the time), and
    the few elements that bracket leaves undecided (for a random 4096² weight, r = 16, an exact merge's
    two brackets: 1 in 2,700 for bfloat16, 1 in 540 for float16) in float64, as float32 weights are.
:func:`_resolve`
    the exact value of undecided elements for float32/16/bfloat16 factors: the arithmetic of
    :func:`lora_ref.merge._exact_by_fsum` (exact float64 products, Dekker's product by the scale),
    its sums kept as an exact non-overlapping expansion (Shewchuk's, as math.fsum keeps them),
    rounded to odd into float64 and then to t: about 0.2 µs an element where Python takes about 11
    (r = 16; a bfloat16 merge of 16 M elements leaves a few thousand undecided: mostly exact ties).

No fastmath (numba's default: LLVM contracts and reassociates nothing without fast-math flags):
every float64 operation is one IEEE operation, rounded to nearest, except the product's
multiply-adds, which :func:`_multiply_add` leaves to the CPU: one fused multiply-add (one rounding)
where it has FMA, a multiply and an add (two) where not. SPEC 3.2's bound covers both, and the
correctly rounded values do not depend on which ran (the bracket, whose operations are the NumPy
path's, never fuses). Fused, a product row costs half the instructions (about a quarter off a
merge's time on 2 cores, bench/bench_merge.py). The kernels release
the GIL (``nogil``), so :func:`lora_ref.merge._map_row_blocks`' threads run them in parallel, and
are compiled lazily, for the signatures used, into numba's on-disk cache (``cache=True``; where the
cache directory is not writable numba compiles in memory and says nothing).

Shapes: :func:`_bracket` takes ``[k, n, c]`` blocks (k stacked weights, n rows, c columns), norms ``[k, n]``
and ``[k, c]``; :func:`_merge_rows` and :func:`_resolve` one weight's ``[n, c]`` block.
Weights travel as their bits: uint32 for float32, uint16 for float16/bfloat16; :data:`BRACKET`,
:data:`MERGE_ROWS` and :data:`RESOLVE` hold the kernels of each dtype (``kind`` 0, 1, 2 compiled in).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .dtypes import bfloat16, float16, float32


_EXPONENT_BITS = np.uint64(0x7FF0000000000000)
_SHIFT16 = np.uint32(16)
#: float16's largest finite value.
_FLOAT16_LARGEST = 65504.0
#: Bit 1 of each byte of a word of :func:`_merge_rows`' codes: set where a bracket is undecided
#: (codes 0 restored, 1 missed, 2 the unmerge's bracket undecided, 6 the merge's).
_UNSURE_BYTES = np.uint64(0x0202020202020202)


@njit(nogil=True, cache=True)
def _widen(bits, kind):
    """The float64 value of one weight element given by its bits (exact; NaN stays NaN, its payload
    aside): float32's value, or :func:`_widen32`'s float32 value of a float16 or bfloat16; bitwise
    NumPy's widening for every non-NaN pattern (tests/test_kernels.py checks all 2^16)."""
    if kind == 0:
        return np.float64(np.uint32(bits).view(np.float32))
    return np.float64(_widen32(bits, kind))


@njit(nogil=True, cache=True)
def _grid(x, kind):
    """RN_t(x) as a float64 value for t float16 (kind 1) or bfloat16 (2): round_to_grid's formula, NaN
    for ±inf and NaN (c = inf), +0 for a rounded 0."""
    if kind == 1:
        spacing, floor = 1.5 * 2.0 ** (53 - 11), 1.5 * 2.0 ** (-14 + 53 - 11)
    else:
        spacing, floor = 1.5 * 2.0 ** (53 - 8), 1.5 * 2.0 ** (-126 + 53 - 8)
    c = np.uint64(np.float64(x).view(np.uint64) & _EXPONENT_BITS).view(np.float64) * spacing
    c = c if c >= floor else floor  # np.maximum: c is never NaN (±inf, NaN x: c = inf)
    return (x + c) - c


@njit(nogil=True, cache=True)
def _store(value, kind):
    """t's bits for a float64 ``value`` as :func:`lora_ref.dtypes.store_exact` makes them, in a uint32 (16-bit
    bits in its low half): float32 rounds any float64; float16 and bfloat16 take a value of t's grid or one
    beyond t's range (then ±inf; NaN gives float16's infinity pattern, as store_exact does), which float32
    holds exactly or rounds to a value as far past the range: :func:`_store32`'s bit moves."""
    if kind == 0:
        return np.float32(value).view(np.uint32)
    return _store32(np.float32(value), kind)


@njit(nogil=True, cache=True, inline="always")
def _ends(w, p, cross, spread, sign, kind):
    """(the low end fl(y − E) rounded to t, as a float64 value; undecided) for y = fl(w ± p),
    E = fl(cross + fl(|y|·spread)). Where undecided, the value is whatever the low end gave (NaN included)."""
    y = w + p if sign > 0 else w - p
    bound = cross + abs(y) * spread
    high = y + bound
    low = y - bound
    if kind == 0:
        low32 = np.float32(low)
        high32 = np.float32(high)
        return np.float64(low32), low32.view(np.uint32) != high32.view(np.uint32) or np.isnan(high32)
    low = _grid(low, kind)
    high = _grid(high, kind)
    return low, not (low == high) or low == 0.0


@njit(nogil=True, cache=True)
def _decide(w, p, cross, spread, sign, kind):
    """(the low end fl(y − E) rounded to t, as t's bits; undecided) for y = fl(w ± p), E = fl(cross + fl(|y|·spread))."""
    value, undecided = _ends(w, p, cross, spread, sign, kind)
    return _store(value, kind), undecided


@njit(nogil=True, cache=True, inline="always")
def _element(original, p, cross, spread, sign, exact, kind):
    """(t's bits of the merge's bracket's low end, its code) for one element of :func:`_merge_rows`' float64
    bracket: code 6 where the merge's bracket does not decide; with ``exact``, for the stored value, the
    unmerge's bracket (same product, opposite sign): 2 where it does not decide, else 1 where it misses
    ``original``'s bits, 0 where it restores them; without, 0 where the merge's decides."""
    w = _widen(original, kind)
    value, undecided = _ends(w, p, cross, spread, sign, kind)
    bits = _store(value, kind)
    if not exact:
        return bits, np.uint8(6 if undecided else 0)
    # the unmerge of the stored value: past t's range that is ±inf (float32's cast gives it)
    largest = _FLOAT16_LARGEST if kind == 1 else (2.0 - 2.0**-7) * 2.0**127  # t's largest finite value (float16, bfloat16)
    merged = value if kind == 0 or abs(value) <= largest else math.copysign(math.inf, value)
    back, undecided_back = _ends(merged, p, cross, spread, -sign, kind)
    # decided ends are not NaN, and for float16/bfloat16 not 0 (undecided): their values differ from w exactly
    # where their bits would; float32's -0 and +0 need the bits
    differs = np.float32(back).view(np.uint32) != original if kind == 0 else back != w
    return bits, np.uint8(6 if undecided else 2 if undecided_back else differs)


@njit(nogil=True, cache=True, inline="always")
def _widen32(bits, kind):
    """The float32 value of a float16 (kind 1) or bfloat16 (2) weight element given by its bits (exact):
    :func:`_widen`'s bit moves, a float16 subnormal as fraction·2^-24 in float32 (a normal float32)."""
    if kind == 2:
        return np.uint32(np.uint32(bits) << _SHIFT16).view(np.float32)
    half = np.uint32(bits)
    magnitude = np.uint32(half & np.uint32(0x7FFF))
    single = np.uint32(np.uint32(magnitude << np.uint32(13)) + np.uint32(112 << 23))  # normal: exponent + 127 − 15
    single = np.uint32(single + np.uint32(112 << 23)) if magnitude >= np.uint32(0x7C00) else single  # ±inf, NaN
    single = np.uint32(single | np.uint32(np.uint32(half & np.uint32(0x8000)) << _SHIFT16))
    subnormal = np.float32(np.int32(magnitude)) * np.float32(2.0**-24)
    subnormal = -subnormal if half >= np.uint32(0x8000) else subnormal
    return subnormal if magnitude < np.uint32(0x400) else single.view(np.float32)


@njit(nogil=True, cache=True, inline="always")
def _store32(value, kind):
    """t's bits for a float32 ``value`` of t's grid (float16, kind 1, or bfloat16, 2) or past t's range, in a
    uint32: bfloat16 is float32's top half; ±inf past its range (NaN gives float16's infinity pattern, as
    :func:`lora_ref.dtypes.store_exact` does).

    float16 from the float32 bits b of v: where |v| ≥ 2^-14 (and for NaN), (b's magnitude >> 13) −
    (127 − 15)·2^10 is float16's biased exponent and 10 fraction bits (v is on the grid: the bits below are
    0), clamped to 0x7C00 past the range; below, the subnormal's bits are |v|·2^24 (an integer, the low bits
    of fl32(|v|·2^24 + 2^23): no float-to-int conversion, which the compiler cannot vectorise); the sign is
    b's top bit moved to bit 15. Bitwise store_exact's v·2^-112 through float32 (which lands on float32's
    subnormals, slow on x86) for every such v."""
    bits = np.float32(value).view(np.uint32)
    if kind == 2:
        return np.uint32(bits >> _SHIFT16)
    magnitude = abs(value)
    normal = np.int32(np.uint32(bits & np.uint32(0x7FFFFFFF)) >> np.uint32(13)) - np.int32(112 << 10)
    subnormal = np.int32(np.float32(magnitude * np.float32(2.0**24) + np.float32(2.0**23)).view(np.uint32) & np.uint32(0x3FF))
    half = subnormal if magnitude < np.float32(2.0**-14) else min(normal, np.int32(0x7C00))
    return np.uint32(np.uint32(half) | np.uint32(np.uint32(bits >> _SHIFT16) & np.uint32(0x8000)))


@njit(nogil=True, cache=True, inline="always")
def _grid32(x, kind):
    """RN_t(x) for a float32 x and t float16 (kind 1) or bfloat16 (2), in float32 arithmetic: :func:`_grid`'s
    formula with float32's 24 bits (c = 1.5·2^(max(e, e_min) + 24 − p)); NaN where c overflows (|x| ≥ 2^112
    for bfloat16, 2^114 for float16) and for ±inf and NaN."""
    if kind == 1:
        spacing, floor = np.float32(1.5 * 2.0 ** (24 - 11)), np.float32(1.5 * 2.0 ** (-14 + 24 - 11))
    else:
        spacing, floor = np.float32(1.5 * 2.0 ** (24 - 8)), np.float32(1.5 * 2.0 ** (-126 + 24 - 8))
    c = np.uint32(np.float32(x).view(np.uint32) & np.uint32(0x7F800000)).view(np.float32) * spacing
    c = c if c >= floor else floor
    return (x + c) - c


@njit(nogil=True, cache=True, inline="always")
def _ends32(w, p, cross, sign, kind):
    """:func:`_ends` for a float16 or bfloat16 weight in float32 arithmetic (w, p, cross float32; the coefficient
    of |y| is 4u₃₂ = 2^-22): (the low end rounded to t, as a float32; undecided). Ends past float16's range
    are undecided too (the float64 bracket stores them).

    Why it decides only RN_t(X) (SPEC 3.2): with p = fl(s·P) the float64 value,
    |p − sT| ≤ (r + 1)u(1 + 2^-18)|s|·‖L_i‖‖R_j‖ + (r|s| + 1)·2^-1074 (the float64 proof without its last
    rounding); p₃₂ = fl32(p) adds u₃₂|p| + 2^-150 and y₃₂ = fl32(w ± p₃₂) adds u₃₂|y₃₂| (sums are exact below
    float32's normal range), so |y₃₂ − X| ≤ u₃₂|y₃₂| + C + 2^-149 with C = (u₃₂ + (r + 1)u)(1 + 2^-18)|s|·
    ‖L_i‖‖R_j‖. cross = fl32(λ_i·ρ_j) ≥ 2(1 − 2^-17)·C + 2^-147 (:func:`lora_ref.merge._float32_norms`),
    which with 4u₃₂|y₃₂| covers that and the roundings of E and of y₃₂ ± E (relative 2^-24 each, or 2^-150
    below float32's normal range), so fl32(y₃₂ − E) ≤ X ≤ fl32(y₃₂ + E). :func:`_grid32` is RN_t for every
    float32 it does not make NaN (undecided), and monotone, so equal rounded ends are RN_t(X); a rounded 0 is
    undecided (its sign needs the exact sum)."""
    y = w + p if sign > 0 else w - p
    bound = cross + abs(y) * np.float32(2.0**-22)
    low = _grid32(y - bound, kind)
    high = _grid32(y + bound, kind)
    past = kind == 1 and abs(low) > np.float32(_FLOAT16_LARGEST)
    return low, not (low == high) or low == np.float32(0.0) or past


@njit(nogil=True, cache=True, inline="always")
def _bracket(base, product, left_norms, right_norms, spread, sign, out, undecided, kind):
    """out := the bits of RN_t(fl(y − E)), undecided := where that may not be RN_t(base ± s·L R)
    (module doc); base, out: weight bits [k, n, c]; product float64 [k, n, c]; undecided bool [k, n, c];
    ``kind`` (0 float32, 1 float16, 2 bfloat16) is a constant of each caller (:data:`BRACKET`)."""
    for s in range(base.shape[0]):
        for i in range(base.shape[1]):
            left = left_norms[s, i]
            for j in range(base.shape[2]):
                bits, unsure = _decide(_widen(base[s, i, j], kind), product[s, i, j], left * right_norms[s, j],
                                       spread, sign, kind)
                out[s, i, j] = bits
                undecided[s, i, j] = unsure


@intrinsic
def _multiply_add(typingctx, a, b, c):
    """a·b + c, rounded once or twice: LLVM's ``fmuladd``, a fused multiply-add where the CPU has one
    (fl(a·b + c)), else fl(fl(a·b) + c). Either is an evaluation SPEC 3.2's bound covers (each term still
    passes through at most r roundings), so the correctly rounded results do not depend on which."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        real = context.get_value_type(a)
        fmuladd = builder.module.declare_intrinsic("llvm.fmuladd", [real], ir.FunctionType(real, [real] * 3))
        return builder.call(fmuladd, args)
    return a(a, a, a), codegen


@njit(nogil=True, cache=True, inline="always")
def _terms(q, factors, sums):
    """The four running sums plus ``factors``·q, one multiply-add each (:func:`_multiply_add`)."""
    return (_multiply_add(factors[0], q, sums[0]), _multiply_add(factors[1], q, sums[1]),
            _multiply_add(factors[2], q, sums[2]), _multiply_add(factors[3], q, sums[3]))


@njit(nogil=True, cache=True, inline="always")
def _row_products(left, right, first, acc):
    """acc[m] := fl(Σ_k L[first + m, k]·R[k, :]) for m < 4 (rows past L's last repeat it): each sum in
    increasing k from −0 (x + −0 is x, signed zeros included, so the first term is its plain product), every
    term one multiply-add (:func:`_multiply_add`: fused or not, each term passes through at most ``rank``
    roundings), vectorised over the columns. Four rows at a time share each load of R, and eight terms at a
    time (in order) keep the sums in registers between acc's loads and stores: half a memory operation per
    multiply-add, a third of the time of two rows and four terms (a product row is 8c bytes in cache, never a
    float64 block in memory)."""
    rank, n_cols = right.shape
    last = left.shape[0] - 1
    rows = (first, min(first + 1, last), min(first + 2, last), min(first + 3, last))
    w, x, y, z = acc[0], acc[1], acc[2], acc[3]
    for j in range(n_cols):
        w[j], x[j], y[j], z[j] = -0.0, -0.0, -0.0, -0.0
    k = 0
    while k + 8 <= rank:
        l0, l1, l2, l3, l4, l5, l6, l7 = (_column(left, rows, k), _column(left, rows, k + 1), _column(left, rows, k + 2),
                                          _column(left, rows, k + 3), _column(left, rows, k + 4), _column(left, rows, k + 5),
                                          _column(left, rows, k + 6), _column(left, rows, k + 7))
        r0, r1, r2, r3, r4, r5, r6, r7 = (right[k], right[k + 1], right[k + 2], right[k + 3], right[k + 4], right[k + 5],
                                          right[k + 6], right[k + 7])
        for j in range(n_cols):
            sums = _terms(r0[j], l0, (w[j], x[j], y[j], z[j]))
            sums = _terms(r1[j], l1, sums)
            sums = _terms(r2[j], l2, sums)
            sums = _terms(r3[j], l3, sums)
            sums = _terms(r4[j], l4, sums)
            sums = _terms(r5[j], l5, sums)
            sums = _terms(r6[j], l6, sums)
            w[j], x[j], y[j], z[j] = _terms(r7[j], l7, sums)
        k += 8
    while k < rank:
        factors, q = _column(left, rows, k), right[k]
        for j in range(n_cols):
            w[j], x[j], y[j], z[j] = _terms(q[j], factors, (w[j], x[j], y[j], z[j]))
        k += 1


@njit(nogil=True, cache=True, inline="always")
def _column(left, rows, k):
    """(L[rows[m], k] for m < 4)."""
    return left[rows[0], k], left[rows[1], k], left[rows[2], k], left[rows[3], k]


@njit(nogil=True, cache=True, inline="always")
def _merge_rows(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32, spread, sign, out,
                positions, exact, kind):
    """A block's merge (``exact`` False) or exact merge (True) in one pass, with the product computed
    here (no BLAS); returns (m, u).

    For each row i of base [n, c] (weight bits): the product row p_j = fl(fl(Σ_k L_ik R_kj)·s)
    (:func:`_row_products`; then ``·scale`` as the NumPy path's ``product *= scale``); out := the
    merge's bracket (:func:`_ends`); with ``exact`` also, for the merged value, the bracket of the
    residual's unmerge (same product, opposite sign) and the comparison with base's bits (by value
    where that is the same: no float64 round trip through t's bits). ``positions``
    (int64, one per element) gets, at [0, m), the flat positions (increasing) where the unmerge decides
    and misses base's bits (m = 0 without ``exact``); at [size − u, size) (decreasing), those where a
    bracket does not decide, as 2·position + 1 where the merge's does not (its ``out`` is to be resolved
    too), 2·position where only the unmerge's does not. Each row is bracketed into a row of codes (a
    loop the compiler vectorises), then compacted. left: L's rows of the block [n, r]; right: R [r, c];
    norms [n] and [c]; ``exact`` and ``kind`` (:func:`_bracket`) are constants of each caller. For
    float16 and bfloat16 (kinds 1, 2) with float32 norms (``left_norms32`` [n], ``right_norms32`` [c]:
    :func:`lora_ref.merge._float32_norms`; empty arrays for the other dtypes, or where the plan has none),
    each row is first bracketed in float32 (:func:`_ends32`, on fl32(p_j) and fl32(λ_i·ρ_j)), and the
    elements it leaves undecided again in float64 (:func:`_element`) while the codes are compacted.

    Why this product gives the correctly rounded values: SPEC 3.2's bound holds for any float64
    evaluation of Σ_k L_ik R_kj in which every term passes through at most r roundings (Higham, Thm 3.1:
    |P − T| ≤ γ_r·Σ_k|L_ik||R_kj| + r·η); the sequential sum rounds the first term once as a product and
    each later term k once as a fused multiply-add (or twice, as a product and a sum, without FMA), then
    at most r − k times with the sums after it; every other operation is one IEEE operation rounded to
    nearest (no reassociation: no fastmath), so P is one of the evaluations the bound covers, and then
    Q = fl(s·P) and y = fl(w ± Q) are the proof's. The brackets decide exactly the elements whose error
    interval rounds to one value of t, and that value is RN_t(X): the merged
    values and residuals are bitwise the NumPy path's (BLAS's product), though which rare elements stay
    undecided may differ (either product may land an interval end across a midpoint the other does not).
    """
    n_rows, n_cols = base.shape
    n_words = (n_cols + 7) // 8
    words = np.zeros(n_words, np.uint64)  # the row's codes, 8 to a word (the tail of the last stays 0)
    codes = words.view(np.uint8)
    acc = np.empty((4, n_cols))
    narrow = kind != 0 and left_norms32.size > 0  # float16 and bfloat16 bracketed in float32 first
    products32 = np.empty(n_cols if narrow else 0, np.float32)
    missed = 0
    unsure = 0
    size = positions.size
    for quad in range(0, n_rows, 4):
        _row_products(left, right, quad, acc)
        for i in range(quad, min(quad + 4, n_rows)):
            row = acc[i - quad]
            left_norm = left_norms[i]
            if narrow:  # float32 lanes only (twice float64's per vector); undecided codes are redone below
                for j in range(n_cols):
                    products32[j] = np.float32(row[j] * scale)
                left_norm32 = left_norms32[i]
                for j in range(n_cols):
                    w = _widen32(base[i, j], kind)
                    p, cross = products32[j], left_norm32 * right_norms32[j]
                    value, undecided = _ends32(w, p, cross, sign, kind)
                    out[i, j] = _store32(value, kind)
                    if exact:  # decided ends are finite and not 0: values differ exactly where bits do
                        back, undecided_back = _ends32(value, p, cross, -sign, kind)
                        codes[j] = 6 if undecided else 2 if undecided_back else np.uint8(back != w)
                    else:
                        codes[j] = 6 if undecided else 0
            else:
                for j in range(n_cols):
                    out[i, j], codes[j] = _element(base[i, j], row[j] * scale, left_norm * right_norms[j], spread, sign,
                                                   exact, kind)
            start = i * n_cols
            for word in range(n_words):  # 8 codes at a time: most are 0, most others 1 (missed)
                value = words[word]
                if value == 0:
                    continue
                if value & _UNSURE_BYTES == 0:  # only 0 and 1 bytes: visit the set bits
                    while value != 0:
                        lowest = value & (~value + np.uint64(1))  # 2^(8·b) for the lowest byte b with a 1
                        byte = np.int64((np.float64(lowest).view(np.uint64) >> np.uint64(52)) - np.uint64(1023)) >> 3
                        positions[missed] = start + 8 * word + byte  # missed + unsure ≤ this element's index < size
                        missed += 1
                        value ^= lowest
                    continue
                for j in range(8 * word, min(8 * word + 8, n_cols)):
                    code = codes[j]
                    if narrow and code >= 2:  # the float64 bracket, for what the float32 one left undecided
                        out[i, j], code = _element(base[i, j], row[j] * scale, left_norm * right_norms[j], spread, sign,
                                                   exact, kind)
                    if code == 1:
                        positions[missed] = start + j
                        missed += 1
                    elif code != 0:
                        unsure += 1
                        positions[size - unsure] = 2 * (start + j) + (code == 6)
    return missed, unsure


# One compiled kernel per storage dtype, with its ``kind`` a constant, so that the compiler drops the
# other dtypes' branches from the loops (a ``kind`` argument would keep them all in every element).
@njit(nogil=True, cache=True)
def _bracket_float32(base, product, left_norms, right_norms, spread, sign, out, undecided):
    _bracket(base, product, left_norms, right_norms, spread, sign, out, undecided, 0)


@njit(nogil=True, cache=True)
def _bracket_float16(base, product, left_norms, right_norms, spread, sign, out, undecided):
    _bracket(base, product, left_norms, right_norms, spread, sign, out, undecided, 1)


@njit(nogil=True, cache=True)
def _bracket_bfloat16(base, product, left_norms, right_norms, spread, sign, out, undecided):
    _bracket(base, product, left_norms, right_norms, spread, sign, out, undecided, 2)


@njit(nogil=True, cache=True)
def _merge_rows_float32(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32,
                        spread, sign, out, positions):
    return _merge_rows(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32, spread,
                       sign, out, positions, False, 0)


@njit(nogil=True, cache=True)
def _exact_merge_rows_float32(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32,
                              spread, sign, out, positions):
    return _merge_rows(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32, spread,
                       sign, out, positions, True, 0)


@njit(nogil=True, cache=True)
def _merge_rows_float16(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32,
                        spread, sign, out, positions):
    return _merge_rows(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32, spread,
                       sign, out, positions, False, 1)


@njit(nogil=True, cache=True)
def _exact_merge_rows_float16(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32,
                              spread, sign, out, positions):
    return _merge_rows(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32, spread,
                       sign, out, positions, True, 1)


@njit(nogil=True, cache=True)
def _merge_rows_bfloat16(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32,
                         spread, sign, out, positions):
    return _merge_rows(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32, spread,
                       sign, out, positions, False, 2)


@njit(nogil=True, cache=True)
def _exact_merge_rows_bfloat16(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32,
                               spread, sign, out, positions):
    return _merge_rows(base, left, right, scale, left_norms, right_norms, left_norms32, right_norms32, spread,
                       sign, out, positions, True, 2)


#: dtype -> bracket(base bits, product, λ, ρ, spread, sign, out bits, undecided) (:func:`_bracket`).
BRACKET = {float32: _bracket_float32, float16: _bracket_float16, bfloat16: _bracket_bfloat16}
#: (dtype, exact) -> merge_rows(base bits [n, c], L rows [n, r], R [r, c], s, λ [n], ρ [c], float32 λ [n] and ρ [c]
#: (float16, bfloat16; else empty), spread, sign, out bits [n, c], positions) -> (m, u) (:func:`_merge_rows`).
MERGE_ROWS = {(float32, False): _merge_rows_float32, (float16, False): _merge_rows_float16,
              (bfloat16, False): _merge_rows_bfloat16, (float32, True): _exact_merge_rows_float32,
              (float16, True): _exact_merge_rows_float16, (bfloat16, True): _exact_merge_rows_bfloat16}


# -- the exact resolution of undecided elements, for float32/16/bfloat16 factors -----------------------


@njit(nogil=True, cache=True)
def _grow(partials, count, x):
    """Add x to the non-overlapping expansion partials[:count] (increasing magnitude; Shewchuk's
    grow-expansion as CPython's math.fsum runs it); returns the new count. Exact while nothing overflows."""
    kept = 0
    for k in range(count):
        y = partials[k]
        if abs(x) < abs(y):
            x, y = y, x
        high = x + y
        low = y - (high - x)
        if low != 0.0:
            partials[kept] = low
            kept += 1
        x = high
    partials[kept] = x
    return kept + 1


@njit(nogil=True, cache=True)
def _nearest(partials, count):
    """The sum of the expansion partials[:count] correctly rounded to float64 (math.fsum's last step)."""
    if count == 0:
        return 0.0
    n = count - 1
    high = partials[n]
    low = 0.0
    while n > 0:
        x = high
        n -= 1
        y = partials[n]
        high = x + y
        low = y - (high - x)
        if low != 0.0:
            break
    if n > 0 and ((low < 0.0 and partials[n - 1] < 0.0) or (low > 0.0 and partials[n - 1] > 0.0)):
        y = low * 2.0
        x = high + y
        if y == x - high:
            high = x
    return high


@njit(nogil=True, cache=True)
def _sign(partials, count):
    """The sign (−1, 0, 1) of the sum of an expansion: its largest nonzero part's (they do not overlap)."""
    for k in range(count - 1, -1, -1):
        if partials[k] != 0.0:
            return 1 if partials[k] > 0.0 else -1
    return 0


@njit(nogil=True, cache=True)
def _two_product(a, b):
    """(h, l) with h = fl(a·b), a·b = h + l exactly (Dekker with Veltkamp's split; no FMA: merge._two_product)."""
    h = a * b
    c = 134217729.0 * a  # 2^27 + 1
    a_high = c - (c - a)
    a_low = a - a_high
    c = 134217729.0 * b
    b_high = c - (c - b)
    b_low = b - b_high
    return h, ((a_high * b_high - h) + a_high * b_low + a_low * b_high) + a_low * b_low


@njit(nogil=True, cache=True, inline="always")
def _resolve(base, out, positions, left, right, first_row, sigma, zero_rows, zero_cols, kind):
    """out.flat[p] := the correctly rounded base + σ·(L R) at each flat position p of the block [n, c]
    (bits, as :func:`_bracket`): :func:`lora_ref.merge._resolve_exactly`'s rules and
    :func:`lora_ref.merge._exact_by_fsum`'s arithmetic for narrow factors (each L_ik·R_kj exact in
    float64; no overflow or underflow: lora_ref.merge._product checks), with the partial sums kept as an
    exact expansion instead of math.fsum's: the float64 value nearest X = w + Σ σ·L_ik·R_kj, the sign of
    X minus it, X rounded to odd (53 ≥ p_t + 2 bits), then to t. Where w is ±inf/NaN, σ = 0, the row
    or column of the factors is 0, or the product sum is exactly 0: base's bits; where X = 0: +0."""
    n_cols = base.shape[1]
    rank = left.shape[1]
    terms = np.empty(4 * rank + 4)
    power_of_two = abs(math.frexp(sigma)[0]) == 0.5
    for q in range(positions.size):
        p = positions[q]
        i, j = p // n_cols, p % n_cols
        original = base[i, j]
        w = _widen(original, kind)
        row = first_row + i
        if not np.isfinite(w) or sigma == 0.0 or zero_rows[row] or zero_cols[j]:
            out[i, j] = original
            continue
        count = 0
        for k in range(rank):
            count = _grow(terms, count, left[row, k] * right[k, j])
        if _sign(terms, count) == 0:
            out[i, j] = original
            continue
        terms[0] = w
        count = 1
        for k in range(rank):
            product = left[row, k] * right[k, j]
            if power_of_two:
                count = _grow(terms, count, sigma * product)
            else:
                high, low = _two_product(sigma, product)
                count = _grow(terms, count, high)
                count = _grow(terms, count, low)
        nearest = _nearest(terms, count)
        count = _grow(terms, count, -nearest)
        remainder = _sign(terms, count)
        if nearest == 0.0 and remainder == 0:
            out[i, j] = 0
            continue
        if remainder != 0 and not np.float64(nearest).view(np.uint64) & np.uint64(1):
            nearest = np.nextafter(nearest, np.inf if remainder > 0 else -np.inf)
        if kind == 0:
            out[i, j] = np.float32(nearest).view(np.uint32)
        else:
            magnitude = abs(nearest)
            rounded = np.inf if kind == 2 and magnitude >= 2.0**128 else _grid(magnitude, kind)
            out[i, j] = _store(-rounded if nearest < 0.0 else rounded, kind)


@njit(nogil=True, cache=True)
def _resolve_float32(base, out, positions, left, right, first_row, sigma, zero_rows, zero_cols):
    _resolve(base, out, positions, left, right, first_row, sigma, zero_rows, zero_cols, 0)


@njit(nogil=True, cache=True)
def _resolve_float16(base, out, positions, left, right, first_row, sigma, zero_rows, zero_cols):
    _resolve(base, out, positions, left, right, first_row, sigma, zero_rows, zero_cols, 1)


@njit(nogil=True, cache=True)
def _resolve_bfloat16(base, out, positions, left, right, first_row, sigma, zero_rows, zero_cols):
    _resolve(base, out, positions, left, right, first_row, sigma, zero_rows, zero_cols, 2)


#: dtype -> resolve(base bits [n, c], out bits [n, c], flat positions, L, R, first row, σ, zero rows, zero
#: columns) for narrow factors (:func:`_resolve`).
RESOLVE = {float32: _resolve_float32, float16: _resolve_float16, bfloat16: _resolve_bfloat16}
