"""Merge and unmerge a LoRA delta into a weight, fast or exact (SPEC section 3).

    merge(W, Δ)   = round_t(W + Δ)        one rounding to W's dtype t (W + Δ in float64)
    unmerge(W', Δ) = round_t(W' − Δ)

Fast mode stops there; the round trip then obeys, elementwise (SPEC 3.3),

    |unmerge(merge(W)) − W| ≤ ũ(1+ũ)|W+Δ| + ũ|W| + (1+ũ)·η_t,   ũ = u_t + u_64(1+u_t)

where u_t is t's unit roundoff and η_t its smallest subnormal, as long as W + Δ does not
overflow t. Exact mode also returns a :class:`Residual`: the flat indices and original bits
of every element where round_t(round_t(W + Δ) − Δ) is not bitwise W. Unmerging with it
restores W bit for bit, whatever W holds (NaN payloads, ±inf, signed zeros, subnormals,
elements that overflowed). The residual carries checksums of the merged weight and of the
adapter factors, so it cannot be applied to another weight or with another adapter.

Δ is produced by a *delta source* (:class:`lora_ref.linear.LinearDelta` and the other layer
kinds) in row blocks over W's first axis, so the extra memory is one float64 block, not a
float64 copy of W.

A source whose merge is not additive (DoRA: W' = g ⊙ (W + Δ)) also defines
``merge_block(rows, W64)`` and ``unmerge_block(rows, M64)`` (float64 in, float64 out, before the
one rounding); merge/unmerge and the exact residual then use those instead of ±Δ.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from .dtypes import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, bits_of, check_float_array, float64, round_to
from .errors import NonFiniteError, ResidualMismatchError, ShapeError

#: Target size of one float64 working block (bytes); bounds the extra memory of a merge. Small
#: enough that a block's temporaries stay in cache (bench/bench_merge.py), large enough that
#: NumPy's per-call overhead is amortised.
BLOCK_BYTES = 1024 * 1024
#: Most threads a merge uses. Blocks are independent and each is computed in the same fixed
#: order whatever thread runs it, so the result is bitwise the same for any thread count.
MAX_THREADS = min(8, os.cpu_count() or 1)

_T = TypeVar("_T")


class DeltaSource(Protocol):
    """Anything that can produce ΔW in row blocks over the first axis of W."""

    shape: tuple[int, ...]
    module: str

    def block(self, rows: slice) -> np.ndarray:
        """Δ[rows] in float64, shaped like W[rows]."""

    def factors(self) -> tuple[np.ndarray, ...]:
        """The arrays Δ is computed from, for the residual checksum."""


@dataclass(frozen=True)
class Residual:
    """What exact unmerge needs beyond Δ to restore W bit for bit.

    ``indices``: flat positions in W, uint32 when W has at most 2^32 elements (halving the
    residual's size; see :func:`residual_index_dtype`), else int64; ``values``: W's original
    elements there, in W's dtype; ``merged_digest`` / ``delta_digest``: BLAKE2b checksums of the merged weight and of
    the adapter factors it belongs to.
    """

    indices: np.ndarray
    values: np.ndarray
    shape: tuple[int, ...]
    merged_digest: str
    delta_digest: str

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
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.reshape(-1).view(np.uint8) if array.ndim else array.tobytes())
    return h.hexdigest()


def block_rows(shape: tuple[int, ...], block_bytes: int = BLOCK_BYTES) -> int:
    """How many rows (first-axis slices) of a float64 block fit in ``block_bytes``."""
    row_elems = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return max(1, block_bytes // (8 * max(row_elems, 1)))


def merged_block(delta: DeltaSource, rows: slice, W64: np.ndarray) -> np.ndarray:
    """The float64 merged value of W[rows] before rounding: W + Δ, or the source's own map."""
    custom = getattr(delta, "merge_block", None)
    with np.errstate(invalid="ignore", over="ignore"):  # inf − inf -> NaN: the residual records it
        return custom(rows, W64) if custom is not None else W64 + delta.block(rows)


def unmerged_block(delta: DeltaSource, rows: slice, M64: np.ndarray) -> np.ndarray:
    """The float64 unmerged value of W'[rows] before rounding: W' − Δ, or the source's inverse map."""
    custom = getattr(delta, "unmerge_block", None)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return custom(rows, M64) if custom is not None else M64 - delta.block(rows)


def row_slices(n_rows: int, step: int):
    """slice(start, start + step) over [0, n_rows), the last one shorter: W's row blocks."""
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _map_row_blocks(fn: Callable[[slice], _T], shape: tuple[int, ...], block_bytes: int) -> list[_T]:
    """[fn(rows) for each row block], in order; on several cores, blocks run in threads.

    NumPy releases the GIL in the array operations, so blocks proceed in parallel. The memory
    budget ``block_bytes`` is shared: with k threads each block is about block_bytes / k, and at
    most 2k blocks are submitted ahead of the one being collected, so the extra memory stays a
    few ``block_bytes`` whatever the thread count and the number of blocks.
    """
    threads = MAX_THREADS
    step = block_rows(shape, max(1, block_bytes // threads))
    if threads == 1 or -(-shape[0] // step) < 2 * threads:
        return [fn(rows) for rows in row_slices(shape[0], block_rows(shape, block_bytes))]
    results: list[_T] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[Future[_T]] = deque()
        for rows in row_slices(shape[0], step):
            pending.append(pool.submit(fn, rows))
            if len(pending) >= 2 * threads:
                results.append(pending.popleft().result())
        results.extend(future.result() for future in pending)
    return results


def _check(W: np.ndarray, delta: DeltaSource) -> None:
    check_float_array(W, f"{delta.module} base weight".strip())
    if tuple(W.shape) != tuple(delta.shape):
        raise ShapeError(f"{delta.module}: base weight has shape {tuple(W.shape)} but the adapter's delta has {tuple(delta.shape)}")


def check_factors_finite(delta: DeltaSource) -> None:
    """NonFiniteError unless every factor of ``delta`` is finite (merge refuses NaN/inf adapters)."""
    for array in delta.factors():
        if not np.all(np.isfinite(np.asarray(array, dtype=float64))):
            raise NonFiniteError(
                f"{delta.module}: the adapter holds NaN or infinity; refusing to merge "
                "(pass allow_nonfinite=True / --allow-nonfinite to merge anyway)"
            )


@dataclass(frozen=True)
class MergeResult:
    """The merged weight and, in exact mode, the residual that undoes it bit for bit."""

    weight: np.ndarray
    residual: Residual | None


def merge(
    W: np.ndarray,
    delta: DeltaSource,
    *,
    exact: bool = False,
    allow_nonfinite: bool = False,
    out: np.ndarray | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> MergeResult:
    """W' = round_t(W + Δ) in W's dtype; with ``exact`` also the residual (see module doc).

    ``out`` may be W itself to merge in place (W is read block by block before it is written),
    or an output tensor of a file being written (:class:`lora_ref.safetensors_io.OutputTensor`,
    written by row blocks).
    Refuses non-finite adapter values unless ``allow_nonfinite``; an overflow of W + Δ to
    ±inf is allowed (exact mode records it).
    """
    _check(W, delta)
    if not allow_nonfinite:
        check_factors_finite(delta)
    W = np.asarray(W)
    result = np.empty_like(W) if out is None else out
    flat_row = int(np.prod(W.shape[1:], dtype=np.int64)) if W.ndim > 1 else 1
    additive = getattr(delta, "merge_block", None) is None and getattr(delta, "unmerge_block", None) is None

    def merge_rows(rows: slice) -> tuple[np.ndarray, np.ndarray] | None:
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, NaN casts: handled on purpose
            original = np.array(W[rows])  # copy: ``out`` may alias W
            d = delta.block(rows) if additive else None  # Δ once per block for W ± Δ sources
            merged = round_to(original.astype(float64) + d if additive
                              else merged_block(delta, rows, original.astype(float64)), W.dtype)
            found = None
            if exact:
                restored = round_to(merged.astype(float64) - d if additive
                                    else unmerged_block(delta, rows, merged.astype(float64)), W.dtype)
                positions = np.flatnonzero((bits_of(restored) != bits_of(original)).reshape(-1))
                flat = positions.astype(np.int64) + rows.start * flat_row
                found = (flat.astype(residual_index_dtype(W.size)), original.reshape(-1)[positions])
            result[rows] = merged
            return found

    parts = [p for p in _map_row_blocks(merge_rows, W.shape, block_bytes) if p is not None]
    index_parts, value_parts = [p[0] for p in parts], [p[1] for p in parts]
    residual = None
    if exact:
        residual = Residual(
            indices=np.concatenate(index_parts) if index_parts else np.zeros(0, residual_index_dtype(W.size)),
            values=np.concatenate(value_parts) if value_parts else np.zeros(0, W.dtype),
            shape=tuple(W.shape),
            merged_digest=digest_arrays(result),
            delta_digest=digest_arrays(*delta.factors()),
        )
    return MergeResult(result, residual)


def unmerge(
    W_merged: np.ndarray,
    delta: DeltaSource,
    *,
    residual: Residual | None = None,
    out: np.ndarray | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> np.ndarray:
    """W = round_t(W' − Δ); with a residual, the exact original bits are put back.

    Raises ResidualMismatchError when the residual was made for another merged weight or
    another adapter.
    """
    _check(W_merged, delta)
    W_merged = np.asarray(W_merged)
    if residual is not None:
        check_residual(residual, W_merged, delta)
    result = np.empty_like(W_merged) if out is None else out

    def unmerge_rows(rows: slice) -> None:
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, NaN casts: handled on purpose
            M64 = np.asarray(W_merged[rows], dtype=float64)  # a copy: ``out`` may alias W_merged
            result[rows] = round_to(unmerged_block(delta, rows, M64), W_merged.dtype)

    _map_row_blocks(unmerge_rows, W_merged.shape, block_bytes)
    if residual is not None and residual.count:
        if isinstance(result, np.ndarray):
            result.reshape(-1)[residual.indices] = residual.values
        else:  # an output tensor in a file being written (safetensors_io.OutputTensor)
            result.put_flat(residual.indices, residual.values, block_bytes)
    return result


def check_residual(residual: Residual, W_merged: np.ndarray, delta: DeltaSource) -> None:
    """Raise ResidualMismatchError unless ``residual`` belongs to this merged weight and delta."""
    where = delta.module or "weight"
    if tuple(residual.shape) != tuple(W_merged.shape) or residual.values.dtype != W_merged.dtype:
        raise ResidualMismatchError(
            f"{where}: residual is for a {residual.values.dtype} weight of shape {residual.shape}, "
            f"not {W_merged.dtype} {tuple(W_merged.shape)}"
        )
    if residual.delta_digest != digest_arrays(*delta.factors()):
        raise ResidualMismatchError(f"{where}: residual was made with another adapter (delta checksum differs)")
    if residual.merged_digest != digest_arrays(W_merged):
        raise ResidualMismatchError(f"{where}: residual was made for another merged weight (checksum differs)")
    if residual.count and (residual.indices.min() < 0 or residual.indices.max() >= W_merged.size):
        raise ResidualMismatchError(f"{where}: residual indices fall outside the weight")


def fast_roundtrip_bound(W: np.ndarray, delta64: np.ndarray) -> np.ndarray:
    """The elementwise bound on |unmerge(merge(W)) − W| in fast mode (module doc, SPEC 3.3)."""
    t = np.asarray(W).dtype
    u = UNIT_ROUNDOFF[t] + UNIT_ROUNDOFF[float64] * (1 + UNIT_ROUNDOFF[t])
    W64 = np.asarray(W, dtype=float64)
    return u * (1 + u) * np.abs(W64 + delta64) + u * np.abs(W64) + (1 + u) * SMALLEST_SUBNORMAL[t]
