"""LoRA on an Embedding layer: forward, backward and delta weight, in float64.

Shapes (PEFT layout): ids [...] integers in [0, V), W [V, D], A = lora_embedding_A [r, V],
B = lora_embedding_B [D, r].

    y[..., :] = W[id] + s · Aᵀ[id] Bᵀ         (a lookup into Aᵀ, then a matmul with Bᵀ)   (SPEC 4.1)
    ΔW = s (B A)ᵀ = s Aᵀ Bᵀ                   [V, D], the shape of W

No dropout (PEFT has none on embeddings) and no lora_bias. ``padding_idx`` does not change the
forward (the lookup returns whatever row it holds, as torch does) but receives no gradient:
dA[:, padding_idx] = 0 and dW[padding_idx] = 0. Repeated ids accumulate their gradients
(scatter-add). Ids outside [0, V) raise :class:`EmbeddingIndexError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import check_float_array, float64, resolve_dtype, round_to
from .errors import DTypeError, ShapeError
from .kinds import ExportFacts, Kind, register
from .numerics import rank_one_sum, wide


class EmbeddingIndexError(ShapeError):
    """A token id is negative or not below num_embeddings."""


def check_embedding_shapes(W_shape: tuple[int, ...], A: np.ndarray, B: np.ndarray, module: str = "") -> tuple[int, int, int]:
    """Validate W [V, D], A [r, V], B [D, r]; return (V, D, r)."""
    where = f"{module}: " if module else ""
    if len(W_shape) != 2 or A.ndim != 2 or B.ndim != 2:
        raise ShapeError(f"{where}embedding weight {tuple(W_shape)}, lora_embedding_A {A.shape} and lora_embedding_B {B.shape} must be 2-D")
    V, D = W_shape
    if A.shape[0] != B.shape[1]:
        raise ShapeError(f"{where}rank mismatch: lora_embedding_A {A.shape} has r={A.shape[0]} but lora_embedding_B {B.shape} has r={B.shape[1]}")
    if A.shape[1] != V:
        raise ShapeError(f"{where}lora_embedding_A {A.shape} must be [r, {V}] (num_embeddings={V})")
    if B.shape[0] != D:
        raise ShapeError(f"{where}lora_embedding_B {B.shape} must be [{D}, r] (embedding_dim={D})")
    return V, D, A.shape[0]


def check_ids(ids: np.ndarray, num_embeddings: int, module: str = "") -> np.ndarray:
    """Return ids as int64, or raise DTypeError / EmbeddingIndexError naming the module."""
    where = f"{module}: " if module else ""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise DTypeError(f"{where}embedding ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_embeddings):
        bad = ids[(ids < 0) | (ids >= num_embeddings)].reshape(-1)[0]
        raise EmbeddingIndexError(f"{where}embedding id {int(bad)} is outside [0, {num_embeddings})")
    return ids.astype(np.int64)


class EmbeddingOps:
    """The float64 maps of one embedding LoRA layer and their vector-Jacobian products.

    ``base(ids) = W[ids]``; ``lora(ids) = s · Aᵀ[ids] Bᵀ``. The output's channel axis (DoRA's
    magnitude) is the last one, D. Ids have no gradient (``base_vjp`` gives None).
    """

    channel_axis = -1

    def __init__(self, W: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, *, padding_idx: int | None = None, module: str = "") -> None:
        self.V, self.D, self.rank = check_embedding_shapes(np.shape(W), np.asarray(A), np.asarray(B), module)
        self.W, self.A, self.B = wide(W, "W"), wide(A, "lora_embedding_A"), wide(B, "lora_embedding_B")
        self.scale = float(scale)
        self.module = module
        if padding_idx is not None and not -self.V <= padding_idx < self.V:
            raise EmbeddingIndexError(f"{module or 'embedding'}: padding_idx {padding_idx} is outside [-{self.V}, {self.V})")
        self.padding_idx = None if padding_idx is None else padding_idx % self.V

    def check_input(self, ids: np.ndarray) -> np.ndarray:
        return check_ids(ids, self.V, self.module)

    def base(self, ids: np.ndarray) -> np.ndarray:
        return self.W[ids]

    def base_vjp(self, ids: np.ndarray, dY: np.ndarray) -> None:
        return None

    def lora(self, ids: np.ndarray) -> np.ndarray:
        return self.scale * (self.A.T[ids] @ self.B.T)

    def scatter_rows(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[V, k]: Σ over positions with id v of rows[pos], padding_idx left at 0 (fixed order)."""
        flat_ids = ids.reshape(-1)
        flat = rows.reshape(flat_ids.size, -1)
        out = np.stack([np.bincount(flat_ids, weights=flat[:, j], minlength=self.V) for j in range(flat.shape[1])], axis=1)
        if self.padding_idx is not None:
            out[self.padding_idx] = 0.0
        return out

    def lora_vjp(self, ids: np.ndarray, dY: np.ndarray) -> tuple[None, np.ndarray, np.ndarray]:
        """(None, dA [r, V], dB [D, r]) of Σ dY · lora(ids)."""
        hidden = self.A.T[ids].reshape(-1, self.rank)  # [positions, r]
        dY2 = dY.reshape(-1, self.D)
        dB = self.scale * (dY2.T @ hidden)
        d_hidden = self.scale * (dY2 @ self.B)  # [positions, r]
        dA = self.scatter_rows(ids, d_hidden).T
        return None, dA, dB


