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
copied first, so those other readers still see the base value.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from lora_ref.adapter import Adapter
from lora_ref.checkpoint import target_delta
from lora_ref.dtypes import round_to
from lora_ref.merge import merge

from .editing import Namer, check_exportable, check_fits
from .errors import UnsupportedGraphError
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


def _stored_layout(adapter: Adapter, layout: str) -> bool:
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
        flip = _stored_layout(adapter, layout)
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


def build_merged(
    model: onnx.ModelProto,
    sites: Mapping[str, Sequence[TargetSite]],
    adapters: Sequence[Adapter],
    *,
    dtype: np.dtype | None = None,
    progress=None,
) -> onnx.ModelProto:
    """A copy of ``model`` with the targeted weights (and lora_bias biases) merged (see module docstring)."""
    out = copy.deepcopy(model)
    graph = out.graph
    index = GraphIndex(graph)
    namer = Namer(graph)
    for step, (module, module_sites) in enumerate(sites.items()):
        if progress:
            progress(step, len(sites), module)
        users = [a for a in adapters if module in a.modules]
        for adapter in users:
            check_exportable(adapter, module, "merged")
            for site in module_sites:
                check_fits(adapter, module, site, "merged")
        weight = module_sites[0].weight
        layout = _one(module, f"layout of {weight!r}", {site.layout for site in module_sites})
        stored = numpy_helper.to_array(index.initializers[weight])
        target = np.dtype(dtype) if dtype is not None else stored.dtype
        merged = merged_tensor(stored, layout, module, "weight", users, target)
        _replace(graph, index, namer, weight, {site.node for site in module_sites}, merged, module)
        if any(adapter.modules[module].lora_bias is not None for adapter in users):
            bias = _one(module, "base bias", {site.bias for site in module_sites})
            stored = numpy_helper.to_array(index.initializers[bias])
            merged = merged_tensor(stored, "bias", module, "bias", users, np.dtype(dtype) if dtype is not None else stored.dtype)
            _replace(graph, index, namer, bias, {site.bias_node for site in module_sites}, merged, module)
    return out
