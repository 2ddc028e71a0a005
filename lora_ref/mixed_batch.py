"""Mixed-batch LoRA: one batch, one base weight, a different adapter per row (SPEC M.1).

Rows are routed by an integer index ``idx`` of length ``batch`` (the first axis of x, or of the
ids for an Embedding): ``idx[b] = i`` sends row b through adapter i, ``idx[b] = -1`` through the
base only. Any registered layer kind (:mod:`lora_ref.kinds`) works through its ``LayerOps``
(base(x), lora(x) and their VJPs): with adapters i = 0..N-1 given as factors (A_i, B_i, s_i,
optionally lora_bias_i or a DoRA magnitude m_i), ranks and scales free per adapter,

    plain row:  y[b] = base(x[b]) + bias + s_i lora_i(x[b] ∘ mask[b]) + s_i lora_bias_i
    DoRA row:   y[b] = g_i ∘ (base(x[b]) + lora_i(x[b])) + bias                   (no dropout)
                y[b] = base(x[b]) + bias + (g_i − 1) ∘ base(x̃[b]) + g_i ∘ lora_i(x̃[b])   (dropout)
    base row:   y[b] = base(x[b]) + bias

with g_i = m_i / n_i and n_i = ‖W + ΔW_i‖ per output channel, each DoRA row with its own
adapter's norm (:func:`lora_ref.dora.build`, n detached as PEFT does). Linear:
base(x) = x Wᵀ, lora(x) = s (x Aᵀ) Bᵀ; Embedding: W[ids], s Aᵀ[ids] Bᵀ (no dropout, no bias);
Conv: conv(x, W), s conv₁ₓ₁(conv(x, A), B). Everything is evaluated in float64 and rounded once
to the output dtype (default: x's float dtype, else W's). The backward pass gives, with
G_i = {b : idx[b] = i} the rows of adapter i,

    dx[b]  = base_vjp(dy[b]) + [b ∈ G_i] · lora_vjp_x(dy[b]) ∘ mask[b]      (plain; DoRA: dora.backward)
    dA_i, dB_i = lora_vjp over G_i only     dlora_bias_i = s_i Σ_{G_i} dy     dm_i: DoRA's dm over G_i

so an adapter's gradients come from its own rows only (an adapter with no rows gets zeros).
Two evaluation strategies for Linear, equal up to float64 rounding (SPEC M.1 gives the bound):

* grouped (:func:`mixed_forward`): the base map for the whole batch, then one LoRA product
  per adapter over its rows (what SGMV-style kernels do);
* stacked (:class:`StackedBank`, plain Linear LoRA only): the N adapters stored as a zero-padded
  bank A [N, r_max, in], B [N, out, r_max], s [N], gathered per row (BGMV-style, as serving
  systems store adapters). Zero padding adds exact zeros, so padding to any r_max >= max r_i
  does not change the value.

An adapter that does not target the layer is given as ``None``: its rows see the base only.
PEFT's ``adapter_names`` refuses DoRA adapters; the reference routes them (SPEC M.7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import dora
from .adapter import Adapter
from .dtypes import check_float_array, float64, resolve_dtype, round_to
from .errors import ConfigError, ShapeError, UnsupportedFeatureError
from .kinds import Kind, kind_of
from .linear import check_lora_shapes
from .numerics import along_axis, check_mask, wide, wide_vector


class RoutingError(ShapeError):
    """A per-row adapter index is malformed: wrong length, not integers, or out of range."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's tensors on one layer, in the kind's PEFT layout, and its scale s.

    ``lora_bias`` [out] (PEFT's lora_B.bias) and ``magnitude`` (DoRA's m, one entry per output
    channel) are optional and exclusive; ``kind`` names the layer kind (:mod:`lora_ref.kinds`).
    """

    A: np.ndarray
    B: np.ndarray
    scale: float
    lora_bias: np.ndarray | None = None
    magnitude: np.ndarray | None = None
    kind: str = "linear"


def factors_for(adapters: Sequence[Adapter], module: str) -> list[LoraFactors | None]:
    """The factors of ``module`` in each adapter (``None`` where an adapter does not target it).

    Every kind, lora_bias and DoRA are taken; the adapters must agree on the module's kind and
    on fan_in_fan_out (ConfigError otherwise: they cannot share one base layer).
    """
    result: list[LoraFactors | None] = []
    for adapter in adapters:
        lora = adapter.modules.get(module)
        result.append(None if lora is None else LoraFactors(lora.A, lora.B, adapter.scale_for(module), lora.lora_bias,
                                                            lora.magnitude, lora.kind))
    kinds_seen = {f.kind for f in result if f is not None}
    if len(kinds_seen) > 1:
        raise ConfigError(f"{module}: the adapters disagree on the layer kind ({sorted(kinds_seen)}); one batch has one base layer")
    layouts = {a.config.fan_in_fan_out for a in adapters if module in a.modules}
    if len(layouts) > 1:
        raise ConfigError(f"{module}: the adapters disagree on fan_in_fan_out; one batch has one base layer layout")
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


def layer_kind(factors: Sequence[LoraFactors | None], kind: str | Kind | None = None) -> Kind:
    """The one kind of ``factors`` (and of ``kind`` if given; default Linear); ConfigError when they disagree."""
    seen = {f.kind for f in factors if f is not None} | ({kind_of(kind).name} if kind is not None else set())
    if len(seen) > 1:
        raise ConfigError(f"adapters of kinds {sorted(seen)} cannot share one base layer")
    return kind_of(seen.pop() if seen else "linear")


class RoutedLayer:
    """One base layer of any kind and N adapters' maps on it, checked once (module doc).

    ``base``: the kind's :class:`~lora_ref.kinds.LayerOps` without an adapter (zero factors);
    ``layer(i)``: adapter i's LayerOps, or its :class:`lora_ref.dora.Dora` layer (built on
    first use, its norm n_i from W + ΔW_i). ``channel_axis``: the output's channel axis.
    """

    def __init__(self, W: np.ndarray, factors: Sequence[LoraFactors | None], *, kind: str | Kind | None = None,
                 fan_in_fan_out: bool = False, geometry=None, padding_idx: int | None = None) -> None:
        self.kind = layer_kind(factors, kind)
        self.W, self.factors = W, list(factors)
        self.options = dict(fan_in_fan_out=fan_in_fan_out, geometry=geometry, padding_idx=padding_idx)
        for i, f in enumerate(self.factors):
            if f is not None:
                self._check(i, f)
        zero_A, zero_B = self.kind.zero_factors(np.shape(W), fan_in_fan_out=fan_in_fan_out)
        self.base = self.kind.ops(W, zero_A, zero_B, 0.0, **self.options)
        self.channel_axis = self.base.channel_axis
        self._layers: dict[int, object] = {}

    def _check(self, i: int, f: LoraFactors) -> None:
        where = f"adapter {i}"
        check_float_array(f.A, f"{where} lora_A")
        check_float_array(f.B, f"{where} lora_B")
        out, _, _ = self.kind.check_shapes(np.shape(self.W), np.asarray(f.A), np.asarray(f.B),
                                           fan_in_fan_out=self.options["fan_in_fan_out"], module=where)
        if f.lora_bias is not None:
            if not self.kind.lora_bias:
                raise ConfigError(f"{where}: {self.kind.label} layers take no lora_bias (PEFT has none)")
            if f.magnitude is not None:
                raise ConfigError(f"{where}: DoRA with lora_bias is undefined (PEFT refuses it too)")
            wide_vector(f.lora_bias, out, f"{where} lora_bias")

    def layer(self, i: int):
        if i not in self._layers:
            f = self.factors[i]
            if f.magnitude is None:
                self._layers[i] = self.kind.ops(self.W, f.A, f.B, f.scale, **self.options)
            else:
                self._layers[i] = dora.build(self.kind, self.W, f.A, f.B, f.scale, f.magnitude, **self.options)
        return self._layers[i]

    def input(self, x: np.ndarray) -> np.ndarray:
        """x widened to float64 (ids stay integers), checked by the kind."""
        x = np.asarray(x)
        return self.base.check_input(x if x.dtype.kind in "iu" else wide(x, "x"))

    def routing(self, x: np.ndarray, index, dropout_mask: np.ndarray | None):
        """(x_in, idx, mask): checked input, routing index and dropout mask (like x, or None)."""
        x_in = self.input(x)
        if x_in.ndim < 1 or (x_in.ndim < 2 and x_in.dtype.kind == "f"):
            raise ShapeError(f"x has shape {x_in.shape}; its first axis must be the batch")
        idx = check_index(index, x_in.shape[0], len(self.factors))
        if dropout_mask is not None and not self.kind.dropout:
            raise ConfigError(f"{self.kind.label} layers take no dropout (PEFT applies none)")
        return x_in, idx, check_mask(dropout_mask, x_in.shape)

    def groups(self, idx: np.ndarray):
        """(i, factors, rows) for every adapter present with at least one row."""
        for i, f in enumerate(self.factors):
            rows = np.flatnonzero(idx == i)
            if f is not None and rows.size:
                yield i, f, rows

    def channel(self, v: np.ndarray, ndim: int) -> np.ndarray:
        return along_axis(np.asarray(v, dtype=float64), ndim, self.channel_axis)

    def add_bias(self, Y: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        if bias is None:
            return Y
        if not self.kind.base_bias:
            raise ConfigError(f"{self.kind.label} layers have no bias")
        return Y + self.channel(wide_vector(bias, Y.shape[self.channel_axis], "bias"), Y.ndim)

    def out_dtype(self, x: np.ndarray, out_dtype: object) -> np.dtype:
        if out_dtype is not None:
            return resolve_dtype(out_dtype)
        return np.asarray(x).dtype if np.asarray(x).dtype.kind == "f" else np.asarray(self.W).dtype


def mixed_forward(
    x: np.ndarray,
    W: np.ndarray,
    factors: Sequence[LoraFactors | None],
    index: np.ndarray | Sequence[int],
    *,
    kind: str | Kind | None = None,
    bias: np.ndarray | None = None,
    dropout_mask: np.ndarray | None = None,
    fan_in_fan_out: bool = False,
    geometry=None,
    padding_idx: int | None = None,
    out_dtype: object = None,
) -> np.ndarray:
    """Grouped mixed-batch forward of any kind (module doc): the base map over the whole batch,
    then each adapter's term over its rows; DoRA rows are recomputed with their own norm."""
    layer = RoutedLayer(W, factors, kind=kind, fan_in_fan_out=fan_in_fan_out, geometry=geometry, padding_idx=padding_idx)
    X, idx, mask = layer.routing(x, index, dropout_mask)
    Y = layer.base.base(X)
    for i, f, rows in layer.groups(idx):
        ops, mask_r = layer.layer(i), None if mask is None else mask[rows]
        if f.magnitude is not None:
            Y[rows] = ops.forward64(X[rows], mask_r)
            continue
        Y[rows] += ops.lora(X[rows] if mask_r is None else X[rows] * mask_r)
        if f.lora_bias is not None:
            Y[rows] += f.scale * layer.channel(f.lora_bias, Y.ndim)
    return round_to(layer.add_bias(Y, bias), layer.out_dtype(x, out_dtype))


