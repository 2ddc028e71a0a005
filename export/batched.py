"""The batched graph: N adapters in per-module banks, one adapter (or none) per batch row.

For module m and adapters 0..N-1 (ranks zero-padded to r_max, scales folded into B):

    m.lora_A.bank  [N, in, r_max]     bank_A[i] = A_i^T (zero columns beyond r_i)
    m.lora_B.bank  [N, r_max, out]    bank_B[i] = s_i · B_i^T (zero rows beyond r_i)

are initializers that are also graph inputs (overridable: feed another bank of any N / r_max).
A module an adapter has ``lora_bias`` on also gets

    m.lora_B.bias.bank  [N, out]      bank_b[i] = round_t(s_i · lora_bias_i) (zeros without one)

gathered per row and added to that row's delta: d += Unsqueeze(Gather(bank_b, i'), 1).
The graph input ``adapter_index`` (int64 [batch]) picks the adapter of each row; -1 means the
base model. For a site with input x [batch, ..., in] and base output y:

    i'   = max(index, 0);  keep = index >= 0
    A_s  = Gather(bank_A, i') [batch, in, r];   B_s = Gather(bank_B, i') [batch, r, out]
    d    = Reshape(x, [batch, -1, in]) @ A_s @ B_s          (batched MatMul)
    y   += Reshape(Where(keep, d, 0), shape(y))

Rows with -1 get exact zeros (Where, not a multiply, so a non-finite delta cannot leak in).
An Embedding site (ids [batch, ...], banks of A_g = lora_embedding_A^T [V, r] and
B_g = s·lora_embedding_B^T [r, D]) looks its rows up in the bank viewed as one table
[N·V, r] instead of multiplying: t = Gather(Flatten(bank_A), i'·V + Reshape(ids, [batch, -1]))
[batch, L, r], then d = t @ B_s as above. The ids must lie in [0, V), as torch requires: any
other id would read another adapter's rows of the table, so the model's metadata_props key
``lora_ref.embedding_ids`` records (JSON) each embedding site's ids tensor and V, and
:meth:`lora_ref.export.runtime.LoraSession.run_batched` refuses ids outside [0, V) before a run.
A Conv site (x [batch, C, *S], base kernel W [O, C, *k], group 1) has banks in PEFT's conv
layouts, bank_A [N, r_max, C, *k] (A_i) and bank_B [N, O, r_max, 1...] (s_i·B_i). ONNX's Conv
takes one kernel for the whole batch (and ``group`` is a static attribute, so the batch cannot
be folded into groups), so every row is convolved with all N adapters' A at once and keeps only
its own channels:

    t   = Conv(x, Reshape(bank_A, [N·r_max, C, *k]))       [batch, N·r_max, *S']  base geometry
    own = Equal(index[:, None], channel // r_max)           [batch, N·r_max]      (-1: none own)
    d   = Conv(Where(own, t, 0), B_cat; 1x1)                B_cat = bank_B as [O, N·r_max, 1...]
    y  += d (+ Where(keep, Gather(bank_b, i'), 0) along the channels, with lora_bias)

The other adapters' channels are exact zeros, so each row's delta sums the same non-zero terms
as its own adapter's conv pair (the error bound is the dynamic graph's). The cost is what grows:
the A conv computes N·r_max channels per row instead of r (multiply-adds ~ N·r_max·C·Πk per
output position, against O·C·Πk for the base conv) and the 1x1 conv N·r_max·O, so this pays off
while N·r_max stays small next to O; beyond that, run one dynamic session per adapter.
Requires the batch to be the leading axis of every targeted Linear's input. Indices outside
[-1, N) are refused by :mod:`lora_ref.export.runtime` before a run (ONNX Runtime would raise an
untyped error, or wrap negative indices silently).
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_ref.adapter import Adapter
from lora_ref.kinds import kind_of

from .editing import (
    Namer,
    check_fits,
    conv_with_base_geometry,
    elem_type,
    factor_shapes,
    lora_bias_term,
    lora_factors,
    np_dtype,
    rename_output,
    splice,
)
from .errors import ExportConfigError, UnsupportedGraphError
from .graphio import default_opset
from .locate import TargetSite

INDEX_INPUT = "adapter_index"
#: metadata_props key: JSON {ids tensor name: V} of the batched graph's Embedding LoRA sites.
EMBEDDING_IDS_KEY = "lora_ref.embedding_ids"
ADAPTER_AXIS = "lora_adapters"


def bank_a_name(module: str) -> str:
    return f"{module}.lora_A.bank"


def bank_b_name(module: str) -> str:
    return f"{module}.lora_B.bank"


def bank_bias_name(module: str) -> str:
    return f"{module}.lora_B.bias.bank"


def build_bias_bank(module: str, site: TargetSite, adapters: Sequence[Adapter], dtype: np.dtype) -> np.ndarray | None:
    """bank_b [N, out] = round_t(s_i · lora_bias_i) (zero rows for adapters without), or None when no adapter has one."""
    if not any(module in a.modules and a.modules[module].lora_bias is not None for a in adapters):
        return None
    bank = np.zeros((len(adapters), site.out_features), dtype)
    for i, adapter in enumerate(adapters):
        if module in adapter.modules:
            bank[i] = lora_bias_term(adapter, module, dtype)
    return bank


def build_banks(
    module: str, site: TargetSite, adapters: Sequence[Adapter], dtype: np.dtype, max_rank: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(bank_A [N, in, r_max], bank_B [N, r_max, out]) for ``module``; zeros for adapters without it.

    A Conv module's banks are [N, r_max, C, *k] and [N, O, r_max, 1...] (module docstring).
    """
    users = [a for a in adapters if module in a.modules]
    for adapter in users:
        check_fits(adapter, module, site, "batched")
    r_max = max(a.modules[module].rank for a in users)
    if max_rank is not None:
        if max_rank < r_max:
            raise ExportConfigError(f"{module}: an adapter has rank {r_max}, above --max-rank {max_rank}")
        r_max = max_rank
    a_shape, b_shape = factor_shapes(site, r_max)
    bank_a = np.zeros((len(adapters), *a_shape), dtype)
    bank_b = np.zeros((len(adapters), *b_shape), dtype)
    for i, adapter in enumerate(adapters):
        if module in adapter.modules:
            bank_a[i], bank_b[i] = lora_factors(adapter, module, dtype, pad_to=r_max)
    return bank_a, bank_b


