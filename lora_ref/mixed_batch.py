"""Mixed-batch LoRA: one batch, one base weight, a different adapter per row (SPEC M.1).

Rows are routed by an integer index ``idx`` of length ``batch`` (the first axis of x):
``idx[b] = i`` sends row b through adapter i, ``idx[b] = -1`` through the base only. With
adapters i = 0..N-1 given as factors (A_i [r_i, in], B_i [out, r_i], s_i), ranks and scales
free per adapter, the forward pass is

    y[b] = x[b] W^T + bias + [idx[b] >= 0] · s_i ((x[b] ∘ mask[b]) A_i^T) B_i^T,   i = idx[b]

evaluated in float64 and rounded once to the output dtype, as :func:`lora_ref.linear.forward`.
The backward pass gives, with G_i = {b : idx[b] = i} the rows of adapter i,

    dx[b] = dy[b] W + [idx[b] >= 0] · s_i ((dy[b] B_i) A_i) ∘ mask[b]
    dA_i  = s_i Σ_{b∈G_i} (dy[b] B_i)^T (x[b] ∘ mask[b])
    dB_i  = s_i Σ_{b∈G_i} dy[b]^T ((x[b] ∘ mask[b]) A_i^T)

so an adapter's gradients come from its own rows only (an adapter with no rows gets zeros).
Two evaluation strategies, equal up to float64 rounding (SPEC M.1 gives the bound):

* grouped (:func:`mixed_forward`): the base product for the whole batch, then one LoRA product
  per adapter over its rows (what SGMV-style kernels do);
* stacked (:class:`StackedBank`): the N adapters stored as a zero-padded bank
  A [N, r_max, in], B [N, out, r_max], s [N], gathered per row (BGMV-style, as serving systems
  store adapters). Zero padding adds exact zeros, so padding to any r_max >= max r_i does not
  change the value.

An adapter that does not target the layer is given as ``None``: its rows see the base only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .adapter import Adapter
from .dtypes import check_float_array, float64, resolve_dtype, round_to
from .errors import ConfigError, ShapeError
from .kinds import kind_of
from .linear import check_lora_shapes
from .numerics import check_mask, lora_vjp, wide


class RoutingError(ShapeError):
    """A per-row adapter index is malformed: wrong length, not integers, or out of range."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's factors on one layer: A [r, in], B [out, r] and its scale s."""

    A: np.ndarray
    B: np.ndarray
    scale: float


def factors_for(adapters: Sequence[Adapter], module: str) -> list[LoraFactors | None]:
    """The factors of ``module`` in each adapter (``None`` where an adapter does not target it).

    Refuses adapters whose module carries a ``lora_bias`` or a DoRA magnitude: the mixed batch
    covers plain LoRA (as PEFT's ``adapter_names`` does, which refuses DoRA).
    """
    result: list[LoraFactors | None] = []
    for adapter in adapters:
        lora = adapter.modules.get(module)
        if lora is None:
            result.append(None)
            continue
        if not kind_of(lora.kind).composable or lora.lora_bias is not None or lora.magnitude is not None:
            raise ConfigError(f"{module} in adapter {adapter.name!r}: mixed batches support plain Linear LoRA only "
                              "(no lora_bias, DoRA, embedding or conv)")
        result.append(LoraFactors(lora.A, lora.B, adapter.scale_for(module)))
    return result


