"""Forward-error bounds for comparing an ONNX Runtime LoRA site with the float64 reference.

For one Linear site evaluated in a dtype with unit roundoff u (float32: 2^-24), the graph
computes ŷ = fl(x W_g + b) (+ fl(fl(x A_g) B_g)) from the input x̂ it actually saw. Every term
x_i W_ij, b_j and x_i A_ik B'_kj reaches ŷ through at most K = in + r + 4 roundings (the stored
weights, merged weight or folded scale s·B: 1; products: 1 each; the sums over in and r: in - 1
and r - 1; the bias and LoRA adds: 2), so for any summation order (Higham, Accuracy and
Stability of Numerical Algorithms, 2nd ed., §3.1)

    |ŷ - y| ≤ γ_K · ( |x̂| |W|^T + |b| + s |x̂| |A|^T |B|^T ),     γ_K = K u / (1 - K u),

with y the exact (float64) value of the reference forward at x̂. Checking each site from its
own input keeps the bound free of the error propagated through LayerNorm, softmax and the
rest of the network, which the graph rewrite does not touch. :func:`layer_bound` extends it to
Embedding and Conv sites, lora_bias and DoRA's gain (SPEC E.5).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from lora_ref.dtypes import UNIT_ROUNDOFF
from lora_ref.kinds import KindName, kind_of
from lora_ref.numerics import gamma


def site_bound(x: np.ndarray, W: np.ndarray, *, A: np.ndarray | None = None, B: np.ndarray | None = None,
               scale: float = 0.0, bias: np.ndarray | None = None, dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """The elementwise bound above; W [out, in], A [r, in], B [out, r] in PEFT layout, x [..., in]."""
    return layer_bound(x, W, A=A, B=B, scale=scale, bias=bias, dtype=dtype)


def layer_bound(x: np.ndarray, W: np.ndarray, *, kind: KindName = "linear", A: np.ndarray | None = None, B: np.ndarray | None = None,
                scale: float = 0.0, bias: np.ndarray | None = None, lora_bias: np.ndarray | None = None,
                gain: np.ndarray | None = None, gain_error: np.ndarray | float | None = None, geometry=None,
                dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """γ_K · M for one layer of any kind, the bound above generalised:

        M = |g| ∘ (base(|x|; |W|) + |s| lora(|x|; |A|, |B|)) + |b| + |s| |lora_bias|

    base/lora are the kind's maps (Linear x W^T and (x A^T) B^T; Embedding W[ids] and
    A^T[ids] B^T; Conv conv(x, W) and conv(conv(x, A), B)) evaluated on absolute values, so M
    bounds the absolute value of every term any evaluation order adds. g is DoRA's per-channel
    gain m / ‖W + sBA‖ (1 without DoRA); it multiplies the merged weight, whose one rounding
    is among the K. K = n + r + 4 with n the inner length of the base map (Linear: in; Conv:
    in·Πk; Embedding: 0, a lookup sums nothing).

    ``gain_error`` ρ (per channel, or one number) is the relative error of a gain the graph
    applies as a separate factor (dynamic and batched DoRA graphs, :func:`dora_gain_error`):
    ĝ = g(1 + θ), |θ| ≤ ρ, multiplying a sum whose own error the γ_K term bounds, adds ρ·M
    (to first order; the γ_K·ρ cross term is below the bound's slack of 4 spare roundings).
    """
    layer = kind_of(kind)
    W_abs = np.abs(np.asarray(W, np.float64))
    r = 0 if A is None else int(np.shape(A)[0])
    A_abs, B_abs = (np.abs(np.asarray(A, np.float64)), np.abs(np.asarray(B, np.float64))) if r else layer.zero_factors(W_abs.shape)
    ops = layer.ops(W_abs, A_abs, B_abs, 1.0, geometry=geometry)
    x = np.asarray(x)
    x_in = x if np.issubdtype(x.dtype, np.integer) else np.abs(x.astype(np.float64))  # embedding ids stay ids
    magnitude, lora = ops.base(x_in), ops.lora(x_in)
    n, channel = layer.inner_length(W_abs.shape), ops.channel_axis
    magnitude = magnitude + abs(scale) * lora

    def along(v: np.ndarray) -> np.ndarray:
        v = np.abs(np.asarray(v, np.float64)).reshape(-1)
        return v.reshape((-1,) + (1,) * (magnitude.ndim - 2)) if channel == 1 else v

    if gain is not None:
        magnitude = along(gain) * magnitude
    if bias is not None:
        magnitude = magnitude + along(bias)
    if lora_bias is not None:
        magnitude = magnitude + abs(scale) * along(lora_bias)
    bound = gamma(n + r + 4, UNIT_ROUNDOFF[np.dtype(dtype)]) * magnitude
    if gain_error is not None:
        bound = bound + along(np.broadcast_to(gain_error, np.shape(gain))) * magnitude
    return bound


def dora_gain_error(W: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, *, kind: KindName = "linear",
                    in_graph: bool, dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray | float:
    """The relative error ρ of the DoRA gain a dynamic (``in_graph``) or batched graph applies, times its multiply.

    Batched graphs store g = round_t(m/n) from float64 (one rounding) and multiply once: ρ = γ_2.
    A dynamic graph computes, per output channel c, in the graph's dtype t (unit roundoff u):
    V̂ = fl(W + fl(A_g B_g)), |V̂ - V| ≤ γ_{r+2} U with U = |W| + |s||B||A| (the stored W's and
    folded s·B's roundings, the r-term sum, the add); n̂² = fl(Σ V̂²) (n non-negative terms:
    relative γ_n), n̂ = fl(sqrt) (halves that, plus u); then m's rounding to t, m/n̂ and the
    multiply (three roundings). A float16 graph accumulates the squares, the root and the
    division in float32 (u_acc = 2^-24; else u_acc = u) and casts g back to t (one rounding,
    in place of the division's). So

        ρ_c = γ_{r+2}(u) ‖U_c‖ / n_c + γ_{n+2}(u_acc) + γ_3(u),      n = the norm's length (in features)

    with n_c the exact norm (the ‖U_c‖/n_c factor is what cancellation in W + ΔW costs; ≈ 1 when
    ΔW is small next to W). Everything in float64 through the core (:func:`lora_ref.dora.weight_norm`).
    """
    from lora_ref.dora import weight_norm

    u = UNIT_ROUNDOFF[np.dtype(dtype)]
    if not in_graph:
        return gamma(2, u)
    layer = kind_of(kind)
    axis = layer.dora_axis()
    W64 = np.asarray(W, np.float64)
    n_c = weight_norm(W64, layer.delta(A, B, scale), axis)
    A_abs, B_abs = np.abs(np.asarray(A, np.float64)), np.abs(np.asarray(B, np.float64))
    U_c = weight_norm(np.abs(W64), layer.delta(A_abs, B_abs, abs(scale)), axis)
    r, length = int(np.shape(A)[0]), int(W64.size // W64.shape[axis])
    u_acc = UNIT_ROUNDOFF[np.dtype(np.float32)] if np.dtype(dtype) == np.float16 else u
    return gamma(r + 2, u) * U_c / n_c + gamma(length + 2, u_acc) + gamma(3, u)


def expose(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the intermediate tensors ``names`` added as graph outputs (for checks)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in out.graph.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*out.graph.value_info, *out.graph.input, *out.graph.output)}
    float_type = next((t.data_type for t in out.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)),
                      onnx.TensorProto.FLOAT)
    for name in names:
        if name not in existing:
            out.graph.output.append(helper.make_tensor_value_info(name, types.get(name, float_type), None))
            existing.add(name)
    return out
