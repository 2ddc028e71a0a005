"""The reference's own small models, built directly as ONNX graphs, with float64 forwards.

Four models, each returned as a :class:`SmallModel` (the ONNX graph, its weights in torch's
``state_dict`` layout, the adapted module paths and their layer kinds, and a float64 NumPy
forward):

* :func:`mlp` — x [batch, in] -> Gemm(fc1, transB=1) -> Relu -> Gemm(fc2, transB=1) -> y [batch, out];
  weights are initializers named ``fc1.weight`` ([out, in]) etc.
* :func:`transformer_block` — pre-LayerNorm block on x [batch, seq, d]: multi-head self-attention
  (q/k/v/o projections as ``MatMul(h, Transpose(<module>.weight))``) and a ReLU MLP whose
  projections are pre-transposed ``[in, out]`` initializers with anonymous names
  (``w_up``/``w_down``), found only through ``pkg.torch.onnx.name_scopes`` metadata, as in
  graphs from torch's dynamo exporter. So the two models exercise all three weight layouts.
* :func:`embedding_model` — ids [batch, seq] -> ``Gather(embed.weight, ids)`` (with a name
  scope, as the dynamo exporter writes it) -> ``MatMul(h, Transpose(proj.weight)) + proj.bias``
  (a Linear whose bias is a separate Add) -> y [batch, seq, out].
* :func:`conv_model` — x [N, C, H, W] -> Conv2d ``conv1`` (3x3, padding 1, bias) -> Relu ->
  Reshape [N, C1, H·W] -> Conv1d ``conv2`` (kernel 3, stride 2, bias; anonymous weight found
  by its name scope) -> y [N, C2, L].

The float64 forward uses the core's forward of each adapted layer (:func:`layer64`: Linear,
Embedding, Conv, with lora_bias and DoRA; LoRA unmerged), so it is the oracle for all three
exported graph kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_ref import dora
from lora_ref.adapter import Adapter
from lora_ref.conv import ConvGeometry
from lora_ref.kinds import KindName, kind_of

from .locate import NAME_SCOPES_KEY

OPSET = 20


@dataclass
class SmallModel:
    """An ONNX graph with its weights (torch layout, float32) and a float64 reference forward.

    ``linear_modules`` lists every adaptable module (the name predates Embedding and Conv);
    ``kinds`` gives the layer kind of those that are not Linear, ``geometry`` each conv's.
    """

    name: str
    onnx: onnx.ModelProto
    weights: dict[str, np.ndarray]
    linear_modules: list[str]
    reference: Callable[[np.ndarray, Adapter | None], np.ndarray]
    kinds: dict[str, KindName] = field(default_factory=dict)
    geometry: dict[str, ConvGeometry] = field(default_factory=dict)

    def kind(self, module: str) -> KindName:
        return self.kinds.get(module, "linear")

    def layer(self, module: str, x: np.ndarray, adapter: Adapter | None = None, *, bias: bool = True) -> np.ndarray:
        """:func:`layer64` of ``module`` in this model (``bias=False``: without the base bias)."""
        return layer64(x, self.weights, module, adapter, kind=self.kind(module), geometry=self.geometry.get(module), bias=bias)


def layer64(x: np.ndarray, weights: Mapping[str, np.ndarray], module: str, adapter: Adapter | None, *,
            kind: KindName = "linear", geometry: ConvGeometry | None = None, bias: bool = True) -> np.ndarray:
    """One layer in float64 through the core's forward: base + LoRA (+ s·lora_bias), or DoRA.

    Linear y = x W^T + b + s (x A^T) B^T + s lora_bias; Embedding y = W[ids] + s A^T[ids] B^T;
    Conv y = conv(x, W) + b + s conv(conv(x, A), B) + s lora_bias; with a magnitude, the
    kind's DoRA forward. Without ``adapter`` (or a module it lacks) the base layer.
    """
    W = weights[f"{module}.weight"]
    b = weights.get(f"{module}.bias") if bias else None
    lora = adapter.modules.get(module) if adapter is not None else None
    s = adapter.scale_for(module) if lora is not None else 0.0
    layer_kind = kind_of(kind)
    A, B = (lora.A, lora.B) if lora is not None else layer_kind.zero_factors(W.shape)
    if lora is not None and lora.magnitude is not None:
        layer = dora.build(layer_kind, W, A, B, s, lora.magnitude, geometry=geometry, module=module)
        return dora.forward(layer, x, bias=b, out_dtype=np.float64)
    lora_bias = lora.lora_bias if lora is not None else None
    return layer_kind.forward(x, W, A, B, s, bias=b, lora_bias=lora_bias, geometry=geometry, out_dtype=np.float64, module=module)


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
        h = np.maximum(layer64(x, weights, "fc1", adapter), 0.0)
        return layer64(h, weights, "fc2", adapter)

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
            layer64(h1, weights, m, adapter).reshape(batch, seq, heads, dh).transpose(0, 2, 1, 3) for m in attn[:3]
        )
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, d_model)
        x1 = x + layer64(ctx, weights, "attn.o_proj", adapter)
        h2 = _layer_norm64(x1, weights["ln2.weight"], weights["ln2.bias"], eps)
        up = np.maximum(layer64(h2, weights, "mlp.up_proj", adapter), 0.0)
        return x1 + layer64(up, weights, "mlp.down_proj", adapter)

    return SmallModel("transformer_block", model, weights, attn + mlp_modules, reference)


def _scoped(node: onnx.NodeProto, module: str, op: str) -> onnx.NodeProto:
    """``node`` with the dynamo exporter's name-scope metadata for ``module``."""
    entry = node.metadata_props.add()
    entry.key, entry.value = NAME_SCOPES_KEY, repr(["", module, op])
    return node


