"""Quantized bases: ONNX Runtime's ``MatMulNBits`` (com.microsoft) and QDQ weights, read exactly, with the LoRA beside it.

``MatMulNBits(x, B_q, scales[, zero_points])`` with attributes K (in), N (out), bits (4 or 8) and
block_size computes y = x · W^T with the dequantized weight [N, K]

    W[n, k] = (q[n, k] − z[n, ⌊k / bs⌋]) · scale[n, ⌊k / bs⌋]

where q[n, k] is element k of row n of B_q [N, ⌈K / bs⌉, bs · bits / 8] (4 bits: two per byte,
the even element in the low nibble), scales [N, ⌈K / bs⌉] (or flat) and z the zero points
(4 bits: packed two per byte, low nibble first; absent: 2^(bits−1), the symmetric form).

A QDQ site (``MatMul(x, DequantizeLinear(q, scale[, zero_point]))``, :mod:`lora_ref.export.locate`)
computes with ONNX's DequantizeLinear output W_s = round_t((q − z) · scale) in the scales' dtype t
(the product is exact in float64: |q − z| < 2^8, scale has 24 bits), q int8/uint8/int4/uint4 in its
stored layout (``in_out`` [K, N] for a MatMul); scale and z are one value (per-tensor), a vector
along ``axis`` (per-axis: ORT's per-channel weights use axis 1 of [K, N], one scale per output), or
blocked (``block_size`` > 0: scale[.., ⌊i / bs⌋, ..] along ``axis``, as ORT's int4 QDQ quantizer
writes with axis 0, blocks along K); z defaults to 0.

A dynamically quantized site (``quantize_dynamic``: MatMulInteger, or ORT's fused DynamicQuantizeMatMul / MatMulIntegerToFloat,
:mod:`lora_ref.export.locate`) computes with W = (q − z) · scale exactly (float64), q the int8/uint8
weight [K, N] (``in_out``), scale and z one value or one per output column (axis 1); the activation
is quantized to uint8 at run time by the base graph's own DynamicQuantizeLinear, which the export
leaves alone (the branch reads the float x).

A LoRA update is far below an int4 step (|Δ| ≪ scale / 2), so rounding W + Δ back to int4 moves
most elements by a whole step or not at all: the result carries a quantization error of about the
adapter's own size. So every export leaves B_q, scales and zero points bit for bit as they were
and adds the float LoRA branch y ← y0 + (x·A_g)·B_g beside the quantized MatMul (dynamic graphs:
A_g, B_g are inputs; merged graphs: constants, the stacked factors of all merged adapters,
:func:`add_constant_branches`). The branch's dtype is the scales' dtype.

Opt-in (``--requantize``, merged graphs only): :func:`requantize` writes Q(W + Σ Δ) with the input's
bits, block size and symmetry instead, and reports per site the requantization error against the
adapter's effect, so the user sees what was lost. A QDQ weight keeps its integer type, axis, block
size (or per-tensor / per-axis grouping) and zero-point input; it is symmetric when it has no zero
point or every one is the type's midpoint (0 signed, 2^(bits−1) unsigned).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lora_ref.adapter import Adapter

from lora_ref.dtypes import round_to

from .editing import Namer, np_dtype, splice
from .errors import UnsupportedGraphError
from .locate import TargetSite


def float_type(graph: onnx.GraphProto, site: TargetSite) -> int:
    """The TensorProto float type the site computes in: its weight's, or a quantized weight's scales'."""
    if site.dequantize is not None:
        name = graph.node[site.dequantize].input[1]
    elif site.integer is not None:
        name = site.integer_operands[0]
    else:
        name = graph.node[site.node].input[2] if site.quantized else site.weight
    return next(t.data_type for t in graph.initializer if t.name == name)


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def dequantize(graph: onnx.GraphProto, site: TargetSite) -> np.ndarray:
    """The float64 weight W [N, K] a quantized site computes with (module docstring): a MatMulNBits' or a
    dynamically quantized weight's (q − z)·scale exactly, a QDQ weight's DequantizeLinear output round_t((q − z)·scale)."""
    if site.dequantize is not None or site.integer is not None:
        return _qdq_dequantize(graph, site)
    node = graph.node[site.node]
    inits = {t.name: t for t in graph.initializer}
    K, N = int(_attr(node, "K", 0)), int(_attr(node, "N", 0))
    bits, bs = int(_attr(node, "bits", 4)), int(_attr(node, "block_size", 0))
    if bits not in (4, 8) or len(node.input) > 4 and any(node.input[4:]):
        raise UnsupportedGraphError(f"{site.module}: MatMulNBits with bits={bits} or g_idx/bias inputs is not supported")
    blocks = -(-K // bs)
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(N, blocks, bs * bits // 8)
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, blocks * bs)
    else:
        q = packed.reshape(N, blocks * bs)
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(N, blocks)
    zero = np.full((N, blocks), 2 ** (bits - 1), np.float64)
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(inits[node.input[3]])
        if zp.dtype == np.uint8 and bits == 4:
            per_row = -(-blocks // 2)
            zp = zp.reshape(N, per_row)
            zero = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(N, 2 * per_row)[:, :blocks].astype(np.float64)
        else:
            zero = zp.astype(np.float64).reshape(N, blocks)
    W = (q.astype(np.float64) - np.repeat(zero, bs, axis=1)) * np.repeat(scales, bs, axis=1)
    return W[:, :K]


def branch_site(graph: onnx.GraphProto, site: TargetSite, namer: Namer) -> tuple[TargetSite, list[onnx.NodeProto]]:
    """Where a LoRA branch goes at ``site``: (the site to put it after, nodes to run first); ``graph`` unchanged.

    In a statically quantized QDQ graph the base layer is DQ(x_q) → MatMul → QuantizeLinear →
    DequantizeLinear, a node group ONNX Runtime fuses into one integer kernel (QLinearMatMul) only
    while each DequantizeLinear has the MatMul as its one reader and the MatMul's output goes to
    the QuantizeLinear alone. So the branch reads its own copy of the activation's
    DequantizeLinear, and when the output is fake-quantized the branch adds after that pair:
    y = DQ(Q(y0)) + (x·A_g)·B_g. The base group is untouched (with no adapter the site's output is
    the base graph's bit for bit, fused or not), and the LoRA term is not rounded to the
    activation grid, whose step is typically larger than the adapter's effect (as for int4 weights).
    Any other site (MatMulNBits, weight-only QDQ, float) is returned as it is.
    """
    if site.dequantize is None:
        return site, []
    nodes = []
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    x = site.x
    source = producers.get(x)
    if source is not None and graph.node[source].op_type == "DequantizeLinear":
        copy_ = onnx.NodeProto()
        copy_.CopyFrom(graph.node[source])
        x = namer(f"{site.x}.lora_input")
        del copy_.output[:]
        copy_.output.append(x)
        copy_.name = namer(f"{site.module}.lora_input_dequantize")
        nodes.append(copy_)
    outputs = {o.name for o in graph.output}
    after = site.node
    for op in ("QuantizeLinear", "DequantizeLinear"):
        name = graph.node[after].output[0]
        users = readers.get(name, [])
        if name in outputs or len(users) != 1 or graph.node[users[0]].op_type != op:
            after = site.node if op == "QuantizeLinear" else None
            break
        after = users[0]
    if after is None or after == site.node:
        return replace(site, x=x), nodes
    return replace(site, x=x, node=after, y=graph.node[after].output[0]), nodes


def add_constant_branches(model: onnx.ModelProto, groups: Mapping[str, tuple], adapters: Sequence[Adapter]) -> dict[str, int]:
    """Add y ← y0 + (x·A_c)·B_c at each quantized site of ``groups`` (stem -> (layout, sites)); in place.

    A_c [in, Σ r] and B_c [Σ r, out] stack every adapter's factors on the layout along the rank, so
    x·A_c·B_c = Σ_i s_i (x A_i^T) B_i^T: the adapters applied one after another, as a merge would.
    Returns stem -> stacked rank.
    """
    from .dynamic import linear_branch
    from .fused import stacked_factors

    graph = model.graph
    namer = Namer(graph)
    after: dict[int, list[onnx.NodeProto]] = {}
    ranks = {}
    for stem, (layout, sites) in groups.items():
        dtype = np_dtype(float_type(graph, sites[0]))
        factors = [f for f in (stacked_factors(a, layout, dtype) for a in adapters) if f is not None]
        A = np.concatenate([a for a, _ in factors], axis=1)
        B = np.concatenate([b for _, b in factors], axis=0)
        a_name, b_name = namer(f"{stem}.lora_A.merged"), namer(f"{stem}.lora_B.merged")
        graph.initializer.extend([numpy_helper.from_array(A, a_name), numpy_helper.from_array(B, b_name)])
        for site in sites:
            place, first = branch_site(graph, site, namer)
            after.setdefault(place.node, []).extend(first + linear_branch(graph, place, namer, a_name, b_name, None))
        ranks[stem] = int(A.shape[1])
    splice(graph, after)
    return ranks


def _block_quantize(W: np.ndarray, bits: int, bs: int, symmetric: str | None, scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [N, blocks·bs] ints, scales [N, blocks] in ``scale_dtype``, zero points [N, blocks]) of W [N, K] (K padded with 0).

    Levels are unsigned, 0 .. 2^bits − 1. ``symmetric`` ``"lowest"`` (no zero-point input): the
    block's element of largest magnitude a maps to the lowest level, scale = a / −2^(bits−1),
    z = 2^(bits−1) (ONNX Runtime's blockwise quantizer's choice; the scale may be negative);
    ``"balanced"``: scale = |a| / (2^(bits−1) − 1), z = 2^(bits−1) (ONNX Runtime's symmetric QDQ
    weights, levels ±(2^(bits−1) − 1) around z). Asymmetric (None):
    scale = (max(0, max) − min(0, min)) / (2^bits − 1), z = rint(−min(0, min) / scale).
    q = clip(rint(W / scale) + z, 0, 2^bits − 1), with the scale already rounded to ``scale_dtype``.
    """
    N, K = W.shape
    blocks = -(-K // bs)
    padded = np.zeros((N, blocks * bs))
    padded[:, :K] = W
    view = padded.reshape(N, blocks, bs)
    top = 2**bits - 1
    if symmetric:
        index = np.abs(view).argmax(axis=2)
        amax = np.take_along_axis(view, index[..., None], axis=2)[..., 0]
        scale = amax / -(2 ** (bits - 1)) if symmetric == "lowest" else np.abs(amax) / (2 ** (bits - 1) - 1)
        zero = np.full((N, blocks), 2 ** (bits - 1), np.float64)
    else:
        lo, hi = np.minimum(view.min(axis=2), 0), np.maximum(view.max(axis=2), 0)
        scale = (hi - lo) / top
    scale = np.where(scale == 0, 1.0, scale).astype(scale_dtype).astype(np.float64)
    if not symmetric:
        zero = np.clip(np.rint(-lo / scale), 0, top)
    q = np.clip(np.rint(view / scale[..., None]) + zero[..., None], 0, top).astype(np.uint8)
    return q.reshape(N, blocks * bs), scale.astype(scale_dtype), zero


def _write_nbits(graph: onnx.GraphProto, site: TargetSite, target: np.ndarray) -> None:
    """Store Q(target) (target [N, K] float64) in the MatMulNBits site's B_q, scales and zero points."""
    inits = {t.name: t for t in graph.initializer}
    node = graph.node[site.node]
    bits, bs = int(_attr(node, "bits", 4)), int(_attr(node, "block_size", 0))
    has_zp = len(node.input) > 3 and bool(node.input[3])
    scales = inits[node.input[2]]
    q, scale, zero = _block_quantize(target, bits, bs, None if has_zp else "lowest", np_dtype(scales.data_type))
    N = q.shape[0]
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8) if bits == 4 else q
    old = inits[node.input[1]]
    old.CopyFrom(numpy_helper.from_array(packed.reshape(tuple(old.dims)), old.name))
    scales.CopyFrom(numpy_helper.from_array(scale.reshape(tuple(scales.dims)), scales.name))
    if has_zp:
        zp = inits[node.input[3]]
        if zp.data_type == onnx.TensorProto.UINT8 and bits == 4:
            z = zero.astype(np.uint8)
            if z.shape[1] % 2:
                z = np.concatenate([z, np.zeros((N, 1), np.uint8)], axis=1)
            value = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
        else:
            value = zero.astype(np_dtype(zp.data_type))
        zp.CopyFrom(numpy_helper.from_array(value.reshape(tuple(zp.dims)), zp.name))


#: QDQ integer types: TensorProto type -> (bits, signed)
_QDQ_TYPES = {onnx.TensorProto.INT8: (8, True), onnx.TensorProto.UINT8: (8, False),
              onnx.TensorProto.INT4: (4, True), onnx.TensorProto.UINT4: (4, False)}


def _qdq_parts(graph: onnx.GraphProto, site: TargetSite):
    """(q, scale, zero point or None initializers, axis >= 0, block size, bits, signed) of a QDQ site's DequantizeLinear,
    or of a dynamically quantized site (q [K, N], scale and zero point per tensor or per column: axis 1, no blocks)."""
    inits = {t.name: t for t in graph.initializer}
    if site.integer is not None:
        q, (scale, zero_point) = inits[graph.node[site.integer].input[1]], site.integer_operands
        return q, inits[scale], inits[zero_point] if zero_point else None, 1, 0, *_QDQ_TYPES[q.data_type]
    node = graph.node[site.dequantize]
    q, scale = inits[node.input[0]], inits.get(node.input[1])
    zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or (len(node.input) > 2 and node.input[2] and zp is None):
        raise UnsupportedGraphError(f"{site.module}: the DequantizeLinear of {site.weight!r} takes its scale or zero point "
                                    "from a computed tensor, not an initializer")
    axis = int(_attr(node, "axis", 1)) % len(q.dims)
    bits, signed = _QDQ_TYPES[q.data_type]
    return q, scale, zp, axis, int(_attr(node, "block_size", 0)), bits, signed


def _expand(values: np.ndarray, shape: tuple[int, ...], axis: int, bs: int) -> np.ndarray:
    """A scale or zero point broadcast to q's ``shape``: per-tensor, per-axis (1-D along ``axis``) or blocked."""
    if bs:
        return np.repeat(values, bs, axis=axis).take(range(shape[axis]), axis=axis)
    if values.size == 1:
        return np.broadcast_to(values.reshape(()), shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(values.reshape(view), shape)


def _qdq_dequantize(graph: onnx.GraphProto, site: TargetSite) -> np.ndarray:
    """W [N, K] = round_t((q − z)·scale) of a QDQ site ((q − z)·scale exactly, unrounded, of a dynamically quantized
    site), transposed from q's stored layout (module docstring)."""
    q, scale, zp, axis, bs, _, _ = _qdq_parts(graph, site)
    values = numpy_helper.to_array(q).astype(np.float64)
    s = _expand(numpy_helper.to_array(scale).astype(np.float64), values.shape, axis, bs)
    z = _expand(numpy_helper.to_array(zp).astype(np.float64), values.shape, axis, bs) if zp is not None else 0.0
    W = (values - z) * s
    if site.integer is None:
        W = round_to(W, np_dtype(scale.data_type)).astype(np.float64)
    return W.T if site.layout == "in_out" else W


def _write_qdq(graph: onnx.GraphProto, site: TargetSite, target: np.ndarray) -> None:
    """Store Q(target) (target [N, K] float64) in the QDQ site's q, scale and zero point, keeping their types and grouping.

    The groups are rearranged as rows for :func:`_block_quantize`: per-tensor one row of all
    elements, per-axis one row per index along ``axis``, blocked the rows along ``axis`` cut in
    blocks of ``block_size``. Symmetric (module docstring) uses the ``"lowest"`` rule when a stored
    scale is negative (ORT's int4 QDQ quantizer), ``"balanced"`` otherwise.
    """
    q, scale, zp, axis, bs, bits, signed = _qdq_parts(graph, site)
    shift = 2 ** (bits - 1) if signed else 0
    stored = target.T if site.layout == "in_out" else target
    old_scale = numpy_helper.to_array(scale)
    midpoint = 0 if signed else 2 ** (bits - 1)
    symmetric = zp is None or bool(np.all(numpy_helper.to_array(zp).astype(np.int64) == midpoint))
    rule = ("lowest" if np.any(old_scale < 0) else "balanced") if symmetric else None
    if bs:
        rows, width = np.moveaxis(stored, axis, -1), bs
    elif old_scale.size == 1:
        rows, width = stored.reshape(1, -1), stored.size
    else:
        rows = np.moveaxis(stored, axis, 0).reshape(stored.shape[axis], -1)
        width = rows.shape[1]
    levels, new_scale, zero = _block_quantize(rows, bits, width, rule, old_scale.dtype)
    levels = levels[:, :rows.shape[1]].astype(np.int64) - shift
    if bs:
        values, new_scale, zero = np.moveaxis(levels, -1, axis), np.moveaxis(new_scale, -1, axis), np.moveaxis(zero, -1, axis)
    else:
        moved = [stored.shape[axis]] + [d for i, d in enumerate(stored.shape) if i != axis]
        values = levels.reshape(stored.shape) if old_scale.size == 1 else np.moveaxis(levels.reshape(moved), 0, axis)
    q_type = np_dtype(q.data_type)
    q.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values).astype(q_type), q.name))
    scale.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new_scale).reshape(tuple(scale.dims)).astype(old_scale.dtype), scale.name))
    if zp is not None:
        value = (np.ascontiguousarray(zero).astype(np.int64) - shift).reshape(tuple(zp.dims))
        zp.CopyFrom(numpy_helper.from_array(value.astype(np_dtype(zp.data_type)), zp.name))