def build_batched(
    model: onnx.ModelProto,
    sites: Mapping[str, Sequence[TargetSite]],
    adapters: Sequence[Adapter],
    *,
    max_rank: int | None = None,
    progress=None,
) -> onnx.ModelProto:
    """A copy of ``model`` with adapter banks and a per-row ``adapter_index`` (see module docstring)."""
    if not adapters:
        raise ExportConfigError("a batched graph needs at least one adapter")
    if default_opset(model) < 13:
        raise ExportConfigError(f"a batched graph needs opset >= 13 (Unsqueeze with axes input); the model has {default_opset(model)}")
    out = copy.deepcopy(model)
    graph = out.graph
    namer = Namer(graph)
    if INDEX_INPUT in namer.used:
        raise UnsupportedGraphError(f"the graph already has a tensor named {INDEX_INPUT!r}")
    namer.used.add(INDEX_INPUT)
    graph.input.append(helper.make_tensor_value_info(INDEX_INPUT, TensorProto.INT64, ["batch"]))
    zero_i, axes, index, keep_1d, keep = (namer(n) for n in ("lora_zero_i64", "lora_axes_12", "lora_index", "lora_keep_1d", "lora_keep"))
    graph.initializer.extend([
        numpy_helper.from_array(np.array(0, np.int64), zero_i),
        numpy_helper.from_array(np.array([1, 2], np.int64), axes),
    ])
    prelude = [
        helper.make_node("Max", [INDEX_INPUT, zero_i], [index], name=namer("lora_index_clamp")),
        helper.make_node("GreaterOrEqual", [INDEX_INPUT, zero_i], [keep_1d], name=namer("lora_index_valid")),
        helper.make_node("Unsqueeze", [keep_1d, axes], [keep], name=namer("lora_keep_unsqueeze")),
    ]
    zeros: dict[int, str] = {}
    constants: dict[tuple, str] = {}

    def constant(*values: int, scalar: bool = False) -> str:
        """A shared int64 initializer holding ``values`` (a 0-D one for ``scalar``)."""
        key = (*values, "scalar") if scalar else values
        if key not in constants:
            constants[key] = namer("lora_i64_" + "_".join(str(v).replace("-", "m") for v in key))
            graph.initializer.append(numpy_helper.from_array(np.array(values[0] if scalar else values, np.int64), constants[key]))
        return constants[key]

    index_col: str | None = None
    embedding_ids: dict[str, int] = {}
    after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for step, (module, module_sites) in enumerate(sites.items()):
        if progress:
            progress(step, len(sites), module)
        first = module_sites[0]
        data_type = elem_type(graph, first.weight)
        bank_a, bank_b = build_banks(module, first, adapters, np_dtype(data_type), max_rank)
        a_name, b_name = bank_a_name(module), bank_b_name(module)
        bias_bank = build_bias_bank(module, first, adapters, np_dtype(data_type))
        banks = [(a_name, bank_a), (b_name, bank_b)] + ([(bank_bias_name(module), bias_bank)] if bias_bank is not None else [])
        for name, bank in banks:
            if name in namer.used:
                raise UnsupportedGraphError(f"{module}: the graph already has a tensor named {name!r}")
            namer.used.add(name)
            graph.initializer.append(numpy_helper.from_array(bank, name))
        a_shape, b_shape = factor_shapes(first, f"{module}.lora_r_max")
        graph.input.append(helper.make_tensor_value_info(a_name, data_type, [ADAPTER_AXIS, *a_shape]))
        graph.input.append(helper.make_tensor_value_info(b_name, data_type, [ADAPTER_AXIS, *b_shape]))
        if data_type not in zeros:
            zeros[data_type] = namer(f"lora_zero_{data_type}")
            graph.initializer.append(numpy_helper.from_array(np.array(0, np_dtype(data_type)), zeros[data_type]))
        if kind_of(first.kind).export.factor_layout == "kernel":
            bias_name = bank_bias_name(module) if bias_bank is not None else None
            if bias_name:
                graph.input.append(helper.make_tensor_value_info(bias_name, data_type, [ADAPTER_AXIS, first.out_features]))
            nodes, site_nodes = _conv_banks(first, a_name, b_name, bias_name, keep_1d, index, zeros[data_type], namer, constant)
            prelude += nodes
            for site in module_sites:
                after[site.node] += site_nodes(graph, site)
            continue
        a_rows, b_rows = namer(f"{module}.lora_A.rows"), namer(f"{module}.lora_B.rows")
        embedding = kind_of(first.kind).export.lora_a_op == "Gather"
        if (embedding or bias_bank is not None) and index_col is None:
            index_col = namer("lora_index_col")
            prelude.append(helper.make_node("Unsqueeze", [index, constant(1)], [index_col], name=namer("lora_index_unsqueeze")))
        if embedding:  # bank_A as one table [N·V, r]; row i·V + id is adapter i's A^T[id]
            offset = namer(f"{module}.lora_A.offset")
            prelude += [
                helper.make_node("Flatten", [a_name], [a_rows], axis=2, name=namer(f"{module}.lora_A.flatten")),
                helper.make_node("Mul", [index_col, constant(first.in_features)], [offset], name=namer(f"{module}.lora_A.offset")),
            ]
        else:
            prelude.append(helper.make_node("Gather", [a_name, index], [a_rows], axis=0, name=namer(f"{module}.lora_A.gather")))
        prelude.append(helper.make_node("Gather", [b_name, index], [b_rows], axis=0, name=namer(f"{module}.lora_B.gather")))
        bias_rows = None
        if bias_bank is not None:
            bias_name, gathered, bias_rows = bank_bias_name(module), namer(f"{module}.lora_B.bias.rows_2d"), namer(f"{module}.lora_B.bias.rows")
            graph.input.append(helper.make_tensor_value_info(bias_name, data_type, [ADAPTER_AXIS, first.out_features]))
            prelude += [
                helper.make_node("Gather", [bias_name, index], [gathered], axis=0, name=namer(f"{module}.lora_B.bias.gather")),
                helper.make_node("Unsqueeze", [gathered, constant(1)], [bias_rows], name=namer(f"{module}.lora_B.bias.unsqueeze")),
            ]
        for site in module_sites:
            base = rename_output(graph, site, namer)
            x3, xa, d3, masked, shape, delta = (
                namer(f"{module}.lora_{n}") for n in ("x_rows", "xA", "delta_rows", "delta_kept", "out_shape", "delta")
            )
            if embedding:
                embedding_ids[site.x] = min(site.in_features, embedding_ids.get(site.x, site.in_features))
                ids64, rows = namer(f"{module}.lora_ids_i64"), namer(f"{module}.lora_ids_rows")
                nodes = [
                    helper.make_node("Cast", [site.x], [ids64], to=TensorProto.INT64, name=namer(f"{module}.lora_ids_cast")),
                    helper.make_node("Reshape", [ids64, constant(0, -1)], [rows], name=namer(f"{module}.lora_reshape_in")),
                    helper.make_node("Add", [rows, offset], [x3], name=namer(f"{module}.lora_ids_offset")),
                    helper.make_node("Gather", [a_rows, x3], [xa], axis=0, name=namer(f"{module}.lora_A")),
                ]
            else:
                nodes = [
                    helper.make_node("Reshape", [site.x, constant(0, -1, first.in_features)], [x3], name=namer(f"{module}.lora_reshape_in")),
                    helper.make_node("MatMul", [x3, a_rows], [xa], name=namer(f"{module}.lora_A")),
                ]
            nodes.append(helper.make_node("MatMul", [xa, b_rows], [d3], name=namer(f"{module}.lora_B")))
            if bias_rows is not None:
                d3_plain, d3 = d3, namer(f"{module}.lora_delta_rows_bias")
                nodes.append(helper.make_node("Add", [d3_plain, bias_rows], [d3], name=namer(f"{module}.lora_bias")))
            after[site.node] += nodes + [
                helper.make_node("Where", [keep, d3, zeros[data_type]], [masked], name=namer(f"{module}.lora_keep")),
                helper.make_node("Shape", [base], [shape], name=namer(f"{module}.lora_shape")),
                helper.make_node("Reshape", [masked, shape], [delta], name=namer(f"{module}.lora_reshape_out")),
                helper.make_node("Add", [base, delta], [site.y], name=namer(f"{module}.lora_add")),
            ]
    splice(graph, after, prelude)
    for i in reversed([i for i, prop in enumerate(out.metadata_props) if prop.key == EMBEDDING_IDS_KEY]):
        del out.metadata_props[i]
    if embedding_ids:
        entry = out.metadata_props.add()
        entry.key, entry.value = EMBEDDING_IDS_KEY, json.dumps(embedding_ids, sort_keys=True)
    return out


