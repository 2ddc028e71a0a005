"""The reference's own small models, built directly as ONNX graphs, with float64 forwards.

Two models, each returned as a :class:`SmallModel` (the ONNX graph, its weights in torch's
``state_dict`` layout, the Linear module paths, and a float64 NumPy forward):

* :func:`mlp` — x [batch, in] -> Gemm(fc1, transB=1) -> Relu -> Gemm(fc2, transB=1) -> y [batch, out];
  weights are initializers named ``fc1.weight`` ([out, in]) etc.
* :func:`transformer_block` — pre-LayerNorm block on x [batch, seq, d]: multi-head self-attention
  (q/k/v/o projections as ``MatMul(h, Transpose(<module>.weight))``) and a ReLU MLP whose
  projections are pre-transposed ``[in, out]`` initializers with anonymous names
  (``w_up``/``w_down``), found only through ``pkg.torch.onnx.name_scopes`` metadata, as in
  graphs from torch's dynamo exporter. So the two models exercise all three weight layouts.

The float64 forward uses the core's :func:`lora_ref.linear.forward` for every adapted Linear
layer (LoRA unmerged), so it is the oracle for all three exported graph kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_ref.adapter import Adapter
from lora_ref.linear import forward as linear_forward

from .locate import NAME_SCOPES_KEY

OPSET = 20


@dataclass
class SmallModel:
    """An ONNX graph with its weights (torch layout, float32) and a float64 reference forward."""

    name: str
    onnx: onnx.ModelProto
    weights: dict[str, np.ndarray]
    linear_modules: list[str]
    reference: Callable[[np.ndarray, Adapter | None], np.ndarray]


def _linear64(x: np.ndarray, weights: Mapping[str, np.ndarray], module: str, adapter: Adapter | None) -> np.ndarray:
    """x W^T + b (+ s (x A^T) B^T when ``adapter`` targets ``module``), all in float64."""
    W = weights[f"{module}.weight"].astype(np.float64)
    b = weights.get(f"{module}.bias")
    if adapter is not None and module in adapter.modules:
        lora = adapter.modules[module]
        return linear_forward(x, W, lora.A, lora.B, adapter.scale_for(module), bias=b, out_dtype=np.float64)
    y = np.asarray(x, np.float64) @ W.T
    return y if b is None else y + b.astype(np.float64)


def _model(nodes, inputs, outputs, initializers, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lora-ref")
    model.ir_version = 9
    return model


def _normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def mlp(in_features: int = 16, hidden: int = 32, out_features: int = 8, *, seed: int = 0) -> SmallModel:
    """Two Gemm layers with a ReLU between; module paths ``fc1`` and ``fc2``."""
    rng = np.random.default_rng(seed)
    weights = {
        "fc1.weight": _normal(rng, (hidden, in_features), in_features),
        "fc1.bias": _normal(rng, (hidden,), in_features),
        "fc2.weight": _normal(rng, (out_features, hidden), hidden),
        "fc2.bias": _normal(rng, (out_features,), hidden),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["act"], name="relu"),
        helper.make_node("Gemm", ["act", "fc2.weight", "fc2.bias"], ["y"], name="fc2", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])]
    model = _model(nodes, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()], "lora_ref_mlp")

    def reference(x: np.ndarray, adapter: Adapter | None = None) -> np.ndarray:
        h = np.maximum(_linear64(x, weights, "fc1", adapter), 0.0)
        return _linear64(h, weights, "fc2", adapter)

    return SmallModel("mlp", model, weights, ["fc1", "fc2"], reference)


def _layer_norm64(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma.astype(np.float64) + beta.astype(np.float64)


def transformer_block(d_model: int = 32, heads: int = 4, d_ff: int = 64, *, seed: int = 0, eps: float = 1e-5) -> SmallModel:
    """A pre-LN transformer block; module paths ``attn.{q,k,v,o}_proj`` and ``mlp.{up,down}_proj``."""
    if d_model % heads:
        raise ValueError("d_model must be a multiple of heads")
    rng = np.random.default_rng(seed)
    dh = d_model // heads
    attn = [f"attn.{p}_proj" for p in "qkvo"]
    mlp_modules = ["mlp.up_proj", "mlp.down_proj"]
    weights: dict[str, np.ndarray] = {}
    for module in attn:
        weights[f"{module}.weight"] = _normal(rng, (d_model, d_model), d_model)
    weights["mlp.up_proj.weight"] = _normal(rng, (d_ff, d_model), d_model)
    weights["mlp.up_proj.bias"] = _normal(rng, (d_ff,), d_model)
    weights["mlp.down_proj.weight"] = _normal(rng, (d_model, d_ff), d_ff)
    weights["mlp.down_proj.bias"] = _normal(rng, (d_model,), d_ff)
    for ln in ("ln1", "ln2"):
        weights[f"{ln}.weight"] = (1 + 0.1 * rng.standard_normal(d_model)).astype(np.float32)
        weights[f"{ln}.bias"] = (0.1 * rng.standard_normal(d_model)).astype(np.float32)

    inits = [numpy_helper.from_array(weights[k], k) for k in weights if not k.startswith("mlp.") or k.endswith("bias")]
    inits += [
        numpy_helper.from_array(np.ascontiguousarray(weights["mlp.up_proj.weight"].T), "w_up"),
        numpy_helper.from_array(np.ascontiguousarray(weights["mlp.down_proj.weight"].T), "w_down"),
        numpy_helper.from_array(np.array([0, 0, heads, dh], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, 0, d_model], np.int64), "model_shape"),
        numpy_helper.from_array(np.array(1.0 / np.sqrt(dh), np.float32), "inv_sqrt_dh"),
    ]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln1.weight", "ln1.bias"], ["h1"], axis=-1, epsilon=eps)]
    for module, short in zip(attn[:3], "qkv"):
        nodes += [
            helper.make_node("Transpose", [f"{module}.weight"], [f"{short}_wT"], perm=[1, 0]),
            helper.make_node("MatMul", ["h1", f"{short}_wT"], [f"{short}"], name=f"{module}.matmul"),
            helper.make_node("Reshape", [short, "heads_shape"], [f"{short}_4d"]),
            helper.make_node("Transpose", [f"{short}_4d"], [f"{short}_heads"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k_heads"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_heads", "k_t"], ["scores_raw"]),
        helper.make_node("Mul", ["scores_raw", "inv_sqrt_dh"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_heads"], ["ctx_heads"]),
        helper.make_node("Transpose", ["ctx_heads"], ["ctx_4d"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_4d", "model_shape"], ["ctx"]),
        helper.make_node("Transpose", ["attn.o_proj.weight"], ["o_wT"], perm=[1, 0]),
        helper.make_node("MatMul", ["ctx", "o_wT"], ["attn_out"], name="attn.o_proj.matmul"),
        helper.make_node("Add", ["x", "attn_out"], ["x1"]),
        helper.make_node("LayerNormalization", ["x1", "ln2.weight", "ln2.bias"], ["h2"], axis=-1, epsilon=eps),
    ]
    for module, w, src, dst in (("mlp.up_proj", "w_up", "h2", "up"), ("mlp.down_proj", "w_down", "act", "down")):
        matmul = helper.make_node("MatMul", [src, w], [f"{dst}_mm"], name=f"{module}.matmul")
        entry = matmul.metadata_props.add()
        entry.key, entry.value = NAME_SCOPES_KEY, repr(["", "mlp", module, "linear"])
        nodes += [matmul, helper.make_node("Add", [f"{dst}_mm", f"{module}.bias"], [dst])]
        if dst == "up":
            nodes.append(helper.make_node("Relu", ["up"], ["act"]))
    nodes.append(helper.make_node("Add", ["x1", "down"], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_model])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d_model])]
    model = _model(nodes, inputs, outputs, inits, "lora_ref_transformer_block")

    def reference(x: np.ndarray, adapter: Adapter | None = None) -> np.ndarray:
        x = np.asarray(x, np.float64)
        batch, seq, _ = x.shape
        h1 = _layer_norm64(x, weights["ln1.weight"], weights["ln1.bias"], eps)
        q, k, v = (
            _linear64(h1, weights, m, adapter).reshape(batch, seq, heads, dh).transpose(0, 2, 1, 3) for m in attn[:3]
        )
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, d_model)
        x1 = x + _linear64(ctx, weights, "attn.o_proj", adapter)
        h2 = _layer_norm64(x1, weights["ln2.weight"], weights["ln2.bias"], eps)
        up = np.maximum(_linear64(h2, weights, "mlp.up_proj", adapter), 0.0)
        return x1 + _linear64(up, weights, "mlp.down_proj", adapter)

    return SmallModel("transformer_block", model, weights, attn + mlp_modules, reference)


def random_adapter(model: SmallModel, r: int, *, alpha: float | None = None, seed: int = 0, modules: list[str] | None = None,
                   name: str = "default", use_rslora: bool = False, magnitude: float = 0.5) -> Adapter:
    """A PEFT-style adapter on ``modules`` (default: every Linear) with random A and non-zero B."""
    from lora_ref.adapter import LoraModule
    from lora_ref.config import LoraConfig

    rng = np.random.default_rng(seed)
    chosen = list(model.linear_modules if modules is None else modules)
    loras = {}
    for module in chosen:
        out_features, in_features = model.weights[f"{module}.weight"].shape
        A = (rng.standard_normal((r, in_features)) * magnitude / np.sqrt(in_features)).astype(np.float32)
        B = (rng.standard_normal((out_features, r)) * magnitude).astype(np.float32)
        loras[module] = LoraModule(module, A, B)
    config = LoraConfig(r=r, lora_alpha=float(2 * r if alpha is None else alpha), target_modules=chosen, use_rslora=use_rslora)
    return Adapter(config, loras, name=name)