def _check_private(graph: onnx.GraphProto, site: TargetSite) -> None:
    """UnsupportedGraphError when a QDQ or dynamically quantized site's weight, scale or zero point is read by more
    than one node (its own DequantizeLinear; MatMulInteger, or the Mul of the scales)."""
    q, scale, zp, *_ = _qdq_parts(graph, site)
    for name in (t.name for t in (q, scale, zp) if t is not None):
        readers = [i for i, other in enumerate(graph.node) if name in other.input]
        if len(readers) != 1:
            raise UnsupportedGraphError(f"{site.module}: {name!r} is also read by other nodes, so requantizing it would change "
                                        "them too; export without --requantize (the LoRA goes beside the quantized base)")


def requantize(model: onnx.ModelProto, groups: Mapping[str, tuple], adapters: Sequence[Adapter]) -> dict[str, dict[str, float]]:
    """Replace each quantized site's weight by the requantized merged weight Q(W + Σ Δ_i); in place.

    W is the dequantized weight (:func:`dequantize`), Δ_i = s_i B_i A_i of each adapter on the
    site's modules (fused parts: their rows of W), summed in float64; Q keeps the input's format
    (MatMulNBits: bits, block size, symmetry, the scales' dtype and the zero points' packing; QDQ and
    dynamically quantized: :func:`_write_qdq`). Returns, per stem, the requantization error against the adapter's effect:
    ``max_error`` = max|Q(W+Δ) − (W+Δ)|, ``max_effect`` = max|Δ|, and ``rms_ratio`` =
    ‖Q(W+Δ) − (W+Δ)‖_F / ‖Δ‖_F (about 1 or more: the rounding is as large as the adapter).
    """
    graph = model.graph
    reports = {}
    for stem, (layout, sites) in groups.items():
        site = sites[0]
        W = dequantize(graph, site)
        delta = np.zeros_like(W)
        row = 0
        for module, width in layout.parts:
            for adapter in adapters:
                if module in adapter.modules:
                    lora = adapter.modules[module]
                    delta[row:row + width] += adapter.scale_for(module) * (lora.B.astype(np.float64) @ lora.A.astype(np.float64))
            row += width
        target = W + delta
        if site.dequantize is not None or site.integer is not None:
            _check_private(graph, site)
            _write_qdq(graph, site, target)
        else:
            _write_nbits(graph, site, target)
        error = dequantize(graph, site) - target
        norm = float(np.linalg.norm(delta))
        reports[stem] = {"max_error": float(np.abs(error).max()), "max_effect": float(np.abs(delta).max()),
                         "rms_ratio": float(np.linalg.norm(error) / norm) if norm else float("inf")}
    return reports
