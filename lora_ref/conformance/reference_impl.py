"""lora_ref itself as a conformance implementation (``--impl lora_ref.conformance.reference_impl:factory``).

Takes the canonical or ``peft`` layout: s comes from ``scale`` when given, else from
lora_alpha / r (or / sqrt(r) with use_rslora). Every operation is a thin call into the core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .. import combine, conv, dora, embedding
from ..adapter import Adapter, LoraModule
from ..config import LoraConfig, lora_scale
from ..linear import LinearDelta, backward, forward
from ..merge import merge, unmerge
from ..mixed_batch import LoraFactors, active_forward, mixed_backward, mixed_forward
from ..tree import AdapterTree, TreeNode, TreeSwitcher

Arrays = dict[str, np.ndarray]


def scale_of(params: Mapping[str, Any]) -> float:
    """``scale`` if present, else derived from r, lora_alpha and use_rslora (SPEC 2.2)."""
    if "scale" in params:
        return float(params["scale"])
    return lora_scale(int(params["r"]), float(params["lora_alpha"]), bool(params.get("use_rslora", False)))


def _linear_forward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    y = forward(inputs["x"], inputs["W"], inputs["A"], inputs["B"], scale_of(params), bias=inputs.get("b"),
                lora_bias=inputs.get("lora_bias"), dropout_mask=inputs.get("dropout_mask"),
                fan_in_fan_out=bool(params.get("fan_in_fan_out", False)))
    return {"y": y}


def _linear_backward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    want_base = bool(params.get("want_base_grads", False))
    grads = backward(inputs["x"], inputs["dy"], inputs["W"], inputs["A"], inputs["B"], scale_of(params),
                     dropout_mask=inputs.get("dropout_mask"), fan_in_fan_out=bool(params.get("fan_in_fan_out", False)),
                     want_base_grads=want_base)
    outputs = {"dx": grads.dx, "dA": grads.dA, "dB": grads.dB}
    if want_base:
        outputs.update(dW=grads.dW, db=grads.db)
        if "lora_bias" in inputs:
            outputs["dlora_bias"] = grads.dlora_bias
    return outputs


def _delta(params: Mapping[str, Any], inputs: Arrays) -> LinearDelta:
    return LinearDelta(inputs["A"], inputs["B"], scale_of(params), fan_in_fan_out=bool(params.get("fan_in_fan_out", False)))


def _linear_merge(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    return {"W_merged": merge(inputs["W"], _delta(params, inputs)).weight}


def _linear_unmerge(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    delta = _delta(params, inputs)
    if not params.get("exact", False):
        return {"W": unmerge(inputs["W_merged"], delta)}
    merged = merge(inputs["W"], delta, exact=True)
    return {"W_merged": merged.weight, "W_restored": unmerge(merged.weight, delta, residual=merged.residual)}


def _embedding_forward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    return {"y": embedding.forward(inputs["ids"], inputs["W"], inputs["A"], inputs["B"], scale_of(params))}


def _embedding_merge(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    return {"W_merged": merge(inputs["W"], embedding.EmbeddingDelta(inputs["A"], inputs["B"], scale_of(params))).weight}


def _embedding_unmerge(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    return {"W": unmerge(inputs["W_merged"], embedding.EmbeddingDelta(inputs["A"], inputs["B"], scale_of(params)))}


def _embedding_backward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    want_base = bool(params.get("want_base_grads", False))
    grads = embedding.backward(inputs["ids"], inputs["dy"], inputs["W"], inputs["A"], inputs["B"], scale_of(params),
                               want_base_grads=want_base)
    return {"dA": grads.dA, "dB": grads.dB, **({"dW": grads.dW} if want_base else {})}


def _geometry(params: Mapping[str, Any]) -> conv.ConvGeometry:
    """The case's stride, padding and dilation: an int (every spatial axis) or one entry per axis."""
    def get(key: str, default: int) -> int | tuple[int, ...]:
        value = params.get(key, default)
        return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)

    return conv.ConvGeometry(stride=get("stride", 1), padding=get("padding", 0), dilation=get("dilation", 1))


def _conv_forward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    return {"y": conv.forward(inputs["x"], inputs["W"], inputs["A"], inputs["B"], scale_of(params),
                              geometry=_geometry(params), bias=inputs.get("b"))}


