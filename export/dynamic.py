"""The dynamic graph: per targeted Linear site, y += (x · A_g) · B_g with A_g, B_g graph inputs.

Nodes per site (x [..., in], base output y0 [..., out]):

    t  = MatMul(x, A_g)                                   [..., r]   (Embedding: Gather(A_g, ids))
    y  = Reshape(Gemm(Flatten(t), B_g, C=Flatten(y0)), Shape(y0))

Gemm accumulates into C, so the add costs no separate pass over y. Against a MatMul + Add pair
(genai's own LoRA form), r=16, CPU, one thread, loaded 2-core machine: at 128 tokens the Gemm form
was 1.07x the merged graph's time and the pair 1.08-1.09x (bench/bench_onnx.py's block); at one
token (decode) the two were within noise of each other (a lone block: 1.15-1.17x both; genai
decoding, bench/bench_genai.py: within ±3%, either ahead), so the Gemm form stays.

For module m, ``m.lora_A.weight`` is A_g = A^T [in, r] and ``m.lora_B.weight`` is B_g = s·B^T
[r, out]; for an Embedding A_g = lora_embedding_A^T [num_embeddings, r] and B_g = s·lora_embedding_B^T
[r, dim], so the same names and the same [in, r] / [r, out] shapes hold. For a module in ``bias_modules`` (one an exported adapter has ``lora_bias`` on) the
graph also has the input ``m.lora_B.bias`` = round_t(s·lora_bias) [out], default zeros, added
to the base output before the Gemm: C = Flatten(y0 + b_g). Other modules get no such input,
so a plain LoRA graph costs nothing extra. The names follow the Olive / onnxruntime-genai convention; note that the scale s is
folded into B here, so a file from a tool that keeps s as a graph constant needs its B scaled.
The rank axis is symbolic (``<m>.lora_r``), and each input has a default initializer of rank 0,
so a session fed no adapter computes x·A_g = [.., 0] and adds exact zeros: the base model.
With ``max_rank`` R the axis is static (R) and the defaults are zeros [in, R] / [R, out]; an
adapter of rank r <= R is zero-padded, which adds exact zeros (static shapes for TensorRT and
CUDA graphs). Switching adapters in a live session is feeding other tensors.

A Conv site (x [N, C, *S], base Conv with W [O, C, *k], group 1) keeps PEFT's conv layouts:
``m.lora_A.weight`` = A [r, C, *k] and ``m.lora_B.weight`` = s·B [O, r, 1, ...], and

    t = Conv(x, A_g)           same kernel_shape/strides/pads/dilations/auto_pad as the base Conv
    y = Add(y0, Conv(t, B_g, b_g))        1x1 kernel, stride 1, no padding; b_g = s·lora_bias

(the lora_bias, when the module has one, is the 1x1 Conv's own bias input). The rank axis is
axis 0 of A_g and 1 of B_g; the rank-0 defaults ([0, C, *k] and [O, 0, 1...]) are a Conv with
zero output channels followed by one with zero input channels, which ONNX Runtime runs (CPU
provider checked by the tests) and which gives an exact zero delta.

A DoRA module (any kind, in ``dora_modules``) also gets the input
``<stem>.lora_magnitude_vector`` = round_t(m) [out] (PEFT's name, in every scheme), default zeros, and computes its
gain once per run in the graph (:func:`dora_gain`): g = m / ‖W + (A_g B_g)ᵀ‖ per output channel
(the norm over the input axes, the kind's DoRA axis), with g_c = 1 exactly where m_c = 0. Each
site then ends in y = g ∘ (y0' + lora) + b (:func:`~lora_ref.export.editing.dora_scale`), y0'
the base output without its bias: a Gemm's C or a Conv's bias is taken out and added after the gain
(PEFT does not scale the bias). The zero default makes a run without adapter tensors, or with
a plain LoRA adapter, unscaled (without any: the base model bit for bit), so an exported DoRA
magnitude may not hold an exact 0. n is a value computed from the fed tensors; as in PEFT and
SPEC 4.3 it is a constant for gradients (these are inference graphs; training through one would
need its gradient stopped).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lora_ref.kinds import kind_of

from .editing import Namer, conv_with_base_geometry, detach_bias, dora_scale, factor_shapes, np_dtype, rename_output, splice
from .errors import ExportConfigError, UnsupportedGraphError
from .fused import slot_groups
from .graphio import default_opset
from .locate import TargetSite
from .names import magnitude_name, slot_names, write_layouts
from .quantized import branch_site, float_type


def rank_dim(module: str) -> str:
    """The symbolic rank dimension of ``module``'s LoRA inputs."""
    return f"{module}.lora_r"


