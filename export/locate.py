"""Find the base weight of each adapted module in an ONNX graph.

A Linear layer y = x W^T (+ b), W [out, in] in torch's layout, appears in a graph as

* ``MatMul(x, W_io)`` with an initializer W_io = W^T [in, out] (torch's dynamo exporter), layout ``in_out``;
* ``MatMul(x, Transpose(W))`` with W [out, in], layout ``out_in``;
* ``Gemm(x, W, b, transB=1)`` (layout ``out_in``) or ``Gemm(x, W_io, b, transB=0)`` (``in_out``).

The module path is found three ways, tried in this order for every module:

1. **name scopes**: the dynamo exporter records the module stack of each node in the metadata
   key ``pkg.torch.onnx.name_scopes``; the innermost module scope (second to last entry) must
   equal the module path or end with ``"." + path`` (the exported wrapper adds a prefix);
2. **initializer names**: an initializer named ``<path>.weight`` or ``<prefix>.<path>.weight``;
3. **values**: with base weights from a safetensors file (key ``<path>.weight``), the
   initializer holding exactly those values (after rounding to its dtype), transposed or not.

A strategy succeeds when it yields exactly one weight initializer; every place it is used as a
Linear weight becomes a :class:`TargetSite`. Modules no strategy resolves are reported together
in one :class:`GraphTargetNotFoundError` that lists what each strategy saw.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lora_ref.dtypes import round_to

from .errors import GraphTargetNotFoundError, UnsupportedGraphError

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class TargetSite:
    """One use of a module's weight as a Linear layer in the graph.

    ``node`` is the index (in ``graph.node``) of the MatMul/Gemm computing y from x; ``x`` and
    ``y`` are its activation input and output; ``weight`` the initializer, stored ``[in, out]``
    (``layout == "in_out"``) or ``[out, in]`` (``"out_in"``); ``found_by`` the strategy used.
    """

    module: str
    node: int
    x: str
    y: str
    weight: str
    layout: str
    in_features: int
    out_features: int
    found_by: str


class GraphIndex:
    """Producers, consumers and initializers of a graph, for lookups by tensor name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.producer: dict[str, int] = {}
        for i, node in enumerate(graph.node):
            self.producer.update((name, i) for name in node.output)
            for pos, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((i, pos))

    def linear_uses(self, weight: str) -> tuple[list[tuple[int, str]], list[str]]:
        """(node index, layout) of every MatMul/Gemm using initializer ``weight`` as its W, and notes."""
        uses: list[tuple[int, str]] = []
        notes: list[str] = []
        for i, pos in self.consumers.get(weight, []):
            node = self.graph.node[i]
            if node.op_type == "Transpose" and pos == 0 and _is_2d_swap(node):
                for j, pos2 in self.consumers.get(node.output[0], []):
                    layout = _linear_layout(self.graph.node[j], pos2, transposed=True, notes=notes)
                    if layout:
                        uses.append((j, layout))
            else:
                layout = _linear_layout(node, pos, transposed=False, notes=notes)
                if layout:
                    uses.append((i, layout))
        return uses, notes


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _is_2d_swap(node: onnx.NodeProto) -> bool:
    return list(_attr(node, "perm", [1, 0])) == [1, 0]


def _linear_layout(node: onnx.NodeProto, pos: int, *, transposed: bool, notes: list[str]) -> str | None:
    """``"in_out"``/``"out_in"`` if ``node`` uses its input ``pos`` as a Linear weight, else None."""
    if node.op_type == "MatMul" and pos == 1:
        return "out_in" if transposed else "in_out"
    if node.op_type == "Gemm" and pos == 1:
        if _attr(node, "transA", 0):
            notes.append(f"Gemm {node.name or node.output[0]!r} has transA=1 (not a Linear layer)")
            return None
        if float(_attr(node, "alpha", 1.0)) != 1.0:
            notes.append(f"Gemm {node.name or node.output[0]!r} has alpha != 1 (the weight is scaled)")
            return None
        stored_out_in = bool(_attr(node, "transB", 0)) != transposed
        return "out_in" if stored_out_in else "in_out"
    return None


def _innermost_scope(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, (list, tuple)) and len(scopes) >= 2 and isinstance(scopes[-2], str):
                return scopes[-2]
    return None


def _path_matches(candidate: str, module: str) -> bool:
    return candidate == module or candidate.endswith("." + module)


def _sites(index: GraphIndex, module: str, weight: str, found_by: str) -> list[TargetSite]:
    tensor = index.initializers[weight]
    uses, _ = index.linear_uses(weight)
    sites = []
    for node_index, layout in uses:
        node = index.graph.node[node_index]
        rows, cols = tensor.dims
        in_f, out_f = (rows, cols) if layout == "in_out" else (cols, rows)
        sites.append(TargetSite(module, node_index, node.input[0], node.output[0], weight, layout, int(in_f), int(out_f), found_by))
    return sites