def active_forward(
    x: np.ndarray,
    W: np.ndarray,
    factors: Sequence[LoraFactors],
    *,
    kind: str | Kind | None = None,
    bias: np.ndarray | None = None,
    fan_in_fan_out: bool = False,
    geometry=None,
    out_dtype: object = None,
) -> np.ndarray:
    """Several adapters active at once on every row (a stack, unmerged), any kind:

        y = base(x) + bias + Σ_j (lora_j(x) + s_j lora_bias_j)        (j in the given order)

    in float64, rounded once; equal, up to float64 rounding, to the forward of the same stack
    merged, base with W + Σ_j ΔW_j and bias + Σ_j s_j lora_bias_j (SPEC M.2). DoRA adapters are
    refused (:class:`~lora_ref.errors.UnsupportedFeatureError`): each DoRA term rescales the
    whole layer output by its own m/n, so "several active at once" has no additive meaning
    (PEFT adds each DoRA term computed against the bare base; the reference does not guess).
    """
    for j, f in enumerate(factors):
        if f.magnitude is not None:
            raise UnsupportedFeatureError(f"adapter {j} is DoRA: an unmerged stack of active adapters is additive and "
                                          "DoRA's m/n rescaling is not; merge DoRA adapters one after another instead")
    layer = RoutedLayer(W, factors, kind=kind, fan_in_fan_out=fan_in_fan_out, geometry=geometry)
    X = layer.input(x)
    Y = layer.base.base(X)
    for j, f in enumerate(factors):
        Y = Y + layer.layer(j).lora(X)
        if f.lora_bias is not None:
            Y = Y + f.scale * layer.channel(f.lora_bias, Y.ndim)
    return round_to(layer.add_bias(Y, bias), layer.out_dtype(x, out_dtype))