def build_dynamic(
    model: onnx.ModelProto,
    sites: Mapping[str, Sequence[TargetSite]],
    *,
    max_rank: int | None = None,
    bias_modules: Collection[str] = (),
    dora_modules: Collection[str] = (),
    scheme: str = "peft",
    progress=None,
) -> onnx.ModelProto:
    """A copy of ``model`` with a LoRA branch on every site (see module docstring); DoRA on ``dora_modules``.

    ``scheme`` names the LoRA inputs (:mod:`lora_ref.export.names`); the parts of a fused
    weight share one branch (:mod:`lora_ref.export.fused`). The slot layout is recorded in the
    model's metadata.
    """
    if default_opset(model) < 11:
        raise ExportConfigError(f"a dynamic graph needs opset >= 11 (Flatten with a negative axis); the model has "
                                f"{default_opset(model)}: convert it with onnx.version_converter first")
    out = copy.deepcopy(model)
    graph = out.graph
    namer = Namer(graph)
    after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    prelude: list[onnx.NodeProto] = []
    groups = slot_groups(sites, scheme)
    for step, (stem, (layout, stem_sites)) in enumerate(groups.items()):
        if progress:
            progress(step, len(groups), stem)
        first = stem_sites[0]
        data_type = float_type(graph, first)
        a_name, b_name, bias_name = slot_names(stem, scheme)
        if not any(module in bias_modules for module, _ in layout.parts):
            bias_name = None
        elif layout.fused:
            raise UnsupportedGraphError(f"{stem}: lora_bias on a part of a fused projection is not supported")
        for name in (a_name, b_name, *([bias_name] if bias_name else [])):
            if name in namer.used:
                raise UnsupportedGraphError(f"{stem}: the graph already has a tensor named {name!r} (is it already a LoRA graph?)")
            namer.used.add(name)
        rank: int | str = max_rank if max_rank is not None else rank_dim(stem)
        width = max_rank or 0
        a_shape, b_shape = factor_shapes(first, rank)
        graph.input.append(helper.make_tensor_value_info(a_name, data_type, a_shape))
        graph.input.append(helper.make_tensor_value_info(b_name, data_type, b_shape))
        dtype = np_dtype(data_type)
        a_default, b_default = factor_shapes(first, width)
        graph.initializer.append(numpy_helper.from_array(np.zeros(a_default, dtype), a_name))
        graph.initializer.append(numpy_helper.from_array(np.zeros(b_default, dtype), b_name))
        if bias_name:
            graph.input.append(helper.make_tensor_value_info(bias_name, data_type, [first.out_features]))
            graph.initializer.append(numpy_helper.from_array(np.zeros(first.out_features, dtype), bias_name))
        gain = None
        if any(module in dora_modules for module, _ in layout.parts):
            if layout.fused or first.quantized:
                raise UnsupportedGraphError(f"{stem}: DoRA needs the float base weight of its own module for the in-graph norm; "
                                            "a fused or quantized (MatMulNBits) weight has none; export --mode merged")
            gain, gain_nodes = dora_gain(graph, first, namer, a_name, b_name, magnitude_name(stem), data_type)
            prelude += gain_nodes
        for site in stem_sites:
            base_bias = detach_bias(graph, site, namer) if gain else None
            out_name = namer(f"{stem}.lora_dora_in") if gain else None
            if kind_of(site.kind).export.factor_layout == "kernel":
                after[site.node] += conv_branch(graph, site, namer, a_name, b_name, bias_name, out_name)
            else:
                place, first_nodes = branch_site(graph, site, namer)
                after[place.node] += first_nodes + linear_branch(graph, place, namer, a_name, b_name, bias_name, out_name)
            if gain:
                after[site.node] += dora_scale(out_name, site.y, gain, base_bias, namer, stem)
    splice(graph, after, prelude)
    write_layouts(out, {stem: layout for stem, (layout, _) in groups.items()}, scheme)
    return out


