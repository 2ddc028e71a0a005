"""Small graph-editing helpers shared by the merged, dynamic and batched builders.

Also the one place that turns a PEFT module into the graph's LoRA factors:

    A_g = A^T            [in, r]
    B_g = s · B^T        [r, out]     (scale folded into B)

each computed in float64 and rounded once to the graph's dtype, so that
x A_g B_g = s (x A^T) B^T, the LoRA term of SPEC 2.3 in PEFT's layout. For an Embedding
(A = lora_embedding_A [r, V], B = lora_embedding_B [D, r]) the same formulas give A_g [V, r]
(in = num_embeddings) and B_g [r, D], and the LoRA term is A_g[ids] B_g = s A^T[ids] B^T.
A Conv keeps PEFT's conv layouts instead, A_g = A [r, C, *k] and B_g = s·B [O, r, 1, ...], so
that conv₁ₓ₁(conv(x, A_g), B_g) is the LoRA term of SPEC 4.2 with two plain ONNX Conv nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lora_ref.adapter import Adapter
from lora_ref.dtypes import round_to
from lora_ref.errors import NonFiniteError
from lora_ref.kinds import kind_of
from lora_ref.kinds import kinds as registered_kinds

from .errors import ExportConfigError
from .locate import TargetSite
from .names import slot_names


def lora_a_name(module: str) -> str:
    """Graph input holding A^T [in, r] (lora-ref's ``peft`` names; others: :func:`lora_ref.export.names.slot_names`)."""
    return slot_names(module)[0]


def lora_b_name(module: str) -> str:
    """Graph input holding s·B^T [r, out]."""
    return slot_names(module)[1]


def lora_bias_name(module: str) -> str:
    """Graph input holding s·lora_bias [out] (dynamic graphs of modules with lora_bias)."""
    return slot_names(module)[2]


#: The layer kinds each graph kind expresses.
EXPORTABLE_KINDS = {mode: tuple(registered_kinds()) for mode in ("merged", "dynamic", "batched")}


def check_exportable(adapter: Adapter, module: str, mode: str = "merged") -> None:
    """Refuse adapter features the ``mode`` graph does not express (typed ExportConfigError), and non-finite values."""
    lora = adapter.modules[module]
    where = f"adapter {adapter.name!r}, module {module}"
    kinds = EXPORTABLE_KINDS[mode]
    if lora.kind not in kinds:
        raise ExportConfigError(f"{where}: {mode} graphs take {'/'.join(kinds)} LoRA layers, not {lora.kind} ones; "
                                "use --mode merged")
    if adapter.config.use_dora and lora.magnitude is None:
        raise ExportConfigError(f"{where}: the config sets use_dora but the module has no lora_magnitude_vector; "
                                "fix the adapter (or unset use_dora for plain LoRA)")
    if lora.magnitude is not None:
        check_dora_exportable(adapter, module, mode)
    if not all(np.all(np.isfinite(array)) for array in lora.arrays().values()):
        raise NonFiniteError(f"{where}: the adapter holds NaN or infinity; refusing to export it")


def check_dora_exportable(adapter: Adapter, module: str, mode: str) -> None:
    """Refuse DoRA the ``mode`` graph does not express (typed ExportConfigError naming why).

    Every graph kind takes DoRA on every layer kind: merged graphs merge g ∘ (W + ΔW), dynamic
    ones compute the norm in the graph, batched ones gather a per-row gain (SPEC E.2).

    Dynamic graphs read m_c = 0 as "channel c is not DoRA-scaled" (gain exactly 1: the default
    magnitude, so a plain LoRA adapter or none runs as without DoRA; see
    :mod:`lora_ref.export.dynamic`), so a magnitude entry of exactly 0 is refused there.
    """
    lora = adapter.modules[module]
    where = f"adapter {adapter.name!r}, module {module}"
    if mode == "dynamic" and not np.all(np.asarray(lora.magnitude) != 0):
        raise ExportConfigError(f"{where}: a DoRA magnitude entry is exactly 0, which a dynamic graph reads as "
                                "'no DoRA on this channel' (gain 1); use --mode merged or batched")


def detach_bias(graph: onnx.GraphProto, site: TargetSite, namer: Namer) -> str | None:
    """Remove the base bias from the site node itself (Gemm's C, Conv's B) and return the tensor to add after, else None.

    DoRA scales x·Wᵀ but not the bias (y = g ∘ (x W^T + lora) + b), so a bias inside the
    node must be added after the scaling. Gemm with beta != 1 scales C: UnsupportedGraphError.
    A bias added by a later Add node (MatMul + Add) stays where it is (already after the site).
    A Conv's bias [O] is returned as a copy shaped [O, 1...] to broadcast over [N, O, *S].
    """
    from .errors import UnsupportedGraphError

    if site.bias is None or site.bias_node != site.node:
        return None
    node = graph.node[site.node]
    beta = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "beta"), 1.0)
    if float(beta) != 1.0:
        raise UnsupportedGraphError(f"{site.module}: Gemm {node.name or node.output[0]!r} has beta != 1 (its bias is scaled)")
    del node.input[2:]
    if kind_of(site.kind).export.factor_layout != "kernel":
        return site.bias
    value = numpy_helper.to_array(next(t for t in graph.initializer if t.name == site.bias))
    shaped = namer(f"{site.bias}.channels")
    graph.initializer.append(numpy_helper.from_array(value.reshape((-1,) + (1,) * (len(site.weight_shape) - 2)), shaped))
    return shaped


