"""Find the base weight of each adapted module in an ONNX graph.

A Linear layer y = x W^T (+ b), W [out, in] in torch's layout, appears in a graph as

* ``MatMul(x, W_io)`` with an initializer W_io = W^T [in, out] (torch's dynamo exporter), layout ``in_out``;
* ``MatMul(x, Transpose(W))`` with W [out, in], layout ``out_in``;
* ``Gemm(x, W, b, transB=1)`` (layout ``out_in``) or ``Gemm(x, W_io, b, transB=0)`` (``in_out``).

An Embedding y = W[ids], W [num_embeddings, embedding_dim], is ``Gather(W, ids, axis=0)``
(layout ``rows``); a Conv1d/2d/3d is ``Conv(x, W, b)`` with W [out, in, *k] (layout
``kernel``, group = 1). The module's kind (``kinds``, default ``"linear"``) says which of these
uses count, so a weight tied between an embedding and an output projection gets sites of the
adapted kind only. A site's base bias, when the graph has one, is Gemm's or Conv's third input
or the 1-D initializer of an ``Add`` that is the only reader of a MatMul's output.

A Linear may also be ONNX Runtime's ``MatMulNBits(x, B_q, scales[, zero_points])`` (com.microsoft;
int4/int8 blocks, attributes K = in, N = out; layout ``nbits``): its weight is the quantized
initializer B_q [N, K / block_size, block_size · bits / 8] (:mod:`lora_ref.export.quantized`).
Or a QDQ weight, ``MatMul(x, DequantizeLinear(q, scale[, zero_point]))`` (or Gemm, or behind a
Transpose) as ONNX Runtime's quantizers write it: the weight is the integer initializer q
(int8/uint8/int4/uint4; per-tensor, per-axis or blocked scales), ``dequantize`` the index of its
DequantizeLinear node and ``layout`` q's orientation (``in_out`` / ``out_in``). Its names
(``<path>.weight_quantized``, ``<path>.weight_DQ_Q4``) count as ``<path>.weight`` for the name
strategies: the suffix after ``.weight_`` is ignored.
Or a dynamically quantized weight (``onnxruntime.quantization.quantize_dynamic``): the int8/uint8
initializer W_q [in, out] of ``MatMulInteger(DynamicQuantizeLinear(x), W_q, x_zp, w_zp)`` → Cast
→ ``Mul(·, Mul(x_scale, w_scale))``, or of ORT's fusions ``DynamicQuantizeMatMul(x, W_q, w_scale[, w_zp])``
and ``MatMulIntegerToFloat`` (com.microsoft); ``integer`` is the index of that node, the site's
``node`` the one computing the float output (the scale Mul, or the fused node), ``x`` the float
activation (DynamicQuantizeLinear's input) and ``layout`` ``in_out``. A weight that such a node reads
in any other arrangement is refused (UnsupportedGraphError saying which part differs).

The module path is found four ways, tried in this order for every module:

1. **name scopes**: the dynamo exporter records the module stack of each node in the metadata
   key ``pkg.torch.onnx.name_scopes``; the innermost module scope (second to last entry) must
   equal the module path or end with ``"." + path`` (the exported wrapper adds a prefix); a
   MatMulNBits, MatMulInteger or DynamicQuantizeMatMul node with such a scope (copied from the MatMul
   ORT's quantizer replaced, e.g. by :func:`lora_ref.export.models.ort_dynamic`) counts too;
2. **initializer names**: an initializer named ``<path>.weight`` or ``<prefix>.<path>.weight``;
3. **genai names**: onnxruntime-genai's builder's ``<genai path>.MatMul.weight`` (float, MatMul) or
   ``<genai path>.MatMul.weight_Q…`` (MatMulNBits), with the genai path of :mod:`lora_ref.export.names`;
   a module that is a part of a fused projection (q/k/v of ``qkv_proj``, gate/up of ``gate_up_proj``)
   whose own weight is absent is found as its column slice of the fused weight (``columns``);
4. **values**: with base weights from a safetensors file (key ``<path>.weight``), the
   initializer holding exactly those values (after rounding to its dtype), transposed or not
   (Linear only).

Each strategy considers only floating initializers of the kind's rank (2-D; Conv 3-5-D) read by
the kind's ops. A strategy succeeds when it yields exactly one weight initializer; every place
it is used as a layer of the module's kind becomes a :class:`TargetSite`. Name scopes also succeed
with several initializers of bitwise-equal values (a module reused at several places, e.g.
ALBERT's shared layer, for which torch's exporter folds one copy of the weight per call): every
use of each in the module's scope is a site. (Other strategies keep refusing several: equal
values found by name or value may be different modules.) Modules no strategy resolves are reported together
in one :class:`GraphTargetNotFoundError` that lists what each strategy saw.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lora_ref.dtypes import round_to
from lora_ref.kinds import KindName, kind_of
from lora_ref.kinds import kinds as registered_kinds

from .errors import GraphTargetNotFoundError, UnsupportedGraphError
from .names import fused_parent, genai_module, part_modules, part_widths

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class TargetSite:
    """One use of a module's weight as a Linear layer in the graph.

    ``node`` is the index (in ``graph.node``) of the MatMul/Gemm/Gather/Conv computing y from x;
    ``x`` and ``y`` are its activation input (ids for a Gather) and output; ``weight`` the
    initializer, stored ``[in, out]`` (``layout == "in_out"``), ``[out, in]`` (``"out_in"``),
    ``[num_embeddings, dim]`` (``"rows"``, in = num_embeddings) or ``[out, in, *k]``
    (``"kernel"``); ``found_by`` the strategy used. ``bias`` is the base bias initializer
    ([out]) and ``bias_node`` the node that adds it (``node`` itself for Gemm/Conv), or None.
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
    kind: KindName = "linear"
    weight_shape: tuple[int, ...] = ()
    bias: str | None = None
    bias_node: int | None = None
    #: a part of a fused projection: its output columns [start, stop) of the fused weight, and
    #: every part of that weight as (PEFT module, width) in output order (:mod:`lora_ref.export.names`)
    columns: tuple[int, int] | None = None
    fused: tuple[tuple[str, int], ...] | None = None
    #: a QDQ weight: the index of the DequantizeLinear node that dequantizes ``weight`` for ``node``
    dequantize: int | None = None
    #: a dynamically quantized weight: the index of its MatMulInteger (or fused) node, and the names of its
    #: weight scale and zero point initializers ("" without one), from :func:`integer_output`
    integer: int | None = None
    integer_operands: tuple[str, str] = ("", "")

    @property
    def quantized(self) -> bool:
        """Whether the base weight is quantized (a MatMulNBits, QDQ or dynamically quantized site)."""
        return self.layout == "nbits" or self.dequantize is not None or self.integer is not None


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

    def uses(self, weight: str, kind: str = "linear") -> tuple[list[tuple[int, str, int | None, int | None]], list[str]]:
        """(node index, layout, DequantizeLinear index or None, MatMulInteger / DynamicQuantizeMatMul index or None)
        of every node using initializer ``weight`` as a ``kind`` layer's W (a QDQ one through its
        DequantizeLinear; a dynamically quantized one: the node computing the float output), and notes."""
        uses: list[tuple[int, str, int | None, int | None]] = []
        notes: list[str] = []
        for i, pos in self.consumers.get(weight, []):
            node = self.graph.node[i]
            if is_integer_matmul(node, pos) and kind_of(kind).export.transposable:
                found = integer_output(self, i)
                if isinstance(found, str):
                    notes.append(found)
                else:
                    uses.append((found[0], "in_out", None, i))
                continue  # (_sites refuses the weight when a note was made)
            if is_dequantize(node, pos) and kind_of(kind).export.transposable:
                for use, layout, _, _ in self._float_uses(node.output[0], notes):
                    uses.append((use, layout, i, None))
                continue
            if not kind_of(kind).export.transposable:
                layout = _other_layout(node, pos, kind, notes)
                if layout:
                    uses.append((i, layout, None, None))
                continue
            uses.extend(self._float_uses(weight, notes, only=(i, pos)))
        return uses, notes

    def _float_uses(self, weight: str, notes: list[str], only: tuple[int, int] | None = None) -> list[tuple[int, str, None, None]]:
        """Linear uses of the float tensor ``weight`` (``only``: of that one (node, position))."""
        uses: list[tuple[int, str, None, None]] = []
        for i, pos in [only] if only else self.consumers.get(weight, []):
            node = self.graph.node[i]
            if node.op_type == "Transpose" and pos == 0 and _is_2d_swap(node):
                for j, pos2 in self.consumers.get(node.output[0], []):
                    layout = _linear_layout(self.graph.node[j], pos2, transposed=True, notes=notes)
                    if layout:
                        uses.append((j, layout, None, None))
            else:
                layout = _linear_layout(node, pos, transposed=False, notes=notes)
                if layout:
                    uses.append((i, layout, None, None))
        return uses

    def only_reader(self, name: str, op_type: str) -> int | None:
        """The index of the one node reading tensor ``name`` when it is an ``op_type`` (default domain) and
        ``name`` is no graph output, else None."""
        readers = self.consumers.get(name, [])
        if len(readers) != 1 or name in {o.name for o in self.graph.output}:
            return None
        node = self.graph.node[readers[0][0]]
        return readers[0][0] if node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def dequantized(self, name: str) -> str | None:
        """The integer initializer a DequantizeLinear turns into the tensor ``name`` (a QDQ weight), else None."""
        producer = self.producer.get(name)
        if producer is None or not is_dequantize(self.graph.node[producer], 0):
            return None
        q = self.graph.node[producer].input[0]
        return q if q in self.initializers and _is_quantized(self.initializers[q]) else None


