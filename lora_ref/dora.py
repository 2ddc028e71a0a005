"""DoRA (weight-decomposed LoRA) on Linear, Embedding and Conv layers, in float64.

With V = W + ΔW (ΔW the layer kind's LoRA delta, scale included), the magnitude m has one
entry per output channel c, and the norm is taken over every other axis of V:

    n_c = ‖V_c‖₂          Linear: row c of [out, in];  Conv: V[c] over (in, *k);
                           Embedding: column c of [V, D] (norm over the vocabulary axis)
    g = m / n              (n is a constant for backward, as PEFT detaches it)

    eval:      y = g ∘ (base(x) + lora(x)) + b                                       (SPEC 4.3)
    dropout:   y = base(x) + b + (g − 1) ∘ base(x̃) + g ∘ lora(x̃),   x̃ = x ∘ mask
    merge:     W' = g ∘ (W + ΔW)           unmerge: W = W' / g − ΔW   (g from the cached n)

where base(x) is the layer without bias (x Wᵀ, conv(x, W), W[ids]) and lora(x) the scaled LoRA
path without lora_bias. Both formulas agree when mask = 1. Embeddings take no dropout.
Everything is evaluated in float64 and rounded once; n is never rounded to the weight's
dtype. Merge and unmerge go through :mod:`lora_ref.merge` (row blocks, fast and exact modes);
the residual's checksum covers m and n, so exact unmerge needs the n that merge used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, check_float_array, float64, resolve_dtype, round_to
from .errors import ConfigError, MergeStateError, ShapeError
from .kinds import Kind, KindName, LayerOps, kind_of
from .merge import BLOCK_BYTES, DeltaSource, block_rows, row_slices
from .numerics import along_axis, check_mask, wide


class DoraNormMissingError(MergeStateError):
    """A DoRA merge/unmerge lacks the weight norm n (unmerge cannot recover it from W')."""


def check_magnitude(magnitude: np.ndarray, channels: int, module: str = "") -> np.ndarray:
    """m as float64 [C]; PEFT's conv form [1, C, 1, ...] is accepted. Wrong length: ShapeError."""
    check_float_array(magnitude, f"{module} lora_magnitude_vector".strip())
    m = np.asarray(magnitude)
    squeezable = m.ndim == 1 or (m.ndim > 1 and m.shape[0] == 1 and all(k == 1 for k in m.shape[2:]))
    if not squeezable or m.size != channels:
        raise ShapeError(
            f"{module or 'dora'}: lora_magnitude_vector has shape {m.shape}; expected {channels} entries, "
            f"one per output channel"
        )
    return m.reshape(-1).astype(float64)


def weight_norm(W: np.ndarray, delta: DeltaSource, axis: int, *, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """n_c = ‖(W + ΔW)_c‖₂ in float64 over every axis but ``axis`` (0 or 1), streamed in row blocks.

    Sums of squares cannot overflow or underflow float64 for float32/16/bf16 inputs
    (|v|² ≤ (3.4e38)² ≪ 1.8e308, and the smallest subnormal squared is ≫ 1e-308).
    """
    W = np.asarray(W)
    if tuple(W.shape) != tuple(delta.shape):
        raise ShapeError(f"{delta.module}: base weight has shape {tuple(W.shape)} but the adapter's delta has {tuple(delta.shape)}")
    if axis not in (0, 1):
        raise ShapeError(f"{delta.module}: DoRA channel axis must be 0 or 1, got {axis}")
    sums = np.zeros(W.shape[axis], dtype=float64)
    for rows in row_slices(W.shape[0], block_rows(W.shape, block_bytes)):
        V = np.asarray(W[rows], dtype=float64) + delta.block(rows)
        squares = (V * V).reshape(V.shape[0], -1) if axis == 0 else (V * V).reshape(V.shape[0], V.shape[1], -1)
        if axis == 0:
            sums[rows] = squares.sum(axis=1)
        else:
            sums += squares.sum(axis=(0, 2))
    return np.sqrt(sums)


class DoraDelta:
    """A delta source for :func:`lora_ref.merge.merge`: W' = g ∘ (W + ΔW), W = W' / g − ΔW.

    ``lora`` is the kind's plain delta source (:class:`~lora_ref.linear.LinearDelta`, ...);
    ``axis`` is W's output-channel axis as stored (0: Linear and Conv rows; 1: Embedding and
    fan_in_fan_out Linear columns). ``norm`` is n, computed from the *unmerged* W (see
    :func:`dora_delta`) and needed again for unmerge.
    """

    def __init__(self, lora: DeltaSource, magnitude: np.ndarray, norm: np.ndarray, axis: int) -> None:
        self.lora = lora
        self.shape = tuple(lora.shape)
        self.module = lora.module
        self.axis = axis
        channels = self.shape[axis]
        self.magnitude = check_magnitude(magnitude, channels, lora.module)
        self.norm = np.asarray(norm, dtype=float64).reshape(-1)
        if self.norm.shape != (channels,):
            raise ShapeError(f"{lora.module}: DoRA weight norm has {self.norm.size} entries, expected {channels}")
        self.gain = self.magnitude / self.norm  # g = m / n, one float64 division each

    def factors(self) -> tuple[np.ndarray, ...]:
        return (*self.lora.factors(), self.magnitude, self.norm, np.int64(self.axis))

    def block(self, rows: slice) -> np.ndarray:
        """The plain ΔW[rows] (the additive part)."""
        return self.lora.block(rows)

    def _gain(self, rows: slice, ndim: int) -> np.ndarray:
        if self.axis == 0:
            return self.gain[rows].reshape((-1,) + (1,) * (ndim - 1))
        return self.gain.reshape(1, -1)

    def merge_block(self, rows: slice, W64: np.ndarray) -> np.ndarray:
        """g ∘ (W + ΔW) for W[rows]: one float64 add and one multiply per element."""
        return self._gain(rows, W64.ndim) * (W64 + self.lora.block(rows))

    def unmerge_block(self, rows: slice, M64: np.ndarray) -> np.ndarray:
        """W' / g − ΔW for W'[rows]: one float64 divide and one subtract per element."""
        return M64 / self._gain(rows, M64.ndim) - self.lora.block(rows)


def dora_delta(lora: DeltaSource, magnitude: np.ndarray, W: np.ndarray, axis: int) -> DoraDelta:
    """The DoRA merge source of unmerged base weight W (n computed from W + ΔW)."""
    return DoraDelta(lora, magnitude, weight_norm(W, lora, axis), axis)


def fast_roundtrip_bound(W: np.ndarray, dora: DoraDelta) -> np.ndarray:
    """Elementwise bound on |unmerge(merge(W)) − W| in fast mode (SPEC 4.3).

    Merge rounds g·(W+Δ) once to t (relative u_t, absolute floor η_t/2) after three float64
    roundings (g, W+Δ, the product); unmerge divides by g and subtracts Δ (two more) then rounds
    once. With ũ = u_t + 5·u_64·(1+u_t) covering the float64 steps,
        |err| ≤ ũ(1+ũ)|W+Δ| + ũ|W| + (1+ũ)²·(η_t/2)/|g| + η_t/2.
    """
    t = np.asarray(W).dtype
    u = UNIT_ROUNDOFF[t] + 5 * UNIT_ROUNDOFF[float64] * (1 + UNIT_ROUNDOFF[t])
    eta = SMALLEST_SUBNORMAL[t]
    W64 = np.asarray(W, dtype=float64)
    full = slice(None)
    V = W64 + dora.lora.block(full)
    g = np.abs(dora._gain(full, W64.ndim))
    return u * (1 + u) * np.abs(V) + u * np.abs(W64) + (1 + u) ** 2 * (eta / 2) / g + eta / 2


# -- forward and backward ---------------------------------------------------------------------

@dataclass(frozen=True)
class DoraGrads:
    """Gradients given dy = dL/dy, each rounded once to its tensor's dtype (dx None for ids)."""

    dx: np.ndarray | None
    dA: np.ndarray
    dB: np.ndarray
    dmagnitude: np.ndarray
    db: np.ndarray | None = None


class Dora:
    """One DoRA layer: a kind's :class:`~lora_ref.kinds.LayerOps`, its m and n, with g = m / n fixed at build.

    Build with :func:`build` (any registered kind) or its spellings :func:`linear`, :func:`conv`,
    :func:`embedding`. ``n`` is :func:`weight_norm` of the unmerged W, the norm merge uses too.
    """

    def __init__(self, ops: LayerOps, n: np.ndarray, magnitude: np.ndarray, weight_dtype: np.dtype, *,
                 dropout_ok: bool = True, module: str = "") -> None:
        self.ops = ops
        self.module = module
        self.weight_dtype = weight_dtype
        self.magnitude_shape = np.shape(magnitude)
        self.magnitude_dtype = np.asarray(magnitude).dtype
        self.n = np.asarray(n, dtype=float64)
        self.g = check_magnitude(magnitude, self.n.size, module) / self.n
        self.dropout_ok = dropout_ok

    def _mask(self, x64: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
        if mask is not None and not self.dropout_ok:
            raise ConfigError(f"{self.module or 'embedding'}: embeddings take no dropout (PEFT applies none)")
        return check_mask(mask, x64.shape)

    def _g(self, ndim: int) -> np.ndarray:
        return along_axis(self.g, ndim, self.ops.channel_axis)

    def forward64(self, x64: np.ndarray, mask: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
        """The float64 output before rounding (eval formula without a mask, dropout formula with)."""
        mask = self._mask(x64, mask)
        base = self.ops.base(x64)
        g = self._g(base.ndim)
        if mask is None:
            y = g * (base + self.ops.lora(x64))
        else:
            x_drop = x64 * mask
            y = base + (g - 1) * self.ops.base(x_drop) + g * self.ops.lora(x_drop)
        if bias is not None:
            b = np.asarray(bias).astype(float64)
            if b.shape != self.g.shape:
                raise ShapeError(f"{self.module or 'dora'}: bias has shape {b.shape}, expected {self.g.shape}")
            y = y + along_axis(b, y.ndim, self.ops.channel_axis)
        return y

    def backward64(self, x64: np.ndarray, dY: np.ndarray, mask: np.ndarray | None = None) -> tuple:
        """(dx, dA, dB, dm, db) in float64; n is a constant (SPEC 4.3)."""
        mask = self._mask(x64, mask)
        g = self._g(dY.ndim)
        x_drop = x64 if mask is None else x64 * mask
        dx_lora, dA, dB = self.ops.lora_vjp(x_drop, g * dY)
        if mask is None:
            dx = self.ops.base_vjp(x64, g * dY)
            dx = None if dx is None else dx + dx_lora
        else:
            inner = self.ops.base_vjp(x_drop, (g - 1) * dY) + dx_lora
            dx = self.ops.base_vjp(x64, dY) + inner * mask
        value = self.ops.base(x_drop) + self.ops.lora(x_drop)  # what g multiplies
        axes = tuple(i for i in range(dY.ndim) if i != dY.ndim + self.ops.channel_axis and i != self.ops.channel_axis)
        dm = (dY * value).sum(axis=axes) / self.n
        db = dY.sum(axis=axes)
        return dx, dA, dB, dm, db


def _round_grads(layer: Dora, x: np.ndarray, A: np.ndarray, B: np.ndarray, grads: tuple, bias_dtype: object) -> DoraGrads:
    dx, dA, dB, dm, db = grads
    return DoraGrads(
        dx=None if dx is None else round_to(dx, np.asarray(x).dtype),
        dA=round_to(dA, np.asarray(A).dtype),
        dB=round_to(dB.reshape(np.shape(B)), np.asarray(B).dtype),
        dmagnitude=round_to(dm.reshape(layer.magnitude_shape), layer.magnitude_dtype),
        db=round_to(db, resolve_dtype(bias_dtype)) if bias_dtype is not None else None,
    )


def build(kind: KindName | Kind, W: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, magnitude: np.ndarray, *,
          fan_in_fan_out: bool = False, geometry=None, padding_idx: int | None = None, module: str = "") -> Dora:
    """DoRA on a layer of any registered kind: the kind's ops, n = :func:`weight_norm` of W + ΔW
    over every stored axis but the kind's DoRA axis, and m (one entry per output channel)."""
    k = kind_of(kind)
    ops = k.ops(W, A, B, scale, fan_in_fan_out=fan_in_fan_out, geometry=geometry, padding_idx=padding_idx, module=module)
    n = weight_norm(W, k.delta(A, B, scale, fan_in_fan_out=fan_in_fan_out, module=module), k.dora_axis(fan_in_fan_out))
    return Dora(ops, n, magnitude, np.asarray(W).dtype, dropout_ok=k.dropout, module=module)


def linear(W: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, magnitude: np.ndarray, *, fan_in_fan_out: bool = False, module: str = "") -> Dora:
    """DoRA on a Linear layer (m: [out], n over the input axis)."""
    return build("linear", W, A, B, scale, magnitude, fan_in_fan_out=fan_in_fan_out, module=module)


def conv(W: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, magnitude: np.ndarray, *,
         geometry=None, module: str = "") -> Dora:
    """DoRA on a Conv layer (m: [O] or PEFT's [1, O, 1...], n over (in, *k))."""
    return build("conv", W, A, B, scale, magnitude, geometry=geometry, module=module)


def embedding(W: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, magnitude: np.ndarray, *, padding_idx: int | None = None, module: str = "") -> Dora:
    """DoRA on an Embedding layer (m: [D], n over the vocabulary axis; no dropout)."""
    return build("embedding", W, A, B, scale, magnitude, padding_idx=padding_idx, module=module)


def _input(layer: Dora, x: np.ndarray) -> np.ndarray:
    if np.asarray(x).dtype.kind in "iu":  # embedding ids
        return layer.ops.check_input(x)  # type: ignore[attr-defined]
    x64 = wide(x, "x")
    layer.ops.check_input(x64)  # type: ignore[attr-defined]
    return x64


def forward(layer: Dora, x: np.ndarray, *, bias: np.ndarray | None = None, dropout_mask: np.ndarray | None = None, out_dtype: object = None) -> np.ndarray:
    """The DoRA output (module doc), rounded once to ``out_dtype`` (default: x's float dtype, else W's)."""
    x_in = _input(layer, x)
    y = layer.forward64(x_in, dropout_mask, bias)
    default = np.asarray(x).dtype if np.asarray(x).dtype.kind == "f" else layer.weight_dtype
    return round_to(y, resolve_dtype(out_dtype) if out_dtype is not None else default)


def backward(layer: Dora, x: np.ndarray, dy: np.ndarray, A: np.ndarray, B: np.ndarray, *, dropout_mask: np.ndarray | None = None, bias_dtype: object = None) -> DoraGrads:
    """Gradients of :func:`forward` with n constant (SPEC 4.3); with G = g ∘ dY, x̃ = x ∘ mask:

        eval:    dx = base_vjp(G) + lora_vjp_x(G),   dA, dB = lora_vjp(x, G)
        dropout: dx = base_vjp(dY) + mask ∘ (base_vjp((g−1) ∘ dY) + lora_vjp_x(G)),  dA, dB at x̃
        dm_c = Σ_{all but c} dY ∘ (base(x̃) + lora(x̃)) / n_c          db_c = Σ_{all but c} dY
    """
    x_in = _input(layer, x)
    dy64 = wide(dy, "dy")
    expected = layer.ops.base(x_in).shape
    if dy64.shape != expected:
        raise ShapeError(f"{layer.module or 'dora'}: dy has shape {dy64.shape}, expected {expected}")
    return _round_grads(layer, x, A, B, layer.backward64(x_in, dy64, dropout_mask), bias_dtype)
