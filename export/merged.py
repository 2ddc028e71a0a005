"""The merged graph: each targeted weight initializer replaced by the core's merge of it.

For every merge target of an adapter (:func:`lora_ref.checkpoint.merge_targets`: a module's
weight, and its base bias when the module has ``lora_bias``) the initializer becomes
``merge(W, target_delta(adapter, target, base=W)).weight`` (:mod:`lora_ref.merge`): round_t(W + Δ)
for Linear, Embedding (the Gather's table) and Conv (the kernel) weights, round_t(b + s·lora_bias)
for the bias, and round_t(g ∘ (W + Δ)) for DoRA (g = m / ‖W + Δ‖_c from the unmerged W). A
Linear weight stored in the other layout than the adapter's (``fan_in_fan_out``) is merged
transposed, which is exact, so the initializer is bit for bit the core's merged weight.

Nothing else in the graph changes, so the merged graph has exactly the base graph's latency.
With several adapters the merges are applied in the given order (W1 = merge(W0, Δ1), ...), as a
PEFT model that merges them one after another. When ``dtype`` differs from the stored dtype
(the fp16 export), the merge is evaluated in float64 and rounded once to ``dtype``.
An initializer that something other than the targeted layers also reads (tied embeddings) is
copied first, so those other readers still see the base value. A module that is a part of a
fused weight (``TargetSite.columns``) merges its column slice only (:mod:`lora_ref.export.fused`).
A module whose sites read several initializers (a module reused at several places, whose
exporter folded one copy of the weight per call, as ALBERT's) merges each of them.


Tensors an adapter carries besides LoRA factors (:mod:`lora_ref.carried`) replace base values,
as in a checkpoint merge: a ``modules_to_save`` copy or trainable bias of a Linear ``<m>.weight``
/ ``<m>.bias`` replaces the initializer of module m's weight (transposed for an ``in_out``
layout, which is exact) or its base bias, W' = round_t(C); trainable-token rows replace rows
of an embedding's Gather table, W'[I] = round_t(D). :func:`carried_sites` says which module
and layer kind each one needs located; a carried tensor of any other parameter (a LayerNorm's,
a buffer) has no place the exporter can find and is refused by name.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from lora_ref.adapter import Adapter
from lora_ref.carried import CarriedTensor, check_base_copies, replacing
from lora_ref.checkpoint import checkpoint_targets, target_delta
from lora_ref.dtypes import round_to
from lora_ref.merge import merge

from .editing import Namer, check_exportable, check_fits, np_dtype, rename_output, splice
from .errors import ExportConfigError, UnsupportedGraphError
from .locate import GraphIndex, TargetSite


def _private_readers(index: GraphIndex, name: str, nodes: set[int]) -> tuple[bool, list[int]]:
    """(whether only ``nodes`` read ``name``, the nodes that read it directly on their behalf)."""
    direct, private = [], True
    for i, _ in index.consumers.get(name, []):
        node = index.graph.node[i]
        if i in nodes:
            direct.append(i)
        elif node.op_type == "Transpose" and {j for j, _ in index.consumers.get(node.output[0], [])} <= nodes:
            direct.append(i)
        else:
            private = False
    return private, direct


def transposed_layout(adapter: Adapter, layout: str) -> bool:
    """Whether a weight stored in ``layout`` is the transpose of the layout the adapter's delta has."""
    if layout not in ("in_out", "out_in"):
        return False  # embedding rows and conv kernels are stored as the core expects
    return layout != ("in_out" if adapter.config.fan_in_fan_out else "out_in")


def merged_tensor(stored: np.ndarray, layout: str, module: str, part: str, adapters: Sequence[Adapter], dtype: np.dtype) -> np.ndarray:
    """The stored weight (``part="weight"``) or bias (``"bias"``) with every adapter merged in order, as ``dtype``."""
    W = stored if np.dtype(dtype) == stored.dtype else stored.astype(np.float64)
    for adapter in adapters:
        if part == "bias":
            if adapter.modules[module].lora_bias is not None:
                W = merge(W.reshape(-1), target_delta(adapter, (module, part))).weight.reshape(W.shape)
            continue
        flip = transposed_layout(adapter, layout)
        core = W.T if flip else W
        merged = merge(core, target_delta(adapter, (module, part), base=core)).weight
        W = merged.T if flip else merged
    return np.ascontiguousarray(round_to(W, dtype) if W.dtype != np.dtype(dtype) else W)


