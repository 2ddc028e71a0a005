"""Oracles for mixed batches of every kind and variant (SPEC M.1): ``mixed_embedding.*``, ``mixed_conv{d}d.*`` and
``mixed_linear.*`` (Linear adapters with lora_bias.i, or DoRA rows with magnitude.i and their own norms).

Composed from the single-adapter oracles (``layer_operations.py``, ``conv_operations.py``), never
from the reference: row b (the first axis of ids or x) routed to adapter i = index[b] has
exactly the single-adapter layer's value with adapter i's factors and scale; a base row (−1)
the same layer with B = 0 (its LoRA term and that term's magnitude are exactly zero). The
per-row magnitudes are taken from the oracle that produced the row and the depth is the
largest of the rows' depths (K with max r_i), so the bound is the single-layer one:

    mixed_embedding.forward   y[b] = W[ids[b]] + s_i Aᵢᵀ[ids[b]] Bᵢᵀ            K = max r_i + 6
    mixed_embedding.backward  dA.i, dB.i = embedding.backward over adapter i's rows only
                              K = P_i + D + 6, P_i + 6   (P_i = ids in adapter i's rows)
    mixed_conv{d}d.forward    y[b] = conv(x[b], W) + bias + s_i conv₁ₓ₁(conv(x[b], A_i), B_i)
                              K = C·∏k + max r_i + 6
    mixed_conv{d}d.backward   dx[b] = conv.backward's dx with adapter i (base rows: B = 0)
                              K = O + max r_i + ∏k + 6;
                              dA.i, dB.i = conv.backward over adapter i's rows  K = P_i + O + 6, P_i + C·∏k + 6

    mixed_linear.forward      row b = linear.forward (with lora_bias.i) or dora.forward (magnitude.i: its own
                              g_i = m_i / ‖W + s_i B_i A_i‖) of adapter index[b]     K = the rows' largest
    mixed_linear.backward     dx[b] from its adapter's backward; dA.i, dB.i, dlora_bias.i, dmagnitude.i from
                              linear.backward / dora.backward over adapter i's rows only

An adapter with no rows gets exact zero gradients (value 0, magnitude 0). A ``dropout_mask`` input (training)
travels with its rows: row b's single-adapter oracle sees mask[b] (Linear, Conv: the LoRA input x[b] ∘ mask[b],
a DoRA row SPEC 4.3's training formula; ``conv_operations.py`` and ``layer_operations.py`` give the bounds).

    stack_{linear,embedding,conv{d}d}.forward   every adapter active on every row, unmerged:
                              y = base(x) + b + Σ_j s_j (lora_j(x) + lora_bias_j)   K = forward K(max r_j) + n − 1
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .conv_operations import _forward as conv_terms
from .conv_operations import conv_backward, conv_forward
from .layer_operations import _embedding_forward, dora_backward, dora_forward, embedding_backward, embedding_forward
from .operations import Expected, Inputs, Params, _linear_forward, bounded, linear_backward, linear_forward, register

Oracle = Callable[[Inputs, Params], dict[str, Expected]]
#: An operation's single-adapter oracle for adapter i's inputs (``None``: the base row's).
Chooser = Callable[[Inputs], Oracle]


def _adapter_inputs(inputs: Inputs, i: int | None, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The single-adapter inputs of adapter i (every ``name.i`` as ``name``; None: the base, B = 0 and no
    lora_bias or magnitude), restricted to batch ``rows`` if given."""
    j = 0 if i is None else i
    out = {k: v for k, v in inputs.items() if "." not in k and k != "index"}
    out.update({k.partition(".")[0]: v for k, v in inputs.items() if k.endswith(f".{j}") and (i is not None or k[0] in "AB")})
    if i is None:
        out["B"] = np.zeros_like(out["B"])
    if rows is not None:
        for name in ("x", "ids", "dy", "dropout_mask"):  # per-row inputs
            if name in out:
                out[name] = out[name][rows]
    return out


def _one(oracle: Oracle) -> Chooser:
    return lambda inputs: oracle


def _routed(choose: Chooser, name: str, inputs: Inputs, params: Params) -> Expected:
    """Output ``name`` row by row: each batch row from its own adapter's (or the base's) single-adapter oracle."""
    index = np.asarray(inputs["index"]).reshape(-1)
    adapters = params["adapters"]
    base_inputs = _adapter_inputs(inputs, None)
    base = choose(base_inputs)(base_inputs, adapters[0])[name]
    value, magnitude, depth = base.value.copy(), base.magnitude.copy(), base.depth
    for i, adapter in enumerate(adapters):
        rows = index == i
        if rows.any():
            sub = _adapter_inputs(inputs, i)
            part = choose(sub)(sub, adapter)[name]
            value[rows], magnitude[rows], depth = part.value[rows], part.magnitude[rows], max(depth, part.depth)
    return Expected("bound", value, magnitude, depth)


def _factor_grads(choose: Chooser, inputs: Inputs, params: Params, want_base_grads: bool = False) -> dict[str, Expected]:
    """dA.i, dB.i (and dlora_bias.i, dmagnitude.i where adapter i has them) from adapter i's rows only
    (exact zeros for an adapter without rows)."""
    index = np.asarray(inputs["index"]).reshape(-1)
    result = {}
    for i, adapter in enumerate(params["adapters"]):
        rows = np.flatnonzero(index == i)
        names = ["A", "B"] + [n for n in ("lora_bias", "magnitude") if f"{n}.{i}" in inputs]
        if rows.size:
            sub = _adapter_inputs(inputs, i, rows)
            grads = choose(sub)(sub, {**adapter, "want_base_grads": want_base_grads})
            result.update({f"d{n}.{i}": grads[f"d{n}"] for n in names})
        else:
            for n in names:
                zero = np.zeros(np.shape(inputs[f"{n}.{i}"]))
                result[f"d{n}.{i}"] = Expected("bound", zero, zero, 1)
    return result


