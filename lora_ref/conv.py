"""LoRA on Conv1d / Conv2d / Conv3d: forward, backward and delta weight, in float64.

Shapes (torch layout, d = 1, 2 or 3 spatial axes): x [N, C, *S], W [O, C, *k], b [O],
A [r, C, *k] (a conv with the base's kernel and geometry), B [O, r, 1, ..., 1] (a 1x1 conv),
lora_bias [O], dropout mask like x.

    y = conv(x, W) + b + s · conv₁ₓ₁(conv(x ∘ mask, A), B) + s · lora_bias      (SPEC 4.2)

where every ``conv`` uses the base layer's stride, padding, dilation and padding_mode (the
spec's choice: PEFT 0.21 builds lora_A without dilation and padding_mode, see the deviations
list). Then ΔW[o, c, κ] = s Σ_j B[o, j] A[j, c, κ] has W's shape (1x1 and kxk alike), and the
merged conv equals the unmerged one. ``groups > 1`` is refused (:class:`ConvGroupsError`).
Every input is widened to float64, the whole expression is evaluated in float64, and the
result is rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .dtypes import check_float_array, float64, resolve_dtype, round_to
from .errors import ConfigError, ShapeError
from .kinds import ExportFacts, Kind, register
from .linear import LoraGrads
from .numerics import check_mask, rank_one_sum, wide, wide_vector

#: torch padding_mode -> numpy.pad mode (``zeros`` pads with a constant 0).
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


class ConvGroupsError(ConfigError):
    """A grouped convolution (groups > 1): its LoRA delta has no single kernel-shaped form."""


@dataclass(frozen=True)
class ConvGeometry:
    """The base conv's hyper-parameters (torch's names); ints apply to every spatial axis.

    ``padding`` may be an int, a tuple, ``"valid"`` (0) or ``"same"`` (stride 1 only; the
    extra element of an odd total goes to the end, as torch does).
    """

    stride: int | Sequence[int] = 1
    padding: int | Sequence[int] | str = 0
    dilation: int | Sequence[int] = 1
    padding_mode: str = "zeros"
    groups: int = 1

    def check(self, module: str = "") -> None:
        where = f"{module}: " if module else ""
        if self.groups != 1:
            raise ConvGroupsError(f"{where}conv LoRA with groups={self.groups} is not supported (only groups=1)")
        if self.padding_mode not in PADDING_MODES:
            raise ConfigError(f"{where}padding_mode must be one of {sorted(PADDING_MODES)}, got {self.padding_mode!r}")

    def per_axis(self, value: int | Sequence[int], d: int, what: str) -> tuple[int, ...]:
        values = (value,) * d if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
        if len(values) != d:
            raise ShapeError(f"conv {what} {value!r} does not have {d} entries")
        if any(v < (0 if what == "padding" else 1) for v in values):
            raise ConfigError(f"conv {what} {value!r} is out of range")
        return values

    def pads(self, kernel: tuple[int, ...]) -> list[tuple[int, int]]:
        """(before, after) padding per spatial axis."""
        d = len(kernel)
        dilation = self.per_axis(self.dilation, d, "dilation")
        if self.padding == "valid":
            return [(0, 0)] * d
        if self.padding == "same":
            if any(s != 1 for s in self.per_axis(self.stride, d, "stride")):
                raise ConfigError("padding='same' needs stride 1")
            totals = [dl * (k - 1) for dl, k in zip(dilation, kernel)]
            return [(t // 2, t - t // 2) for t in totals]
        if isinstance(self.padding, str):
            raise ConfigError(f"conv padding must be an int, a tuple, 'same' or 'valid', got {self.padding!r}")
        return [(p, p) for p in self.per_axis(self.padding, d, "padding")]


def check_conv_shapes(W_shape: tuple[int, ...], A: np.ndarray, B: np.ndarray, module: str = "") -> tuple[int, int, int]:
    """Validate W [O, C, *k], A [r, C, *k], B [O, r, 1...]; return (O, C, r)."""
    where = f"{module}: " if module else ""
    if len(W_shape) not in (3, 4, 5):
        raise ShapeError(f"{where}conv weight must have 3, 4 or 5 axes (Conv1d/2d/3d), got shape {tuple(W_shape)}")
    if A.ndim != len(W_shape) or B.ndim != len(W_shape):
        raise ShapeError(f"{where}lora_A {A.shape} and lora_B {B.shape} must have as many axes as the conv weight {tuple(W_shape)}")
    out_ch, in_ch, kernel = W_shape[0], W_shape[1], tuple(W_shape[2:])
    if A.shape[0] != B.shape[1]:
        raise ShapeError(f"{where}rank mismatch: lora_A {A.shape} has r={A.shape[0]} but lora_B {B.shape} has r={B.shape[1]}")
    if A.shape[1] != in_ch or tuple(A.shape[2:]) != kernel:
        raise ShapeError(f"{where}lora_A {A.shape} must be [r, {in_ch}, *{kernel}] to fit the conv weight {tuple(W_shape)}")
    if B.shape[0] != out_ch or any(k != 1 for k in B.shape[2:]):
        raise ShapeError(f"{where}lora_B {B.shape} must be a 1x1 kernel [{out_ch}, r, {', '.join('1' * len(kernel))}]")
    return out_ch, in_ch, A.shape[0]


class ConvOps:
    """The float64 linear maps of one conv LoRA layer and their vector-Jacobian products.

    ``base(x) = conv(x, W)`` (no bias); ``lora(x) = s · conv₁ₓ₁(conv(x, A), B)`` (no lora_bias).
    Output channels are axis 1 (``channel_axis``), as DoRA's magnitude broadcasts.
    """

    channel_axis = 1

    def __init__(self, W: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, geometry: ConvGeometry, module: str = "") -> None:
        geometry.check(module)
        self.out_ch, self.in_ch, self.rank = check_conv_shapes(np.shape(W), np.asarray(A), np.asarray(B), module)
        self.W = wide(W, "W")
        self.A = wide(A, "lora_A")
        self.B2 = wide(B, "lora_B").reshape(self.out_ch, self.rank)
        self.scale = float(scale)
        self.geometry = geometry
        self.kernel = tuple(np.shape(W)[2:])
        d = len(self.kernel)
        self.stride = geometry.per_axis(geometry.stride, d, "stride")
        self.dilation = geometry.per_axis(geometry.dilation, d, "dilation")
        self.pads = geometry.pads(self.kernel)

    # -- convolution primitives --------------------------------------------------------------
    def check_input(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != len(self.kernel) + 2 or x.shape[1] != self.in_ch:
            raise ShapeError(f"x has shape {x.shape}; expected [N, {self.in_ch}, *spatial] with {len(self.kernel)} spatial axes")
        return x

    def _windows(self, x64: np.ndarray) -> np.ndarray:
        """[N, C, *out, *k]: the input patch each output position sees (padding applied)."""
        padded = np.pad(x64, [(0, 0), (0, 0), *self.pads], mode=PADDING_MODES[self.geometry.padding_mode])
        span = tuple(dl * (k - 1) + 1 for dl, k in zip(self.dilation, self.kernel))
        if any(p < s for p, s in zip(padded.shape[2:], span)):
            raise ShapeError(f"input spatial size {x64.shape[2:]} (padded {padded.shape[2:]}) is smaller than the kernel span {span}")
        view = sliding_window_view(padded, span, axis=tuple(range(2, padded.ndim)))
        index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in self.stride) + tuple(
            slice(None, None, dl) for dl in self.dilation
        )
        return view[index]

    def conv(self, x64: np.ndarray, kernel64: np.ndarray) -> np.ndarray:
        """[N, K, *out] = Σ_{c, κ} x_patch[n, c, out, κ] kernel[K, c, κ]."""
        windows = self._windows(x64)
        d = len(self.kernel)
        axes_w = [1] + [2 + d + i for i in range(d)]
        y = np.tensordot(windows, kernel64, axes=(axes_w, [1] + [2 + i for i in range(d)]))  # [N, *out, K]
        return np.moveaxis(y, -1, 1)

    def conv_vjp_kernel(self, x64: np.ndarray, dY: np.ndarray) -> np.ndarray:
        """d/d kernel of Σ dY · conv(x, kernel): [K, C, *k]."""
        windows = self._windows(x64)
        d = len(self.kernel)
        axes = [0] + [2 + i for i in range(d)]
        return np.tensordot(dY, windows, axes=(axes, axes))  # [K, C, *k]

    def conv_vjp_input(self, dY: np.ndarray, kernel64: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
        """d/dx of Σ dY · conv(x, kernel): scatter each kernel tap back, then fold the padding."""
        padded_shape = tuple(n + lo + hi for n, (lo, hi) in zip(x_shape[2:], self.pads))
        out_shape = dY.shape[2:]
        grad = np.zeros((x_shape[0], x_shape[1]) + padded_shape, dtype=float64)
        for tap in np.ndindex(*self.kernel):
            contribution = np.tensordot(dY, kernel64[(slice(None), slice(None)) + tap], axes=([1], [0]))  # [N, *out, C]
            where = tuple(
                slice(t * dl, t * dl + s * (o - 1) + 1, s) for t, dl, s, o in zip(tap, self.dilation, self.stride, out_shape)
            )
            grad[(slice(None), slice(None)) + where] += np.moveaxis(contribution, -1, 1)
        return self._fold_padding(grad, x_shape)

    def _fold_padding(self, grad_padded: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
        """Adjoint of the padding: add each padded position's gradient to the element it copies."""
        spatial = x_shape[2:]
        mode = PADDING_MODES[self.geometry.padding_mode]
        index = np.arange(int(np.prod(spatial)), dtype=np.int64).reshape(spatial)
        kwargs = {"constant_values": -1} if mode == "constant" else {}
        source = np.pad(index, self.pads, mode=mode, **kwargs).reshape(-1)
        flat = grad_padded.reshape(x_shape[0] * x_shape[1], -1)
        keep = source >= 0
        out = np.zeros((flat.shape[0], index.size), dtype=float64)
        for row in range(flat.shape[0]):  # bincount: a fixed-order scatter-add per (n, c)
            out[row] = np.bincount(source[keep], weights=flat[row, keep], minlength=index.size)
        return out.reshape(x_shape)

    # -- the LoRA layer's maps ---------------------------------------------------------------
    def base(self, x64: np.ndarray) -> np.ndarray:
        return self.conv(x64, self.W)

    def base_vjp(self, x64: np.ndarray, dY: np.ndarray) -> np.ndarray:
        return self.conv_vjp_input(dY, self.W, x64.shape)

    def lora(self, x64: np.ndarray) -> np.ndarray:
        hidden = self.conv(x64, self.A)  # [N, r, *out]
        return self.scale * np.moveaxis(np.tensordot(hidden, self.B2, axes=([1], [1])), -1, 1)

    def lora_vjp(self, x64: np.ndarray, dY: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dx, dA, dB) of Σ dY · lora(x); dB has B's [O, r, 1...] shape."""
        hidden = self.conv(x64, self.A)
        d_hidden = self.scale * np.moveaxis(np.tensordot(dY, self.B2, axes=([1], [0])), -1, 1)  # [N, r, *out]
        axes = [0] + list(range(2, dY.ndim))
        dB = self.scale * np.tensordot(dY, hidden, axes=(axes, axes))  # [O, r]
        dA = self.conv_vjp_kernel(x64, d_hidden)
        dx = self.conv_vjp_input(d_hidden, self.A, x64.shape)
        return dx, dA, dB.reshape((self.out_ch, self.rank) + (1,) * len(self.kernel))