def _replace(graph: onnx.GraphProto, index: GraphIndex, namer: Namer, name: str, readers: set[int], value: np.ndarray, module: str) -> None:
    """Set initializer ``name`` to ``value`` for ``readers``; a copy when other nodes read it too."""
    private, direct = _private_readers(index, name, readers)
    if private:
        index.initializers[name].CopyFrom(numpy_helper.from_array(value, name))
        return
    fresh = namer(f"{name}.merged.{module}")
    graph.initializer.append(numpy_helper.from_array(value, fresh))
    for i in direct:
        node = graph.node[i]
        for pos, current in enumerate(node.input):
            if current == name:
                node.input[pos] = fresh


def _one(module: str, what: str, values: set) -> object:
    if len(values) != 1:
        raise UnsupportedGraphError(f"{module}: its sites disagree on the {what}: {sorted(map(str, values))}")
    return next(iter(values))


def carried_sites(adapters: Sequence[Adapter]) -> dict[str, tuple[str, str, CarriedTensor]]:
    """The carried tensors of ``adapters`` by base key -> (module to locate, its layer kind, tensor).

    Refuses (ExportConfigError) a carried tensor that is not a Linear weight/bias or trainable
    token rows, and two adapters carrying copies of one base tensor.
    """
    out: dict[str, tuple[str, str, CarriedTensor]] = {}
    for adapter in adapters:
        checkpoint_targets(adapter)  # refuses a carried tensor that a LoRA merge also changes
        for key, carried in replacing(adapter.carried_tensors()).items():
            if key in out:
                raise ExportConfigError(f"adapters {out[key][2].key!r} and {carried.key!r} both carry base tensor {key!r}")
            module, _, part = key.rpartition(".")
            kind = "embedding" if carried.kind == "trainable_tokens" else "linear"
            if part not in ("weight", "bias") or (kind == "linear" and carried.values.ndim != (2 if part == "weight" else 1)):
                raise ExportConfigError(
                    f"adapter {adapter.name!r}: carried {carried.kind} tensor {carried.key!r} {tuple(carried.values.shape)} is "
                    "not a Linear weight or bias, so its place in the graph cannot be found; merge the checkpoint with "
                    "lora-ref merge and export the merged model instead")
            out[key] = (module, kind, carried)
    return out


def check_graph_base_copies(index: GraphIndex, sites: Mapping[str, Sequence[TargetSite]], adapters: Sequence[Adapter]) -> None:
    """Refuse an adapter whose frozen ``base_layer`` copy differs from the graph's weight (lora_ref.carried)."""
    def lookup(key: str) -> np.ndarray | None:
        module_sites = sites.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        if not module_sites or module_sites[0].quantized:  # a quantized base is not compared (refused as such)
            return None
        value = numpy_helper.to_array(index.initializers[module_sites[0].weight])
        value = value.T if module_sites[0].layout == "in_out" else value
        columns = module_sites[0].columns  # a part of a fused weight: its rows in torch's layout
        return value[slice(*columns)] if columns is not None else value

    for adapter in adapters:
        check_base_copies(adapter.carried_tensors(), lookup, f"adapter {adapter.name!r}")


def _carried_value(carried: CarriedTensor, stored: np.ndarray, layout: str, dtype: np.dtype) -> np.ndarray:
    """The initializer's new value: the copy rounded once to ``dtype`` (transposed for ``in_out``), or rows replaced."""
    values = np.asarray(carried.values, dtype=np.float64)
    if carried.rows is not None:
        out = np.asarray(stored, dtype=np.float64).copy()
        out[list(carried.rows)] = values
        return np.ascontiguousarray(round_to(out, dtype))
    value = values.T if layout == "in_out" else values
    if value.shape != stored.shape:
        raise ExportConfigError(f"carried tensor {carried.key!r} {tuple(carried.values.shape)} does not fit graph "
                                f"initializer of shape {tuple(stored.shape)}")
    return np.ascontiguousarray(round_to(value, dtype))


