"""Merge and unmerge a LoRA delta into a weight, fast or exact (SPEC section 3).

Two evaluations ("merge semantics"), named by the string a merged file records under
``lora_ref.merge_semantics``:

``correctly-rounded/2`` (:data:`CORRECTLY_ROUNDED`, what merges use and record today)
    merge(W, Δ) = the correctly rounded value of W + s·B·A: exact real arithmetic, one rounding
    to W's dtype t (to nearest, ties to even). unmerge(W', Δ) = the correctly rounded W' − s·B·A.
    The value is computed with a float64 product (BLAS's GEMM, any order, any threads, or the
    kernels' sequential sum) plus a rigorous elementwise error bound; an element whose error
    interval rounds to one value of t has that value; the rare rest are resolved in exact
    integer arithmetic (SPEC 3.2 has the proof). The result depends on nothing but the inputs:
    not the product's evaluation, the BLAS, its threads or the block size.
``fixed-order/1`` (:data:`FIXED_ORDER`, files without the key)
    round_t(fl_64(W + Δ)) with Δ = s·Σ_k B[:, k] ⊗ A[k, :] accumulated in increasing k
    (:func:`lora_ref.numerics.rank_one_sum`): what lora-ref 0.x wrote; kept so their merged files
    and residuals unmerge bit for bit. DoRA sources, float64 weights, sources without
    ``rank_factors`` and adapters with non-finite values use it under either name.

Fast mode stops at the merged weight; the round trip then obeys, elementwise (SPEC 3.3),

    |unmerge(merge(W)) − W| ≤ ũ(1+ũ)|W+Δ| + ũ|W| + (1+ũ)·η_t,   ũ = u_t + u_64(1+u_t)

(the correctly rounded evaluation satisfies it with ũ = u_t). Exact mode also returns a
:class:`Residual`: the flat indices and original bits of every element where unmerge(W') is not
bitwise W. Unmerging with it restores W bit for bit, whatever W holds (NaN payloads, ±inf, signed
zeros, subnormals, elements that overflowed). A residual carries a checksum of the adapter
factors and, when it may leave the process, of the merged weight.

Δ is produced by a *delta source* (:class:`lora_ref.linear.LinearDelta` and the other layer
kinds) in row blocks over W's first axis, so the extra memory is a few float64 blocks, not a
float64 copy of W. A source whose merge is not additive (DoRA: W' = g ⊙ (W + Δ)) also defines
``merge_block(rows, W64)`` and ``unmerge_block(rows, M64)`` (float64 in, float64 out, before the
one rounding); merge/unmerge and the exact residual then use those instead of ±Δ.

The correctly rounded evaluation's elementwise work has two implementations with the same bits:
the NumPy passes below (:func:`_bracket`, the reference, always available, on BLAS's product) and,
where numba is installed (the ``fast`` extra), the compiled kernels of :mod:`lora_ref.kernels` (one
pass per block that computes the product itself, row by row, and brackets it: for a merge or
unmerge, and for an exact merge's block with its residual check; the bracket alone for
:func:`merge_many`'s stacked product; the exact resolution of narrow factors). Any float64 product
within SPEC 3.2's bound gives the same correctly rounded bits, so the paths differ at most in which
rare elements go to the exact resolution. :func:`kernels_module` picks one (``LORA_REF_KERNELS``:
auto, numpy, numba).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from .dtypes import (
    BITS_VIEW, SMALLEST_NORMAL, SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, bfloat16, bits_of, check_float_array, float32, float64, narrow_view,
    round_scalar, round_to, round_to_grid, store_exact, widen_to_float32,
)
from .errors import ConfigError, NonFiniteError, ResidualMismatchError, ShapeError

#: Target size of one float64 working block (bytes); bounds the extra memory of a merge (shared by its
#: threads). Large enough that the per-block calls (NumPy's, the kernels' and the exact resolution's) are
#: amortised; the NumPy path's thread blocks are capped lower (THREAD_BLOCK_BYTES) to stay in cache.
BLOCK_BYTES = 2 * 1024 * 1024
#: Most bytes of one float64 temporary a thread works on, whatever ``block_bytes`` allows: glibc
#: serves larger allocations with fresh mmap pages, and their page faults cost more than the
#: arithmetic (bench/bench_merge.py measures the effect).
THREAD_BLOCK_BYTES = 256 * 1024
#: The same for the numba kernels (lora_ref/kernels.py), whose largest temporary is the block's found
#: positions (int32: 4 bytes an element; the product is computed a row at a time, in cache), so their
#: blocks hold twice the elements of the bytes: 256 Ki elements (64 rows of 4096) at most, on 2 threads
#: under the default BLOCK_BYTES too. Measured on 2 cores (4096², r = 16, fast / exact merge, medians of
#: 12 interleaved rounds): 32-row blocks a thread float32 27 / 53 ms, bfloat16 35 / 74 ms; 64-row ones
#: 24 / 46 and 28 / 52 ms; 128-row ones no faster (the exact resolution's per-block calls weigh most in
#: bfloat16, where most blocks have a few undecided elements). An exact q/v switch of a hidden-1024 Llama
#: (MergeLedger, 2 threads, 256 Ki-element blocks instead of 128 Ki): float32 42 → 37 ms, bfloat16 51 → 41.
KERNEL_THREAD_BLOCK_BYTES = 1024 * 1024
#: Largest m·n·k of one GEMM call: OpenBLAS runs products up to 2^18 on the calling thread; larger
#: ones start its own threads, which, called from several of ours at once, oversubscribe the cores.
GEMM_CHUNK = 2**18
#: Smallest block the numba kernels take under LORA_REF_KERNELS=auto: below, NumPy's passes cost tens of
#: microseconds, less than numba's import and first call (about a second in a fresh process: a command
#: on a small model never pays it).
AUTO_KERNEL_ELEMENTS = 4096
#: Most threads a merge uses. Every element's value is fixed by the semantics, whatever thread
#: computes its block, so the result is bitwise the same for any thread count.
MAX_THREADS = min(8, os.cpu_count() or 1)

#: The merge semantics names (module doc); files without a name were merged with FIXED_ORDER.
FIXED_ORDER = "fixed-order/1"
CORRECTLY_ROUNDED = "correctly-rounded/2"
SEMANTICS = (FIXED_ORDER, CORRECTLY_ROUNDED)
#: What merges use and record.
MERGE_SEMANTICS = CORRECTLY_ROUNDED
#: ``Residual.delta_digest`` of a residual made by :func:`switch` for an in-process owner: no checksum
#: was computed (check_residual never matches it, so such a residual cannot unmerge another weight).
IN_MEMORY = "in-memory (no checksum)"
#: The safetensors metadata key a merged checkpoint records its semantics under.
SEMANTICS_META_KEY = "lora_ref.merge_semantics"

_T = TypeVar("_T")
_U64 = UNIT_ROUNDOFF[float64]  # 2^-53
_ETA64 = SMALLEST_SUBNORMAL[float64]  # 2^-1074
#: Largest rank the correctly rounded evaluation takes (r·u ≤ 2^-33 keeps γ_r ≤ (1 + 2^-32)·r·u).
_MAX_RANK = 2**20


class DeltaSource(Protocol):
    """Anything that can produce ΔW in row blocks over the first axis of W.

    Optional: ``rank_factors() -> (L, R)`` and ``scale``, float64 arrays with
    Δ = scale · L R reshaped like W (L: [W.shape[0], r], R: [r, W[0].size]); sources that have
    them merge with the correctly rounded semantics.
    """

    shape: tuple[int, ...]
    module: str

    def block(self, rows: slice) -> np.ndarray:
        """Δ[rows] in float64, shaped like W[rows], in the fixed order of ``fixed-order/1``."""

    def factors(self) -> tuple[np.ndarray, ...]:
        """The arrays Δ is computed from, for the residual checksum."""


def check_semantics(semantics: str, where: str = "merge") -> str:
    """``semantics`` if lora-ref knows it, else a ConfigError naming the known ones."""
    if semantics not in SEMANTICS:
        raise ConfigError(
            f"{where}: unknown merge semantics {str(semantics)[:80]!r}; this lora-ref evaluates {', '.join(SEMANTICS)} "
            "(a newer lora-ref wrote it: upgrade to unmerge it)"
        )
    return semantics


@dataclass(frozen=True)
class Residual:
    """What exact unmerge needs beyond Δ to restore W bit for bit.

    ``indices``: flat positions in W, strictly increasing, uint32 when W has at most 2^32
    elements (halving the residual's size; see :func:`residual_index_dtype`), else int64;
    ``values``: W's original elements there, in W's dtype; ``delta_digest``: BLAKE2b checksum of
    the adapter factors (:data:`IN_MEMORY` for one made by :func:`switch`); ``merged_digest``: BLAKE2b checksum of the merged weight, or None for a
    residual that stays with the weight it was made for in one process (a
    :class:`~lora_ref.ledger.MergeLedger` owns its weights: no digest of every merged weight on
    every switch); ``semantics``: the evaluation unmerge must use.
    """

    indices: np.ndarray
    values: np.ndarray
    shape: tuple[int, ...]
    merged_digest: str | None
    delta_digest: str
    semantics: str = MERGE_SEMANTICS

    @property
    def count(self) -> int:
        return int(self.indices.size)

    @property
    def nbytes(self) -> int:
        return int(self.indices.nbytes + self.values.nbytes)


def residual_index_dtype(size: int) -> np.dtype:
    """The dtype of residual indices into a weight of ``size`` elements: uint32 if they fit, else int64."""
    return np.dtype(np.uint32) if size <= 2**32 else np.dtype(np.int64)


def digest_arrays(*arrays: np.ndarray) -> str:
    """BLAKE2b-128 over dtype, shape and bytes of each array (order matters)."""
    h = hashlib.blake2b(digest_size=16)
    for array in arrays:
        array = np.ascontiguousarray(array)
        key = (array.dtype.str, array.shape)
        prefix = _DIGEST_PREFIXES.get(key)
        if prefix is None:
            prefix = f"{array.dtype.str}{array.shape}".encode()
            if len(_DIGEST_PREFIXES) < 4096:
                _DIGEST_PREFIXES[key] = prefix
        h.update(prefix)
        h.update(array if array.ndim else array.tobytes())  # the bytes as laid out (C order)
    return h.hexdigest()


#: (dtype string, shape) -> the text digest_arrays hashes before an array's bytes, for the layouts seen first.
_DIGEST_PREFIXES: dict[tuple[str, tuple[int, ...]], bytes] = {}


def block_rows(shape: tuple[int, ...], block_bytes: int = BLOCK_BYTES) -> int:
    """How many rows (first-axis slices) of a float64 block fit in ``block_bytes``."""
    row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, block_bytes // (8 * max(row_elems, 1)))


def row_slices(n_rows: int, step: int):
    """slice(start, start + step) over [0, n_rows), the last one shorter: W's row blocks."""
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


class _Workspace:
    """One thread's scratch arrays, reused from block to block of one merge, unmerge or switch.

    A fresh temporary the size of a block costs more than the arithmetic on it (glibc serves it
    with new mmap pages: page faults, then munmap), so every per-block temporary of the correctly
    rounded evaluation is one of these, written with ``out=`` (about 2 float64 arrays of the block
    for a fast merge, 4 with the exact residual, plus a few narrow ones).
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._views: dict[tuple, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The array ``name`` with ``shape`` and ``dtype``, contents undefined (the same memory on every call)."""
        key = (name, shape, dtype)
        view = self._views.get(key)
        if view is None:
            size = math.prod(shape)
            array = self._arrays.get(name)
            if array is None or array.size < size or array.dtype != dtype:
                array = self._arrays[name] = np.empty(size, dtype)
                self._views = {k: v for k, v in self._views.items() if k[0] != name}
            view = self._views[key] = array[:size].reshape(shape)
        return view


def _map_row_blocks(fn: Callable[[slice, _Workspace], _T], shape: tuple[int, ...], block_bytes: int,
                    workspace: _Workspace | None = None) -> list[_T]:
    """[fn(rows, workspace) for each row block], in order; on several cores, blocks run in threads.

    With a ``workspace`` the blocks run one after another on the calling thread, in it (for a
    caller that runs several weights at once on its own threads, one workspace each).

    NumPy releases the GIL in the array operations, so blocks proceed in parallel; each thread
    has its own :class:`_Workspace`, dropped when the call returns. The memory budget
    ``block_bytes`` is shared: with k threads each block is about block_bytes / k, and at most 2k
    blocks are submitted ahead of the one being collected, so the extra memory stays a few
    ``block_bytes`` whatever the thread count and the number of blocks.
    """
    row_bytes = 8 * (math.prod(shape[1:]) if len(shape) > 1 else 1)
    kernel = kernels_module(math.prod(shape)) is not None
    thread_block = KERNEL_THREAD_BLOCK_BYTES if kernel else THREAD_BLOCK_BYTES
    # a block is at least one row, and a thread keeps several float64 temporaries of its block alive
    # (the correctly rounded evaluation: product, sum, bound, both ends, masks): at most
    # block_bytes / (4 rows) threads, so the extra memory stays a few block_bytes (tests/test_memory.py).
    # The kernels keep no float64 block: their largest temporary is the found positions, int32 (_kernel_rows),
    # so a block of the same bytes holds twice the elements (block_rows counts 8 bytes an element).
    threads = max(1, min(MAX_THREADS, block_bytes // (4 * row_bytes)))
    per_element = 2 if kernel else 1
    step = block_rows(shape, per_element * max(1, min(block_bytes // threads, thread_block)))
    if workspace is not None or threads == 1 or -(-shape[0] // step) < 2 * threads:
        workspace = workspace or _Workspace()
        single = block_rows(shape, per_element * min(block_bytes, thread_block))
        return [fn(rows, workspace) for rows in row_slices(shape[0], single)]
    local = threading.local()

    def run(rows: slice) -> _T:
        if not hasattr(local, "workspace"):
            local.workspace = _Workspace()
        return fn(rows, local.workspace)

    results: list[_T] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[Future[_T]] = deque()
        for rows in row_slices(shape[0], step):
            pending.append(pool.submit(run, rows))
            if len(pending) >= 2 * threads:
                results.append(pending.popleft().result())
        results.extend(future.result() for future in pending)
    return results


def _check(W: np.ndarray, delta: DeltaSource) -> None:
    check_float_array(W, f"{delta.module} base weight".strip())
    if tuple(W.shape) != tuple(delta.shape):
        raise ShapeError(f"{delta.module}: base weight has shape {tuple(W.shape)} but the adapter's delta has {tuple(delta.shape)}")


#: Dtypes np.isfinite takes as they are (others, bfloat16 and integers, are widened to float64 first).
_NATIVE_FLOATS = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16))


def check_factors_finite(delta: DeltaSource) -> None:
    """NonFiniteError unless every factor of ``delta`` is finite (merge refuses NaN/inf adapters)."""
    for array in delta.factors():
        array = np.asarray(array)
        if not np.isfinite(array if array.dtype in _NATIVE_FLOATS else array.astype(float64)).all():
            raise NonFiniteError(
                f"{delta.module}: the adapter holds NaN or infinity; refusing to merge "
                "(pass allow_nonfinite=True / --allow-nonfinite to merge anyway)"
            )


# -- the correctly rounded evaluation (correctly-rounded/2, SPEC 3.2) ---------------------------------


@dataclass(frozen=True)
class _Product:
    """Δ = s · L R (L [rows, r], R [r, c], float64) and the constants of the error bound.

    For element (i, j) of a block, with y the float64 value of W + s·(L R) from BLAS,
    |y − (W + s·Σ_k L_ik R_kj)| ≤ 4u|y| + κ·‖L_i‖·‖R_j‖ + φ   (SPEC 3.2), where κ = 2(r+1)u|s|;
    ``left_norms`` hold κ·‖L_i‖ + √φ and ``right_norms`` ‖R_j‖ + √φ, whose products cover
    κ·‖L_i‖·‖R_j‖ + φ.
    """

    scale: float
    left: np.ndarray
    right: np.ndarray
    left_norms: np.ndarray  # κ·‖L_i‖₂ (+ the underflow allowance)
    right_norms: np.ndarray  # ‖R_j‖₂ (+ the underflow allowance)
    zero_rows: np.ndarray  # L_i = 0: Δ_i is exactly 0
    zero_cols: np.ndarray  # R_j = 0
    spread: float  # the coefficient of |y|: 4u
    narrow: bool  # L and R hold float32/16/bf16 values: each L_ik·R_kj is exact in float64
    left_norms32: np.ndarray  # float16/bfloat16 weights: the float32 bracket's κ₃₂·‖L_i‖ + 2^-73 (else empty)
    right_norms32: np.ndarray  # ‖R_j‖ + 2^-73


def _product(delta: DeltaSource, dtype: np.dtype, semantics: str) -> _Product | None:
    """The correctly rounded evaluation's plan for ``delta``, or None where the fixed order applies."""
    rank_factors = getattr(delta, "rank_factors", None)
    if semantics == FIXED_ORDER or dtype == float64 or rank_factors is None or getattr(delta, "merge_block", None) is not None:
        return None
    left, right = rank_factors()
    narrow = all(np.asarray(f).dtype in (float32, np.dtype(np.float16), bfloat16) for f in (left, right))
    left = np.ascontiguousarray(left, dtype=float64)
    right = np.ascontiguousarray(right, dtype=float64)
    scale, rank = float(delta.scale), left.shape[1]
    if rank > _MAX_RANK or not (math.isfinite(scale) and np.isfinite(left).all() and np.isfinite(right).all()):
        return None
    norms = _factor_norms(left, right)
    left_norms, right_norms, spread, near = _bound_norms(*norms, rank, scale)
    if near:
        return None  # near float64's range (float64 factors only): the bound's arithmetic could overflow
    left_norms32, right_norms32 = _float32_norms(*norms, rank, scale) if dtype in _FLOAT32_BRACKETED else (_NO_NORMS, _NO_NORMS)
    return _Product(
        scale=scale, left=left, right=right, left_norms=left_norms, right_norms=right_norms,
        zero_rows=~left.any(axis=1), zero_cols=~right.any(axis=0), spread=spread,
        narrow=narrow and 2.0**-400 < abs(scale) and np.abs(left).max(initial=0) * np.abs(right).max(initial=0) * abs(scale) < 2.0**900,
        left_norms32=left_norms32, right_norms32=right_norms32,
    )


#: The weight dtypes the kernels bracket in float32 first (SPEC 3.2): those float32 holds with room to spare.
_FLOAT32_BRACKETED = (np.dtype(np.float16), bfloat16)
#: The float32 norms of a plan without the float32 bracket.
_NO_NORMS = np.zeros(0, float32)


def _float32_norms(left_norms: np.ndarray, right_norms: np.ndarray, rank: int,
                   scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(λ, ρ) of the float32 bracket of float16 and bfloat16 weights (SPEC 3.2; lora_ref.kernels._ends32 says
    why), from the float64 norms ‖L_i‖ [n] and ‖R_j‖ [c] (:func:`_factor_norms`) of a rank-r product:
    float32 [n] and [c] with λ_i·ρ_j ≥ 2(u₃₂ + (r + 1)u)|s|·‖L_i‖‖R_j‖ + 2^-146, or empty arrays (no float32
    bracket) where |s| ≥ 2^64 or the norms leave float32's range.

    λ_i = fl32(κ₃₂·‖L_i‖·(1 + 2^-20) + 2^-73) with κ₃₂ = 2(u₃₂ + (r + 1)u)|s|, ρ_j = fl32(‖R_j‖·(1 + 2^-20) +
    2^-73): the factor 1 + 2^-20 covers the float64 norms' (r + 2)u and float32's rounding to nearest
    (2^-24); the floors' product 2^-146 covers the product's float32 rounding (2^-150 below float32's
    normal range) and float64's underflow terms (r|s|·2^-1074, under 2^-900 for |s| < 2^64)."""
    kappa = 2 * (UNIT_ROUNDOFF[float32] + (rank + 1) * _U64) * abs(scale)
    with np.errstate(over="ignore"):
        left32 = (kappa * left_norms * (1 + 2.0**-20) + 2.0**-73).astype(float32)
        right32 = (right_norms * (1 + 2.0**-20) + 2.0**-73).astype(float32)
    if abs(scale) >= 2.0**64 or not (np.isfinite(left32).all() and np.isfinite(right32).all()):
        return _NO_NORMS, _NO_NORMS
    return left32, right32


def _factor_norms(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(‖L_i‖₂ [..., n], ‖R_j‖₂ [..., c]) in float64 for L [..., n, r] and R [..., r, c]: within a relative
    (r + 2)u of the true norms, less what squares below 2^-1074 lose (each value under 2^-537)."""
    return np.sqrt(np.einsum("...ik,...ik->...i", left, left)), np.sqrt(np.einsum("...kj,...kj->...j", right, right))


def _bound_norms(left_norms: np.ndarray, right_norms: np.ndarray, rank: int,
                 scale: float | np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """The error bound's constants of Δ = s · L R (:class:`_Product`): (κ·‖L_i‖ + √φ, ‖R_j‖ + √φ,
    the coefficient 4u of |y|, ``near``) from the norms of L [..., n, r] and R [..., r, c] in float64
    (:func:`_factor_norms`) and finite s [...]; leading axes stack products, each with its own s.
    ``near`` (bool [...]) marks products with |s|·max‖L_i‖·max‖R_j‖ > 2^1000 (float64 factors only),
    whose bound arithmetic could overflow.
    """
    magnitude = np.abs(np.asarray(scale, dtype=float64))[..., None]  # |s|, [..., 1]
    # the float64 norms' relative (r + 2)u is covered by the factor 2 in κ; squares of values below
    # 2^-537 underflow, so each norm also gets √r·2^-500 ≥ the lost part.
    allowance = math.sqrt(rank) * 2.0**-500
    left_norms = left_norms + allowance
    right_norms = right_norms + allowance
    with np.errstate(over="ignore"):
        near = (magnitude[..., 0] * left_norms.max(axis=-1, initial=0) * right_norms.max(axis=-1, initial=0) > 2.0**1000) \
            & (rank > 0)
    left_norms *= 2 * (rank + 1) * _U64 * magnitude
    floor = _ETA64 * np.ceil(2 * rank * magnitude + 6)
    root_floor = np.sqrt(floor) * (1 + 2.0**-20)  # (√φ)² ≥ φ
    return left_norms + root_floor, right_norms + root_floor, 4 * _U64, near


def _exact_int(x: float) -> int:
    """x · 2^1074 as an integer (exact for every finite float64)."""
    mantissa, exponent = math.frexp(x)
    return int(mantissa * 2.0**53) << (exponent - 53 + 1074)


#: Exact values in :func:`_resolve_exactly` are integers N standing for N · 2^-3222 (2^-3222 =
#: 2^-1074 · 2^-1074 · 2^-1074: a product s · L_ik · R_kj of three float64 numbers is an integer
#: multiple of it, and W = W_int · 2^-1074 is W_int · 2^2148 of them).
_W_SHIFT = 2148
_DENOMINATOR = 1 << 3222


def _odd_from_integer(numerator: int) -> float:
    """numerator · 2^-3222 (≠ 0) rounded to odd into float64 (±inf past its range).

    The inexact result's last bit is set; 53 ≥ p_t + 2, so one more rounding to t is correct
    (Boldo & Melquiond 2005).
    """
    try:
        nearest = numerator / _DENOMINATOR  # int / int is correctly rounded in CPython
    except OverflowError:  # |x| ≥ 2^1024: beyond every t's range
        return math.copysign(math.inf, numerator)
    if math.isfinite(nearest):
        represented = _exact_int(nearest) << _W_SHIFT
        if represented != numerator and not int(np.float64(nearest).view(np.uint64)) & 1:
            nearest = math.nextafter(nearest, math.inf if represented < numerator else -math.inf)
    return nearest


def _resolve_exactly(plan: _Product, rows: slice, base: np.ndarray, sign: float, positions: np.ndarray,
                     out: np.ndarray) -> None:
    """out.flat[p] = the correctly rounded base + sign·s·(L R) at each flat position p, exactly.

    ``base`` is the block [n, c] in t, ``out`` an array like it. The rules of SPEC 3.2: where
    base_p is ±inf or NaN, or s·(L R)_p is exactly 0, out_p is base_p bit for bit (so −0 and NaN
    payloads stay); where the exact sum is 0 otherwise, +0 (what IEEE addition gives). One element
    at a time in Python (a block has a few undecided elements; array calls on them would cost
    more): :func:`_exact_by_fsum` for float32/16/bf16 factors, integers otherwise.
    """
    sigma = sign * plan.scale
    kernels = kernels_module(base.size) if plan.narrow else None
    if kernels is not None:  # the same arithmetic in one compiled loop (lora_ref/kernels.py)
        kernels.RESOLVE[base.dtype](bits_of(base), out.view(BITS_VIEW[out.dtype]), positions.astype(np.int64, copy=False),
                                    plan.left, plan.right, rows.start, sigma, plan.zero_rows, plan.zero_cols)
        return
    n_cols = base.shape[1]
    out_flat, out_bits, base_bits, flat_base = out.reshape(-1), bits_of(out).reshape(-1), bits_of(base).reshape(-1), base.reshape(-1)
    scale_int = None if plan.narrow else _exact_int(sigma)
    for p in positions.tolist():
        i, j = divmod(p, n_cols)
        i += rows.start
        w = float(flat_base[p])
        if not math.isfinite(w) or sigma == 0 or plan.zero_rows[i] or plan.zero_cols[j]:
            out_bits[p] = base_bits[p]
            continue
        left, right = plan.left[i].tolist(), plan.right[:, j].tolist()
        if plan.narrow:
            value = _exact_by_fsum(w, sigma, left, right)
        else:
            total = sum(_exact_int(a) * _exact_int(b) for a, b in zip(left, right))
            numerator = (_exact_int(w) << _W_SHIFT) + scale_int * total
            value = None if total == 0 else _odd_from_integer(numerator) if numerator else 0.0
        if value is None:  # the delta is exactly 0: W's bits
            out_bits[p] = base_bits[p]
        else:
            out_flat[p] = round_scalar(value, out.dtype) if value else 0.0


def _gemm(left: np.ndarray, right: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out := left @ right (float64) in BLAS calls of at most :data:`GEMM_CHUNK` multiply-adds each; returns out."""
    rank, cols = right.shape
    step_rows = GEMM_CHUNK // max(1, rank * cols)
    if step_rows >= 1:
        for start in range(0, left.shape[0], step_rows):
            np.matmul(left[start : start + step_rows], right, out=out[start : start + step_rows])
        return out
    step_cols = max(1, GEMM_CHUNK // max(1, rank))
    for start in range(0, cols, step_cols):
        out[:, start : start + step_cols] = left @ right[:, start : start + step_cols]
    return out


_SPLIT = 2.0**27 + 1  # Veltkamp's constant for float64


def _two_product(a: float, b: float) -> tuple[float, float]:
    """(h, l) with h = fl(a·b) and a·b = h + l exactly (Dekker with Veltkamp's split; |a·b| < 2^900, > 2^-700)."""
    h = a * b
    c = _SPLIT * a
    a_hi = c - (c - a)
    a_lo = a - a_hi
    c = _SPLIT * b
    b_hi = c - (c - b)
    b_lo = b - b_hi
    return h, ((a_hi * b_hi - h) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _exact_by_fsum(w: float, sigma: float, left: list[float], right: list[float]) -> float | None:
    """RN_64-to-odd of X = w + σ·Σ_k left_k·right_k (float32/16/bf16 factors), None if the sum is exactly 0.

    Each p_k = left_k·right_k is exact in float64 and σ·p_k = h_k + l_k exactly (exact products
    when σ is a power of two, else :func:`_two_product`; no overflow or underflow, which the
    narrow factors and a sane scale give: :func:`_product`). math.fsum returns the correctly
    rounded sum of its floats, and the fsum of the terms and −f is the correctly rounded remainder
    X − f, whose sign is exact: so f rounded to odd (53 ≥ p_t + 2 bits) and then to t is RN_t(X).
    Returns 0.0 where X = 0 exactly.
    """
    products = [a * b for a, b in zip(left, right)]
    if math.fsum(products) == 0:
        return None
    if math.frexp(sigma)[0] in (0.5, -0.5):
        terms = [w, *(sigma * q for q in products)]
    else:
        terms = [w, *(part for q in products for part in _two_product(sigma, q))]
    nearest = math.fsum(terms)
    remainder = math.fsum([*terms, -nearest])
    if nearest == 0 and remainder == 0:
        return 0.0
    if remainder != 0 and not int(np.float64(nearest).view(np.uint64)) & 1:
        nearest = math.nextafter(nearest, math.inf if remainder > 0 else -math.inf)
    return nearest


def _rounded_sum(plan: _Product, rows: slice, base: np.ndarray, sign: float, workspace: _Workspace, out: np.ndarray,
                 product: np.ndarray | None = None, keep: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(``out`` := the correctly rounded base + sign·Δ[rows] in base's dtype t, the float64 fl(s·L R) used).

    ``base`` is the block [n, c] in t, ``out`` an array like it (not base); ``product`` (from an
    earlier call on the same rows) saves the GEMM: any float64 approximation within the bound
    gives the same result; ``keep`` asks for the product back (else it is overwritten and None
    is returned). The elements :func:`_bracket` leaves undecided are resolved exactly. On the
    kernel path without ``product`` or ``keep``, :func:`lora_ref.kernels._merge_rows` computes the
    product itself (no GEMM, no float64 block: :func:`_kernel_rows`); ``out`` is then C-contiguous.
    """
    if product is None and not keep:
        kernels = kernels_module(base.size)
        if kernels is not None:  # the product, the bracket and the compaction in one compiled pass
            coded = _kernel_rows(kernels, plan, rows, base, sign, workspace, out, exact=False)[1]
            if coded.size:
                _resolve_exactly(plan, rows, base, sign, np.sort(coded >> 1), out)
            return out, None
    if product is None:
        product = _gemm(plan.left[rows], plan.right, workspace.get("product", base.shape, float64))  # any order (SPEC 3.2)
        product *= plan.scale
    undecided = _bracket(base, product, plan.left_norms[rows], plan.right_norms, plan.spread, sign, workspace, out, keep)
    if undecided.any():
        _resolve_exactly(plan, rows, base, sign, np.flatnonzero(undecided), out)
    return out, product if keep else None


def kernels_module(elements: int = AUTO_KERNEL_ELEMENTS):
    """:mod:`lora_ref.kernels` if the numba kernels are to run on a block of ``elements``, else None (the
    NumPy reference path).

    ``LORA_REF_KERNELS`` (read on every call): ``auto`` (default) uses them where numba imports and the
    block has at least :data:`AUTO_KERNEL_ELEMENTS` elements, ``numpy`` never, ``numba`` always (a
    ConfigError where numba is missing). Both paths give the same bits (lora_ref/kernels.py says why;
    tests/test_kernels.py checks it).
    """
    choice = os.environ.get("LORA_REF_KERNELS", "auto")
    if choice == "numpy" or (choice == "auto" and elements < AUTO_KERNEL_ELEMENTS):
        return None
    if choice not in ("auto", "numba"):
        raise ConfigError(f"LORA_REF_KERNELS={choice[:40]!r}: expected auto, numpy or numba")
    if _KERNELS[0] is None:
        try:
            from . import kernels
        except ImportError as exc:  # numba is an optional accelerator
            _KERNELS[:] = [False, f"{type(exc).__name__}: {exc}"]
        else:
            _KERNELS[:] = [kernels, None]
    if _KERNELS[0] is False and choice == "numba":
        raise ConfigError(f"LORA_REF_KERNELS=numba but the numba kernels do not import ({_KERNELS[1]}); "
                          "install lora-ref[fast] or set LORA_REF_KERNELS=auto")
    return _KERNELS[0] or None


#: [lora_ref.kernels, None] once imported, [False, why] where it does not import, [None, None] before the first try.
_KERNELS: list = [None, None]


def _kernel_args(base: np.ndarray, product: np.ndarray, left_norms: np.ndarray, right_norms: np.ndarray,
                 out: np.ndarray) -> tuple:
    """(base bits, product, λ, ρ, out bits) as the kernels take them: [k, n, c] blocks, [k, n] and [k, c] norms."""
    n, c = base.shape[-2:]
    bits = lambda a: np.ascontiguousarray(a).reshape(-1, n, c).view(BITS_VIEW[a.dtype])  # noqa: E731
    if not out.flags.c_contiguous:
        raise ValueError("the kernels write a contiguous out block")  # a bug: every caller passes workspace memory
    return (bits(base), np.ascontiguousarray(product).reshape(-1, n, c), np.ascontiguousarray(left_norms).reshape(-1, n),
            np.ascontiguousarray(right_norms).reshape(-1, c), out.reshape(-1, n, c).view(BITS_VIEW[out.dtype]))


def _kernel_rows(kernels, plan: _Product, rows: slice, base: np.ndarray, sign: float, workspace: _Workspace,
                 out: np.ndarray, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lora_ref.kernels._merge_rows` on the block ``base`` [n, c] (t) of W[rows] into ``out`` (like base, not
    base, C-contiguous): (the increasing flat positions in the block where the correctly rounded unmerge of
    ``out`` misses base, if ``exact``; the undecided ones, coded 2·position + 1 where the merge's bracket
    does not decide, 2·position where only the unmerge's does not), views of ``workspace`` memory."""
    if not out.flags.c_contiguous:
        raise ValueError("the kernels write a contiguous out block")  # a bug: callers pass workspace memory or rows of a C array
    # int32 positions (codes 2·position + 1 < 2^31) halve the block's largest temporary (_map_row_blocks counts on it)
    found = workspace.get("positions", (base.size,), np.dtype(np.int32 if base.size < 2**30 else np.int64))
    missed, unsure = kernels.MERGE_ROWS[base.dtype, exact](
        bits_of(np.ascontiguousarray(base)), plan.left[rows], plan.right, plan.scale, plan.left_norms[rows],
        plan.right_norms, plan.left_norms32[rows], plan.right_norms32, plan.spread, sign, out.view(BITS_VIEW[out.dtype]), found)
    return found[:missed], found[found.size - unsure:]


def _bracket(base: np.ndarray, product: np.ndarray, left_norms: np.ndarray, right_norms: np.ndarray, spread: float,
             sign: float, workspace: _Workspace, out: np.ndarray, keep: bool) -> np.ndarray:
    """``out`` := RN_t of the low end of y ± E, with y = fl(base ± product); returns where that is
    undecided (a bool array of ``workspace``, valid until its next use).

    ``base`` [..., n, c] in t, ``out`` an array like it (not base), ``product`` ≈ s·L R in float64
    like it (any float64 evaluation within the bound of SPEC 3.2: a BLAS GEMM of one block, or a
    batched matmul of a stack of weights), E = left_norms[..., i] · right_norms[..., j] + spread·|y|
    (:func:`_bound_norms`); leading axes stack weights, each with its own norms. An element is
    decided where fl(y − E) and fl(y + E) round to the same value of t: float32 by NumPy's cast
    (a −0/+0 pair differs in its bits), float16 and bfloat16 by :func:`round_to_grid` in float64 (a
    rounded 0 is undecided: its sign needs the exact sum); there ``out`` is the correctly rounded
    base ± s·L R, whatever evaluation gave ``product``. NaN and ±inf in y are undecided too (±inf
    makes E infinite, so an end is NaN). The temporaries are float64 arrays of ``workspace``
    updated in place: y (in the product's memory unless ``keep``) and the two ends (the low one
    in E's memory); narrower scratch arrays are views of memory no longer needed at that point.
    """
    shape, dtype = base.shape, base.dtype
    kernels = kernels_module(base.size)
    if kernels is not None:  # one fused pass, bitwise the NumPy passes below
        undecided = workspace.get("undecided", shape, np.dtype(bool))
        base_bits, product, left_norms, right_norms, out_bits = _kernel_args(base, product, left_norms, right_norms, out)
        kernels.BRACKET[dtype](base_bits, product, left_norms, right_norms, spread, sign, out_bits,
                               undecided.reshape(base_bits.shape))
        return undecided
    low = workspace.get("low", shape, float64)
    high = workspace.get("high", shape, float64)
    wide = base if dtype == float32 else widen_to_float32(base, narrow_view(low, float32))
    y = workspace.get("sum", shape, float64) if keep else product
    undecided = workspace.get("undecided", shape, np.dtype(bool))
    with np.errstate(invalid="ignore", over="ignore"):  # W = ±inf / NaN: undecided, resolved by the caller
        (np.add if sign > 0 else np.subtract)(wide, product, out=y)
        np.multiply(left_norms[..., :, None], right_norms[..., None, :], out=low)
        np.abs(y, out=high)
        if dtype == float32:
            nan = bool(np.isnan(high.max(initial=0.0)))  # max propagates NaN: one reduction, not a mask
        else:
            smallest = float(high.min(initial=math.inf))  # NaN: compares false below
        high *= spread
        low += high  # E
        if dtype == float32:
            np.add(y, low, out=high)
            np.subtract(y, low, out=low)
            high32 = narrow_view(y, float32)  # y is not needed any more
            np.copyto(high32, high, casting="unsafe")
            np.copyto(out, low, casting="unsafe")
            np.not_equal(out.view(np.uint32), high32.view(np.uint32), out=undecided)
            if nan:  # NaN casts to NaN at both ends, with the same bits
                undecided |= np.isnan(high32)
        else:
            # |y| ≥ 2^(e_min+1) and E ≤ |y|/4 everywhere: every end has |end| ≥ 2^e_min (so no rounded 0)
            normal = smallest >= 2 * SMALLEST_NORMAL[dtype] and 4 * float(low.max(initial=0.0)) <= smallest
            np.add(y, low, out=high)
            np.subtract(y, low, out=low)
            round_to_grid(high, dtype, y, normal=normal)
            round_to_grid(low, dtype, y, normal=normal)
            np.not_equal(low, high, out=undecided)  # NaN ends differ from everything
            if not normal and not low.all():
                undecided |= low == 0
            store_exact(low, out, y)  # y (the rounding's scratch) is not needed any more
    return undecided


# -- one block of a weight: merge, unmerge, residual ---------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One merge (sign +1) or unmerge (sign −1) of ``delta`` on a weight, and how it is evaluated."""

    delta: DeltaSource
    plan: _Product | None
    sign: float

    def apply(self, rows: slice, block: np.ndarray, workspace: _Workspace, out: np.ndarray,
              keep: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(block ± Δ[rows] rounded into block's dtype, the float64 Δ it used if ``keep``: fl(s·L R) for
        the correctly rounded evaluation, the signed fixed-order Δ otherwise, None for a custom map).

        The correctly rounded evaluation writes ``out`` (an array like block, not block itself)
        and returns it; the others return a new array."""
        if self.plan is not None:
            value, product = _rounded_sum(self.plan, rows, block.reshape(block.shape[0], -1), self.sign, workspace,
                                          out.reshape(block.shape[0], -1), keep=keep)
            return value.reshape(block.shape), product
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # inf − inf, NaN casts: on purpose
            wide = block.astype(float64)
            custom = getattr(self.delta, "merge_block" if self.sign > 0 else "unmerge_block", None)
            if custom is not None:
                return round_to(custom(rows, wide), block.dtype), None
            d = self.delta.block(rows)
            return round_to(wide + d if self.sign > 0 else wide - d, block.dtype), d

    def undo(self, rows: slice, block: np.ndarray, delta64: np.ndarray | None, workspace: _Workspace,
             out: np.ndarray) -> np.ndarray:
        """The opposite step on ``block`` (what :meth:`apply` made), reusing its float64 Δ."""
        if delta64 is None:
            return _Step(self.delta, None, -self.sign).apply(rows, block, workspace, out)[0]
        if self.plan is not None:
            return _rounded_sum(self.plan, rows, block.reshape(block.shape[0], -1), -self.sign, workspace,
                                out.reshape(block.shape[0], -1), delta64)[0].reshape(block.shape)
        with np.errstate(invalid="ignore", over="ignore"):
            wide = block.astype(float64)
            return round_to(wide - delta64 if self.sign > 0 else wide + delta64, block.dtype)


def _merge_block(step: _Step, rows: slice, original: np.ndarray, exact: bool, flat_row: int,
                 index_dtype: np.dtype, workspace: _Workspace,
                 out: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(merged block, (flat indices, original values) where unmerge misses W, in exact mode).

    ``out`` (like original, not original) may receive the merged block (:meth:`_Step.apply`)."""
    kernels = kernels_module(original.size) if exact and step.plan is not None else None
    if kernels is not None:
        merged, positions = _fused_merge_block(kernels, step, rows, original, workspace, out)
    else:
        merged, delta64 = step.apply(rows, original, workspace, out, keep=exact)
        if not exact:
            return merged, None
        restored = step.undo(rows, merged, delta64, workspace, workspace.get("restored", original.shape, original.dtype))
        missed = np.not_equal(bits_of(restored), bits_of(original), out=workspace.get("missed", original.shape, np.dtype(bool)))
        positions = np.flatnonzero(missed) if missed.any() else np.zeros(0, np.int64)
    # one pass: W's flat indices (< W.size, which index_dtype holds) from the block's nonnegative positions
    flat = np.add(positions, rows.start * flat_row, dtype=index_dtype, casting="unsafe")
    return merged, (flat, original.reshape(-1)[positions])


def _fused_merge_block(kernels, step: _Step, rows: slice, original: np.ndarray, workspace: _Workspace,
                       out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``out`` := the correctly rounded merged block, the flat positions in the block where the
    correctly rounded unmerge of it misses ``original``): :func:`lora_ref.kernels._merge_rows`' one
    pass, then the elements it leaves undecided resolved exactly (the merge's, then the unmerge's of
    those and of the elements whose unmerge alone is undecided). Bitwise what :meth:`_Step.apply` and
    :meth:`_Step.undo` give: both are the correctly rounded values (SPEC 3.2)."""
    plan, sign = step.plan, step.sign
    base, merged = original.reshape(original.shape[0], -1), out.reshape(original.shape[0], -1)
    positions, coded = _kernel_rows(kernels, plan, rows, base, sign, workspace, merged, exact=True)
    if coded.size:
        unsure = np.sort(coded >> 1)
        undecided = np.sort(coded[(coded & 1) == 1] >> 1)
        if undecided.size:
            _resolve_exactly(plan, rows, base, sign, undecided, merged)
        restored = workspace.get("restored", base.shape, base.dtype)
        _resolve_exactly(plan, rows, merged, -sign, unsure, restored)
        missed = unsure[bits_of(restored).reshape(-1)[unsure] != bits_of(base).reshape(-1)[unsure]]
        positions = np.insert(positions, np.searchsorted(positions, missed), missed)  # both increasing
    return out, positions


def _patch(block: np.ndarray, residual: Residual, rows: slice, flat_row: int) -> None:
    """Write the residual's values that fall in W[rows] into ``block`` (indices strictly increasing)."""
    if not residual.count:
        return
    # queries in the indices' own dtype: mixed dtypes would convert (copy) all the indices on every block;
    # "≤ stop − 1" rather than "< stop", since stop may be 2^32 for uint32 indices
    first, last = np.array([rows.start * flat_row, rows.stop * flat_row - 1], dtype=residual.indices.dtype)
    lo = int(np.searchsorted(residual.indices, first, side="left"))
    hi = int(np.searchsorted(residual.indices, last, side="right"))
    if hi > lo:
        block.reshape(-1)[residual.indices[lo:hi].astype(np.int64) - rows.start * flat_row] = residual.values[lo:hi]


@dataclass(frozen=True)
class MergeResult:
    """The merged weight and, in exact mode, the residual that undoes it bit for bit."""

    weight: np.ndarray
    residual: Residual | None


def _collect(parts: list, W: np.ndarray, delta: DeltaSource, semantics: str, digest: bool, result: np.ndarray,
             delta_digest: str | None = None) -> Residual:
    index_dtype = residual_index_dtype(W.size)
    return Residual(
        indices=np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, index_dtype),
        values=np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, W.dtype),
        shape=tuple(W.shape),
        merged_digest=digest_arrays(result) if digest else None,
        delta_digest=digest_arrays(*delta.factors()) if delta_digest is None else delta_digest,
        semantics=semantics,
    )


def _check_out(W: np.ndarray, out: object) -> None:
    """Refuse an ``out`` array that overlaps W without being W itself (same memory, shape, strides and
    dtype): the blocks are written as they are computed, so a shifted overlap would read rows that an
    earlier block already overwrote."""
    if isinstance(out, np.ndarray) and np.may_share_memory(out, W) and np.shares_memory(out, W):
        same = out.ctypes.data == W.ctypes.data and out.shape == W.shape and out.strides == W.strides \
            and out.dtype == W.dtype
        if not same:
            raise ConfigError("out overlaps the weight without being the weight itself (pass out=W to work in place, "
                              "or a separate array)")


def _writes_directly(result: object, W: np.ndarray) -> bool:
    """Whether blocks can be written straight into ``result``'s rows: C-contiguous memory of W's dtype and
    shape apart from W's. Else (out is W, overlaps it, is a file's OutputTensor, or of another layout or
    dtype) each block goes into a workspace block, then is copied: an exact merge and the exact
    resolution read W's original block after the output is written."""
    return isinstance(result, np.ndarray) and result.flags.c_contiguous and result.dtype == W.dtype \
        and result.shape == W.shape and not np.may_share_memory(result, W)


def merge(
    W: np.ndarray,
    delta: DeltaSource,
    *,
    exact: bool = False,
    allow_nonfinite: bool = False,
    out: np.ndarray | None = None,
    block_bytes: int = BLOCK_BYTES,
    semantics: str = MERGE_SEMANTICS,
    digest: bool = True,
) -> MergeResult:
    """W' = merge(W, Δ) in W's dtype under ``semantics``; with ``exact`` also the residual (module doc).

    ``out`` may be W itself to merge in place (W is read block by block before it is written),
    or an output tensor of a file being written (:class:`lora_ref.safetensors_io.OutputTensor`,
    written by row blocks).
    Refuses non-finite adapter values unless ``allow_nonfinite``; an overflow of W + Δ to
    ±inf is allowed (exact mode records it). ``digest=False`` leaves the residual's
    merged-weight checksum out (for residuals that never leave the process).
    """
    _check(W, delta)
    check_semantics(semantics)
    if not allow_nonfinite:
        check_factors_finite(delta)
    W = np.asarray(W)
    _check_out(W, out)
    result = np.empty_like(W) if out is None else out
    flat_row = math.prod(W.shape[1:]) if W.ndim > 1 else 1
    step = _Step(delta, _product(delta, W.dtype, semantics), 1.0)
    index_dtype = residual_index_dtype(W.size)

    direct = _writes_directly(result, W)

    def merge_rows(rows: slice, workspace: _Workspace) -> tuple[np.ndarray, np.ndarray] | None:
        block = np.ascontiguousarray(W[rows])
        target = result[rows] if direct else workspace.get("merged", block.shape, W.dtype)
        merged, found = _merge_block(step, rows, block, exact, flat_row, index_dtype, workspace, target)
        if not direct or merged.ctypes.data != target.ctypes.data:  # not written in place (a view of target is)
            result[rows] = merged
        return found

    parts = [p for p in _map_row_blocks(merge_rows, W.shape, block_bytes) if p is not None]
    return MergeResult(result, _collect(parts, W, delta, semantics, digest, result) if exact else None)


def merge_many(
    W: np.ndarray,
    deltas: Sequence[DeltaSource],
    *,
    exact: bool = False,
    allow_nonfinite: bool = False,
    semantics: str = MERGE_SEMANTICS,
    digest: bool = True,
) -> tuple[np.ndarray, list[Residual | None]]:
    """(merged W [k, ...], residuals) for a stack of k weights W[i] of one dtype and shape and their
    deltas: bitwise ``[merge(W[i], deltas[i], ...) for i]``, in one stacked evaluation.

    For many small weights (a 100,000-module adapter of tiny layers) NumPy's per-call overhead,
    not arithmetic, is the cost of :func:`merge`; here every step runs once for the whole stack:
    one batched matmul [k, n, r] @ [k, r, c], one :func:`_bound_norms`, one :func:`_bracket` (and
    one more for the exact residual's unmerge). The correctly rounded value does not depend on how
    y ≈ W + s·L R was evaluated (SPEC 3.2), so the batched product gives the same bits wherever the
    bracket decides; every weight with an undecided element (the rare ones: resolved exactly), and
    every stack this path does not take (other semantics, float64, sources without
    ``rank_factors`` or with ``merge_block``, factors of differing shapes or dtypes, non-finite
    factors or scales, near-overflow), goes through :func:`merge` one weight at a time, which also
    raises each refusal in order. The extra memory is a few float64 copies of the stack: callers
    stack small weights (:class:`lora_ref.checkpoint._Run`).
    """
    W = np.asarray(W)
    check_semantics(semantics)
    merged = np.empty_like(W)
    residuals: list[Residual | None] = [None] * len(deltas)
    pending = range(len(deltas))
    stack = _stacked_product(W, deltas, semantics)
    if stack is not None:
        left, right, scale, left_norms, right_norms, spread, near = stack
        workspace = _Workspace()
        shape = (W.shape[0], left.shape[1], right.shape[2])
        product = np.matmul(left, right, out=workspace.get("product", shape, float64))  # any float64 evaluation (SPEC 3.2)
        product *= scale[:, None, None]
        base, out = W.reshape(shape), merged.reshape(shape)
        failed = _bracket(base, product, left_norms, right_norms, spread, 1.0, workspace, out, exact).any(axis=(1, 2))
        failed |= near
        if exact:
            restored = workspace.get("restored", shape, W.dtype)
            failed |= _bracket(out, product, left_norms, right_norms, spread, -1.0, workspace, restored, False).any(axis=(1, 2))
            missed = bits_of(restored) != bits_of(base)
            index_dtype = residual_index_dtype(math.prod(W.shape[1:]))
            for i in np.flatnonzero(~failed).tolist():
                positions = np.flatnonzero(missed[i])
                residuals[i] = Residual(
                    indices=positions.astype(index_dtype), values=base[i].reshape(-1)[positions], shape=tuple(W.shape[1:]),
                    merged_digest=digest_arrays(merged[i]) if digest else None,
                    delta_digest=digest_arrays(*deltas[i].factors()), semantics=semantics)
        pending = np.flatnonzero(failed).tolist()
    for i in pending:
        residuals[i] = merge(W[i], deltas[i], exact=exact, allow_nonfinite=allow_nonfinite, out=merged[i],
                             semantics=semantics, digest=digest).residual
    return merged, residuals


#: The dtypes whose merges take the correctly rounded evaluation (float64 weights use the fixed order).
_STACKED_DTYPES = (float32, np.dtype(np.float16), bfloat16)


def _stacked_product(W: np.ndarray, deltas: Sequence[DeltaSource], semantics: str) -> tuple | None:
    """(L [k, n, r], R [k, r, c], s [k], the bound's constants: :func:`_bound_norms`) of the stack
    W [k, ...], if every weight would take the correctly rounded evaluation (:func:`_product`) and
    every factor is finite; else None (:func:`merge_many` then merges one weight at a time)."""
    if not deltas or semantics == FIXED_ORDER or W.dtype not in _STACKED_DTYPES or W.ndim < 2 or len(deltas) != W.shape[0]:
        return None
    if any(tuple(d.shape) != W.shape[1:] or getattr(d, "rank_factors", None) is None
           or getattr(d, "merge_block", None) is not None for d in deltas):
        return None
    factors = [d.factors() for d in deltas]
    pairs = [d.rank_factors() for d in deltas]
    try:  # arrays of differing shapes do not stack; differing dtypes widen, which keeps (non-)finiteness
        if len({len(f) for f in factors}) != 1:
            return None
        for column in zip(*factors):  # what check_factors_finite checks, for the whole stack at once
            stacked = np.stack(column)
            if not np.isfinite(stacked if stacked.dtype in _NATIVE_FLOATS else stacked.astype(float64)).all():
                return None
        left = np.stack([p[0] for p in pairs]).astype(float64, copy=False)
        right = np.stack([p[1] for p in pairs]).astype(float64, copy=False)
    except ValueError:
        return None
    scale = np.array([float(d.scale) for d in deltas], dtype=float64)
    if left.ndim != 3 or right.ndim != 3 or left.shape[1] != W.shape[1] or right.shape[-1] != math.prod(W.shape[2:]) \
            or left.shape[-1] > _MAX_RANK or not np.isfinite(scale).all() \
            or not (np.isfinite(left).all() and np.isfinite(right).all()):
        return None
    return (left, right, scale, *_bound_norms(*_factor_norms(left, right), left.shape[-1], scale))


def unmerge(
    W_merged: np.ndarray,
    delta: DeltaSource,
    *,
    residual: Residual | None = None,
    out: np.ndarray | None = None,
    block_bytes: int = BLOCK_BYTES,
    semantics: str | None = None,
) -> np.ndarray:
    """W = unmerge(W', Δ); with a residual, the exact original bits are put back.

    The evaluation is the residual's semantics, else ``semantics``, else :data:`MERGE_SEMANTICS`
    (pass :data:`FIXED_ORDER` for a file merged without a record). Raises ResidualMismatchError when the
    residual was made for another merged weight, another adapter, or another semantics.
    """
    _check(W_merged, delta)
    W_merged = np.asarray(W_merged)
    if residual is not None:
        check_residual(residual, W_merged, delta)
        if semantics is not None and semantics != residual.semantics:
            raise ResidualMismatchError(
                f"{delta.module or 'weight'}: the residual was made under merge semantics {residual.semantics!r}, "
                f"the merged weight records {semantics!r}"
            )
        semantics = residual.semantics
    semantics = check_semantics(semantics or MERGE_SEMANTICS, "unmerge")
    _check_out(W_merged, out)
    result = np.empty_like(W_merged) if out is None else out
    flat_row = math.prod(W_merged.shape[1:]) if W_merged.ndim > 1 else 1
    step = _Step(delta, _product(delta, W_merged.dtype, semantics), -1.0)

    direct = _writes_directly(result, W_merged)

    def unmerge_rows(rows: slice, workspace: _Workspace) -> None:
        block = np.ascontiguousarray(W_merged[rows])
        target = result[rows] if direct else workspace.get("merged", block.shape, W_merged.dtype)
        block = step.apply(rows, block, workspace, target)[0]
        if residual is not None:
            _patch(block, residual, rows, flat_row)
        if not direct or block.ctypes.data != target.ctypes.data:
            result[rows] = block

    _map_row_blocks(unmerge_rows, W_merged.shape, block_bytes)
    return result


def switch(
    W: np.ndarray,
    undo: Sequence[tuple[DeltaSource, Residual | None]],
    do: Sequence[DeltaSource],
    *,
    exact: bool = True,
    block_bytes: int = BLOCK_BYTES,
    semantics: str = MERGE_SEMANTICS,
    plans: Sequence[_Product | None] | None = None,
    workspace: _Workspace | None = None,
) -> list[Residual | None]:
    """In place and in one pass over W, block by block: unmerge each of ``undo`` (in order, each
    with its residual, under the residual's semantics or ``semantics``), then merge each of ``do``
    (in order), recording each merge's residual in exact mode. Bitwise what the separate
    :func:`unmerge` and :func:`merge` calls give, without their intermediate full-size arrays.

    The caller validates the deltas (shapes, finiteness) and the residuals
    (:func:`check_residual`) first. ``plans`` (one per undo step, then one per do step) are the
    steps' :func:`_product` plans for W's dtype and each step's semantics, made earlier by a caller
    that keeps them (:class:`~lora_ref.ledger.MergeLedger`, whose rule for reusing one is in its
    doc); without them they are made here. With a ``workspace`` the blocks run one after another
    on the calling thread, in it (a caller that switches several weights at once on its own
    threads, one workspace each: :class:`~lora_ref.ledger.MergeLedger`); else on
    :func:`_map_row_blocks`' threads. The residuals made here carry no checksum at all (their
    ``delta_digest`` is :data:`IN_MEMORY`, which :func:`check_residual` refuses): they stay with
    the caller that owns W and the deltas (:class:`~lora_ref.ledger.MergeLedger`), so a switch
    hashes nothing.
    """
    W = np.asarray(W)
    flat_row = math.prod(W.shape[1:]) if W.ndim > 1 else 1
    index_dtype = residual_index_dtype(W.size)
    if plans is None:
        plans = [_product(d, W.dtype, r.semantics if r is not None else semantics) for d, r in undo] \
            + [_product(d, W.dtype, semantics) for d in do]
    if len(plans) != len(undo) + len(do):
        raise ValueError("switch: one plan per step")  # a bug in the caller
    undo_steps = [(_Step(d, plan, -1.0), r) for (d, r), plan in zip(undo, plans)]
    do_steps = [_Step(d, plan, 1.0) for d, plan in zip(do, plans[len(undo):])]

    n_steps = len(undo_steps) + len(do_steps)

    def switch_rows(rows: slice, workspace: _Workspace) -> list:
        target = W[rows]
        block = np.ascontiguousarray(target)
        # each step's output is not its input: ping, pong, ..., and the last step of several writes W[rows]
        # itself where that is one contiguous block (its input is then ping or pong), saving a copy
        outs = [workspace.get(("ping", "pong")[j % 2], block.shape, W.dtype) for j in range(n_steps)]
        if n_steps > 1 and target.flags.c_contiguous:
            outs[-1] = target
        outs = iter(outs)
        for step, residual in undo_steps:
            block = step.apply(rows, block, workspace, next(outs))[0]
            if residual is not None:
                _patch(block, residual, rows, flat_row)
        found = []
        for step in do_steps:
            block, part = _merge_block(step, rows, block, exact, flat_row, index_dtype, workspace, next(outs))
            found.append(part)
        if not np.may_share_memory(block, target):
            W[rows] = block
        return found

    per_block = _map_row_blocks(switch_rows, W.shape, block_bytes, workspace)
    if not exact:
        return [None] * len(do)
    return [_collect([parts[k] for parts in per_block], W, d, semantics, False, W, IN_MEMORY) for k, d in enumerate(do)]


def check_residual(residual: Residual, W_merged: np.ndarray, delta: DeltaSource) -> None:
    """Raise ResidualMismatchError unless ``residual`` belongs to this merged weight and delta."""
    where = delta.module or "weight"
    if tuple(residual.shape) != tuple(W_merged.shape) or residual.values.dtype != W_merged.dtype:
        raise ResidualMismatchError(
            f"{where}: residual is for a {residual.values.dtype} weight of shape {residual.shape}, "
            f"not {W_merged.dtype} {tuple(W_merged.shape)}"
        )
    check_semantics(residual.semantics, f"{where} residual")
    if residual.delta_digest == IN_MEMORY:
        raise ResidualMismatchError(f"{where}: the residual was made by an in-memory switch and carries no checksums; "
                                    "unmerge through the MergeLedger that holds it")
    if residual.delta_digest != digest_arrays(*delta.factors()):
        raise ResidualMismatchError(f"{where}: residual was made with another adapter (delta checksum differs)")
    if residual.merged_digest is not None and residual.merged_digest != digest_arrays(W_merged):
        raise ResidualMismatchError(f"{where}: residual was made for another merged weight (checksum differs)")
    if residual.count and (residual.indices.min() < 0 or residual.indices.max() >= W_merged.size):
        raise ResidualMismatchError(f"{where}: residual indices fall outside the weight")
    if residual.count > 1 and not np.all(residual.indices[1:] > residual.indices[:-1]):
        raise ResidualMismatchError(f"{where}: residual indices are not strictly increasing")


def fast_roundtrip_bound(W: np.ndarray, delta64: np.ndarray) -> np.ndarray:
    """The elementwise bound on |unmerge(merge(W)) − W| in fast mode (module doc, SPEC 3.3)."""
    t = np.asarray(W).dtype
    u = UNIT_ROUNDOFF[t] + UNIT_ROUNDOFF[float64] * (1 + UNIT_ROUNDOFF[t])
    W64 = np.asarray(W, dtype=float64)
    return u * (1 + u) * np.abs(W64 + delta64) + u * np.abs(W64) + (1 + u) * SMALLEST_SUBNORMAL[t]