@dataclass(frozen=True)
class MixedGrads:
    """Gradients of a mixed batch: dx like x (None for embedding ids); per adapter i (None if
    absent) dA[i], dB[i] like its factors, dlora_bias[i] (None without lora_bias) and
    dmagnitude[i] (DoRA only, like its magnitude)."""

    dx: np.ndarray | None
    dA: list[np.ndarray | None]
    dB: list[np.ndarray | None]
    dlora_bias: list[np.ndarray | None] = field(default_factory=list)
    dmagnitude: list[np.ndarray | None] = field(default_factory=list)


def mixed_backward(
    x: np.ndarray,
    dy: np.ndarray,
    W: np.ndarray,
    factors: Sequence[LoraFactors | None],
    index: np.ndarray | Sequence[int],
    *,
    kind: str | Kind | None = None,
    dropout_mask: np.ndarray | None = None,
    fan_in_fan_out: bool = False,
    geometry=None,
    padding_idx: int | None = None,
) -> MixedGrads:
    """Gradients of :func:`mixed_forward` given dy = dL/dy (module doc); each rounded once to its tensor's dtype.

    Plain rows: dx = base_vjp(dy) + lora_vjp_x(dy) ∘ mask, (dA, dB) = lora_vjp at x ∘ mask;
    DoRA rows: :meth:`lora_ref.dora.Dora.backward64` with the adapter's own g = m / n (n constant).
    """
    layer = RoutedLayer(W, factors, kind=kind, fan_in_fan_out=fan_in_fan_out, geometry=geometry, padding_idx=padding_idx)
    X, idx, mask = layer.routing(x, index, dropout_mask)
    dY = wide(dy, "dy")
    expected = layer.base.base(X[:1]).shape[1:]
    if dY.shape != (X.shape[0],) + expected:
        raise ShapeError(f"dy has shape {dY.shape}, expected {(X.shape[0],) + expected}")
    dX = layer.base.base_vjp(X, dY)
    dA: list = [None if f is None else np.zeros(np.shape(f.A), float64) for f in factors]
    dB: list = [None if f is None else np.zeros(np.shape(f.B), float64) for f in factors]
    dlb: list = [None if f is None or f.lora_bias is None else np.zeros(np.shape(f.lora_bias), float64) for f in factors]
    dm: list = [None if f is None or f.magnitude is None else np.zeros(np.shape(f.magnitude), float64) for f in factors]
    sum_axes = tuple(a for a in range(dY.ndim) if a != dY.ndim + layer.channel_axis and a != layer.channel_axis)
    for i, f, rows in layer.groups(idx):
        ops, mask_r, dY_r = layer.layer(i), None if mask is None else mask[rows], dY[rows]
        if f.magnitude is not None:
            dx_r, dA[i], dB[i], dm_i, _ = ops.backward64(X[rows], dY_r, mask_r)
            dm[i] = dm_i.reshape(np.shape(f.magnitude))
            if dX is not None:
                dX[rows] = dx_r
            continue
        dx_r, dA[i], dB[i] = ops.lora_vjp(X[rows] if mask_r is None else X[rows] * mask_r, dY_r)
        if dX is not None:
            dX[rows] += dx_r if mask_r is None else dx_r * mask_r
        if f.lora_bias is not None:
            dlb[i] = f.scale * dY_r.sum(axis=sum_axes)

    def rounded(grads: list, attr: str) -> list:
        return [None if g is None else round_to(np.reshape(g, np.shape(getattr(f, attr))), np.asarray(getattr(f, attr)).dtype)
                for g, f in zip(grads, factors)]

    return MixedGrads(
        dx=None if dX is None else round_to(dX, np.asarray(x).dtype),
        dA=rounded(dA, "A"), dB=rounded(dB, "B"), dlora_bias=rounded(dlb, "lora_bias"), dmagnitude=rounded(dm, "magnitude"),
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
            if f.kind != "linear" or f.lora_bias is not None or f.magnitude is not None:
                raise UnsupportedFeatureError(f"adapter {i}: the stacked bank holds plain Linear LoRA only "
                                              "(no lora_bias, DoRA or other kinds); use mixed_forward")
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
