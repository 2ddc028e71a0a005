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


def _wide(array: np.ndarray | None, what: str) -> np.ndarray | None:
    if array is None:
        return None
    check_float_array(array, what)
    return np.asarray(array).astype(float64)


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
    x64 = _wide(x, "x")
    if x64.shape[-1:] != (in_features,):
        raise ShapeError(f"x has shape {x64.shape}; its last axis must be in_features={in_features}")
    W64 = _weight_out_in(_wide(W, "W"), fan_in_fan_out)
    A64, B64 = _wide(A, "lora_A"), _wide(B, "lora_B")
    lora_in = x64 if dropout_mask is None else x64 * _mask(dropout_mask, x64.shape)
    y = x64 @ W64.T + scale * ((lora_in @ A64.T) @ B64.T)
    if bias is not None:
        y = y + _vector(bias, out_features, "bias")
    if lora_bias is not None:
        y = y + scale * _vector(lora_bias, out_features, "lora_bias")
    return round_to(y, resolve_dtype(out_dtype) if out_dtype is not None else np.asarray(x).dtype)


def _mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask64 = np.asarray(mask, dtype=float64)
    if mask64.shape != shape:
        raise ShapeError(f"dropout mask has shape {mask64.shape}, expected {shape}")
    return mask64


def _vector(v: np.ndarray, length: int, what: str) -> np.ndarray:
    v64 = _wide(v, what)
    if v64.shape != (length,):
        raise ShapeError(f"{what} has shape {v64.shape}, expected ({length},)")
    return v64


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
    x64, dy64 = _wide(x, "x"), _wide(dy, "dy")
    if x64.shape[-1:] != (in_features,) or dy64.shape != x64.shape[:-1] + (out_features,):
        raise ShapeError(f"x {x64.shape} and dy {dy64.shape} do not fit a {in_features}->{out_features} layer")
    W64 = _weight_out_in(_wide(W, "W"), fan_in_fan_out)
    A64, B64 = _wide(A, "lora_A"), _wide(B, "lora_B")
    mask = None if dropout_mask is None else _mask(dropout_mask, x64.shape)
    X = x64.reshape(-1, in_features)
    dY = dy64.reshape(-1, out_features)
    Xm = X if mask is None else X * mask.reshape(-1, in_features)
    dYB = dY @ B64  # [rows, r]
    lora_dx = (dYB @ A64) * scale
    if mask is not None:
        lora_dx = lora_dx * mask.reshape(-1, in_features)
    dx = (dY @ W64 + lora_dx).reshape(x64.shape)
    dA = scale * (dYB.T @ Xm)
    dB = scale * (dY.T @ (Xm @ A64.T))
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

    kind = "linear"

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

    kind = "linear_bias"

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

    def block(self, rows: slice) -> np.ndarray:
        """Δb[rows] in float64."""
        return self.lora_bias[rows].astype(float64) * self.scale


#: Elements of one accumulator tile in :func:`rank_one_sum` (256 KiB of float64: stays in cache
#: while the r rank-one terms are added to it).
TILE_ELEMENTS = 32 * 1024


def rank_one_sum(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Σ_k left[:, k] ⊗ right[k, :] in float64, accumulated in increasing k (no BLAS).

    Every element is 0 + p_0 + p_1 + ... + p_{r-1} with p_k = left[i, k] · right[k, j], one
    float64 multiply and one float64 add per term, in this order. The rows are processed in
    tiles small enough to stay in cache while all r terms are added; the tiling changes no
    element's sequence of operations, so the result is bitwise the same for any tile size.
    """
    left = np.asarray(left, dtype=float64)
    right = np.asarray(right, dtype=float64)
    n_rows, n_cols = left.shape[0], right.shape[1]
    acc = np.zeros((n_rows, n_cols), dtype=float64)
    step = max(1, TILE_ELEMENTS // max(n_cols, 1))
    term = np.empty((min(step, n_rows), n_cols), dtype=float64)
    for start in range(0, n_rows, step):
        tile = acc[start : start + step]
        scratch = term[: tile.shape[0]]
        for k in range(left.shape[1]):
            np.multiply(left[start : start + step, k, None], right[k], out=scratch)
            tile += scratch
    return acc