def linear_branch(graph: onnx.GraphProto, site: TargetSite, namer: Namer, a: str, b: str, bias: str | None,
                  out: str | None = None) -> list[onnx.NodeProto]:
    """``out`` (default site.y) = Reshape(Gemm(Flatten(x·a), b, C=Flatten(y0 (+ bias))), Shape(y0)) for a Linear/Embedding site; the nodes.

    ``a`` [in, r] and ``b`` [r, out] are tensor names (graph inputs, or constants for a quantized
    merged site); an Embedding site gathers rows of ``a`` instead of multiplying.
    """
    stem = site.module
    base = rename_output(graph, site, namer)
    xa, xa2, base2, y2, shape = (namer(f"{stem}.lora_{n}") for n in ("xA", "xA_2d", "base_2d", "out_2d", "out_shape"))
    nodes = []
    accumulate = base
    if bias:
        accumulate = namer(f"{stem}.lora_base_plus_bias")
        nodes.append(helper.make_node("Add", [base, bias], [accumulate], name=namer(f"{stem}.lora_bias")))
    return nodes + [
        helper.make_node("Gather", [a, site.x], [xa], axis=0, name=namer(f"{stem}.lora_A"))
        if kind_of(site.kind).export.lora_a_op == "Gather" else helper.make_node("MatMul", [site.x, a], [xa], name=namer(f"{stem}.lora_A")),
        helper.make_node("Flatten", [xa], [xa2], axis=-1, name=namer(f"{stem}.lora_flatten_xA")),
        helper.make_node("Flatten", [accumulate], [base2], axis=-1, name=namer(f"{stem}.lora_flatten_base")),
        helper.make_node("Gemm", [xa2, b, base2], [y2], name=namer(f"{stem}.lora_B")),
        helper.make_node("Shape", [base], [shape], name=namer(f"{stem}.lora_shape")),
        helper.make_node("Reshape", [y2, shape], [out or site.y], name=namer(f"{stem}.lora_reshape")),
    ]


def conv_branch(graph: onnx.GraphProto, site: TargetSite, namer: Namer, a: str, b: str, bias: str | None,
                out: str | None = None) -> list[onnx.NodeProto]:
    """``out`` (default site.y) = y0 + Conv(Conv(x, a; base geometry), b, bias; 1x1) for the Conv site ``site``; returns the nodes.

    ``a`` is [r, C, *k], ``b`` [O, r, 1...] and ``bias`` [O] (or None).
    """
    module = site.module
    xa, delta = namer(f"{module}.lora_xA"), namer(f"{module}.lora_delta")
    conv_a = conv_with_base_geometry(graph, site, a, xa, namer(f"{module}.lora_A"))
    base = rename_output(graph, site, namer)
    ones = [1] * (len(site.weight_shape) - 2)
    return [
        conv_a,
        helper.make_node("Conv", [xa, b, *([bias] if bias else [])], [delta], kernel_shape=ones, name=namer(f"{module}.lora_B")),
        helper.make_node("Add", [base, delta], [out or site.y], name=namer(f"{module}.lora_add")),
    ]