def dora_scale(pre: str, out: str, gain: str, bias: str | None, namer: Namer, module: str) -> list[onnx.NodeProto]:
    """out = gain ∘ pre (+ bias): DoRA's per-channel gain on the unscaled sum, then the unscaled bias."""
    scaled = out if bias is None else namer(f"{module}.lora_dora_scaled")
    nodes = [helper.make_node("Mul", [pre, gain], [scaled], name=namer(f"{module}.lora_dora_scale"))]
    if bias is not None:
        nodes.append(helper.make_node("Add", [scaled, bias], [out], name=namer(f"{module}.lora_dora_bias")))
    return nodes


def check_fits(adapter: Adapter, module: str, site: TargetSite, mode: str = "merged") -> None:
    """ShapeError unless the module's tensors fit the graph weight at ``site`` (kind, in/out, kernel).

    Merging lora_bias needs a base bias in the graph (as PEFT and the core's checkpoint merge).
    """
    from lora_ref.errors import ShapeError

    from .errors import UnsupportedGraphError

    lora = adapter.modules[module]
    where = f"adapter {adapter.name!r}, module {module}"
    if lora.kind != site.kind:
        raise ShapeError(f"{where}: a {lora.kind} adapter, but the graph uses {site.weight!r} as a {site.kind} weight")
    in_features = lora.A.shape[1]
    fits = in_features == site.in_features and lora.B.shape[0] == site.out_features
    if kind_of(lora.kind).kernel_axes:
        fits = fits and tuple(lora.A.shape[2:]) == tuple(site.weight_shape[2:])
    if not fits:
        raise ShapeError(
            f"{where}: lora_A {lora.A.shape} / lora_B {lora.B.shape} do not fit the "
            f"graph weight {site.weight!r} {site.weight_shape} ({site.in_features} in, {site.out_features} out)"
        )
    if mode == "merged" and lora.lora_bias is not None and site.bias is None:
        raise UnsupportedGraphError(f"{where}: lora_bias merges into the base layer's bias, but the graph's "
                                    f"{site.weight!r} layer has none (export it --mode dynamic instead)")


def lora_bias_term(adapter: Adapter, module: str, dtype: np.dtype) -> np.ndarray:
    """round_t(s · lora_bias) [out]; zeros when the module has no lora_bias."""
    lora = adapter.modules[module]
    if lora.lora_bias is None:
        return np.zeros(lora.B.shape[0], dtype)
    return round_to(adapter.scale_for(module) * lora.lora_bias.astype(np.float64), dtype)