def embedding_model(vocab: int = 20, dim: int = 8, out_features: int = 6, *, seed: int = 0) -> SmallModel:
    """Gather(embed.weight, ids) -> MatMul(., Transpose(proj.weight)) + proj.bias; modules ``embed``, ``proj``."""
    rng = np.random.default_rng(seed)
    weights = {
        "embed.weight": rng.standard_normal((vocab, dim)).astype(np.float32),
        "proj.weight": _normal(rng, (out_features, dim), dim),
        "proj.bias": _normal(rng, (out_features,), dim),
    }
    nodes = [
        _scoped(helper.make_node("Gather", ["embed.weight", "ids"], ["h"], name="embed.gather", axis=0), "embed", "embedding"),
        helper.make_node("Transpose", ["proj.weight"], ["proj_wT"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "proj_wT"], ["proj_mm"], name="proj.matmul"),
        helper.make_node("Add", ["proj_mm", "proj.bias"], ["y"], name="proj.bias_add"),
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", out_features])]
    model = _model(nodes, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()], "lora_ref_embedding")
    kinds = {"embed": "embedding"}

    def reference(ids: np.ndarray, adapter: Adapter | None = None) -> np.ndarray:
        return layer64(layer64(ids, weights, "embed", adapter, kind="embedding"), weights, "proj", adapter)

    return SmallModel("embedding", model, weights, ["embed", "proj"], reference, kinds)