def is_integer_matmul(node: onnx.NodeProto, pos: int) -> bool:
    """Whether ``node`` is a MatMulInteger, or ORT's DynamicQuantizeMatMul / MatMulIntegerToFloat (com.microsoft),
    reading its weight at input ``pos``."""
    return pos == 1 and (node.op_type == "MatMulInteger" and node.domain in ("", "ai.onnx")
                         or node.op_type in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat") and node.domain == "com.microsoft")


def integer_output(index: GraphIndex, integer: int) -> tuple[int, str, str] | str:
    """(the node computing the float output, the weight scale initializer, the weight zero point initializer or "")
    of the dynamically quantized node ``integer`` (module docstring), or a note saying why it is not a site.

    A MatMulInteger counts only in ONNX Runtime's dynamic quantization arrangement: its activation
    and activation zero point are outputs 0 and 2 of one DynamicQuantizeLinear, its weight zero point
    (if any) an initializer, its output read by one Cast to float alone, which one Mul reads alone
    with Mul(DynamicQuantizeLinear's scale, w_scale), w_scale a float initializer (one value, or one
    per output column). Then that Mul's output is x_scale·w_scale·(x_q − x_zp)(W_q − w_zp).
    ORT's fusions of it: DynamicQuantizeMatMul(x, W_q, w_scale[, w_zp, bias]) (one node from the float
    x) and MatMulIntegerToFloat(x_q, W_q, x_scale, w_scale[, x_zp, w_zp, bias]) (when several
    MatMulIntegers share the DynamicQuantizeLinear, whose outputs 0, 1 and 2 it must read).
    """
    graph, inits = index.graph, index.initializers
    node = graph.node[integer]
    label = f"{node.op_type} {node.name or node.output[0]!r}"
    positions = {"MatMulInteger": (None, 2, 3), "DynamicQuantizeMatMul": (2, None, 3), "MatMulIntegerToFloat": (3, 4, 5)}
    scale_at, x_zero_at, zero_at = positions[node.op_type]
    operand = lambda i: node.input[i] if i is not None and len(node.input) > i else ""  # noqa: E731
    weight = inits.get(node.input[1])
    if weight is None or len(weight.dims) != 2 or weight.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
        return f"{label}: its weight is not a 2-D int8/uint8 initializer"
    out_features = int(weight.dims[1])

    def per_column(name: str, floating: bool) -> bool:
        tensor = inits.get(name)
        if tensor is None or int(np.prod(tensor.dims)) not in (1, out_features) or len(tensor.dims) > 1:
            return False
        return tensor.data_type == onnx.TensorProto.FLOAT if floating else tensor.data_type == weight.data_type

    zero_point = operand(zero_at)
    if zero_point and not per_column(zero_point, floating=False):
        return f"{label}: the weight zero point {zero_point!r} is not an initializer of the weight's type, one value or one per column"
    if scale_at is not None and not per_column(operand(scale_at), floating=True):
        return f"{label}: the weight scale {operand(scale_at)!r} is not a float initializer, one value or one per column"
    if node.op_type == "DynamicQuantizeMatMul":
        return integer, operand(scale_at), zero_point
    source = index.producer.get(node.input[0])
    quantize = graph.node[source] if source is not None else None
    if quantize is None or quantize.op_type != "DynamicQuantizeLinear" or operand(x_zero_at) != quantize.output[2] or (
            node.op_type == "MatMulIntegerToFloat" and operand(2) != quantize.output[1]):
        return f"{label}: its activation (scale, zero point) do not come from a DynamicQuantizeLinear"
    if node.op_type == "MatMulIntegerToFloat":
        return integer, operand(scale_at), zero_point
    cast = index.only_reader(node.output[0], "Cast")
    if cast is None or _attr(graph.node[cast], "to", 0) != onnx.TensorProto.FLOAT:
        return f"{label}: its output is not read by one Cast to float alone"
    mul = index.only_reader(graph.node[cast].output[0], "Mul")
    if mul is None:
        return f"{label}: its cast output is not read by one Mul alone"
    scales = [n for n in graph.node[mul].input if n != graph.node[cast].output[0]]
    product = index.producer.get(scales[0]) if len(scales) == 1 else None
    factors = list(graph.node[product].input) if product is not None and graph.node[product].op_type == "Mul" else []
    if len(factors) != 2 or quantize.output[1] not in factors:
        return f"{label}: its output is not scaled by Mul(the activation scale, a weight scale)"
    w_scale = factors[1 - factors.index(quantize.output[1])]
    if not per_column(w_scale, floating=True):
        return f"{label}: the weight scale {w_scale!r} is not a float initializer, one value or one per column"
    return mul, w_scale, zero_point


def is_dequantize(node: onnx.NodeProto, pos: int) -> bool:
    """Whether ``node`` is an ONNX DequantizeLinear reading its quantized data at input ``pos``."""
    return node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and pos == 0


#: quantized ops that take their weight as input 1 (their name scopes count for strategy 1)
_QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")

_QUANTIZED_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _is_quantized(tensor: onnx.TensorProto) -> bool:
    """A 2-D int8/uint8/int4/uint4 initializer (a QDQ Linear weight)."""
    return len(tensor.dims) == 2 and tensor.data_type in _QUANTIZED_TYPES


def _weight_key(name: str) -> str:
    """A QDQ weight's name with its quantizer's suffix dropped (``fc.weight_quantized`` -> ``fc.weight``)."""
    head, found, _ = name.partition(".weight_")
    return head + ".weight" if found else name


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _is_2d_swap(node: onnx.NodeProto) -> bool:
    return list(_attr(node, "perm", [1, 0])) == [1, 0]


def _linear_layout(node: onnx.NodeProto, pos: int, *, transposed: bool, notes: list[str]) -> str | None:
    """``"in_out"``/``"out_in"``/``"nbits"`` if ``node`` uses its input ``pos`` as a Linear weight, else None."""
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and pos == 1 and not transposed:
        return "nbits"
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


def _other_layout(node: onnx.NodeProto, pos: int, kind: str, notes: list[str]) -> str | None:
    """``"rows"`` for an embedding's Gather, ``"kernel"`` for a conv's Conv, else None."""
    facts = kind_of(kind).export
    if node.op_type not in facts.ops or pos != facts.weight_input:
        return None
    if node.op_type == "Gather":
        if _attr(node, "axis", 0) != 0:
            notes.append(f"Gather {node.name or node.output[0]!r} gathers along axis {_attr(node, 'axis', 0)} (not an embedding)")
            return None
        return "rows"
    if node.op_type == "Conv":
        if _attr(node, "group", 1) != 1:
            notes.append(f"Conv {node.name or node.output[0]!r} has group={_attr(node, 'group', 1)} (grouped convs cannot merge a LoRA delta)")
            return None
        return "kernel"
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


def _bias(index: GraphIndex, node_index: int, out_features: int) -> tuple[str | None, int | None]:
    """(base bias initializer [out], the node adding it) of a site, or (None, None)."""
    node = index.graph.node[node_index]
    if node.op_type in ("Gemm", "Conv"):
        name = node.input[2] if len(node.input) > 2 else ""
        tensor = index.initializers.get(name)
        if tensor is not None and int(np.prod(tensor.dims)) == out_features and tensor.dims[-1:] == [out_features]:
            return name, node_index
        return None, None
    if node.op_type != "MatMul":
        return None, None
    readers = index.consumers.get(node.output[0], [])
    if len(readers) != 1 or index.graph.node[readers[0][0]].op_type != "Add":
        return None, None
    add = index.graph.node[readers[0][0]]
    other = add.input[1 - readers[0][1]]
    tensor = index.initializers.get(other)
    if tensor is not None and list(tensor.dims) == [out_features]:
        return other, readers[0][0]
    return None, None


def _sites(index: GraphIndex, module: str, weight: str, found_by: str, kind: str) -> list[TargetSite]:
    """The sites of ``weight``; UnsupportedGraphError when a MatMulInteger-like node reads it outside ORT's dynamic
    quantization arrangement (it multiplies by the weight, so adapting only the other uses would be wrong)."""
    tensor = index.initializers[weight]
    integer_operands = {}
    for i, pos in index.consumers.get(weight, []):
        if is_integer_matmul(index.graph.node[i], pos) and kind_of(kind).export.transposable:
            found = integer_output(index, i)
            if isinstance(found, str):
                raise UnsupportedGraphError(f"{module}: weight {weight!r} (found by {found_by}) cannot take a LoRA there: {found}")
            integer_operands[i] = found[1:]
    uses, _ = index.uses(weight, kind)
    dims = tuple(int(d) for d in tensor.dims)
    sites = []
    for node_index, layout, dequantize, integer in uses:
        node = index.graph.node[node_index]
        if layout == "nbits":
            in_f, out_f = int(_attr(node, "K", 0)), int(_attr(node, "N", 0))
        elif layout in ("in_out", "rows"):
            in_f, out_f = dims
        else:  # out_in, kernel
            out_f, in_f = dims[:2]
        x = node.input[1] if layout == "rows" else node.input[0]
        if integer is not None and index.graph.node[integer].op_type != "DynamicQuantizeMatMul":  # the DynamicQuantizeLinear's input
            x = index.graph.node[index.producer[index.graph.node[integer].input[0]]].input[0]
        bias, bias_node = _bias(index, node_index, out_f)
        sites.append(TargetSite(module, node_index, x, node.output[0], weight, layout, in_f, out_f, found_by,
                                kind, dims, bias, bias_node, dequantize=dequantize, integer=integer,
                                integer_operands=integer_operands.get(integer, ("", ""))))
    return sites


def _by_scopes(index: GraphIndex, module: str, scopes: Mapping[int, str], kind: str) -> tuple[set[str], str]:
    facts = kind_of(kind).export
    op_types, position, ranks = facts.ops, facts.weight_input, facts.weight_ranks
    weights: set[str] = set()
    seen = []
    for i, scope in scopes.items():
        node = index.graph.node[i]
        nbits = facts.transposable and node.op_type in _QUANTIZED_OPS
        if (node.op_type not in op_types and not nbits) or not _path_matches(scope, module):
            continue
        seen.append(node.name or node.output[0])
        if nbits:  # its quantized weight (a scope copied from the MatMul it replaced)
            if node.input[1] in index.initializers:
                weights.add(node.input[1])
            continue
        weight = node.input[position] if len(node.input) > position else ""
        producer = index.graph.node[index.producer[weight]] if weight in index.producer else None
        if facts.transposable and producer is not None and producer.op_type == "Transpose" and _is_2d_swap(producer):
            weight = producer.input[0]
        quantized = index.dequantized(weight) if facts.transposable else None
        if quantized is not None:
            weights.add(quantized)
        elif weight in index.initializers and _is_weight(index.initializers[weight], ranks):
            weights.add(weight)
    what = "/".join(op_types)
    if not seen:
        return weights, f"name scopes: no {what} has a {NAME_SCOPES_KEY} scope ending in {module!r}"
    if not weights:
        return weights, f"name scopes: nodes {seen} match but none takes a floating {'/'.join(map(str, ranks))}-D initializer as its weight"
    return weights, f"name scopes: {len(seen)} node(s) match, weights {sorted(weights)}"


def _is_weight(tensor: onnx.TensorProto, ranks: tuple[int, ...]) -> bool:
    return len(tensor.dims) in ranks and np.issubdtype(helper.tensor_dtype_to_np_dtype(tensor.data_type), np.floating)


def _site_scope(scopes: Mapping[int, str], site: TargetSite) -> str:
    """The name scope of a site's node (a MatMulInteger site: of its MatMulInteger when the scale Mul has none)."""
    scope = scopes.get(site.node)
    return scope if scope is not None or site.integer is None else scopes.get(site.integer, "")


def _by_name(index: GraphIndex, module: str, kind: str) -> tuple[set[str], str]:
    ranks = kind_of(kind).export.weight_ranks
    key = f"{module}.weight"
    weights = {name for name, t in index.initializers.items() if _path_matches(name, key) and _is_weight(t, ranks)}
    if kind_of(kind).export.transposable:  # QDQ / dynamic weights: <path>.weight_quantized read by a DQ or MatMulInteger
        weights |= {name for name in _qdq_weights(index) if _path_matches(_weight_key(name), key)}
    if not weights:
        return weights, f"initializer names: no floating {'/'.join(map(str, ranks))}-D initializer named {key!r} or '*.{key}'"
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


def _identical(index: GraphIndex, weights: set[str]) -> bool:
    """Whether the initializers ``weights`` hold bitwise-equal values (copies of one module's weight)."""
    first, *rest = (_view(index.initializers[name]) for name in sorted(weights))
    return all(value.dtype == first.dtype and _equal(value, first) for value in rest)


def _by_value(index: GraphIndex, module: str, base: Mapping[str, np.ndarray] | None, kind: str) -> tuple[set[str], str]:
    if base is None:
        return set(), "values: not tried (no --base-weights file given)"
    key = next((k for k in base if _path_matches(k, f"{module}.weight")), None)
    if key is None:
        return set(), f"values: the base weights have no tensor '{module}.weight'"
    W = np.asarray(base[key])
    facts = kind_of(kind).export
    shapes = (W.shape, W.shape[::-1]) if facts.transposable else (W.shape,)  # only a Linear's weight may be transposed
    weights = set()
    for name, tensor in index.initializers.items():
        if tuple(tensor.dims) not in shapes or not _is_weight(tensor, facts.weight_ranks):
            continue
        value = _view(tensor)
        target = round_to(np.asarray(W, dtype=np.float64), value.dtype)
        if _equal(value, target) or (facts.transposable and _equal(value, target.T)):
            weights.add(name)
    if not weights:
        return weights, f"values: no initializer equals base tensor {key!r} {W.shape} or its transpose"
    return weights, f"values: {sorted(weights)} equal base tensor {key!r}"


def _qdq_weights(index: GraphIndex) -> list[str]:
    """The integer initializers that a DequantizeLinear dequantizes (QDQ weights) or a MatMulInteger (or one of
    ORT's fusions of it) multiplies by (dynamically quantized weights)."""
    return [name for name, t in index.initializers.items() if _is_quantized(t)
            and any(is_dequantize(index.graph.node[i], pos) or is_integer_matmul(index.graph.node[i], pos)
                    for i, pos in index.consumers.get(name, []))]


def _genai_weights(index: GraphIndex, path: str) -> set[str]:
    """Initializers genai's builder names for the Linear at genai path ``path`` (float MatMul or MatMulNBits)."""
    stem = f"{path}.MatMul.weight"
    found = set()
    for name, tensor in index.initializers.items():
        if name == stem and _is_weight(tensor, (2,)):
            found.add(name)
        elif name.startswith(stem + "_") and any(
                name.startswith(stem + "_Q") and index.graph.node[i].op_type == "MatMulNBits" and pos == 1
                or _is_quantized(tensor) and is_dequantize(index.graph.node[i], pos) for i, pos in index.consumers.get(name, [])):
            found.add(name)
    return found


def _by_genai(index: GraphIndex, module: str, kind: str) -> tuple[set[str], str, str | None]:
    """(weights, note, fused projection path or None) by genai's names (module docstring, strategy 3)."""
    if not kind_of(kind).export.transposable:
        return set(), "genai names: Linear modules only", None
    path = genai_module(module)
    weights = _genai_weights(index, path)
    if weights:
        return weights, f"genai names: {sorted(weights)}", None
    parent = fused_parent(module)
    if parent is not None:
        fused = _genai_weights(index, genai_module(parent[0]))
        if fused:
            return fused, f"genai names: fused {sorted(fused)}", parent[0]
    return set(), f"genai names: no {path}.MatMul.weight (float, _Q… for MatMulNBits or _… for QDQ)" + (
        f" nor fused {genai_module(parent[0])}.MatMul.weight" if parent else ""), None


def _fused_slice(site: TargetSite, fused_path: str, widths: Mapping[str, int]) -> TargetSite:
    """``site`` of the whole fused weight narrowed to its module's columns (UnsupportedGraphError when undetermined)."""
    _, name, part = fused_parent(site.module)
    parts = part_modules(fused_path, name)
    sizes = part_widths(name, parts, site.out_features, {m: w for m, w in widths.items() if m in parts})
    if sizes is None:
        raise UnsupportedGraphError(
            f"{site.module}: cannot split the fused weight {site.weight!r} ({site.out_features} outputs) into "
            f"{[p.rpartition('.')[2] for p in parts]}: the adapters give widths {dict((m, widths[m]) for m in parts if m in widths)}"
        )
    start = sum(sizes[:part])
    return replace(site, out_features=sizes[part], columns=(start, start + sizes[part]), fused=tuple(zip(parts, sizes)),
                   bias=None, bias_node=None)


def locate_targets(
    model: onnx.ModelProto,
    modules: Iterable[str],
    *,
    base_weights: Mapping[str, np.ndarray] | None = None,
    kinds: Mapping[str, str] | None = None,
    widths: Mapping[str, int] | None = None,
) -> dict[str, list[TargetSite]]:
    """The sites of each module in ``modules`` (see module docstring for the strategies).

    ``widths`` (module -> out features, e.g. the adapters' B rows) splits fused weights into parts.
    ``kinds`` maps a module to its layer kind (``"linear"``, ``"embedding"``, ``"conv"``;
    default linear). Raises GraphTargetNotFoundError naming every unresolved module and what
    each strategy saw, and UnsupportedGraphError when a found weight is not used as a layer of
    that kind anywhere.
    """
    index = GraphIndex(model.graph)
    op_types = {op for kind in registered_kinds().values() for op in kind.export.ops} | set(_QUANTIZED_OPS)
    scopes = {i: s for i, n in enumerate(model.graph.node) if n.op_type in op_types and (s := _innermost_scope(n))}
    found: dict[str, list[TargetSite]] = {}
    failures: dict[str, list[str]] = {}
    for module in modules:
        kind = (kinds or {}).get(module, "linear")
        if kind not in registered_kinds():
            raise UnsupportedGraphError(f"{module}: layer kind {kind!r} cannot be located (kinds: {tuple(registered_kinds())})")
        tried = []
        fused: list[str | None] = [None]

        def genai_strategy():
            weights, note, fused[0] = _by_genai(index, module, kind)
            return weights, note

        for found_by, strategy in (
            ("name scopes", lambda: _by_scopes(index, module, scopes, kind)),
            ("initializer name", lambda: _by_name(index, module, kind)),
            ("genai names", genai_strategy),
            ("value match", lambda: _by_value(index, module, base_weights, kind)),
        ):
            weights, note = strategy()  # lazily: value matching reads tensors
            if found_by == "name scopes" and len(weights) > 1 and _identical(index, weights):  # one module, several calls (ALBERT)
                sites = [site for weight in sorted(weights) for site in _sites(index, module, weight, found_by, kind)
                         if _path_matches(_site_scope(scopes, site), module)]
                found[module] = sorted(sites, key=lambda site: site.node)
                break
            if len(weights) == 1:
                weight = next(iter(weights))
                sites = _sites(index, module, weight, found_by, kind)
                if found_by == "genai names" and fused[0] is not None:
                    sites = [_fused_slice(site, fused[0], widths or {}) for site in sites]
                if found_by == "name scopes":  # a weight shared with another module keeps that module's nodes
                    sites = [site for site in sites if _path_matches(_site_scope(scopes, site), module)]
                if not sites:
                    _, notes = index.uses(weight, kind)
                    raise UnsupportedGraphError(
                        f"{module}: weight {weight!r} (found by {found_by}) is not used as a {kind} layer "
                        f"({kind_of(kind).export.form}){': ' + '; '.join(notes) if notes else ''}"
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