def _channel(v64: np.ndarray, ndim: int) -> np.ndarray:
    return v64.reshape((1, -1) + (1,) * (ndim - 2))


def forward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scale: float,
    *,
    geometry: ConvGeometry = ConvGeometry(),
    bias: np.ndarray | None = None,
    lora_bias: np.ndarray | None = None,
    dropout_mask: np.ndarray | None = None,
    out_dtype: object = None,
) -> np.ndarray:
    """y = conv(x, W) + b + s conv₁ₓ₁(conv(x ∘ mask, A), B) + s lora_bias, rounded once."""
    ops = ConvOps(W, A, B, scale, geometry)
    x64 = wide(x, "x")
    ops.check_input(x64)
    mask = check_mask(dropout_mask, x64.shape)
    y = ops.base(x64) + ops.lora(x64 if mask is None else x64 * mask)
    if bias is not None:
        y = y + _channel(wide_vector(bias, ops.out_ch, "bias"), y.ndim)
    if lora_bias is not None:
        y = y + scale * _channel(wide_vector(lora_bias, ops.out_ch, "lora_bias"), y.ndim)
    return round_to(y, resolve_dtype(out_dtype) if out_dtype is not None else np.asarray(x).dtype)


def backward(
    x: np.ndarray,
    dy: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scale: float,
    *,
    geometry: ConvGeometry = ConvGeometry(),
    dropout_mask: np.ndarray | None = None,
    want_base_grads: bool = False,
) -> LoraGrads:
    """Gradients of :func:`forward` (SPEC 4.2), with h = conv(x̃, A), x̃ = x ∘ mask:

        dx = convᵀ(dY, W) + convᵀ(dH, A) ∘ mask,   dH = s Bᵀ dY (per position)
        dA = corr(x̃, dH)    dB = s Σ_{n,pos} dY hᵀ    dW = corr(x, dY)
        db = Σ_{n,pos} dY   dlora_bias = s db
    """
    ops = ConvOps(W, A, B, scale, geometry)
    x64, dy64 = wide(x, "x"), wide(dy, "dy")
    ops.check_input(x64)
    mask = check_mask(dropout_mask, x64.shape)
    expected = ops.base(np.zeros((1,) + x64.shape[1:])).shape[2:]
    if dy64.shape != (x64.shape[0], ops.out_ch) + expected:
        raise ShapeError(f"dy has shape {dy64.shape}, expected {(x64.shape[0], ops.out_ch) + expected}")
    x_lora = x64 if mask is None else x64 * mask
    dx_lora, dA, dB = ops.lora_vjp(x_lora, dy64)
    dx = ops.base_vjp(x64, dy64) + (dx_lora if mask is None else dx_lora * mask)
    grads = {
        "dx": round_to(dx, np.asarray(x).dtype),
        "dA": round_to(dA, np.asarray(A).dtype),
        "dB": round_to(dB, np.asarray(B).dtype),
    }
    if want_base_grads:
        column_sum = dy64.sum(axis=(0,) + tuple(range(2, dy64.ndim)))
        grads["dW"] = round_to(ops.conv_vjp_kernel(x64, dy64), np.asarray(W).dtype)
        grads["db"] = round_to(column_sum, np.asarray(W).dtype)
        grads["dlora_bias"] = round_to(scale * column_sum, np.asarray(B).dtype)
    return LoraGrads(**grads)


