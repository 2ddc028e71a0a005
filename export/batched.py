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
[batch, L, r], then d = t @ B_s as above (ids must lie in [0, V), as torch requires).
Requires the batch to be the leading axis of every targeted Linear's input. Indices outside
[-1, N) are refused by :mod:`lora_ref.export.runtime` before a run (ONNX Runtime would raise an
untyped error, or wrap negative indices silently).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_ref.adapter import Adapter

from .editing import Namer, check_fits, elem_type, lora_bias_term, lora_factors, np_dtype, rename_output, splice
from .errors import ExportConfigError, UnsupportedGraphError
from .graphio import default_opset
from .locate import TargetSite

INDEX_INPUT = "adapter_index"
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
    """(bank_A [N, in, r_max], bank_B [N, r_max, out]) for ``module``; zeros for adapters without it."""
    users = [a for a in adapters if module in a.modules]
    for adapter in users:
        check_fits(adapter, module, site, "batched")
    r_max = max(a.modules[module].rank for a in users)
    if max_rank is not None:
        if max_rank < r_max:
            raise ExportConfigError(f"{module}: an adapter has rank {r_max}, above --max-rank {max_rank}")
        r_max = max_rank
    bank_a = np.zeros((len(adapters), site.in_features, r_max), dtype)
    bank_b = np.zeros((len(adapters), r_max, site.out_features), dtype)
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
    constants: dict[tuple[int, ...], str] = {}

    def constant(*values: int) -> str:
        """A shared int64 initializer holding ``values``."""
        if values not in constants:
            constants[values] = namer("lora_i64_" + "_".join(str(v).replace("-", "m") for v in values))
            graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), constants[values]))
        return constants[values]

    index_col: str | None = None
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
        r_axis = f"{module}.lora_r_max"
        graph.input.append(helper.make_tensor_value_info(a_name, data_type, [ADAPTER_AXIS, first.in_features, r_axis]))
        graph.input.append(helper.make_tensor_value_info(b_name, data_type, [ADAPTER_AXIS, r_axis, first.out_features]))
        a_rows, b_rows = namer(f"{module}.lora_A.rows"), namer(f"{module}.lora_B.rows")
        embedding = first.kind == "embedding"
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
        if data_type not in zeros:
            zeros[data_type] = namer(f"lora_zero_{data_type}")
            graph.initializer.append(numpy_helper.from_array(np.array(0, np_dtype(data_type)), zeros[data_type]))
        for site in module_sites:
            base = rename_output(graph, site, namer)
            x3, xa, d3, masked, shape, delta = (
                namer(f"{module}.lora_{n}") for n in ("x_rows", "xA", "delta_rows", "delta_kept", "out_shape", "delta")
            )
            if embedding:
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
    return out