def dora_gain(graph: onnx.GraphProto, site: TargetSite, namer: Namer, a: str, b: str, m_name: str,
              data_type: int) -> tuple[str, list[onnx.NodeProto]]:
    """DoRA's gain g of a module, from the fed A_g, B_g and m (module docstring); returns (g, nodes).

    Declares the input ``m_name`` (``<stem>.lora_magnitude_vector``) [out] (default zeros). Linear/Embedding, g [1, out]:

        W_io = W (in_out, rows) or Transpose(W) (out_in)          [in, out]
        V    = W_io + A_g @ B_g                                    [in, out]  A_g B_g = (s B A)^T
        n    = Sqrt(1_in^T @ (V ∘ V))                              [1, out]   the norm over the input axis

    Conv (W [O, C, *k], A_g [r, C, *k], B_g [O, r, 1...]), g [O, 1...] for outputs [N, O, *S]:

        V    = Reshape(W, [O, CK]) + Reshape(B_g, [O, -1]) @ Reshape(A_g, [-1, CK])     CK = C·Πk
        n    = Reshape(Sqrt((V ∘ V) @ 1_CK), [O, 1...])           the norm over (C, *k)

    then g = Where(m == 0, 1, m / n) (m reshaped like n; m_c = 0: channel c is not DoRA-scaled).
    Once per run, not per token: in·out·r multiply-adds for the delta and ≈ 3·in·out more (Conv: in = CK).
    In a float16 graph V is cast to float32 before squaring (a float16 sum of squares overflows
    past 65504, e.g. an N(0, 1) embedding table's norm over a 50k vocabulary), g is cast back.
    """
    module, dtype = site.module, np_dtype(data_type)
    if m_name in namer.used:
        raise UnsupportedGraphError(f"{module}: the graph already has a tensor named {m_name!r} (is it already a LoRA graph?)")
    namer.used.add(m_name)
    graph.input.append(helper.make_tensor_value_info(m_name, data_type, [site.out_features]))
    graph.initializer.append(numpy_helper.from_array(np.zeros(site.out_features, dtype), m_name))
    n = lambda what: namer(f"{module}.lora_dora_{what}")  # noqa: E731 - a local naming shorthand

    def constant(what: str, value: np.ndarray) -> str:
        name = n(what)
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    node = lambda op, inputs, output, **kw: helper.make_node(op, inputs, [output], name=namer(f"{output}.node"), **kw)  # noqa: E731
    wide = np.dtype(np.float32) if dtype == np.float16 else dtype  # where the norm is accumulated
    one, zero = constant("one", np.array(1, wide)), constant("zero", np.array(0, wide))
    v_t, v, sq, n2, norm, m_t, m_shaped, raw, no_m, gain_w, gain = (
        n(w) for w in ("V_t", "V", "V_sq", "norm_sq", "norm", "m_t", "m", "gain_raw", "no_m", "gain_wide", "gain"))
    to_wide = helper.np_dtype_to_tensor_dtype(wide)
    widen = [node("Cast", [v_t], v, to=to_wide), node("Cast", [m_name], m_t, to=to_wide)]
    if kind_of(site.kind).export.factor_layout == "kernel":
        out, ck = site.out_features, int(np.prod(site.weight_shape[1:]))
        gain_shape = constant("gain_shape", np.array([out] + [1] * (len(site.weight_shape) - 2), np.int64))
        w2, a2, b2, delta, n_col = n("W_2d"), n("A_2d"), n("B_2d"), n("delta"), n("norm_col")
        nodes = [
            node("Reshape", [site.weight, constant("w_shape", np.array([out, ck], np.int64))], w2),
            node("Reshape", [a, constant("a_shape", np.array([-1, ck], np.int64))], a2),
            node("Reshape", [b, constant("b_shape", np.array([out, -1], np.int64))], b2),
            node("MatMul", [b2, a2], delta),
            node("Add", [w2, delta], v_t),
            *widen,
            node("Mul", [v, v], sq),
            node("MatMul", [sq, constant("ones", np.ones((ck, 1), wide))], n2),
            node("Sqrt", [n2], n_col),
            node("Reshape", [n_col, gain_shape], norm),
        ]
    else:
        gain_shape = constant("gain_shape", np.array([1, site.out_features], np.int64))
        w_io, delta = n("W_io"), n("delta")
        nodes = [node("Transpose", [site.weight], w_io, perm=[1, 0])] if site.layout == "out_in" else []
        nodes += [
            node("MatMul", [a, b], delta),
            node("Add", [w_io if nodes else site.weight, delta], v_t),
            *widen,
            node("Mul", [v, v], sq),
            node("MatMul", [constant("ones", np.ones((1, site.in_features), wide)), sq], n2),
            node("Sqrt", [n2], norm),
        ]
    return gain, nodes + [
        node("Reshape", [m_t, gain_shape], m_shaped),
        node("Div", [m_shaped, norm], raw),
        node("Equal", [m_shaped, zero], no_m),
        node("Where", [no_m, one, raw], gain_w),
        node("Cast", [gain_w], gain, to=data_type),
    ]
