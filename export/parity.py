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
rest of the network, which the graph rewrite does not touch.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from lora_ref.dtypes import UNIT_ROUNDOFF


def gamma(n: int, u: float) -> float:
    """γ_n = n u / (1 - n u); requires n u < 1."""
    if n * u >= 1:
        raise ValueError(f"gamma_{n} undefined for u={u}")
    return n * u / (1 - n * u)


def site_bound(x: np.ndarray, W: np.ndarray, *, A: np.ndarray | None = None, B: np.ndarray | None = None,
               scale: float = 0.0, bias: np.ndarray | None = None, dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """The elementwise bound above; W [out, in], A [r, in], B [out, r] in PEFT layout, x [..., in]."""
    x_abs = np.abs(np.asarray(x, np.float64))
    magnitude = x_abs @ np.abs(np.asarray(W, np.float64)).T
    r = 0
    if A is not None and B is not None:
        r = A.shape[0]
        magnitude = magnitude + abs(scale) * ((x_abs @ np.abs(np.asarray(A, np.float64)).T) @ np.abs(np.asarray(B, np.float64)).T)
    if bias is not None:
        magnitude = magnitude + np.abs(np.asarray(bias, np.float64))
    K = np.shape(W)[1] + r + 4
    return gamma(K, UNIT_ROUNDOFF[np.dtype(dtype)]) * magnitude


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
