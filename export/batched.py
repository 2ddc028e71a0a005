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

    i'   = max(index, 0) (checked, see _Builder);  keep = index >= 0
    A_s  = Gather(bank_A, i') [batch, in, r];   B_s = Gather(bank_B, i') [batch, r, out]
    d    = Where(keep, Reshape(x, [batch, -1, in]) @ A_s, 0) @ B_s     (batched MatMul)
    y   += Reshape(d, shape(y))                                       (no Reshapes for x [batch, L, in])

Rows with -1 get exact zeros: their x·A_s is selected to zeros (Where, not a multiply, so a
non-finite x·A cannot leak in) before the product with the finite B_s. The selection is on the
r-wide tensor, not the out-wide delta.
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
A DoRA module (any kind) gets a bank of gains, not magnitudes, since the banks are
fixed at export:

    m.lora_dora_gain.bank  [N, out]   bank_g[i] = round_t(m_i / ‖W + ΔW_i‖) (float64, the core's norm;
                                      1 for adapters without DoRA on m)

and each site ends in y = Where(keep, Gather(bank_g, i'), 1)[:, None, :] ∘ (y0' + d) + b on the
[batch, L, out] view (Conv: g_row [batch, O, 1...]; y0' without its bias: a Gemm's C or a
Conv's bias moves after the gain), so -1 rows are
scaled by exactly 1 and stay the base model bit for bit. The gain costs one multiply per
output element; computing the N norms in the graph instead would cost N·in·out·r per run for
no gain in accuracy. A fed replacement of the A/B banks needs its own gain bank.
Requires the batch to be the leading axis of every targeted Linear's input. Indices outside
[-1, N) are refused by :mod:`lora_ref.export.runtime` (and the Triton client helper) before a
run with a typed error; fed to the graph anyway they fail the run (see :class:`_Builder`)
instead of wrapping (Gather takes negative indices) or running the base model.

Cost (issue 13, bench/bench_onnx.py): per row and module the Gathers copy r·(in + out) bank
values and the LoRA products add r·(in + out) multiply-adds per token, next to in·out for the
base. With every row on its own adapter a run reads each adapter's factors once, as many
single-adapter runs do; for 16 adapters of rank 16 on a d=1024 block (12.6 M weights) that is
4.7 M values, 37% of the base weights, and one batched decode step (1 token per row) costs
about 1.3x the base graph's batched run. The speedup over one-row runs is bounded by what the
base graph alone gains from batching (printed beside it): with 32 tokens per row that is about
1.1x on one CPU thread, as the base GEMMs already have 32 rows.

Alternatives measured (ONNX Runtime CPU, one thread, one run on a loaded 2-core machine; that
block, 16 rows on 16 adapters; cost over the base graph's batched run at 1 token, all within
noise of each other at 32 tokens):
per-row Gathers as above 1.33x; x·A for every adapter at once (MatMul of [1, rows, in] with the
[N, in, r] bank, each row's own r columns selected with Where and ReduceSum) with gathered B
1.53x; the same x·A_all masked to each row's own columns ([rows, N·r], as the Conv sites do)
times the bank as one [N·r, out] matrix 1.70x; gathered A with that stacked B 1.61x. The
stacked forms avoid the copies but multiply by all N adapters' factors, N times the LoRA
multiply-adds, which costs more than the copies whenever N·r is not small next to in and out.

Providers: only standard ops (Gather, MatMul with a batch axis, Where, Shape, Range, Less, Max,
Sub, Unsqueeze, Reshape, Flatten, Cast, Equal, And, Or, ReduceSum, Min); TensorRT runs int64 index arithmetic and
Range with data-dependent bounds only in recent versions, and ORT hands any node it refuses to
the CUDA provider. The in-graph index check does not rely on Gather refusing an out-of-range
index (ORT's CUDA Gather writes 0 instead, gather_impl.cu): a Reshape guard fails the run on
every provider (:class:`_Builder`).
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
from lora_ref.deltas import delta_for
from lora_ref.dtypes import round_to
from lora_ref.kinds import kind_of

from .editing import (
    Namer,
    check_fits,
    conv_with_base_geometry,
    detach_bias,
    dora_scale,
    factor_shapes,
    lora_bias_term,
    lora_factors,
    np_dtype,
    rename_output,
    splice,
)
from .errors import ExportConfigError, UnsupportedGraphError
from .graphio import default_opset
from .fused import slot_groups, stacked_factors
from .locate import TargetSite
from .merged import transposed_layout
from .names import SlotLayout
from .quantized import branch_site, float_type

INDEX_INPUT = "adapter_index"
#: The name of the prelude's Reshape that fails the run on any provider when an index is outside [-1, N)
#: (ONNX Runtime's error names the node).
INDEX_GUARD = "lora_adapter_index_outside_range"
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


def bank_gain_name(module: str) -> str:
    return f"{module}.lora_dora_gain.bank"


def build_gain_bank(module: str, site: TargetSite, stored: np.ndarray, adapters: Sequence[Adapter], dtype: np.dtype) -> np.ndarray | None:
    """bank_g [N, out] = round_t(m_i / ‖W + ΔW_i‖_c) in float64 (1 for adapters without DoRA here), or None when none has it.

    ``stored`` is the graph's base weight (as the graph stores it); the norm is the core's
    (:func:`lora_ref.deltas.delta_for` with the unmerged W), so each row's gain is the merged graph's.
    """
    if not any(module in a.modules and a.modules[module].magnitude is not None for a in adapters):
        return None
    bank = np.ones((len(adapters), site.out_features), dtype)
    for i, adapter in enumerate(adapters):
        if module in adapter.modules and adapter.modules[module].magnitude is not None:
            W = stored.T if transposed_layout(adapter, site.layout) else stored
            bank[i] = round_to(delta_for(adapter, module, base=W).gain, dtype)
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
            bank_a[i], bank_b[i] = lora_factors(adapter, module, dtype, pad_to=r_max, mode="batched")
    return bank_a, bank_b


class _Builder:
    """The state one batched rewrite shares across modules: the graph, fresh names, shared constants and the prelude.

    The prelude (nodes run once, before the base graph) validates and clamps ``adapter_index``:

        N     = Shape(first bank)[0]
        i''   = Where(index < -1, index - N, Max(index, 0))    every invalid value lands outside [-N, N)
        i'    = Gather(Range(0, N), i'')                       = i'' for valid rows; ORT refuses the run otherwise
        keep  = index >= 0

            bad   = Or(index < -1, index >= N);   i' = Reshape(i', [−1 − Min(ReduceSum(bad), 1)])

so an index outside [-1, N) fails the run (ORT's CPU Gather names the offending value and the
range [-N, N-1]) instead of wrapping (Gather takes negative indices) or silently running the
base model or adapter 0. Providers whose Gather writes 0 for an out-of-range index (ORT's CUDA
kernel, gather_impl.cu) still fail: the guard's Reshape gets the shape [-2], which every
Reshape refuses, and the error names the node :data:`INDEX_GUARD`. Callers get a typed error
before any of this from :meth:`LoraSession.run_batched` or the Triton client helper.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.namer = Namer(self.graph)
        self.prelude: list[onnx.NodeProto] = []
        self.after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        self.zeros: dict[int, str] = {}
        self.constants: dict[tuple, str] = {}
        self.embedding_ids: dict[str, int] = {}
        self._index_col: str | None = None
        self.ranks = _activation_ranks(model)
        if INDEX_INPUT in self.namer.used:
            raise UnsupportedGraphError(f"the graph already has a tensor named {INDEX_INPUT!r}")
        self.namer.used.add(INDEX_INPUT)
        self.graph.input.append(helper.make_tensor_value_info(INDEX_INPUT, TensorProto.INT64, ["batch"]))
        self.index = self.keep_1d = self.keep = ""

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, list(inputs), [output], name=self.namer(f"{output}.node"), **attrs)

    def constant(self, *values: int, scalar: bool = False) -> str:
        """A shared int64 initializer holding ``values`` (a 0-D one for ``scalar``)."""
        key = (*values, "scalar") if scalar else values
        if key not in self.constants:
            self.constants[key] = self.namer("lora_i64_" + "_".join(str(v).replace("-", "m") for v in key))
            value = np.array(values[0] if scalar else values, np.int64)
            self.graph.initializer.append(numpy_helper.from_array(value, self.constants[key]))
        return self.constants[key]

    def zero(self, data_type: int) -> str:
        if data_type not in self.zeros:
            self.zeros[data_type] = self.namer(f"lora_zero_{data_type}")
            self.graph.initializer.append(numpy_helper.from_array(np.array(0, np_dtype(data_type)), self.zeros[data_type]))
        return self.zeros[data_type]

    def index_prelude(self, first_bank: str) -> None:
        """The checked index i', keep [batch] and keep [batch, 1, 1] (class docstring)."""
        n = self.namer
        shape, count, span, low, clamped, shifted, checked_in, gathered, high, invalid, invalid64, n_invalid, any_invalid, \
            guard_shape = (
                n(w) for w in ("lora_bank_shape", "lora_adapters", "lora_index_range", "lora_index_low", "lora_index_clamped",
                               "lora_index_shifted", "lora_index_unchecked", "lora_index_gathered", "lora_index_high",
                               "lora_index_invalid", "lora_index_invalid_i64", "lora_index_invalid_count",
                               "lora_index_any_invalid", "lora_index_guard_shape"))
        self.index, self.keep_1d, self.keep = n("lora_index"), n("lora_keep_1d"), n("lora_keep")
        minus_one, zero_s, one = self.constant(-1, scalar=True), self.constant(0, scalar=True), self.constant(1)
        self.prelude += [
            self.node("Shape", [first_bank], shape),
            self.node("Gather", [shape, zero_s], count, axis=0),
            self.node("Range", [zero_s, count, self.constant(1, scalar=True)], span),
            self.node("Less", [INDEX_INPUT, minus_one], low),
            self.node("Max", [INDEX_INPUT, zero_s], clamped),
            self.node("Sub", [INDEX_INPUT, count], shifted),
            self.node("Where", [low, shifted, clamped], checked_in),
            self.node("Gather", [span, checked_in], gathered, axis=0),
            # the guard for providers whose Gather does not refuse an out-of-range index
            self.node("GreaterOrEqual", [INDEX_INPUT, count], high),
            self.node("Or", [low, high], invalid),
            self.node("Cast", [invalid], invalid64, to=TensorProto.INT64),
            self.node("ReduceSum", [invalid64, self.constant(0)], n_invalid, keepdims=1),
            self.node("Min", [n_invalid, one], any_invalid),
            self.node("Sub", [self.constant(-1), any_invalid], guard_shape),
            helper.make_node("Reshape", [gathered, guard_shape], [self.index], name=self.namer(INDEX_GUARD)),
            self.node("GreaterOrEqual", [INDEX_INPUT, zero_s], self.keep_1d),
            self.node("Unsqueeze", [self.keep_1d, self.constant(1, 2)], self.keep),
        ]

    def index_col(self) -> str:
        """i' as [batch, 1] (shared by Embedding offsets and bias rows)."""
        if self._index_col is None:
            self._index_col = self.namer("lora_index_col")
            self.prelude.append(self.node("Unsqueeze", [self.index, self.constant(1)], self._index_col))
        return self._index_col

    def add_bank(self, name: str, bank: np.ndarray, dims: Sequence[int | str], data_type: int) -> None:
        """``bank`` as an initializer that is also an (overridable) graph input with a symbolic adapter axis."""
        if name in self.namer.used:
            raise UnsupportedGraphError(f"the graph already has a tensor named {name!r}")
        self.namer.used.add(name)
        self.graph.initializer.append(numpy_helper.from_array(bank, name))
        self.graph.input.append(helper.make_tensor_value_info(name, data_type, [ADAPTER_AXIS, *dims]))

    def finish(self) -> onnx.ModelProto:
        splice(self.graph, self.after, self.prelude)
        out = self.model
        for i in reversed([i for i, prop in enumerate(out.metadata_props) if prop.key == EMBEDDING_IDS_KEY]):
            del out.metadata_props[i]
        if self.embedding_ids:
            entry = out.metadata_props.add()
            entry.key, entry.value = EMBEDDING_IDS_KEY, json.dumps(self.embedding_ids, sort_keys=True)
        return out


def _activation_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of each tensor ONNX shape inference knows ({} when it cannot run, e.g. a model past 2 GiB)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a missing rank only costs the generic Reshape path
        return {}
    infos = (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos if v.type.tensor_type.HasField("shape")}


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
    b = _Builder(copy.deepcopy(model))
    groups = slot_groups(sites)
    for step, (module, (layout, module_sites)) in enumerate(groups.items()):
        if progress:
            progress(step, len(groups), module)
        first = module_sites[0]
        data_type = float_type(b.graph, first)
        _refuse_extras(layout, first, adapters)
        if layout.fused:
            bank_a, bank_b = build_stacked_banks(layout, first, adapters, np_dtype(data_type), max_rank)
            bias_bank = None
        else:
            bank_a, bank_b = build_banks(module, first, adapters, np_dtype(data_type), max_rank)
            bias_bank = build_bias_bank(module, first, adapters, np_dtype(data_type))
        a_shape, b_shape = factor_shapes(first, f"{module}.lora_r_max")
        b.add_bank(bank_a_name(module), bank_a, a_shape, data_type)
        b.add_bank(bank_b_name(module), bank_b, b_shape, data_type)
        bias_name = None
        if bias_bank is not None:
            bias_name = bank_bias_name(module)
            b.add_bank(bias_name, bias_bank, [first.out_features], data_type)
        gain_bank = None if layout.fused or first.quantized else build_gain_bank(
            module, first, _initializer(b.graph, first.weight), adapters, np_dtype(data_type))
        gain_name = None
        if gain_bank is not None:
            gain_name = bank_gain_name(module)
            b.add_bank(gain_name, gain_bank, [first.out_features], data_type)
        if step == 0:
            b.index_prelude(bank_a_name(module))
        if kind_of(first.kind).export.factor_layout == "kernel":
            _conv_module(b, module_sites, bias_name, data_type, gain_name)
        else:
            _matmul_module(b, module_sites, bias_name, data_type, gain_name)
    return b.finish()


def build_stacked_banks(layout: SlotLayout, site: TargetSite, adapters: Sequence[Adapter], dtype: np.dtype,
                        max_rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bank_A [N, in, R], bank_B [N, R, Σ w_j]) of a fused site: bank_A[i], bank_B[i] = adapter i's stacked
    A_g and block-diagonal B_g (:func:`lora_ref.export.fused.stacked_factors`), zero-padded to the
    largest stacked rank R (or ``max_rank``); zeros for an adapter on none of the parts."""
    ranks = [f[0].shape[1] for f in (stacked_factors(a, layout, dtype) for a in adapters) if f is not None]
    r_max = max(ranks)
    if max_rank is not None:
        if max_rank < r_max:
            raise ExportConfigError(f"{layout.stem}: an adapter's stacked rank is {r_max}, above --max-rank {max_rank}")
        r_max = max_rank
    bank_a = np.zeros((len(adapters), site.in_features, r_max), dtype)
    bank_b = np.zeros((len(adapters), r_max, site.out_features), dtype)
    for i, adapter in enumerate(adapters):
        factors = stacked_factors(adapter, layout, dtype, pad_to=r_max)
        if factors is not None:
            bank_a[i], bank_b[i] = factors
    return bank_a, bank_b


def _refuse_extras(layout: SlotLayout, site: TargetSite, adapters: Sequence[Adapter]) -> None:
    """UnsupportedGraphError for DoRA on a fused or quantized site (no float weight of its own for the norm)
    and lora_bias on a part of a fused projection."""
    if not (layout.fused or site.quantized):
        return
    for adapter in adapters:
        for module, _ in layout.parts:
            lora = adapter.modules.get(module)
            if lora is not None and lora.magnitude is not None:
                raise UnsupportedGraphError(f"{layout.stem}: DoRA needs the float base weight of its own module for its gain; "
                                            "a fused or quantized weight has none; export --mode merged")
            if lora is not None and lora.lora_bias is not None and layout.fused:
                raise UnsupportedGraphError(f"{layout.stem}: lora_bias on a part of a fused projection is not supported")


def _initializer(graph: onnx.GraphProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in graph.initializer if t.name == name))


def _gain_rows(b: _Builder, module: str, gain_bank: str, data_type: int, axes: Sequence[int] = (1,)) -> str:
    """Each row's DoRA gain [batch, 1, out] (Conv, ``axes`` the spatial ones: [batch, O, 1...]):
    Where(keep, Gather(bank_g, i'), 1), so a -1 row is scaled by exactly 1."""
    n = lambda what: b.namer(f"{module}.lora_{what}")  # noqa: E731 - a local naming shorthand
    gathered, kept, rows, one = n("dora_gain.rows_2d"), n("dora_gain.kept"), n("dora_gain.rows"), n("dora_one")
    b.graph.initializer.append(numpy_helper.from_array(np.array(1, np_dtype(data_type)), one))
    b.prelude += [b.node("Gather", [gain_bank, b.index], gathered, axis=0),
                  b.node("Unsqueeze", [b.keep_1d, b.constant(1)], kept + ".keep"),
                  b.node("Where", [kept + ".keep", gathered, one], kept),
                  b.node("Unsqueeze", [kept, b.constant(*axes)], rows)]
    return rows


def _matmul_module(b: _Builder, module_sites: Sequence[TargetSite], bias_bank: str | None, data_type: int,
                   gain_bank: str | None = None) -> None:
    """A Linear or Embedding module: gather each row's A_s [batch, in, r] (Embedding: look up rows) and B_s [batch, r, out].

    Per site: d = Reshape(x, [batch, -1, in]) @ A_s @ B_s (+ bias_s); y = base + Reshape(d, Shape(base)).
    The mask goes on the small tensor xA [batch, L, r] (Where(keep, xA, 0)) and on bias_s, so a -1
    row adds 0 @ B_0 = exact zeros (the banks are finite: export refuses non-finite adapters).
    A site whose input is known to be rank 3 [batch, L, in] skips both Reshapes and the Shape.
    """
    first = module_sites[0]
    module, n = first.module, lambda what: b.namer(f"{first.module}.lora_{what}")
    a_bank, b_bank = bank_a_name(module), bank_b_name(module)
    zero = b.zero(data_type)
    a_rows, b_rows = n("A.rows"), n("B.rows")
    embedding = kind_of(first.kind).export.lora_a_op == "Gather"
    if embedding:  # bank_A as one table [N·V, r]; row i·V + id is adapter i's A^T[id]
        offset = n("A.offset")
        b.prelude += [b.node("Flatten", [a_bank], a_rows, axis=2),
                      b.node("Mul", [b.index_col(), b.constant(first.in_features)], offset)]
    else:
        b.prelude.append(b.node("Gather", [a_bank, b.index], a_rows, axis=0))
    b.prelude.append(b.node("Gather", [b_bank, b.index], b_rows, axis=0))
    bias_rows = None
    if bias_bank is not None:
        gathered, kept, bias_rows = n("B.bias.rows_2d"), n("B.bias.kept"), n("B.bias.rows")
        b.prelude += [b.node("Gather", [bias_bank, b.index], gathered, axis=0),
                      b.node("Unsqueeze", [b.keep_1d, b.constant(1)], kept + ".keep"),
                      b.node("Where", [kept + ".keep", gathered, zero], kept),
                      b.node("Unsqueeze", [kept, b.constant(1)], bias_rows)]
    gain_rows = _gain_rows(b, module, gain_bank, data_type) if gain_bank is not None else None
    for located in module_sites:
        site, nodes = branch_site(b.graph, located, b.namer)  # a QDQ site: after its fake-quantized output
        base_bias = detach_bias(b.graph, site, b.namer) if gain_rows else None
        base = rename_output(b.graph, site, b.namer)
        x3, xa, xa_kept, d3 = n("x_rows"), n("xA"), n("xA_kept"), n("delta_rows")
        direct = not embedding and b.ranks.get(site.x) == 3
        if embedding:
            b.embedding_ids[site.x] = min(site.in_features, b.embedding_ids.get(site.x, site.in_features))
            ids64, rows = n("ids_i64"), n("ids_rows")
            nodes += [b.node("Cast", [site.x], ids64, to=TensorProto.INT64),
                     b.node("Reshape", [ids64, b.constant(0, -1)], rows),
                     b.node("Add", [rows, offset], x3),
                     b.node("Gather", [a_rows, x3], xa, axis=0)]
        elif direct:
            nodes += [b.node("MatMul", [site.x, a_rows], xa)]
        else:
            nodes += [b.node("Reshape", [site.x, b.constant(0, -1, first.in_features)], x3),
                     b.node("MatMul", [x3, a_rows], xa)]
        nodes += [b.node("Where", [b.keep, xa, zero], xa_kept), b.node("MatMul", [xa_kept, b_rows], d3)]
        if bias_rows is not None:
            plain, d3 = d3, n("delta_rows_bias")
            nodes.append(b.node("Add", [plain, bias_rows], d3))
        if gain_rows is not None:
            nodes += _dora_rows(b, site, base, d3, gain_rows, base_bias, direct)
        elif direct:
            nodes.append(b.node("Add", [base, d3], site.y))
        else:
            shape, delta = n("out_shape"), n("delta")
            nodes += [b.node("Shape", [base], shape), b.node("Reshape", [d3, shape], delta), b.node("Add", [base, delta], site.y)]
        b.after[site.node] += nodes


def _dora_rows(b: _Builder, site: TargetSite, base: str, d3: str, gain_rows: str, bias: str | None, direct: bool) -> list[onnx.NodeProto]:
    """y = g_row ∘ (base + d) (+ b) on the [batch, L, out] view: g_row [batch, 1, out] scales the whole sum of its row."""
    n = lambda what: b.namer(f"{site.module}.lora_{what}")  # noqa: E731 - a local naming shorthand
    if direct:
        base3, nodes = base, []
    else:
        base3 = n("base_rows")
        nodes = [b.node("Reshape", [base, b.constant(0, -1, site.out_features)], base3)]
    sum3, scaled3 = n("dora_in_rows"), n("dora_rows")
    nodes += [b.node("Add", [base3, d3], sum3), b.node("Mul", [sum3, gain_rows], scaled3)]
    scaled = scaled3
    if not direct:
        shape, scaled = n("out_shape"), n("dora_scaled")
        nodes += [b.node("Shape", [base], shape), b.node("Reshape", [scaled3, shape], scaled)]
    if bias is not None:
        return nodes + [b.node("Add", [scaled, bias], site.y)]
    return nodes + [b.node("Identity", [scaled], site.y)]


def _conv_module(b: _Builder, module_sites: Sequence[TargetSite], bias_bank: str | None, data_type: int,
                 gain_bank: str | None = None) -> None:
    """A Conv module: the once-per-run nodes in the prelude, each site's nodes after its base Conv (module docstring).

    DoRA: the site's sum goes to a fresh tensor, then y = g_row ∘ sum (+ the base bias, taken out of the Conv)."""
    first = module_sites[0]
    nodes, site_nodes = _conv_banks(first, bank_a_name(first.module), bank_b_name(first.module), bias_bank, b.keep_1d,
                                    b.index, b.zero(data_type), b.namer, b.constant)
    b.prelude += nodes
    spatial = tuple(range(2, len(first.weight_shape)))
    gain_rows = _gain_rows(b, first.module, gain_bank, data_type, spatial) if gain_bank is not None else None
    for site in module_sites:
        if gain_rows is None:
            b.after[site.node] += site_nodes(b.graph, site)
            continue
        base_bias = detach_bias(b.graph, site, b.namer)
        pre = b.namer(f"{site.module}.lora_dora_in")
        b.after[site.node] += site_nodes(b.graph, site, pre) + dora_scale(pre, site.y, gain_rows, base_bias, b.namer, site.module)


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
    a_cat, b_perm, b_cat, a_shape, cat_shape, r_max, nr, channels, owner, raw_col, own_eq, keep_col, own_2d, own = (
        n(w) for w in ("A.cat", "B.perm", "B.cat", "A.shape", "A.cat_shape", "r_max", "channels", "channel_ids", "channel_owner",
                       "index_col", "own_eq", "keep_col", "own_2d", "own"))
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
        helper.make_node("Unsqueeze", [index, constant(1)], [raw_col], name=n("index_unsqueeze")),
        helper.make_node("Equal", [raw_col, owner], [own_eq], name=n("own_eq")),
        helper.make_node("Unsqueeze", [keep_1d, constant(1)], [keep_col], name=n("keep_col")),
        helper.make_node("And", [own_eq, keep_col], [own_2d], name=n("own")),
        helper.make_node("Unsqueeze", [own_2d, constant(*spatial)], [own], name=n("own_unsqueeze")),
    ]
    bias_rows = None
    if bias_bank is not None:
        gathered, kept, bias_rows = (n(w) for w in ("B.bias.rows_2d", "B.bias.kept", "B.bias.rows"))
        nodes += [
            helper.make_node("Gather", [bias_bank, index], [gathered], axis=0, name=n("B.bias.gather")),
            helper.make_node("Where", [keep_col, gathered, zero], [kept], name=n("B.bias.keep")),
            helper.make_node("Unsqueeze", [kept, constant(*spatial)], [bias_rows], name=n("B.bias.unsqueeze")),
        ]

    def site_nodes(graph: onnx.GraphProto, site: TargetSite, out: str | None = None) -> list[onnx.NodeProto]:
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
        site_list.append(helper.make_node("Add", [base, delta], [out or site.y], name=n("add")))
        return site_list

    return nodes, site_nodes