def conv_model(channels: int = 3, size: int = 6, hidden: int = 4, out_channels: int = 5, *, seed: int = 0) -> SmallModel:
    """Conv2d ``conv1`` (3x3, pad 1) -> Relu -> Reshape -> Conv1d ``conv2`` (k 3, stride 2; weight found by name scope)."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv1.weight": _normal(rng, (hidden, channels, 3, 3), channels * 9),
        "conv1.bias": _normal(rng, (hidden,), channels * 9),
        "conv2.weight": _normal(rng, (out_channels, hidden, 3), hidden * 3),
        "conv2.bias": _normal(rng, (out_channels,), hidden * 3),
    }
    geometry = {"conv1": ConvGeometry(padding=1), "conv2": ConvGeometry(stride=2)}
    inits = [numpy_helper.from_array(weights[k], k) for k in ("conv1.weight", "conv1.bias", "conv2.bias")]
    inits += [numpy_helper.from_array(weights["conv2.weight"], "w_conv2"),
              numpy_helper.from_array(np.array([0, hidden, -1], np.int64), "flat_shape")]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Reshape", ["a1", "flat_shape"], ["flat"]),
        _scoped(helper.make_node("Conv", ["flat", "w_conv2", "conv2.bias"], ["y"], name="conv2.conv", kernel_shape=[3], strides=[2]),
                "conv2", "conv1d"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_channels, None])]
    model = _model(nodes, inputs, outputs, inits, "lora_ref_conv")
    kinds = {"conv1": "conv", "conv2": "conv"}

    def reference(x: np.ndarray, adapter: Adapter | None = None) -> np.ndarray:
        h = np.maximum(layer64(x, weights, "conv1", adapter, kind="conv", geometry=geometry["conv1"]), 0.0)
        return layer64(h.reshape(h.shape[0], hidden, -1), weights, "conv2", adapter, kind="conv", geometry=geometry["conv2"])

    return SmallModel("conv", model, weights, ["conv1", "conv2"], reference, kinds, geometry)


def random_adapter(model: SmallModel, r: int, *, alpha: float | None = None, seed: int = 0, modules: list[str] | None = None,
                   name: str = "default", use_rslora: bool = False, magnitude: float = 0.5, lora_bias: bool = False,
                   use_dora: bool = False) -> Adapter:
    """A PEFT-style adapter on ``modules`` (default: every adaptable one) with random A and non-zero B.

    Shapes follow each module's kind (Linear A [r, in], B [out, r]; Embedding A [r, V],
    B [D, r]; Conv A [r, C, *k], B [O, r, 1...]). ``lora_bias`` adds a random lora_B.bias to
    Linear and Conv modules; ``use_dora`` a magnitude per output channel near ‖W‖ of that channel.
    """
    from lora_ref.adapter import LoraModule
    from lora_ref.config import LoraConfig

    rng = np.random.default_rng(seed)
    chosen = list(model.linear_modules if modules is None else modules)
    loras = {}
    for module in chosen:
        W = model.weights[f"{module}.weight"]
        kind = kind_of(model.kind(module))
        a_shape, b_shape = kind.lora_shapes(W.shape, r)
        fan_in, out, axis = int(np.prod(a_shape[1:])), b_shape[0], kind.dora_axis()
        A = (rng.standard_normal(a_shape) * magnitude / np.sqrt(fan_in)).astype(np.float32)
        B = (rng.standard_normal(b_shape) * magnitude).astype(np.float32)
        bias = (rng.standard_normal(out) * magnitude).astype(np.float32) if lora_bias and kind.lora_bias else None
        m = None
        if use_dora:
            norms = np.sqrt((W.astype(np.float64) ** 2).sum(axis=tuple(k for k in range(W.ndim) if k != axis)))
            m = (norms * (1 + 0.2 * rng.standard_normal(norms.shape))).astype(np.float32)
        loras[module] = LoraModule(module, A, B, lora_bias=bias, magnitude=m, kind=kind.name)
    config = LoraConfig(r=r, lora_alpha=float(2 * r if alpha is None else alpha), target_modules=chosen, use_rslora=use_rslora,
                        use_dora=use_dora, lora_bias=lora_bias)
    return Adapter(config, loras, name=name)


def ort_int4(model: onnx.ModelProto, *, qdq: bool, block_size: int = 32, symmetric: bool = True) -> onnx.ModelProto:
    """``model``'s MatMul weights quantized to int4 blocks by ONNX Runtime's own quantizer, on a copy.

    ``qdq``: DequantizeLinear -> MatMul (``QuantFormat.QDQ``); else MatMulNBits nodes, which the
    quantizer makes without the replaced MatMul's metadata: its name scopes are copied back (by
    output name), as a user would keep them to find the modules (:mod:`lora_ref.export.locate`).
    """
    import copy

    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    scopes = {n.output[0]: list(n.metadata_props) for n in model.graph.node}
    quantizer = MatMulNBitsQuantizer(copy.deepcopy(model), block_size=block_size, is_symmetric=symmetric,
                                     quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator)
    quantizer.process()
    out = quantizer.model.model
    for node in out.graph.node:
        if not node.metadata_props and node.output[0] in scopes:
            node.metadata_props.extend(scopes[node.output[0]])
    return out


def ort_dynamic(model: onnx.ModelProto, *, per_channel: bool, signed: bool = True) -> onnx.ModelProto:
    """``model``'s MatMul weights dynamically quantized by ONNX Runtime's ``quantize_dynamic`` (int8 or uint8
    weights, per tensor or per output column; the activation quantized to uint8 at run time), on a copy.

    The quantizer writes DynamicQuantizeLinear → MatMulInteger → Cast → Mul without the replaced
    MatMul's metadata; the last Mul keeps the MatMul's output name, by which the name scopes are
    copied back onto the MatMulInteger, so that graphs with anonymous weights (torch's dynamo
    exporter) keep their modules (:mod:`lora_ref.export.locate`).
    """
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantType, quantize_dynamic

    scopes = {n.output[0]: list(n.metadata_props) for n in model.graph.node if n.op_type == "MatMul"}
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "quantized.onnx"
        onnx.save(model, str(source))
        quantize_dynamic(str(source), str(target), per_channel=per_channel,
                         weight_type=QuantType.QInt8 if signed else QuantType.QUInt8)
        out = onnx.load(str(target))
    producer = {name: node for node in out.graph.node for name in node.output}
    for node in out.graph.node:
        if node.op_type == "Mul" and node.output[0] in scopes and not node.metadata_props:
            cast = producer.get(node.input[0])
            integer = producer.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
            if integer is not None and integer.op_type == "MatMulInteger" and not integer.metadata_props:
                integer.metadata_props.extend(scopes[node.output[0]])
    return out