def forward(
    ids: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scale: float,
    *,
    out_dtype: object = None,
    module: str = "",
) -> np.ndarray:
    """y = W[ids] + s Aᵀ[ids] Bᵀ, shape ids.shape + (D,), rounded once (default: W's dtype)."""
    ops = EmbeddingOps(W, A, B, scale, module=module)
    ids = ops.check_input(ids)
    y = ops.base(ids) + ops.lora(ids)
    return round_to(y, resolve_dtype(out_dtype) if out_dtype is not None else np.asarray(W).dtype)


@dataclass(frozen=True)
class EmbeddingGrads:
    """Gradients given dy = dL/dy, each rounded once to its tensor's dtype (dW on request)."""

    dA: np.ndarray
    dB: np.ndarray
    dW: np.ndarray | None = None


def backward(
    ids: np.ndarray,
    dy: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scale: float,
    *,
    padding_idx: int | None = None,
    want_base_grads: bool = False,
    module: str = "",
) -> EmbeddingGrads:
    """Gradients of :func:`forward` (SPEC 4.1): with h = Aᵀ[ids] and G[v] = Σ_{pos: id=v} dY[pos]

        dB = s dYᵀ h        dA = s (G B)ᵀ = scatter-add of s dY B into the columns of A
        dW = G              (padding_idx's column of dA and row of dW are 0)
    """
    ops = EmbeddingOps(W, A, B, scale, padding_idx=padding_idx, module=module)
    ids = ops.check_input(ids)
    dy64 = wide(dy, "dy")
    if dy64.shape != ids.shape + (ops.D,):
        raise ShapeError(f"{module or 'embedding'}: dy has shape {dy64.shape}, expected {ids.shape + (ops.D,)}")
    _, dA, dB = ops.lora_vjp(ids, dy64)
    dW = round_to(ops.scatter_rows(ids, dy64), np.asarray(W).dtype) if want_base_grads else None
    return EmbeddingGrads(dA=round_to(dA, np.asarray(A).dtype), dB=round_to(dB, np.asarray(B).dtype), dW=dW)


class EmbeddingDelta:
    """ΔW = s Aᵀ Bᵀ [V, D] in row blocks over V (SPEC 4.1), rank-one terms in increasing j."""

    def __init__(self, A: np.ndarray, B: np.ndarray, scale: float, *, module: str = "") -> None:
        check_float_array(A, f"{module} lora_embedding_A".strip())
        check_float_array(B, f"{module} lora_embedding_B".strip())
        A, B = np.asarray(A), np.asarray(B)
        if A.ndim != 2 or B.ndim != 2:
            raise ShapeError(f"{module}: lora_embedding_A {A.shape} and lora_embedding_B {B.shape} must be 2-D")
        self.shape = (A.shape[1], B.shape[0])
        check_embedding_shapes(self.shape, A, B, module)
        self.A, self.B, self.scale, self.module = A, B, float(scale), module

    def factors(self) -> tuple[np.ndarray, ...]:
        return (self.A, self.B, np.float64(self.scale))

    def rank_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(L, R) with Δ = s · L R: Aᵀ [V, r] and Bᵀ [r, D]."""
        return self.A.T, self.B.T

    def block(self, rows: slice) -> np.ndarray:
        """Δ[rows, :] in float64."""
        return rank_one_sum(self.A.T[rows].astype(float64), self.B.T.astype(float64)) * self.scale

    def full(self) -> np.ndarray:
        return self.block(slice(None))


class EmbeddingKind(Kind):
    """Embedding (torch ``nn.Embedding``): W [V, D], PEFT's lora_embedding_A [r, V], lora_embedding_B [D, r]."""

    name = "embedding"
    label = "Embedding"
    peft_parts = ("lora_embedding_A", "lora_embedding_B")
    dropout = False  # PEFT applies none to embeddings
    base_bias = False
    lora_bias = False
    reversed_init = True
    export = ExportFacts(ops=("Gather",), weight_input=0, weight_ranks=(2,), transposable=False,
                         form="Gather along axis 0", lora_a_op="Gather", factor_layout="matrix")

    def check_shapes(self, W_shape, A, B, *, fan_in_fan_out=False, module=""):
        V, D, r = check_embedding_shapes(W_shape, np.asarray(A), np.asarray(B), module)
        return D, V, r

    def lora_shapes(self, W_shape, r, *, fan_in_fan_out=False):
        if len(W_shape) != 2:
            raise ShapeError(f"embedding weight must be 2-D, got {W_shape}")
        return (r, W_shape[0]), (W_shape[1], r)

    def delta(self, A, B, scale, *, fan_in_fan_out=False, module=""):
        return EmbeddingDelta(A, B, scale, module=module)

    def ops(self, W, A, B, scale, *, fan_in_fan_out=False, geometry=None, padding_idx=None, module=""):
        self.refuse_options(module, geometry=geometry)
        return EmbeddingOps(W, A, B, scale, padding_idx=padding_idx, module=module)

    def forward(self, x, W, A, B, scale, *, bias=None, lora_bias=None, dropout_mask=None, fan_in_fan_out=False,
                geometry=None, out_dtype=None, module=""):
        self.refuse_options(module, bias=bias, lora_bias=lora_bias, dropout_mask=dropout_mask, geometry=geometry)
        return forward(x, W, A, B, scale, out_dtype=out_dtype, module=module)

    def dora_axis(self, fan_in_fan_out=False):
        return 1  # W [num_embeddings, embedding_dim]: m per embedding dimension

    def inner_length(self, W_shape):
        return 0  # a lookup sums nothing


EMBEDDING = register(EmbeddingKind())
