"""LoRA on a Linear layer: forward, backward and delta weight, computed in float64.

Shapes (PEFT / torch layout): x [..., in], W [out, in] (``fan_in_fan_out``: W stored
[in, out]), b [out], A [r, in], B [out, r], lora_bias [out], dropout mask like x.

    y = x W^T + b + s * ((x ∘ mask) A^T) B^T + s * lora_bias              (SPEC 2.3)

The LoRA path is evaluated as (x A^T) B^T, never through B A. Every input is widened to
float64 exactly, the whole expression is evaluated in float64, and the result is rounded
once to the output dtype (default: x's dtype). ``lora_bias`` is scaled by s, as PEFT does
(its scaling multiplies the output of lora_B, bias included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import check_float_array, float64, resolve_dtype, round_to
from .errors import ShapeError
from .kinds import ExportFacts, Kind, register
from .numerics import check_mask, lora_vjp, rank_one_sum, wide, wide_vector


def check_lora_shapes(W_shape: tuple[int, ...], A: np.ndarray, B: np.ndarray, *, fan_in_fan_out: bool, module: str = "") -> tuple[int, int, int]:
    """Validate W/A/B shapes for a Linear layer; return (out, in, r)."""
    where = f"{module}: " if module else ""
    if len(W_shape) != 2:
        raise ShapeError(f"{where}Linear weight must be 2-D, got shape {tuple(W_shape)}")
    out_features, in_features = (W_shape[1], W_shape[0]) if fan_in_fan_out else W_shape
    if A.ndim != 2 or B.ndim != 2:
        raise ShapeError(f"{where}lora_A and lora_B must be 2-D, got {A.shape} and {B.shape}")
    if A.shape[0] != B.shape[1]:
        raise ShapeError(f"{where}rank mismatch: lora_A is {A.shape} (r={A.shape[0]}) but lora_B is {B.shape} (r={B.shape[1]})")
    if A.shape[1] != in_features:
        raise ShapeError(f"{where}lora_A {A.shape} does not fit the base weight's {in_features} input features")
    if B.shape[0] != out_features:
        raise ShapeError(f"{where}lora_B {B.shape} does not fit the base weight's {out_features} output features")
    return out_features, in_features, A.shape[0]


def _weight_out_in(W: np.ndarray, fan_in_fan_out: bool) -> np.ndarray:
    return W.T if fan_in_fan_out else W


def forward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scale: float,
    *,
    bias: np.ndarray | None = None,
    lora_bias: np.ndarray | None = None,
    dropout_mask: np.ndarray | None = None,
    fan_in_fan_out: bool = False,
    out_dtype: object = None,
) -> np.ndarray:
    """y = x W^T + b + s ((x ∘ mask) A^T) B^T + s lora_bias, rounded once to ``out_dtype``."""
    out_features, in_features, _ = check_lora_shapes(np.shape(W), np.asarray(A), np.asarray(B), fan_in_fan_out=fan_in_fan_out)
    x64 = wide(x, "x")
    if x64.shape[-1:] != (in_features,):
        raise ShapeError(f"x has shape {x64.shape}; its last axis must be in_features={in_features}")
    W64 = _weight_out_in(wide(W, "W"), fan_in_fan_out)
    A64, B64 = wide(A, "lora_A"), wide(B, "lora_B")
    mask = check_mask(dropout_mask, x64.shape)
    lora_in = x64 if mask is None else x64 * mask
    y = x64 @ W64.T + scale * ((lora_in @ A64.T) @ B64.T)
    if bias is not None:
        y = y + wide_vector(bias, out_features, "bias")
    if lora_bias is not None:
        y = y + scale * wide_vector(lora_bias, out_features, "lora_bias")
    return round_to(y, resolve_dtype(out_dtype) if out_dtype is not None else np.asarray(x).dtype)


@dataclass(frozen=True)
class LoraGrads:
    """Gradients of a scalar loss L with respect to each input of a Linear or Conv LoRA layer, given dy = dL/dy.

    Each is rounded once to the dtype of the tensor it differentiates. ``dW``, ``db`` and
    ``dlora_bias`` are None unless requested.
    """

    dx: np.ndarray
    dA: np.ndarray
    dB: np.ndarray
    dW: np.ndarray | None = None
    db: np.ndarray | None = None
    dlora_bias: np.ndarray | None = None


def backward(
    x: np.ndarray,
    dy: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scale: float,
    *,
    dropout_mask: np.ndarray | None = None,
    fan_in_fan_out: bool = False,
    want_base_grads: bool = False,
    bias_dtype: object = None,
    lora_bias_dtype: object = None,
) -> LoraGrads:
    """Gradients of the forward above (SPEC 2.4), with X, dY flattened over leading axes.

        dx = dY W + s ((dY B) A) ∘ mask        dA = s (dY B)^T (X ∘ mask)
        dB = s dY^T ((X ∘ mask) A^T)           dW = dY^T X  (transposed for fan_in_fan_out)
        db = Σ_rows dY                         dlora_bias = s Σ_rows dY
    """
    out_features, in_features, _ = check_lora_shapes(np.shape(W), np.asarray(A), np.asarray(B), fan_in_fan_out=fan_in_fan_out)
    x64, dy64 = wide(x, "x"), wide(dy, "dy")
    if x64.shape[-1:] != (in_features,) or dy64.shape != x64.shape[:-1] + (out_features,):
        raise ShapeError(f"x {x64.shape} and dy {dy64.shape} do not fit a {in_features}->{out_features} layer")
    W64 = _weight_out_in(wide(W, "W"), fan_in_fan_out)
    A64, B64 = wide(A, "lora_A"), wide(B, "lora_B")
    mask = check_mask(dropout_mask, x64.shape)
    X = x64.reshape(-1, in_features)
    dY = dy64.reshape(-1, out_features)
    lora_dx, dA, dB = lora_vjp(X, dY, A64, B64, scale, None if mask is None else mask.reshape(-1, in_features))
    dx = (dY @ W64 + lora_dx).reshape(x64.shape)
    grads = {
        "dx": round_to(dx, np.asarray(x).dtype),
        "dA": round_to(dA, np.asarray(A).dtype),
        "dB": round_to(dB, np.asarray(B).dtype),
    }
    if want_base_grads:
        dW = dY.T @ X
        grads["dW"] = round_to(dW.T if fan_in_fan_out else dW, np.asarray(W).dtype)
        column_sum = dY.sum(axis=0)
        grads["db"] = round_to(column_sum, resolve_dtype(bias_dtype) if bias_dtype is not None else np.asarray(W).dtype)
        grads["dlora_bias"] = round_to(
            scale * column_sum, resolve_dtype(lora_bias_dtype) if lora_bias_dtype is not None else np.asarray(B).dtype
        )
    return LoraGrads(**grads)


class LinearDelta:
    """ΔW = s · B A for a Linear layer, evaluated in float64 in row blocks (SPEC 3.1).

    Fixed evaluation order, so Δ is bit-reproducible on every machine and thread count:
    Σ_k B[:, k] ⊗ A[k, :] accumulated in increasing k with elementwise float64 operations
    (no BLAS), then multiplied by s. With ``fan_in_fan_out`` the delta is transposed to the
    stored [in, out] layout.
    """

    def __init__(self, A: np.ndarray, B: np.ndarray, scale: float, *, fan_in_fan_out: bool = False, module: str = "") -> None:
        check_float_array(A, f"{module} lora_A".strip())
        check_float_array(B, f"{module} lora_B".strip())
        out_features, in_features, _ = check_lora_shapes(
            (np.shape(B)[0], np.shape(A)[1]) if not fan_in_fan_out else (np.shape(A)[1], np.shape(B)[0]),
            np.asarray(A), np.asarray(B), fan_in_fan_out=fan_in_fan_out, module=module,
        )
        self.A = np.asarray(A)
        self.B = np.asarray(B)
        self.scale = float(scale)
        self.fan_in_fan_out = fan_in_fan_out
        self.module = module
        self.shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)

    def factors(self) -> tuple[np.ndarray, ...]:
        """The tensors the delta depends on (their bytes enter the residual's checksum)."""
        return (self.A, self.B, np.float64(self.scale), np.bool_(self.fan_in_fan_out))

    def rank_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(L, R) in float64 with Δ_stored = s · L R (:mod:`lora_ref.merge`, correctly rounded merges)."""
        return (self.A.T, self.B.T) if self.fan_in_fan_out else (self.B, self.A)

    def block(self, rows: slice) -> np.ndarray:
        """Δ[rows, :] in float64, in the stored layout of W."""
        if self.fan_in_fan_out:  # Δ_stored = (s B A)^T: rows of Δ_stored are input features
            left, right = self.A.T[rows].astype(float64), self.B.T.astype(float64)
        else:
            left, right = self.B[rows].astype(float64), self.A.astype(float64)
        return rank_one_sum(left, right) * self.scale

    def full(self) -> np.ndarray:
        """The whole Δ in float64 (small matrices only)."""
        return self.block(slice(None))


class LinearBiasDelta:
    """Δb = s · lora_bias: what merging a LoRA layer with ``lora_bias`` adds to the base bias.

    PEFT's merge adds ``lora_B.bias * scaling`` to the base layer's bias (and cannot merge when
    the base layer has none); the merged layer then equals the adapted one (SPEC 2.3). One
    float64 multiply per element, so Δb is bit-reproducible.
    """

    def __init__(self, lora_bias: np.ndarray, scale: float, *, module: str = "") -> None:
        check_float_array(lora_bias, f"{module} lora_B.bias".strip())
        self.lora_bias = np.asarray(lora_bias)
        if self.lora_bias.ndim != 1:
            raise ShapeError(f"{module}: lora_B.bias must be 1-D, got shape {self.lora_bias.shape}")
        self.scale = float(scale)
        self.module = module
        self.shape = self.lora_bias.shape

    def factors(self) -> tuple[np.ndarray, ...]:
        return (self.lora_bias, np.float64(self.scale))

    def rank_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(L, R) with Δb = s · L R: L = lora_bias as a column, R = [[1]]."""
        return self.lora_bias.reshape(-1, 1), np.ones((1, 1))

    def block(self, rows: slice) -> np.ndarray:
        """Δb[rows] in float64."""
        return self.lora_bias[rows].astype(float64) * self.scale


class LinearOps:
    """Linear's float64 maps (:class:`lora_ref.kinds.LayerOps`): base(x) = x Wᵀ, lora(x) = s (x Aᵀ) Bᵀ; W taken as [out, in]."""

    channel_axis = -1

    def __init__(self, W: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, *, fan_in_fan_out: bool = False, module: str = "") -> None:
        check_lora_shapes(np.shape(W), np.asarray(A), np.asarray(B), fan_in_fan_out=fan_in_fan_out, module=module)
        W64 = wide(W, f"{module} W".strip())
        self.W = _weight_out_in(W64, fan_in_fan_out)
        self.A, self.B = wide(A, f"{module} lora_A".strip()), wide(B, f"{module} lora_B".strip())
        self.scale = float(scale)

    def check_input(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1:] != (self.W.shape[1],):
            raise ShapeError(f"x has shape {x.shape}; its last axis must be in_features={self.W.shape[1]}")
        return x

    def base(self, x: np.ndarray) -> np.ndarray:
        return x @ self.W.T

    def base_vjp(self, x: np.ndarray, dY: np.ndarray) -> np.ndarray:
        return dY @ self.W

    def lora(self, x: np.ndarray) -> np.ndarray:
        return self.scale * ((x @ self.A.T) @ self.B.T)

    def lora_vjp(self, x: np.ndarray, dY: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dX, dA, dB = lora_vjp(x.reshape(-1, x.shape[-1]), dY.reshape(-1, dY.shape[-1]), self.A, self.B, self.scale)
        return dX.reshape(x.shape), dA, dB


class LinearKind(Kind):
    """Linear (torch ``nn.Linear``, GPT-2's ``Conv1D`` with fan_in_fan_out): W [out, in] or [in, out]."""

    name = "linear"
    label = "Linear"
    decomposition_init = True
    export = ExportFacts(ops=("MatMul", "Gemm"), weight_input=1, weight_ranks=(2,), transposable=True,
                         form="MatMul, Transpose+MatMul, or Gemm", lora_a_op="MatMul", factor_layout="matrix")

    def check_shapes(self, W_shape, A, B, *, fan_in_fan_out=False, module=""):
        return check_lora_shapes(W_shape, np.asarray(A), np.asarray(B), fan_in_fan_out=fan_in_fan_out, module=module)

    def lora_shapes(self, W_shape, r, *, fan_in_fan_out=False):
        if len(W_shape) != 2:
            raise ShapeError(f"Linear weight must be 2-D, got {W_shape}")
        out_f, in_f = (W_shape[1], W_shape[0]) if fan_in_fan_out else W_shape
        return (r, in_f), (out_f, r)

    def delta(self, A, B, scale, *, fan_in_fan_out=False, module=""):
        return LinearDelta(A, B, scale, fan_in_fan_out=fan_in_fan_out, module=module)

    def ops(self, W, A, B, scale, *, fan_in_fan_out=False, geometry=None, padding_idx=None, module=""):
        self.refuse_options(module, geometry=geometry, padding_idx=padding_idx)
        return LinearOps(W, A, B, scale, fan_in_fan_out=fan_in_fan_out, module=module)

    def forward(self, x, W, A, B, scale, *, bias=None, lora_bias=None, dropout_mask=None, fan_in_fan_out=False,
                geometry=None, out_dtype=None, module=""):
        self.refuse_options(module, geometry=geometry)
        return forward(x, W, A, B, scale, bias=bias, lora_bias=lora_bias, dropout_mask=dropout_mask,
                       fan_in_fan_out=fan_in_fan_out, out_dtype=out_dtype)

    def dora_axis(self, fan_in_fan_out=False):
        return 1 if fan_in_fan_out else 0  # W stored [in, out] with fan_in_fan_out


LINEAR = register(LinearKind())
