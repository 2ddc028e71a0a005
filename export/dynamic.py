"""The dynamic graph: per targeted Linear site, y += (x · A_g) · B_g with A_g, B_g graph inputs.

Nodes per site (x [..., in], base output y0 [..., out]):

    t  = MatMul(x, A_g)                                   [..., r]   (Embedding: Gather(A_g, ids))
    y  = Reshape(Gemm(Flatten(t), B_g, C=Flatten(y0)), Shape(y0))

Gemm accumulates into C, so the add costs no separate pass over y (a MatMul + Add pair was
~20% slower than the merged graph at r=16 on CPU; this form 3-10%; see bench/bench_onnx.py).

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
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lora_ref.kinds import kind_of

from .editing import Namer, conv_with_base_geometry, factor_shapes, np_dtype, rename_output, splice
from .errors import UnsupportedGraphError
from .fused import slot_groups
from .locate import TargetSite
from .names import slot_names, write_layouts
from .quantized import float_type


def rank_dim(module: str) -> str:
    """The symbolic rank dimension of ``module``'s LoRA inputs."""
    return f"{module}.lora_r"


def build_dynamic(
    model: onnx.ModelProto,
    sites: Mapping[str, Sequence[TargetSite]],
    *,
    max_rank: int | None = None,
    bias_modules: Collection[str] = (),
    scheme: str = "peft",
    progress=None,
) -> onnx.ModelProto:
    """A copy of ``model`` with a LoRA branch on every site (see module docstring).

    ``scheme`` names the LoRA inputs (:mod:`lora_ref.export.names`); the parts of a fused
    weight share one branch (:mod:`lora_ref.export.fused`). The slot layout is recorded in the
    model's metadata.
    """
    out = copy.deepcopy(model)
    graph = out.graph
    namer = Namer(graph)
    after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
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
        for site in stem_sites:
            if kind_of(site.kind).export.factor_layout == "kernel":
                after[site.node] += conv_branch(graph, site, namer, a_name, b_name, bias_name)
            else:
                after[site.node] += linear_branch(graph, site, namer, a_name, b_name, bias_name)
    splice(graph, after)
    write_layouts(out, {stem: layout for stem, (layout, _) in groups.items()}, scheme)
    return out


def linear_branch(graph: onnx.GraphProto, site: TargetSite, namer: Namer, a: str, b: str, bias: str | None) -> list[onnx.NodeProto]:
    """y = Reshape(Gemm(Flatten(x·a), b, C=Flatten(y0 (+ bias))), Shape(y0)) for a Linear/Embedding site; the nodes.

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
        helper.make_node("Reshape", [y2, shape], [site.y], name=namer(f"{stem}.lora_reshape")),
    ]


def conv_branch(graph: onnx.GraphProto, site: TargetSite, namer: Namer, a: str, b: str, bias: str | None) -> list[onnx.NodeProto]:
    """y = y0 + Conv(Conv(x, a; base geometry), b, bias; 1x1) for the Conv site ``site``; returns the nodes.

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
        helper.make_node("Add", [base, delta], [site.y], name=namer(f"{module}.lora_add")),
    ]