def _kind_params(params: Params) -> Callable[[Params], Params]:
    """Per-adapter params with the layer's shared geometry (stride, padding, dilation) added."""
    shared = {k: params[k] for k in ("stride", "padding", "dilation") if k in params}
    return lambda adapter: {**adapter, **shared}


def _with_geometry(params: Params) -> Params:
    return {**params, "adapters": [_kind_params(params)(a) for a in params["adapters"]]}


@register("mixed_embedding.forward", "SPEC M.1, C.3")
def mixed_embedding_forward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Embedding mixed batch: ids [batch, ...], W [V, D], A.i [r_i, V], B.i [D, r_i]; row b uses adapter index[b]."""
    return {"y": _routed(_one(embedding_forward), "y", inputs, params)}


@register("mixed_embedding.backward", "SPEC M.1, C.3")
def mixed_embedding_backward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """dA.i, dB.i of an Embedding mixed batch, from adapter i's rows only (ids carry no gradient)."""
    return _factor_grads(_one(embedding_backward), inputs, params)


def mixed_conv_forward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Conv mixed batch: x [N, C, *S], W [O, C, *k], A.i [r_i, C, *k], B.i [O, r_i, 1..]; params stride/padding/dilation shared."""
    return {"y": _routed(_one(conv_forward), "y", inputs, _with_geometry(params))}


def mixed_conv_backward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """dx per row (its adapter's conv backward; base rows the base's), dA.i, dB.i over adapter i's rows."""
    params = _with_geometry(params)
    return {"dx": _routed(_one(conv_backward), "dx", inputs, params), **_factor_grads(_one(conv_backward), inputs, params)}


def _linear_variant(forward: bool) -> Chooser:
    """dora.* for an adapter with a magnitude, else linear.* (lora_bias included when given)."""
    return lambda sub: (dora_forward if forward else dora_backward) if "magnitude" in sub else (linear_forward if forward else linear_backward)


@register("mixed_linear.forward", "SPEC M.1, 4.3, C.3")
def mixed_linear_forward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Linear mixed batch with variant adapters: lora_bias.i [out] (scaled by s_i), or magnitude.i [out] (a DoRA row)."""
    return {"y": _routed(_linear_variant(True), "y", inputs, params)}


@register("mixed_linear.backward", "SPEC M.1, 4.3, C.3")
def mixed_linear_backward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """dx per row (its adapter's backward, a DoRA row's with G = g_i ∘ dY), and per adapter its gradients over its rows."""
    dx = _routed(_linear_variant(False), "dx", {k: v for k, v in inputs.items() if k != "b"}, params)
    return {"dx": dx, **_factor_grads(_linear_variant(False), inputs, params, want_base_grads=True)}


for _d in (1, 2, 3):
    register(f"mixed_conv{_d}d.forward", "SPEC M.1, C.3")(mixed_conv_forward)
    register(f"mixed_conv{_d}d.backward", "SPEC M.1, C.3")(mixed_conv_backward)


# -- active stacks: several adapters active at once on every row, unmerged (SPEC M.2) ---------------------
def _stack_terms(kind: str, inputs: Inputs, params: Params, absolute: bool) -> list:
    """base(x) (+ bias) once, plus every adapter j's LoRA term s_j lora_j(x) (+ s_j lora_bias_j), as exact terms."""
    def single(sub: dict, adapter: Params) -> list:
        if kind == "embedding":
            return _embedding_forward(sub, adapter, absolute)
        if kind == "conv":
            return conv_terms(sub, _kind_params(params)(adapter), absolute)[0]
        return _linear_forward(sub, adapter, absolute)[0]

    terms: list = []
    for j, adapter in enumerate(params["adapters"]):
        sub = _adapter_inputs(inputs, j)
        if j:
            sub.pop("b", None)
        first = single(sub, adapter)
        terms += first if not j else first[1:]
    return terms


def _stack_forward(kind: str, inputs: Inputs, params: Params) -> dict[str, Expected]:
    """y = base(x) + b + Σ_j s_j (lora_j(x) + lora_bias_j): each term's path is the single layer's, plus n − 1
    additions of the adapters' terms, so K = the kind's forward K at max r_j, plus n − 1."""
    adapters = params["adapters"]
    value_terms, abs_terms = _stack_terms(kind, inputs, params, False), _stack_terms(kind, inputs, params, True)
    max_r = max(inputs[f"A.{j}"].shape[0] for j in range(len(adapters)))
    length = {"linear": inputs["W"].shape[-1], "embedding": 0, "conv": int(np.prod(inputs["W"].shape[1:]))}[kind]
    shape = tuple(value_terms[0][1].shape)
    return {"y": bounded(value_terms, abs_terms, shape, length + max_r + 6 + len(adapters) - 1)}


for _kind, _group in (("linear", "stack_linear"), ("embedding", "stack_embedding"), *(("conv", f"stack_conv{d}d") for d in (1, 2, 3))):
    def _stack(inputs: Inputs, params: Params, _k: str = _kind) -> dict[str, Expected]:
        return _stack_forward(_k, inputs, params)

    _stack.__doc__ = f"Active stack on a {_kind} layer: every adapter on every row, unmerged (``_stack_forward``)."
    register(f"{_group}.forward", "SPEC M.2, C.3")(_stack)
