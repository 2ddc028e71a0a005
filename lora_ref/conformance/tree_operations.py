"""Oracles for adapter trees and merged stacks (SPEC M.2, M.4): ``tree_{linear,embedding,conv1d,conv2d,conv3d}.switch``.

A case holds a base W, node adapters i (A.i, B.i, and magnitude.i for a DoRA node), ``parents``
(parents[i]: the parent node, None for a child of the base) and ``visits``, the nodes the weights
are switched to in turn (−1: the bare base). A switch a → b is an op of its own: unmerge path(a)
below the lowest common ancestor c, last merged first (LIFO), then merge path(b) below c in order
(exact mode: each step keeps its residual). A merged stack is the tree that is a chain. Output
``W.k`` is the weight after visit k:

* the first visit of node n: the merge of path(n) = (n_1, ..., n_L) from the base, one rounding
  to t per step, a DoRA step P_j = g_j ∘ (P_{j−1} + ΔW_j) with g_j = m_j / ‖P_{j−1} + ΔW_j‖ (its norm
  from the weight as merged so far), a plain step P_j = P_{j−1} + ΔW_j;
* a later visit of n: **bitwise** the output of n's first visit (``equals``): exact switching never
  drifts, so a LIFO error (unmerging in merge order, a residual of another step, a norm recomputed
  at unmerge) shows as different bits;
* a visit of the base: W's bits.

Bound of a first visit (first order, the DoRA merge one of ``dora_operations.py`` per step, then
propagated). The exact chain P_j has no intermediate rounding. An implementation's state Q_j has
error e_j = Q_j − P_j; step j maps e_{j−1} linearly to first order by J_j: a plain step adds ΔW
(J_j e = e); a DoRA step, with U = P_{j−1} + ΔW_j and n = ‖U_c‖, perturbs g ∘ U by
g ∘ δU − g ∘ U (U_c · δU_c) / n_c², so |J_j e| ≤ |g| (|e| + |U| ‖e_c‖ / n_c). Each step adds its own
merge error (the single-step magnitude N_j: |P_{j−1}| + |s||B||A| plain, K = r + 6; DoRA
|g| (N + |U| (‖N_c‖/n_c + 2)), K = 2 (r + L + 9), L the elements per norm) and, but for the last,
its rounding to t, ≤ u_t |P_j| + η_t / 2 (the last one is the runner's ½ ulp). With
M = Σ_j J_L⋯J_{j+1} N_j and S = Σ_{j<L} J_L⋯J_{j+1} (u_t |P_j| + η_t / 2):

    |Q_L − P_L| ≤ γ_K(u_c) · 2M + 2S + ½ ulp_t,     K = max_j K_j

stored as magnitude 2M, depth K and slack 2S (the factor 2 covers the second-order terms, each a
product of two relative errors ≤ γ_K ≪ 1, as for the other DoRA bounds). S does not depend on the
compute profile: the intermediate roundings to t are part of the definition of merging.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import numpy as np

from ..dtypes import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF
from .conv_operations import conv_delta
from .dora_operations import _norms
from .exact import Dyadic, to_float64
from .layer_operations import _embedding_delta
from .operations import Expected, Inputs, Params, _linear_delta, register

#: kind -> W's output-channel axis (the DoRA norm is over every other axis)
_AXIS = {"linear": 0, "embedding": 1, "conv": 0}


def _node_delta(kind: str, inputs: Inputs, params: Params, i: int) -> Callable[[bool], tuple[Fraction, Dyadic]]:
    factors = {"A": inputs[f"A.{i}"], "B": inputs[f"B.{i}"]}
    if kind == "embedding":
        return _embedding_delta(factors, params)
    if kind == "conv":
        return conv_delta(factors, params, inputs["W"].shape)
    return _linear_delta(factors, params)


def _channel_norms(E: np.ndarray, axis: int) -> np.ndarray:
    """‖E_c‖ (float64) over every axis but ``axis``, shaped to broadcast against E."""
    shape = [1] * E.ndim
    shape[axis] = -1
    return np.sqrt((np.moveaxis(E, axis, 0).reshape(E.shape[axis], -1) ** 2).sum(axis=1)).reshape(shape)


def path_of(parents: list, node: int) -> list[int]:
    """The nodes from the root down to ``node`` (empty for the base, −1)."""
    path = []
    while node is not None and node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def _chain(kind: str, inputs: Inputs, params: Params, path: list[int], dtype: np.dtype) -> Expected:
    """The exact merge chain along ``path`` with its propagated bound (module docstring)."""
    axis = _AXIS[kind]
    P = Dyadic.of(inputs["W"], what="W").fractions()
    M = np.zeros(P.shape)
    S = np.zeros(P.shape)
    depth = 0
    u_t, eta_t = UNIT_ROUNDOFF[dtype], SMALLEST_SUBNORMAL[dtype]
    shape = [1] * P.ndim
    shape[axis] = -1
    for step, i in enumerate(path):
        adapter = params["adapters"][i]
        delta = _node_delta(kind, inputs, adapter, i)
        (c, D), (abs_c, abs_D) = delta(False), delta(True)
        U = P + c * D.fractions()
        N = to_float64(np.abs(P)) + float(abs_c) * to_float64(abs_D.fractions())
        r = inputs[f"A.{i}"].shape[0]
        if f"magnitude.{i}" in inputs:
            n = _norms(U, axis)
            g = (Dyadic.of(inputs[f"magnitude.{i}"], what=f"magnitude.{i}").fractions() / n).reshape(shape)
            n64, g64, U64 = to_float64(n).reshape(shape), np.abs(to_float64(g)), np.abs(to_float64(U))
            propagate = (lambda E, g64=g64, U64=U64, n64=n64: g64 * (E + U64 * _channel_norms(E, axis) / n64))
            length = P.size // P.shape[axis]
            local, k = g64 * (N + U64 * (_channel_norms(N, axis) / n64 + 2)), 2 * (r + length + 9)
            P = g * U
        else:
            propagate, local, k = (lambda E: E), N, r + 6
            P = U
        M, S = propagate(M) + local, propagate(S)
        if step < len(path) - 1:  # rounded to t before the next step
            S = S + u_t * np.abs(to_float64(P)) + eta_t / 2
        depth = max(depth, k)
    return Expected("bound", to_float64(P), 2 * M, depth, slack=2 * S)


def tree_switch(kind: str, inputs: Inputs, params: Params) -> dict[str, Expected]:
    """``W.k`` after each visit (module docstring): a bounded chain, the bits of an earlier visit, or W's bits."""
    dtype = np.asarray(inputs["W"]).dtype
    first: dict[int, int] = {}
    out: dict[str, Expected] = {}
    for k, node in enumerate(params["visits"]):
        if node < 0:
            out[f"W.{k}"] = Expected("bitwise", np.array(inputs["W"]))
        elif node in first:
            out[f"W.{k}"] = Expected("equals", np.zeros(np.shape(inputs["W"])), same_as=f"W.{first[node]}")
        else:
            first[node] = k
            out[f"W.{k}"] = _chain(kind, inputs, params, path_of(params["parents"], node), dtype)
    return out


for _kind, _group in (("linear", "tree_linear"), ("embedding", "tree_embedding"), *(("conv", f"tree_conv{d}d") for d in (1, 2, 3))):
    def _switch(inputs: Inputs, params: Params, _k: str = _kind) -> dict[str, Expected]:
        return tree_switch(_k, inputs, params)

    _switch.__doc__ = f"Adapter tree / merged stack on a {_kind} layer: the weights after each switch (``tree_switch``)."
    register(f"{_group}.switch", "SPEC M.2, M.4, C.3")(_switch)
