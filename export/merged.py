"""The merged graph: each targeted weight initializer replaced by round_t(W + Δ) (the core's merge).

Nothing else in the graph changes, so the merged graph has exactly the base graph's latency.
With several adapters the merges are applied in the given order (W1 = merge(W0, Δ1), ...), as a
PEFT model that merges them one after another. When ``dtype`` differs from the stored dtype
(the fp16 export), the merge is evaluated in float64 and rounded once to ``dtype``.
A weight initializer that something other than the targeted Linear layers also reads (tied
embeddings) is copied first, so those other readers still see the base weight.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from lora_ref.adapter import Adapter
from lora_ref.dtypes import round_to
from lora_ref.linear import LinearDelta
from lora_ref.merge import merge

from .editing import Namer, check_exportable, check_fits
from .errors import UnsupportedGraphError
from .locate import GraphIndex, TargetSite


def _private_readers(index: GraphIndex, weight: str, sites: Sequence[TargetSite]) -> tuple[bool, list[int]]:
    """(whether only the sites read ``weight``, the nodes that read it directly on the sites' behalf)."""
    site_nodes = {site.node for site in sites}
    direct, private = [], True
    for i, _ in index.consumers.get(weight, []):
        node = index.graph.node[i]
        if i in site_nodes:
            direct.append(i)
        elif node.op_type == "Transpose" and {j for j, _ in index.consumers.get(node.output[0], [])} <= site_nodes:
            direct.append(i)
        else:
            private = False
    return private, direct


def merged_weight(stored: np.ndarray, layout: str, module: str, adapters: Sequence[Adapter], dtype: np.dtype) -> np.ndarray:
    """The stored weight with every adapter's Δ merged in order, in the stored layout, as ``dtype``."""
    W = stored if np.dtype(dtype) == stored.dtype else stored.astype(np.float64)
    for adapter in adapters:
        lora = adapter.modules[module]
        delta = LinearDelta(lora.A, lora.B, adapter.scale_for(module), fan_in_fan_out=layout == "in_out", module=module)
        W = merge(W, delta).weight
    return round_to(W, dtype) if W.dtype != np.dtype(dtype) else W


def build_merged(
    model: onnx.ModelProto,
    sites: Mapping[str, Sequence[TargetSite]],
    adapters: Sequence[Adapter],
    *,
    dtype: np.dtype | None = None,
    progress=None,
) -> onnx.ModelProto:
    """A copy of ``model`` with the targeted weights merged (see module docstring)."""
    out = copy.deepcopy(model)
    graph = out.graph
    index = GraphIndex(graph)
    namer = Namer(graph)
    for step, (module, module_sites) in enumerate(sites.items()):
        if progress:
            progress(step, len(sites), module)
        users = [a for a in adapters if module in a.modules]
        for adapter in users:
            check_exportable(adapter, module)
            for site in module_sites:
                check_fits(adapter, module, site)
        weight, layouts = module_sites[0].weight, {site.layout for site in module_sites}
        if len(layouts) != 1:
            raise UnsupportedGraphError(f"{module}: weight {weight!r} is read in both layouts {sorted(layouts)}")
        tensor = index.initializers[weight]
        stored = numpy_helper.to_array(tensor)
        target = np.dtype(dtype) if dtype is not None else stored.dtype
        merged = merged_weight(stored, layouts.pop(), module, users, target)
        private, direct = _private_readers(index, weight, module_sites)
        if private:
            tensor.CopyFrom(numpy_helper.from_array(merged, weight))
            continue
        fresh = namer(f"{weight}.merged.{module}")
        graph.initializer.append(numpy_helper.from_array(merged, fresh))
        for i in direct:
            node = graph.node[i]
            for pos, name in enumerate(node.input):
                if name == weight:
                    node.input[pos] = fresh
    return out