def _conv_banks(first: TargetSite, a_bank: str, b_bank: str, bias_bank: str | None, keep_1d: str, index: str, zero: str,
                namer: Namer, constant) -> tuple[list[onnx.NodeProto], object]:
    """The once-per-run nodes of a Conv module's banks, and a function giving each site's nodes (module docstring).

    Prelude: A_cat = Reshape(bank_A, [-1, C, *k]); B_cat = Reshape(Transpose(bank_B, [1, 0, 2, ...]), [O, -1, 1...]);
    own [batch, N·r_max, 1...] = Equal(adapter_index[:, None], Range(0, N·r_max) // r_max); the row's masked bias [batch, O, 1...].
    """
    module, d = first.module, len(first.weight_shape) - 2
    spatial = list(range(2, 2 + d))
    ones = [1] * d
    n = lambda what: namer(f"{module}.lora_{what}")  # noqa: E731 - a local naming shorthand
    a_cat, b_perm, b_cat, a_shape, cat_shape, r_max, nr, channels, owner, raw_col, own_2d, own = (
        n(w) for w in ("A.cat", "B.perm", "B.cat", "A.shape", "A.cat_shape", "r_max", "channels", "channel_ids", "channel_owner",
                       "index_col", "own_2d", "own"))
    nodes = [
        helper.make_node("Reshape", [a_bank, constant(-1, *first.weight_shape[1:])], [a_cat], name=n("A.concat")),
        helper.make_node("Transpose", [b_bank], [b_perm], perm=[1, 0, 2, *[3 + i for i in range(d)]], name=n("B.transpose")),
        helper.make_node("Reshape", [b_perm, constant(first.out_features, -1, *ones)], [b_cat], name=n("B.concat")),
        helper.make_node("Shape", [a_bank], [a_shape], name=n("A.shape")),
        helper.make_node("Gather", [a_shape, constant(1, scalar=True)], [r_max], axis=0, name=n("A.r_max")),
        helper.make_node("Shape", [a_cat], [cat_shape], name=n("A.cat_shape")),
        helper.make_node("Gather", [cat_shape, constant(0, scalar=True)], [nr], axis=0, name=n("A.channels")),
        helper.make_node("Range", [constant(0, scalar=True), nr, constant(1, scalar=True)], [channels], name=n("A.range")),
        helper.make_node("Div", [channels, r_max], [owner], name=n("A.owner")),
        helper.make_node("Unsqueeze", [INDEX_INPUT, constant(1)], [raw_col], name=n("index_unsqueeze")),
        helper.make_node("Equal", [raw_col, owner], [own_2d], name=n("own")),
        helper.make_node("Unsqueeze", [own_2d, constant(*spatial)], [own], name=n("own_unsqueeze")),
    ]
    bias_rows = None
    if bias_bank is not None:
        gathered, keep_col, kept, bias_rows = (n(w) for w in ("B.bias.rows_2d", "keep_col", "B.bias.kept", "B.bias.rows"))
        nodes += [
            helper.make_node("Gather", [bias_bank, index], [gathered], axis=0, name=n("B.bias.gather")),
            helper.make_node("Unsqueeze", [keep_1d, constant(1)], [keep_col], name=n("keep_col")),
            helper.make_node("Where", [keep_col, gathered, zero], [kept], name=n("B.bias.keep")),
            helper.make_node("Unsqueeze", [kept, constant(*spatial)], [bias_rows], name=n("B.bias.unsqueeze")),
        ]

    def site_nodes(graph: onnx.GraphProto, site: TargetSite) -> list[onnx.NodeProto]:
        t, masked, delta = n("xA_all"), n("xA_own"), n("delta")
        conv_a = conv_with_base_geometry(graph, site, a_cat, t, n("A"))
        base = rename_output(graph, site, namer)
        site_list = [
            conv_a,
            helper.make_node("Where", [own, t, zero], [masked], name=n("A.own")),
            helper.make_node("Conv", [masked, b_cat], [delta], kernel_shape=ones, name=n("B")),
        ]
        if bias_rows is not None:
            plain, delta = delta, n("delta_bias")
            site_list.append(helper.make_node("Add", [plain, bias_rows], [delta], name=n("bias")))
        site_list.append(helper.make_node("Add", [base, delta], [site.y], name=n("add")))
        return site_list

    return nodes, site_nodes