def build_merged(
    model: onnx.ModelProto,
    sites: Mapping[str, Sequence[TargetSite]],
    adapters: Sequence[Adapter],
    *,
    dtype: np.dtype | None = None,
    progress=None,
) -> onnx.ModelProto:
    """A copy of ``model`` with the targeted weights (and lora_bias biases) merged and carried tensors
    applied (see module docstring); ``sites`` must hold the modules :func:`carried_sites` names."""
    out = copy.deepcopy(model)
    graph = out.graph
    index = GraphIndex(graph)
    inputs = {t.name: t for t in model.graph.initializer}
    namer = Namer(graph)
    for step, (module, module_sites) in enumerate(sites.items()):
        if progress:
            progress(step, len(sites), module)
        users = [a for a in adapters if module in a.modules]
        if not users:
            continue  # located for a carried tensor only
        for adapter in users:
            check_exportable(adapter, module, "merged")
            for site in module_sites:
                check_fits(adapter, module, site, "merged")
        for weight in dict.fromkeys(site.weight for site in module_sites):  # several: a module reused (ALBERT)
            weight_sites = [site for site in module_sites if site.weight == weight]
            layout = _one(module, f"layout of {weight!r}", {site.layout for site in weight_sites})
            stored = numpy_helper.to_array(index.initializers[weight])
            target = np.dtype(dtype) if dtype is not None else stored.dtype
            columns = _one(module, f"columns of {weight!r}", {site.columns for site in weight_sites})
            if columns is None:
                merged = merged_tensor(stored, layout, module, "weight", users, target)
            else:  # a part of a fused weight: its slice merged alone (lora_ref.export.fused), the rest as stored
                cut = (slice(None), slice(*columns)) if layout == "in_out" else (slice(*columns), slice(None))
                original = numpy_helper.to_array(inputs[weight])  # the input model's: parts merged before change `stored`
                merged = round_to(stored, target) if stored.dtype != target else stored.copy()
                merged[cut] = merged_tensor(original[cut], layout, module, "weight", users, target)
            _replace(graph, index, namer, weight, {site.node for site in weight_sites}, merged, module)
        if any(adapter.modules[module].lora_bias is not None for adapter in users):
            bias = _one(module, "base bias", {site.bias for site in module_sites})
            stored = numpy_helper.to_array(index.initializers[bias])
            merged = merged_tensor(stored, "bias", module, "bias", users, np.dtype(dtype) if dtype is not None else stored.dtype)
            _replace(graph, index, namer, bias, {site.bias_node for site in module_sites}, merged, module)
    added: dict[int, list[onnx.NodeProto]] = {}
    for key, (module, _, carried) in carried_sites(adapters).items():
        module_sites = sites[module]
        if key.endswith(".bias"):
            name = _one(module, "base bias", {site.bias for site in module_sites})
            if name is None:
                _add_bias(graph, namer, module_sites, carried, np.dtype(dtype) if dtype is not None else None, added)
                continue
            readers, layout = {site.bias_node for site in module_sites}, "bias"
        else:
            name = module_sites[0].weight
            readers = {site.node for site in module_sites}
            layout = _one(module, f"layout of {name!r}", {site.layout for site in module_sites})
        stored = numpy_helper.to_array(index.initializers[name])
        value = _carried_value(carried, stored, layout, np.dtype(dtype) if dtype is not None else stored.dtype)
        _replace(graph, index, namer, name, readers, value, module)
    splice(graph, added)
    return out


def _add_bias(graph: onnx.GraphProto, namer: Namer, module_sites: Sequence[TargetSite], carried: CarriedTensor,
              dtype: np.dtype | None, added: dict[int, list[onnx.NodeProto]]) -> None:
    """Give a bias-less Linear layer the carried bias b (exporters drop all-zero biases): Gemm's C
    input, or ``Add(MatMul(x, W), b)``; the value is round_t(b), t the weight's dtype (or ``dtype``)."""
    weight = next(t for t in graph.initializer if t.name == module_sites[0].weight)
    target = dtype if dtype is not None else np_dtype(weight.data_type)
    name = namer(f"{module_sites[0].module}.bias.carried")
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(round_to(np.asarray(carried.values, np.float64), target)), name))
    for site in module_sites:
        node = graph.node[site.node]
        if node.op_type == "Gemm" and len(node.input) < 3:
            node.input.append(name)
        elif node.op_type == "MatMul":
            fresh = rename_output(graph, site, namer)
            added.setdefault(site.node, []).append(onnx.helper.make_node("Add", [fresh, name], [site.y], name=namer(f"{name}.add")))
        else:
            raise UnsupportedGraphError(f"{site.module}: the adapter carries {carried.key!r}, but the graph's "
                                        f"{node.op_type} layer has an input where its bias would go")