class ConvDelta:
    """ΔW = s Σ_j B[:, j] ⊗ A[j] with the conv kernel's shape [O, C, *k] (SPEC 4.2), in row blocks.

    Same fixed evaluation order as :class:`lora_ref.linear.LinearDelta` (rank-one terms in
    increasing j, no BLAS), so Δ is bit-reproducible; the 1x1 and kxk cases are one formula.
    """

    def __init__(self, A: np.ndarray, B: np.ndarray, scale: float, *, module: str = "") -> None:
        check_float_array(A, f"{module} lora_A".strip())
        check_float_array(B, f"{module} lora_B".strip())
        A, B = np.asarray(A), np.asarray(B)
        if A.ndim < 3:
            raise ShapeError(f"{module}: conv lora_A must have kernel axes, got shape {A.shape}")
        self.shape = (B.shape[0],) + tuple(A.shape[1:])
        check_conv_shapes(self.shape, A, B, module)
        self.A, self.B, self.scale, self.module = A, B, float(scale), module

    def factors(self) -> tuple[np.ndarray, ...]:
        return (self.A, self.B, np.float64(self.scale))

    def rank_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(L, R) with Δ = s · L R reshaped to the kernel: B as [O, r] and A as [r, C·k]."""
        r = self.A.shape[0]
        return self.B.reshape(self.B.shape[0], r), self.A.reshape(r, -1)

    def block(self, rows: slice) -> np.ndarray:
        """Δ[rows] in float64, shaped like W[rows]."""
        r = self.A.shape[0]
        left = self.B.reshape(self.B.shape[0], r)[rows].astype(float64)
        flat = rank_one_sum(left, self.A.reshape(r, -1).astype(float64)) * self.scale
        return flat.reshape((left.shape[0],) + self.shape[1:])

    def full(self) -> np.ndarray:
        return self.block(slice(None))


class ConvKind(Kind):
    """Conv1d / Conv2d / Conv3d (groups = 1): W [O, C, *k], A [r, C, *k], B [O, r, 1...]."""

    name = "conv"
    label = "Conv"
    kernel_axes = True
    export = ExportFacts(ops=("Conv",), weight_input=1, weight_ranks=(3, 4, 5), transposable=False,
                         form="Conv with group=1", lora_a_op="Conv", factor_layout="kernel")

    def check_shapes(self, W_shape, A, B, *, fan_in_fan_out=False, module=""):
        return check_conv_shapes(W_shape, np.asarray(A), np.asarray(B), module)

    def lora_shapes(self, W_shape, r, *, fan_in_fan_out=False):
        if len(W_shape) not in (3, 4, 5):
            raise ShapeError(f"conv weight must have 3-5 axes, got {W_shape}")
        return (r,) + tuple(W_shape[1:]), (W_shape[0], r) + (1,) * (len(W_shape) - 2)

    def delta(self, A, B, scale, *, fan_in_fan_out=False, module=""):
        return ConvDelta(A, B, scale, module=module)

    def ops(self, W, A, B, scale, *, fan_in_fan_out=False, geometry=None, padding_idx=None, module=""):
        self.refuse_options(module, padding_idx=padding_idx)
        return ConvOps(W, A, B, scale, geometry or ConvGeometry(), module)

    def forward(self, x, W, A, B, scale, *, bias=None, lora_bias=None, dropout_mask=None, fan_in_fan_out=False,
                geometry=None, out_dtype=None, module=""):
        return forward(x, W, A, B, scale, geometry=geometry or ConvGeometry(), bias=bias, lora_bias=lora_bias,
                       dropout_mask=dropout_mask, out_dtype=out_dtype)


CONV = register(ConvKind())