def check_index(index: np.ndarray | Sequence[int], batch: int, n_adapters: int) -> np.ndarray:
    """Validate a routing index: 1-D integers, length ``batch``, values in [-1, n_adapters)."""
    idx = np.asarray(index)
    if idx.ndim != 1 or idx.shape[0] != batch:
        raise RoutingError(f"adapter index has shape {idx.shape}, expected ({batch},): one entry per batch row")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise RoutingError(f"adapter index must hold integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    bad = np.flatnonzero((idx < -1) | (idx >= n_adapters))
    if bad.size:
        raise RoutingError(
            f"adapter index {int(idx[bad[0]])} at row {int(bad[0])} is out of range: "
            f"{n_adapters} adapter(s) give valid values -1 (base) .. {n_adapters - 1}"
        )
    return idx


def _check_factors(factors: Sequence[LoraFactors | None], W_shape: tuple[int, ...], fan_in_fan_out: bool) -> None:
    for i, f in enumerate(factors):
        if f is not None:
            check_float_array(f.A, f"adapter {i} lora_A")
            check_float_array(f.B, f"adapter {i} lora_B")
            check_lora_shapes(W_shape, np.asarray(f.A), np.asarray(f.B), fan_in_fan_out=fan_in_fan_out, module=f"adapter {i}")


def _prepare(x, W, factors, index, dropout_mask, fan_in_fan_out):
    """Common checks; returns float64 views: X [batch, m, in], W [out, in], mask, idx."""
    x64, W64 = wide(x, "x"), wide(W, "W")
    _check_factors(factors, np.shape(W), fan_in_fan_out)
    W64 = W64.T if fan_in_fan_out else W64
    if x64.ndim < 2 or x64.shape[-1] != W64.shape[1]:
        raise ShapeError(f"x has shape {x64.shape}; expected [batch, ..., {W64.shape[1]}]")
    idx = check_index(index, x64.shape[0], len(factors))
    X = x64.reshape(x64.shape[0], -1, x64.shape[-1])
    mask = check_mask(dropout_mask, x64.shape)
    if mask is not None:
        mask = mask.reshape(X.shape)
    return x64, X, W64, mask, idx


def _groups(idx: np.ndarray, factors: Sequence[LoraFactors | None]):
    for i, f in enumerate(factors):
        rows = np.flatnonzero(idx == i)
        if f is not None and rows.size:
            yield i, f, rows


def mixed_forward(
    x: np.ndarray,
    W: np.ndarray,
    factors: Sequence[LoraFactors | None],
    index: np.ndarray | Sequence[int],
    *,
    bias: np.ndarray | None = None,
    dropout_mask: np.ndarray | None = None,
    fan_in_fan_out: bool = False,
    out_dtype: object = None,
) -> np.ndarray:
    """Grouped mixed-batch forward (module doc); x [batch, ..., in] -> y [batch, ..., out]."""
    x64, X, W64, mask, idx = _prepare(x, W, factors, index, dropout_mask, fan_in_fan_out)
    batch, m, d_in = X.shape
    Y = (X.reshape(-1, d_in) @ W64.T).reshape(batch, m, -1)  # one GEMM over every row
    for _, f, rows in _groups(idx, factors):
        Xr = (X[rows] if mask is None else X[rows] * mask[rows]).reshape(-1, d_in)
        lora = (Xr @ np.asarray(f.A, dtype=float64).T) @ np.asarray(f.B, dtype=float64).T
        Y[rows] += f.scale * lora.reshape(rows.size, m, -1)
    if bias is not None:
        b = np.asarray(bias, dtype=float64)
        if b.shape != (W64.shape[0],):
            raise ShapeError(f"bias has shape {b.shape}, expected ({W64.shape[0]},)")
        Y = Y + b
    y = Y.reshape(x64.shape[:-1] + (W64.shape[0],))
    return round_to(y, resolve_dtype(out_dtype) if out_dtype is not None else np.asarray(x).dtype)


def active_forward(
    x: np.ndarray,
    W: np.ndarray,
    factors: Sequence[LoraFactors],
    *,
    bias: np.ndarray | None = None,
    fan_in_fan_out: bool = False,
    out_dtype: object = None,
) -> np.ndarray:
    """Several adapters active at once on every row (a stack, unmerged):

        y = x W^T + bias + Σ_j s_j (x A_j^T) B_j^T        (j in the given order)

    in float64, rounded once; equal, up to float64 rounding, to x (W + Σ_j s_j B_j A_j)^T + bias,
    the forward of the same stack merged (SPEC M.2).
    """
    _check_factors(factors, np.shape(W), fan_in_fan_out)
    batch = np.shape(x)[0] if np.ndim(x) else 0
    y = mixed_forward(x, W, [], np.full(batch, -1), bias=bias, fan_in_fan_out=fan_in_fan_out, out_dtype=float64)
    x64 = np.asarray(x, dtype=float64)
    for f in factors:
        y = y + f.scale * ((x64 @ np.asarray(f.A, dtype=float64).T) @ np.asarray(f.B, dtype=float64).T)
    return round_to(y, resolve_dtype(out_dtype) if out_dtype is not None else np.asarray(x).dtype)


@dataclass(frozen=True)
class MixedGrads:
    """Gradients of a mixed batch: dx like x; dA[i], dB[i] like adapter i's factors (None if absent)."""

    dx: np.ndarray
    dA: list[np.ndarray | None]
    dB: list[np.ndarray | None]


def mixed_backward(
    x: np.ndarray,
    dy: np.ndarray,
    W: np.ndarray,
    factors: Sequence[LoraFactors | None],
    index: np.ndarray | Sequence[int],
    *,
    dropout_mask: np.ndarray | None = None,
    fan_in_fan_out: bool = False,
) -> MixedGrads:
    """Gradients of :func:`mixed_forward` given dy = dL/dy (module doc); each rounded once to its tensor's dtype."""
    x64, X, W64, mask, idx = _prepare(x, W, factors, index, dropout_mask, fan_in_fan_out)
    dy64 = np.asarray(dy, dtype=float64)
    if dy64.shape != x64.shape[:-1] + (W64.shape[0],):
        raise ShapeError(f"dy has shape {dy64.shape}, expected {x64.shape[:-1] + (W64.shape[0],)}")
    dY = dy64.reshape(X.shape[0], X.shape[1], W64.shape[0])
    dX = dY @ W64
    dA: list[np.ndarray | None] = [None if f is None else np.zeros(np.shape(f.A), float64) for f in factors]
    dB: list[np.ndarray | None] = [None if f is None else np.zeros(np.shape(f.B), float64) for f in factors]
    for i, f, rows in _groups(idx, factors):
        A64, B64 = np.asarray(f.A, dtype=float64), np.asarray(f.B, dtype=float64)
        mask_r = None if mask is None else mask[rows].reshape(-1, X.shape[2])
        lora_dx, dA[i], dB[i] = lora_vjp(X[rows].reshape(-1, X.shape[2]), dY[rows].reshape(-1, W64.shape[0]), A64, B64, f.scale, mask_r)
        dX[rows] += lora_dx.reshape(rows.size, X.shape[1], X.shape[2])
    return MixedGrads(
        dx=round_to(dX.reshape(x64.shape), np.asarray(x).dtype),
        dA=[None if g is None else round_to(g, np.asarray(f.A).dtype) for g, f in zip(dA, factors)],
        dB=[None if g is None else round_to(g, np.asarray(f.B).dtype) for g, f in zip(dB, factors)],
    )


@dataclass(frozen=True)
class StackedBank:
    """N adapters as one zero-padded bank: A [N, r_max, in], B [N, out, r_max], scale [N].

    Slots of adapters that do not target the layer hold zeros (their rows see the base only).
    An inference-time structure: W in [out, in] layout, no dropout.
    """

    A: np.ndarray
    B: np.ndarray
    scale: np.ndarray
    ranks: tuple[int, ...]

    @classmethod
    def from_factors(cls, factors: Sequence[LoraFactors | None], out_features: int, in_features: int,
                     r_max: int | None = None) -> StackedBank:
        """Stack ``factors`` in float64, zero-padding every rank to ``r_max`` (default: the largest)."""
        ranks = tuple(0 if f is None else int(np.shape(f.A)[0]) for f in factors)
        width = max(ranks, default=0) if r_max is None else int(r_max)
        if width < max(ranks, default=0):
            raise ShapeError(f"r_max={width} is smaller than the largest adapter rank {max(ranks)}")
        A = np.zeros((len(factors), width, in_features), float64)
        B = np.zeros((len(factors), out_features, width), float64)
        scale = np.zeros(len(factors), float64)
        for i, f in enumerate(factors):
            if f is None:
                continue
            check_lora_shapes((out_features, in_features), np.asarray(f.A), np.asarray(f.B), fan_in_fan_out=False,
                              module=f"adapter {i}")
            A[i, : ranks[i]] = f.A
            B[i, :, : ranks[i]] = f.B
            scale[i] = f.scale
        return cls(A, B, scale, ranks)

    def forward(self, x: np.ndarray, W: np.ndarray, index: np.ndarray | Sequence[int], *,
                bias: np.ndarray | None = None, out_dtype: object = None) -> np.ndarray:
        """y[b] = x[b] W^T + bias + s[j] (x[b] A[j]^T) B[j]^T with j = idx[b] (no term where j = -1)."""
        x64, W64 = wide(x, "x"), wide(W, "W")
        if W64.shape != (self.B.shape[1], self.A.shape[2]):
            raise ShapeError(f"W has shape {W64.shape}; the bank is for {(self.B.shape[1], self.A.shape[2])}")
        if x64.ndim < 2 or x64.shape[-1] != W64.shape[1]:
            raise ShapeError(f"x has shape {x64.shape}; expected [batch, ..., {W64.shape[1]}]")
        idx = check_index(index, x64.shape[0], self.A.shape[0])
        X = x64.reshape(x64.shape[0], -1, x64.shape[-1])
        live = idx >= 0
        j = np.where(live, idx, 0)
        A_rows, B_rows = self.A[j], self.B[j]  # gathered [batch, r_max, in], [batch, out, r_max]
        s_rows = np.where(live, self.scale[j], 0.0)
        lora = ((X @ A_rows.transpose(0, 2, 1)) @ B_rows.transpose(0, 2, 1)) * s_rows[:, None, None]  # batched GEMMs
        lora[~live] = 0.0  # base rows: no LoRA term at all (not 0 * gathered slot, which is NaN for inf x)
        Y = (X.reshape(-1, X.shape[2]) @ W64.T).reshape(lora.shape) + lora
        if bias is not None:
            Y = Y + np.asarray(bias, dtype=float64)
        y = Y.reshape(x64.shape[:-1] + (W64.shape[0],))
        return round_to(y, resolve_dtype(out_dtype) if out_dtype is not None else np.asarray(x).dtype)