def lora_factors(adapter: Adapter, module: str, dtype: np.dtype, *, pad_to: int | None = None,
                 mode: str = "dynamic", graph_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The graph's (A_g, B_g) rounded once to ``dtype``, rank r' = ``pad_to`` (zero-padded) or r.

    ``graph_scale`` s_g: the graph multiplies the branch by a constant s_g itself, so B_g carries
    s / s_g (computed in float64; exactly 1 when the adapter's s is the graph's).

    Linear/Embedding: (A^T [in, r'], s·B^T [r', out]); Conv: (A [r', C, *k], s·B [O, r', 1...]).
    """
    check_exportable(adapter, module, mode)
    lora = adapter.modules[module]
    r = lora.rank
    width = r if pad_to is None else pad_to
    if width < r:
        raise ExportConfigError(f"adapter {adapter.name!r}, module {module}: rank {r} exceeds the maximum rank {width}")
    s = adapter.scale_for(module) / graph_scale
    if kind_of(lora.kind).export.factor_layout == "kernel":
        A = np.zeros((width, *lora.A.shape[1:]), np.float64)
        B = np.zeros((lora.B.shape[0], width, *lora.B.shape[2:]), np.float64)
        A[:r] = lora.A.astype(np.float64)
        B[:, :r] = s * lora.B.astype(np.float64)
    else:
        A = np.zeros((lora.A.shape[1], width), np.float64)
        B = np.zeros((width, lora.B.shape[0]), np.float64)
        A[:, :r] = lora.A.astype(np.float64).T
        B[:r, :] = s * lora.B.astype(np.float64).T
    return round_to(A, dtype), round_to(B, dtype)


def factor_shapes(site: TargetSite, rank: int | str) -> tuple[list[int | str], list[int | str]]:
    """Shapes of (A_g, B_g) at ``site`` with rank ``rank``: [in, r] / [r, out]; Conv [r, C, *k] / [O, r, 1...]."""
    if kind_of(site.kind).export.factor_layout == "kernel":
        ones = [1] * (len(site.weight_shape) - 2)
        return [rank, *site.weight_shape[1:]], [site.out_features, rank, *ones]
    return [site.in_features, rank], [rank, site.out_features]


#: Base Conv attributes a LoRA A conv copies (group is 1: the locator refuses grouped convs).
CONV_GEOMETRY = ("auto_pad", "dilations", "kernel_shape", "pads", "strides")


def conv_with_base_geometry(graph: onnx.GraphProto, site: TargetSite, kernel: str, output: str, name: str) -> onnx.NodeProto:
    """Conv(site.x, kernel) -> output with the site's base Conv geometry (SPEC 4.2: A uses the base's)."""
    node = helper.make_node("Conv", [site.x, kernel], [output], name=name)
    node.attribute.extend(a for a in graph.node[site.node].attribute if a.name in CONV_GEOMETRY)
    return node


class Namer:
    """Fresh tensor/node names that collide with nothing already in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used: set[str] = {t.name for t in graph.initializer}
        self.used.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
        for node in graph.node:
            self.used.update(node.output)
            self.used.update(node.input)
            self.used.add(node.name)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def rename_output(graph: onnx.GraphProto, site: TargetSite, namer: Namer) -> str:
    """Give the site node's output a fresh name and return it; the old name is then free for an Add."""
    node = graph.node[site.node]
    fresh = namer(f"{site.y}.base")
    node.output[0] = fresh
    return fresh


def splice(graph: onnx.GraphProto, after: Mapping[int, Sequence[onnx.NodeProto]], prelude: Iterable[onnx.NodeProto] = ()) -> None:
    """Rebuild ``graph.node`` with ``prelude`` first and ``after[i]`` inserted after node i (keeps topological order)."""
    nodes = list(prelude)
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, ()))
    del graph.node[:]
    graph.node.extend(nodes)


def elem_type(graph: onnx.GraphProto, initializer: str) -> int:
    """The TensorProto data type of initializer ``initializer``."""
    return next(t.data_type for t in graph.initializer if t.name == initializer)


def np_dtype(data_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
