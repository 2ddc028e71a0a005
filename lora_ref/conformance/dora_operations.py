"""Oracles for DoRA on Embedding and Conv2d (SPEC 4.3): ``dora_embedding.*`` and ``dora_conv2d.*``.

With the kind's ΔW (Embedding s Aᵀ Bᵀ [V, D]; Conv s (B A) in the kernel's shape), V = W + ΔW,
the norm over every axis of V but the output-channel axis (Embedding: column c of [V, D], over
the vocabulary; Conv: V[c] over (C, kh, kw)) and g = m / n:

    forward (eval)  y = g ∘ (base(x) + lora(x)) + b     (Embedding: no bias; g along y's last axis)
    merge           W' = g ∘ (W + ΔW)
    unmerge (exact) round trip: W_merged as merge, W_restored = W bit for bit

The first-order bound is the Linear one (``layer_operations.py``) with its lengths generalised:
z = base(x) + lora(x) has error ≤ γ_{K1} M_z (K1 = r + 6 for Embedding, C·kh·kw + r + 6 for
Conv), V's elements ≤ γ_{r+6} N (N = |W| + |s||ΔW|-expression), and the norm over L elements
(L = V for Embedding, C·kh·kw for Conv) gives g a relative error ≤ γ_{r+6}‖N_c‖/n_c + γ_{L+3}, so

    |ŷ − y| ≤ γ_{K+3} (|g| M_z + |g z| (‖N_c‖/n_c + 2) + |b|),   K = max(K1, r + 6, L + 3)
    |Ŵ' − W'| ≤ γ_{r+L+9} |g| (N + |V| (‖N_c‖/n_c + 2))

stored with doubled depths (a factor two for second-order terms), exactly as for Linear (where
L = in and K = K1 = in + r + 6, so these formulas give the Linear cases' depths).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import numpy as np

from ..errors import ConfigError
from .conv_operations import _forward as _conv_terms
from .conv_operations import conv_delta
from .exact import Dyadic, sqrt_fraction, to_float64
from .layer_operations import _embedding_delta, _embedding_forward, combine_fractions
from .operations import Expected, Inputs, Params, register

#: kind -> (W's output-channel axis, the output's channel axis)
_AXES = {"embedding": (1, -1), "conv": (0, 1)}


def _delta(kind: str, inputs: Inputs, params: Params) -> Callable[[bool], tuple[Fraction, Dyadic]]:
    return _embedding_delta(inputs, params) if kind == "embedding" else conv_delta(inputs, params, inputs["W"].shape)


def _norms(V: np.ndarray, axis: int) -> np.ndarray:
    """‖V_c‖ over every axis but ``axis`` (Fractions, square roots to 2^-200)."""
    rows = np.moveaxis(V, axis, 0).reshape(V.shape[axis], -1)
    return np.array([sqrt_fraction(sum((v * v for v in row), Fraction(0))) for row in rows], dtype=object)


def _pieces(kind: str, inputs: Inputs, params: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(V, N, n, ‖N_c‖) as Fractions: V = W + ΔW, N = |W| + |ΔW| evaluated on absolute values."""
    W = Dyadic.of(inputs["W"], what="W")
    delta = _delta(kind, inputs, params)
    (s, D), (abs_s, abs_D) = delta(False), delta(True)
    V = combine_fractions([(Fraction(1), W), (s, D)])
    N = combine_fractions([(Fraction(1), W.abs()), (abs_s, abs_D)])
    axis = _AXES[kind][0]
    return V, N, _norms(V, axis), _norms(N, axis)


def _along(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _norm_length(kind: str, inputs: Inputs) -> int:
    W = inputs["W"]
    return W.shape[0] if kind == "embedding" else int(np.prod(W.shape[1:]))


def _forward(kind: str, inputs: Inputs, params: Params) -> dict[str, Expected]:
    _, _, norms, abs_norms = _pieces(kind, inputs, params)
    g = Dyadic.of(inputs["magnitude"], what="magnitude").fractions() / norms
    unbiased = {k: v for k, v in inputs.items() if k != "b"}
    if kind == "embedding":
        terms, abs_terms = _embedding_forward(unbiased, params, False), _embedding_forward(unbiased, params, True)
        k1 = inputs["A"].shape[0] + 6
    else:
        (terms, _), (abs_terms, _) = _conv_terms(unbiased, params, False), _conv_terms(unbiased, params, True)
        k1 = int(np.prod(inputs["W"].shape[1:])) + inputs["A"].shape[0] + 6
    z, Mz = combine_fractions(terms), combine_fractions(abs_terms)
    channel = _AXES[kind][1]
    gz = _along(g, z.ndim, channel) * z
    b = Dyadic.of(inputs["b"], what="b").fractions() if "b" in inputs else np.zeros(len(g), dtype=object) + Fraction(0)
    ratio = _along(abs_norms / norms + 2, z.ndim, channel)
    y = gz + _along(b, z.ndim, channel)
    magnitude = _along(np.abs(g), z.ndim, channel) * Mz + np.abs(gz) * ratio + _along(np.abs(b), z.ndim, channel)
    depth = max(k1, inputs["A"].shape[0] + 6, _norm_length(kind, inputs) + 3) + 3
    return {"y": Expected("bound", to_float64(y), to_float64(magnitude), 2 * depth)}


def _merge(kind: str, inputs: Inputs, params: Params) -> dict[str, Expected]:
    V, N, norms, abs_norms = _pieces(kind, inputs, params)
    axis = _AXES[kind][0]
    g = _along(Dyadic.of(inputs["magnitude"], what="magnitude").fractions() / norms, V.ndim, axis)
    ratio = _along(abs_norms / norms + 2, V.ndim, axis)
    depth = 2 * (inputs["A"].shape[0] + _norm_length(kind, inputs) + 9)
    return {"W_merged": Expected("bound", to_float64(g * V), to_float64(np.abs(g) * (N + np.abs(V) * ratio)), depth)}


def _unmerge(kind: str, inputs: Inputs, params: Params) -> dict[str, Expected]:
    if not params.get("exact", False):
        raise ConfigError(f"dora_{kind} unmerge cases are exact round trips (exact: true)")
    return {**_merge(kind, inputs, params), "W_restored": Expected("bitwise", np.array(inputs["W"]))}


for _kind, _group in (("embedding", "dora_embedding"), ("conv", "dora_conv2d")):
    for _action, _oracle in (("forward", _forward), ("merge", _merge), ("unmerge", _unmerge)):
        def _bound(inputs: Inputs, params: Params, _k: str = _kind, _f=_oracle) -> dict[str, Expected]:
            return _f(_k, inputs, params)

        _bound.__doc__ = f"DoRA on {_kind}: {_action} (module docstring)."
        register(f"{_group}.{_action}", "SPEC 4.3, 3.4, C.3" if _action == "unmerge" else "SPEC 4.3, C.3")(_bound)