def _by_scopes(index: GraphIndex, module: str, scopes: Mapping[int, str]) -> tuple[set[str], str]:
    weights: set[str] = set()
    seen = []
    for i, scope in scopes.items():
        if not _path_matches(scope, module):
            continue
        node = index.graph.node[i]
        seen.append(node.name or node.output[0])
        weight = node.input[1] if len(node.input) > 1 else ""
        producer = index.graph.node[index.producer[weight]] if weight in index.producer else None
        if producer is not None and producer.op_type == "Transpose" and _is_2d_swap(producer):
            weight = producer.input[0]
        if weight in index.initializers and len(index.initializers[weight].dims) == 2:
            weights.add(weight)
    if not seen:
        return weights, f"name scopes: no MatMul/Gemm has a {NAME_SCOPES_KEY} scope ending in {module!r}"
    if not weights:
        return weights, f"name scopes: nodes {seen} match but none takes a 2-D initializer as its weight"
    return weights, f"name scopes: {len(seen)} node(s) match, weights {sorted(weights)}"


def _by_name(index: GraphIndex, module: str) -> tuple[set[str], str]:
    key = f"{module}.weight"
    weights = {name for name, t in index.initializers.items() if _path_matches(name, key) and len(t.dims) == 2}
    if not weights:
        return weights, f"initializer names: no 2-D initializer named {key!r} or '*.{key}'"
    return weights, f"initializer names: {sorted(weights)}"


def _view(tensor: onnx.TensorProto) -> np.ndarray:
    """The initializer's values; a zero-copy view of ``raw_data`` when the tensor has one."""
    if tensor.raw_data:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def _equal(value: np.ndarray, target: np.ndarray) -> bool:
    """Bitwise-equal values (NaN-safe through the bits), probing one row first to fail fast."""
    if value.shape != target.shape:
        return False
    if not np.array_equal(value[:1], target[:1], equal_nan=True):
        return False
    return bool(np.array_equal(value, target, equal_nan=True))


def _by_value(index: GraphIndex, module: str, base: Mapping[str, np.ndarray] | None) -> tuple[set[str], str]:
    if base is None:
        return set(), "values: not tried (no --base-weights file given)"
    key = next((k for k in base if _path_matches(k, f"{module}.weight")), None)
    if key is None:
        return set(), f"values: the base weights have no tensor '{module}.weight'"
    W = np.asarray(base[key])
    weights = set()
    for name, tensor in index.initializers.items():
        if len(tensor.dims) != 2 or tuple(tensor.dims) not in (W.shape, W.shape[::-1]):
            continue
        value = _view(tensor)
        if not np.issubdtype(value.dtype, np.floating):
            continue
        target = round_to(np.asarray(W, dtype=np.float64), value.dtype)
        if _equal(value, target) or _equal(value, target.T):
            weights.add(name)
    if not weights:
        return weights, f"values: no initializer equals base tensor {key!r} {W.shape} or its transpose"
    return weights, f"values: {sorted(weights)} equal base tensor {key!r}"


def locate_targets(
    model: onnx.ModelProto,
    modules: Iterable[str],
    *,
    base_weights: Mapping[str, np.ndarray] | None = None,
) -> dict[str, list[TargetSite]]:
    """The Linear sites of each module in ``modules`` (see module docstring for the strategies).

    Raises GraphTargetNotFoundError naming every unresolved module and what each strategy saw,
    and UnsupportedGraphError when a found weight is not used as a Linear layer anywhere.
    """
    index = GraphIndex(model.graph)
    scopes = {i: s for i, n in enumerate(model.graph.node) if n.op_type in ("MatMul", "Gemm") and (s := _innermost_scope(n))}
    found: dict[str, list[TargetSite]] = {}
    failures: dict[str, list[str]] = {}
    for module in modules:
        tried = []
        for found_by, strategy in (
            ("name scopes", lambda: _by_scopes(index, module, scopes)),
            ("initializer name", lambda: _by_name(index, module)),
            ("value match", lambda: _by_value(index, module, base_weights)),
        ):
            weights, note = strategy()  # lazily: value matching reads tensors
            if len(weights) == 1:
                weight = next(iter(weights))
                sites = _sites(index, module, weight, found_by)
                if found_by == "name scopes":  # a weight shared with another module keeps that module's nodes
                    sites = [site for site in sites if _path_matches(scopes.get(site.node, ""), module)]
                if not sites:
                    _, notes = index.linear_uses(weight)
                    raise UnsupportedGraphError(
                        f"{module}: weight {weight!r} (found by {found_by}) is not used as a Linear layer "
                        f"(MatMul, Transpose+MatMul, or Gemm){': ' + '; '.join(notes) if notes else ''}"
                    )
                found[module] = sites
                break
            tried.append(note + (" (ambiguous: more than one)" if len(weights) > 1 else ""))
        else:
            failures[module] = tried
    if failures:
        lines = [f"  {module}: " + " | ".join(tried) for module, tried in failures.items()]
        raise GraphTargetNotFoundError(
            f"{len(failures)} adapted module(s) not found in the graph:\n" + "\n".join(lines)
        )
    return found
