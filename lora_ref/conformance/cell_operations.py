"""Oracles for mixed batches of Embedding and Conv layers (SPEC M.1): ``mixed_embedding.*``, ``mixed_conv{d}d.*``.

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

An adapter with no rows gets exact zero gradients (value 0, magnitude 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .conv_operations import conv_backward, conv_forward
from .layer_operations import embedding_backward, embedding_forward
from .operations import Expected, Inputs, Params, register

Oracle = Callable[[Inputs, Params], dict[str, Expected]]


def _adapter_inputs(inputs: Inputs, i: int | None, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The single-adapter inputs of adapter i (None: the base, B = 0), restricted to batch ``rows`` if given."""
    j = 0 if i is None else i
    out = {k: v for k, v in inputs.items() if "." not in k and k != "index"}
    out["A"], out["B"] = inputs[f"A.{j}"], inputs[f"B.{j}"] if i is not None else np.zeros_like(inputs[f"B.{j}"])
    if rows is not None:
        for name in ("x", "ids", "dy"):
            if name in out:
                out[name] = out[name][rows]
    return out


def _routed(oracle: Oracle, name: str, inputs: Inputs, params: Params) -> Expected:
    """Output ``name`` of ``oracle`` row by row: each batch row from its own adapter's (or the base's) layer."""
    index = np.asarray(inputs["index"]).reshape(-1)
    adapters = params["adapters"]
    base = oracle(_adapter_inputs(inputs, None), adapters[0])[name]
    value, magnitude, depth = base.value.copy(), base.magnitude.copy(), base.depth
    for i, adapter in enumerate(adapters):
        rows = index == i
        if rows.any():
            part = oracle(_adapter_inputs(inputs, i), adapter)[name]
            value[rows], magnitude[rows], depth = part.value[rows], part.magnitude[rows], max(depth, part.depth)
    return Expected("bound", value, magnitude, depth)


def _factor_grads(oracle: Oracle, inputs: Inputs, params: Params) -> dict[str, Expected]:
    """dA.i, dB.i from adapter i's rows only (exact zeros for an adapter without rows)."""
    index = np.asarray(inputs["index"]).reshape(-1)
    result = {}
    for i, adapter in enumerate(params["adapters"]):
        rows = np.flatnonzero(index == i)
        if rows.size:
            grads = oracle(_adapter_inputs(inputs, i, rows), {**adapter, "want_base_grads": False})
            result[f"dA.{i}"], result[f"dB.{i}"] = grads["dA"], grads["dB"]
        else:
            for g in ("A", "B"):
                zero = np.zeros(np.shape(inputs[f"{g}.{i}"]))
                result[f"d{g}.{i}"] = Expected("bound", zero, zero, 1)
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
    return {"y": _routed(embedding_forward, "y", inputs, params)}


@register("mixed_embedding.backward", "SPEC M.1, C.3")
def mixed_embedding_backward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """dA.i, dB.i of an Embedding mixed batch, from adapter i's rows only (ids carry no gradient)."""
    return _factor_grads(embedding_backward, inputs, params)


def mixed_conv_forward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Conv mixed batch: x [N, C, *S], W [O, C, *k], A.i [r_i, C, *k], B.i [O, r_i, 1..]; params stride/padding/dilation shared."""
    return {"y": _routed(conv_forward, "y", inputs, _with_geometry(params))}


def mixed_conv_backward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """dx per row (its adapter's conv backward; base rows the base's), dA.i, dB.i over adapter i's rows."""
    params = _with_geometry(params)
    return {"dx": _routed(conv_backward, "dx", inputs, params), **_factor_grads(conv_backward, inputs, params)}


for _d in (1, 2, 3):
    register(f"mixed_conv{_d}d.forward", "SPEC M.1, C.3")(mixed_conv_forward)
    register(f"mixed_conv{_d}d.backward", "SPEC M.1, C.3")(mixed_conv_backward)