def _conv_merge(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    return {"W_merged": merge(inputs["W"], conv.ConvDelta(inputs["A"], inputs["B"], scale_of(params))).weight}


def _conv_unmerge(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    return {"W": unmerge(inputs["W_merged"], conv.ConvDelta(inputs["A"], inputs["B"], scale_of(params)))}


def _conv_backward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    want_base = bool(params.get("want_base_grads", False))
    grads = conv.backward(inputs["x"], inputs["dy"], inputs["W"], inputs["A"], inputs["B"], scale_of(params),
                          geometry=_geometry(params), want_base_grads=want_base)
    return {"dx": grads.dx, "dA": grads.dA, "dB": grads.dB, **({"dW": grads.dW, "db": grads.db} if want_base else {})}


def _factors(params: Mapping[str, Any], inputs: Arrays) -> list[LoraFactors]:
    return [LoraFactors(inputs[f"A.{i}"], inputs[f"B.{i}"], scale_of(adapter)) for i, adapter in enumerate(params["adapters"])]


def _mixed_batch_backward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    grads = mixed_backward(inputs["x"], inputs["dy"], inputs["W"], _factors(params, inputs), inputs["index"])
    outputs = {"dx": grads.dx}
    for i in range(len(params["adapters"])):
        outputs[f"dA.{i}"], outputs[f"dB.{i}"] = grads.dA[i], grads.dB[i]
    return outputs


def _mixed_batch_forward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    return {"y": mixed_forward(inputs["x"], inputs["W"], _factors(params, inputs), inputs["index"], bias=inputs.get("b"))}


def _dora_forward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    layer = dora.linear(inputs["W"], inputs["A"], inputs["B"], scale_of(params), inputs["magnitude"])
    return {"y": dora.forward(layer, inputs["x"], bias=inputs.get("b"), dropout_mask=inputs.get("dropout_mask"))}


def _dora_backward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    layer = dora.linear(inputs["W"], inputs["A"], inputs["B"], scale_of(params), inputs["magnitude"])
    grads = dora.backward(layer, inputs["x"], inputs["dy"], inputs["A"], inputs["B"], dropout_mask=inputs.get("dropout_mask"),
                          bias_dtype=inputs["b"].dtype)
    return {"dx": grads.dx, "dA": grads.dA, "dB": grads.dB, "dmagnitude": grads.dmagnitude, "db": grads.db}


#: DoRA kind -> (its plain delta source, W's output-channel axis)
_DORA_DELTAS = {"linear": (LinearDelta, 0), "embedding": (embedding.EmbeddingDelta, 1), "conv": (conv.ConvDelta, 0)}


def _dora_source(kind: str, params: Mapping[str, Any], inputs: Arrays) -> dora.DoraDelta:
    delta, axis = _DORA_DELTAS[kind]
    return dora.dora_delta(delta(inputs["A"], inputs["B"], scale_of(params)), inputs["magnitude"], inputs["W"], axis=axis)


def _dora_merge(params: Mapping[str, Any], inputs: Arrays, kind: str = "linear") -> Arrays:
    return {"W_merged": merge(inputs["W"], _dora_source(kind, params, inputs)).weight}


def _dora_unmerge(params: Mapping[str, Any], inputs: Arrays, kind: str = "linear") -> Arrays:
    """Exact: merge with the residual, then restore. Fast: W_merged / g − ΔW with the merge-time norm given as ``norm``."""
    if not params.get("exact", False):
        delta, axis = _DORA_DELTAS[kind]
        source = dora.DoraDelta(delta(inputs["A"], inputs["B"], scale_of(params)), inputs["magnitude"], inputs["norm"], axis)
        return {"W": unmerge(inputs["W_merged"], source)}
    source = _dora_source(kind, params, inputs)
    merged = merge(inputs["W"], source, exact=True)
    return {"W_merged": merged.weight, "W_restored": unmerge(merged.weight, source, residual=merged.residual)}


def _dora_embedding_forward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    layer = dora.embedding(inputs["W"], inputs["A"], inputs["B"], scale_of(params), inputs["magnitude"])
    return {"y": dora.forward(layer, inputs["ids"])}


def _dora_conv_forward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    layer = dora.conv(inputs["W"], inputs["A"], inputs["B"], scale_of(params), inputs["magnitude"], geometry=_geometry(params))
    return {"y": dora.forward(layer, inputs["x"], bias=inputs.get("b"), dropout_mask=inputs.get("dropout_mask"))}


def _dora_kind_backward(kind: str, params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    """DoRA backward on Embedding (ids: no dx) or Conv (dx, db with a bias)."""
    options = {"geometry": _geometry(params)} if kind == "conv" else {}
    x = inputs["ids"] if kind == "embedding" else inputs["x"]
    layer = dora.build(kind, inputs["W"], inputs["A"], inputs["B"], scale_of(params), inputs["magnitude"], **options)
    grads = dora.backward(layer, x, inputs["dy"], inputs["A"], inputs["B"], dropout_mask=inputs.get("dropout_mask"),
                          bias_dtype=inputs["b"].dtype if "b" in inputs else None)
    outputs = {"dA": grads.dA, "dB": grads.dB, "dmagnitude": grads.dmagnitude}
    if grads.dx is not None:
        outputs["dx"] = grads.dx
    if grads.db is not None:
        outputs["db"] = grads.db
    return outputs


def _mixed_kind_forward(kind: str, params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    """Mixed batch of an Embedding (ids) or Conv (x, shared geometry) layer."""
    x = inputs["ids"] if kind == "embedding" else inputs["x"]
    options = {"geometry": _geometry(params), "bias": inputs.get("b")} if kind == "conv" else {}
    factors = [LoraFactors(f.A, f.B, f.scale, kind=kind) for f in _factors(params, inputs)]
    return {"y": mixed_forward(x, inputs["W"], factors, inputs["index"], kind=kind, dropout_mask=inputs.get("dropout_mask"), **options)}


def _mixed_kind_backward(kind: str, params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    x = inputs["ids"] if kind == "embedding" else inputs["x"]
    options = {"geometry": _geometry(params)} if kind == "conv" else {}
    factors = [LoraFactors(f.A, f.B, f.scale, kind=kind) for f in _factors(params, inputs)]
    grads = mixed_backward(x, inputs["dy"], inputs["W"], factors, inputs["index"], kind=kind, dropout_mask=inputs.get("dropout_mask"), **options)
    outputs = {} if grads.dx is None else {"dx": grads.dx}
    for i in range(len(factors)):
        outputs[f"dA.{i}"], outputs[f"dB.{i}"] = grads.dA[i], grads.dB[i]
    return outputs


def _variant_factors(params: Mapping[str, Any], inputs: Arrays) -> list[LoraFactors]:
    """Linear adapters with their optional lora_bias.i or DoRA magnitude.i."""
    return [LoraFactors(f.A, f.B, f.scale, lora_bias=inputs.get(f"lora_bias.{i}"), magnitude=inputs.get(f"magnitude.{i}"))
            for i, f in enumerate(_factors(params, inputs))]


def _mixed_linear_forward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    return {"y": mixed_forward(inputs["x"], inputs["W"], _variant_factors(params, inputs), inputs["index"], bias=inputs.get("b"),
                               dropout_mask=inputs.get("dropout_mask"))}


def _mixed_linear_backward(params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    factors = _variant_factors(params, inputs)
    grads = mixed_backward(inputs["x"], inputs["dy"], inputs["W"], factors, inputs["index"], dropout_mask=inputs.get("dropout_mask"))
    outputs = {"dx": grads.dx}
    for i, f in enumerate(factors):
        outputs[f"dA.{i}"], outputs[f"dB.{i}"] = grads.dA[i], grads.dB[i]
        if f.lora_bias is not None:
            outputs[f"dlora_bias.{i}"] = grads.dlora_bias[i]
        if f.magnitude is not None:
            outputs[f"dmagnitude.{i}"] = grads.dmagnitude[i]
    return outputs


def _stack_forward(kind: str, params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    """Every adapter active on every row (mixed_batch.active_forward), any kind."""
    x = inputs["ids"] if kind == "embedding" else inputs["x"]
    factors = [LoraFactors(f.A, f.B, f.scale, lora_bias=inputs.get(f"lora_bias.{i}"), kind=kind) for i, f in enumerate(_factors(params, inputs))]
    options = {"geometry": _geometry(params)} if kind == "conv" else {}
    return {"y": active_forward(x, inputs["W"], factors, kind=kind, bias=inputs.get("b"), **options)}


def _tree_switch(kind: str, params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    """tree.TreeSwitcher (exact) over nodes n<i> (adapters[i], A.i, B.i, magnitude.i), switched to each visit in turn."""
    nodes = []
    for i, p in enumerate(params["adapters"]):
        magnitude = inputs.get(f"magnitude.{i}")
        config = LoraConfig(r=int(p["r"]), lora_alpha=p["lora_alpha"], use_rslora=bool(p.get("use_rslora", False)),
                            use_dora=magnitude is not None, target_modules=["layer"])
        module = LoraModule("layer", inputs[f"A.{i}"], inputs[f"B.{i}"], magnitude=magnitude, kind=kind)
        parent = params["parents"][i]
        nodes.append(TreeNode(f"n{i}", None if parent is None else f"n{parent}", Adapter(config, {"layer": module}, name=f"n{i}")))
    switcher = TreeSwitcher(AdapterTree(nodes), {"layer.weight": np.array(inputs["W"])}, exact=bool(params.get("exact", True)))
    outputs = {}
    for k, node in enumerate(params["visits"]):
        switcher.switch(None if node < 0 else f"n{node}")
        outputs[f"W.{k}"] = switcher.weights["layer.weight"].copy()
    return outputs


def _combine(method: str, params: Mapping[str, Any], inputs: Arrays) -> Arrays:
    """combine.combine of one-module adapters built from A.i, B.i and params adapters[i] (SPEC M.3)."""
    adapters = []
    for i, p in enumerate(params["adapters"]):
        config = LoraConfig(r=int(p["r"]), lora_alpha=p["lora_alpha"], use_rslora=bool(p.get("use_rslora", False)), target_modules=["layer"])
        module = LoraModule("layer", inputs[f"A.{i}"], inputs[f"B.{i}"], lora_bias=inputs.get(f"lora_bias.{i}"),
                            kind=params.get("kind", "linear"))
        adapters.append(Adapter(config, {"layer": module}, name=f"a{i}"))
    rank = int(params["rank"]) if method == "svd" else None
    module = combine.combine(adapters, params["weights"], method, rank=rank).adapter.modules["layer"]
    return {"A": module.A, "B": module.B, **({} if module.lora_bias is None else {"lora_bias": module.lora_bias})}


OPERATIONS: dict[str, Callable[[Mapping[str, Any], Arrays], Arrays]] = {
    "linear.forward": _linear_forward,
    "linear.backward": _linear_backward,
    "linear.merge": _linear_merge,
    "linear.unmerge": _linear_unmerge,
    "embedding.forward": _embedding_forward,
    "embedding.merge": _embedding_merge,
    "embedding.unmerge": _embedding_unmerge,
    "embedding.backward": _embedding_backward,
    **{f"conv{d}d.{name}": fn for d in (1, 2, 3)
       for name, fn in (("forward", _conv_forward), ("merge", _conv_merge), ("unmerge", _conv_unmerge), ("backward", _conv_backward))},
    "mixed_batch.forward": _mixed_batch_forward,
    "mixed_batch.backward": _mixed_batch_backward,
    "dora.forward": _dora_forward,
    "dora.backward": _dora_backward,
    "dora.merge": _dora_merge,
    "dora.unmerge": _dora_unmerge,
    "dora_embedding.forward": _dora_embedding_forward,
    "dora_embedding.merge": lambda params, inputs: _dora_merge(params, inputs, "embedding"),
    "dora_embedding.unmerge": lambda params, inputs: _dora_unmerge(params, inputs, "embedding"),
    "dora_embedding.backward": lambda params, inputs: _dora_kind_backward("embedding", params, inputs),
    **{f"dora_conv{d}d.{name}": fn for d in (1, 2, 3) for name, fn in (
        ("forward", _dora_conv_forward), ("merge", lambda params, inputs: _dora_merge(params, inputs, "conv")),
        ("unmerge", lambda params, inputs: _dora_unmerge(params, inputs, "conv")),
        ("backward", lambda params, inputs: _dora_kind_backward("conv", params, inputs)))},
    "stack_linear.forward": lambda params, inputs: _stack_forward("linear", params, inputs),
    "stack_embedding.forward": lambda params, inputs: _stack_forward("embedding", params, inputs),
    **{f"stack_conv{d}d.forward": lambda params, inputs: _stack_forward("conv", params, inputs) for d in (1, 2, 3)},
    "mixed_linear.forward": _mixed_linear_forward,
    "mixed_linear.backward": _mixed_linear_backward,
    "mixed_embedding.forward": lambda params, inputs: _mixed_kind_forward("embedding", params, inputs),
    "mixed_embedding.backward": lambda params, inputs: _mixed_kind_backward("embedding", params, inputs),
    **{f"mixed_conv{d}d.{name}": fn for d in (1, 2, 3) for name, fn in (
        ("forward", lambda params, inputs: _mixed_kind_forward("conv", params, inputs)),
        ("backward", lambda params, inputs: _mixed_kind_backward("conv", params, inputs)))},
    "tree_linear.switch": lambda params, inputs: _tree_switch("linear", params, inputs),
    "tree_embedding.switch": lambda params, inputs: _tree_switch("embedding", params, inputs),
    **{f"tree_conv{d}d.switch": lambda params, inputs: _tree_switch("conv", params, inputs) for d in (1, 2, 3)},
    "combine.cat": lambda params, inputs: _combine("cat", params, inputs),
    "combine.svd": lambda params, inputs: _combine("svd", params, inputs),
}


class ReferenceImplementation:
    """The conformance protocol object: ``run(op, params, inputs) -> outputs``."""

    def run(self, op: str, params: dict[str, Any], inputs: Arrays) -> Arrays:
        if op not in OPERATIONS:
            raise NotImplementedError(f"lora_ref does not implement {op!r}")
        return OPERATIONS[op](params, inputs)


def factory() -> ReferenceImplementation:
    return ReferenceImplementation()
