"""Oracles for DoRA on Embedding and Conv1d/2d/3d (SPEC 4.3): ``dora_embedding.*`` and ``dora_conv{d}d.*``.

With the kind's ΔW (Embedding s Aᵀ Bᵀ [V, D]; Conv s (B A) in the kernel's shape), V = W + ΔW,
the norm over every axis of V but the output-channel axis (Embedding: column c of [V, D], over
the vocabulary; Conv: V[c] over (C, kh, kw)) and g = m / n:

    forward (eval)  y = g ∘ (base(x) + lora(x)) + b     (Embedding: no bias; g along y's last axis)
    merge           W' = g ∘ (W + ΔW)
    unmerge (exact) round trip: W_merged as merge, W_restored = W bit for bit
    backward (eval, n detached) with G = g ∘ dY (g along dY's channel axis): dx, dA, dB = the plain
                    kind's gradients at dY -> G (Embedding: dA, dB only); dm = Σ dY ∘ z / n over every
                    axis but the channel; db = Σ dY (Conv)
    backward (Conv, training: a dropout_mask, x̃ = x ∘ mask; SPEC 4.3) dx = base_vjp(dY) + mask ∘ (base_vjp((g − 1) ∘ dY)
                    + lora_vjp(G)); dA, dB, dm as eval on x̃ (z = base(x̃) + lora(x̃)); the (g − 1) terms' magnitude
                    |g − 1| + |g| ρ (g's error), K one more (the mask)

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

from .conv_operations import _backward as _conv_grad_terms
from .conv_operations import _forward as _conv_terms
from .conv_operations import conv_backward, conv_delta
from .exact import Dyadic, sqrt_fraction, to_float64
from .layer_operations import _embedding_backward, _embedding_delta, _embedding_forward, combine_fractions, dora_fast_unmerge, embedding_backward
from .operations import Expected, Inputs, Params, register

#: kind -> (W's output-channel axis, the output's channel axis)
_AXES = {"embedding": (1, -1), "conv": (0, 1)}


def _delta(kind: str, inputs: Inputs, params: Params) -> Callable[[bool], tuple[Fraction, Dyadic]]:
    return _embedding_delta(inputs, params) if kind == "embedding" else conv_delta(inputs, params, (inputs["W"] if "W" in inputs else inputs["W_merged"]).shape)


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
    channel = _AXES[kind][1]
    b = Dyadic.of(inputs["b"], what="b").fractions() if "b" in inputs else np.zeros(len(g), dtype=object) + Fraction(0)
    depth = max(k1, inputs["A"].shape[0] + 6, _norm_length(kind, inputs) + 3) + 3
    if "dropout_mask" in inputs:  # training (Conv): base(x) + b + (g − 1) ∘ base(x̃) + g ∘ lora(x̃), x̃ = x ∘ mask (SPEC 4.3)
        return {"y": _dropout_forward(inputs, params, g, abs_norms / norms + 2, terms[0], abs_terms[0], b, 2 * (depth + 1))}
    z, Mz = combine_fractions(terms), combine_fractions(abs_terms)
    gz = _along(g, z.ndim, channel) * z
    ratio = _along(abs_norms / norms + 2, z.ndim, channel)
    y = gz + _along(b, z.ndim, channel)
    magnitude = _along(np.abs(g), z.ndim, channel) * Mz + np.abs(gz) * ratio + _along(np.abs(b), z.ndim, channel)
    return {"y": Expected("bound", to_float64(y), to_float64(magnitude), 2 * depth)}


def _dropped(inputs: Inputs) -> dict:
    """``inputs`` with x replaced by x̃ = x ∘ mask and the mask removed (x̃ exact in t: entries 0 or 1/(1 − p) = 2)."""
    x = np.asarray(inputs["x"])
    x_drop = (x.astype(np.float64) * np.asarray(inputs["dropout_mask"]).astype(np.float64)).astype(x.dtype)
    return {**{k: v for k, v in inputs.items() if k != "dropout_mask"}, "x": x_drop}


def _dropout_forward(inputs: Inputs, params: Params, g: np.ndarray, rho: np.ndarray, base: tuple, abs_base: tuple,
                     b: np.ndarray, depth: int) -> Expected:
    """Conv DoRA in training: y = base(x) + b + (g − 1) ∘ base(x̃) + g ∘ lora(x̃) (PEFT's formula, SPEC 4.3).

    x̃ = x ∘ mask is exact in t (mask entries 0 or 1/(1 − p) = 2). Bound as the eval one, term by term:
    M = |base|(x) + |b| + |g − 1| M_base(x̃) + |g| M_lora(x̃) + |g| (M_base(x̃) + M_lora(x̃)) ρ, ρ = ‖N_c‖/n_c + 2
    (g's and g − 1's error), K one more than eval's (the mask), doubled for second-order terms.
    """
    dropped = _dropped({k: v for k, v in inputs.items() if k != "b"})
    (d_terms, _), (d_abs, _) = _conv_terms(dropped, params, False), _conv_terms(dropped, params, True)
    (_, base_d), (s, lora_d) = d_terms
    (_, abase_d), (abs_s, alora_d) = d_abs
    ndim = len(inputs["x"].shape)
    gc, gm1 = _along(g, ndim, 1), _along(g - 1, ndim, 1)
    base_x, abs_base_x = base[1].fractions() * base[0], abs_base[1].fractions() * abs_base[0]
    lora_v, alora_v = lora_d.fractions() * s, alora_d.fractions() * abs_s
    bc = _along(b, ndim, 1)
    y = base_x + bc + gm1 * base_d.fractions() + gc * lora_v
    Mb, Ml = abase_d.fractions(), alora_v
    magnitude = (abs_base_x + np.abs(bc) + np.abs(gm1) * Mb + np.abs(gc) * Ml + np.abs(gc) * (Mb + Ml) * _along(rho, ndim, 1))
    return Expected("bound", to_float64(y), to_float64(magnitude), depth)


def _merge(kind: str, inputs: Inputs, params: Params) -> dict[str, Expected]:
    V, N, norms, abs_norms = _pieces(kind, inputs, params)
    axis = _AXES[kind][0]
    g = _along(Dyadic.of(inputs["magnitude"], what="magnitude").fractions() / norms, V.ndim, axis)
    ratio = _along(abs_norms / norms + 2, V.ndim, axis)
    depth = 2 * (inputs["A"].shape[0] + _norm_length(kind, inputs) + 9)
    return {"W_merged": Expected("bound", to_float64(g * V), to_float64(np.abs(g) * (N + np.abs(V) * ratio)), depth)}


def _unmerge(kind: str, inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Exact round trip; or fast, W = W_merged / g − ΔW with the merge-time norm given (``dora_fast_unmerge``)."""
    if not params.get("exact", False):
        return dora_fast_unmerge(inputs, params, _delta(kind, inputs, params), _AXES[kind][0])
    return {**_merge(kind, inputs, params), "W_restored": Expected("bitwise", np.array(inputs["W"]))}


def _zero_but(dy: np.ndarray, axis: int, c: int) -> np.ndarray:
    """dy with every channel but c set to zero (exactly; dtype kept)."""
    keep = np.zeros(dy.shape[axis], dtype=bool)
    keep[c] = True
    return np.where(_along(keep, dy.ndim, axis), dy, np.zeros_like(dy))


def _backward(kind: str, inputs: Inputs, params: Params) -> dict[str, Expected]:
    """DoRA backward on Embedding / Conv (module docstring), the norm a constant as in PEFT.

    G = g ∘ dY is not dyadic, so the plain kind's exact gradient terms are evaluated once per output
    channel c on dY with every other channel zeroed, and summed with coefficient g_c: Σ_c g_c T(dY_c)
    = T(g ∘ dY) by linearity. Bound (as Linear's ``dora.backward``): g's relative error is
    ≤ γ_{Kg}(‖N_c‖/n_c + 1), Kg = L + r + 9, so the magnitudes are the plain ones at |dY_c| times
    |g_c| ρ_c (ρ_c = ‖N_c‖/n_c + 2) and K = 2 (K_plain + Kg); dm: M = Σ |dY| (M_z + |z| ρ) / n,
    K = 2 (K1 + P + 2 + Kg) with K1 z's depth and P the summed elements per channel; db: K = P + 1.
    """
    _, _, norms, abs_norms = _pieces(kind, inputs, params)
    g = Dyadic.of(inputs["magnitude"], what="magnitude").fractions() / norms
    rho = abs_norms / norms + 2
    channel = _AXES[kind][1]
    dy = np.asarray(inputs["dy"])
    training = "dropout_mask" in inputs
    undropped, inputs = inputs, (_dropped(inputs) if training else inputs)
    plain_params = {k: v for k, v in params.items() if k != "want_base_grads"}
    terms_of = (lambda i, a: _embedding_backward(i, plain_params, a)) if kind == "embedding" else (lambda i, a: _conv_grad_terms(i, plain_params, a))
    plain = (embedding_backward if kind == "embedding" else conv_backward)(inputs, plain_params)
    kg = _norm_length(kind, inputs) + inputs["A"].shape[0] + 9 + int(training)
    values: dict[str, list] = {name: [] for name in plain}
    magnitudes: dict[str, list] = {name: [] for name in plain}
    for c in range(len(g)):
        part = {**inputs, "dy": _zero_but(dy, channel, c)}
        terms, abs_terms = terms_of(part, False), terms_of(part, True)
        for name in plain:
            if training and name == "dx":  # the x̃ paths: (g_c − 1) on the base term, g_c on the LoRA term
                (c0, t0), (c1, t1) = terms[name]
                (a0, u0), (a1, u1) = abs_terms[name]
                values[name] += [((g[c] - 1) * c0, t0), (g[c] * c1, t1)]
                magnitudes[name] += [((abs(g[c] - 1) + abs(g[c]) * rho[c]) * a0, u0), (abs(g[c]) * rho[c] * a1, u1)]
                continue
            values[name] += [(g[c] * coef, t) for coef, t in terms[name]]
            magnitudes[name] += [(abs(g[c]) * rho[c] * coef, t) for coef, t in abs_terms[name]]
    result = {name: Expected("bound", to_float64(combine_fractions(values[name])), to_float64(combine_fractions(magnitudes[name])),
                             2 * (plain[name].depth + kg)) for name in plain}
    if training:  # dx = base_vjp(dY) (on x) + mask ∘ (the x̃ paths above)
        mask = Dyadic.of(np.asarray(undropped["dropout_mask"]), what="dropout_mask").fractions()
        (c0, t0), = terms_of(inputs, False)["dx"][:1]
        (a0, u0), = terms_of(inputs, True)["dx"][:1]
        result["dx"] = Expected("bound", to_float64(c0 * t0.fractions() + mask * combine_fractions(values["dx"])),
                                to_float64(a0 * u0.fractions() + np.abs(mask) * combine_fractions(magnitudes["dx"])),
                                result["dx"].depth)
    unbiased = {k: v for k, v in inputs.items() if k not in ("b", "dy")}
    if kind == "embedding":
        z_terms, z_abs, k1 = _embedding_forward(unbiased, params, False), _embedding_forward(unbiased, params, True), inputs["A"].shape[0] + 6
    else:
        (z_terms, _), (z_abs, _) = _conv_terms(unbiased, params, False), _conv_terms(unbiased, params, True)
        k1 = int(np.prod(inputs["W"].shape[1:])) + inputs["A"].shape[0] + 6
    z, Mz = combine_fractions(z_terms), combine_fractions(z_abs)
    dY = Dyadic.of(dy, what="dy").fractions()
    axes = tuple(a for a in range(dY.ndim) if a != dY.ndim + channel and a != channel)
    P = int(np.prod([dY.shape[a] for a in axes]))
    result["dmagnitude"] = Expected("bound", to_float64((dY * z).sum(axis=axes) / norms),
                                    to_float64((np.abs(dY) * (Mz + np.abs(z) * _along(rho, z.ndim, channel))).sum(axis=axes) / norms),
                                    2 * (k1 + P + 2 + kg))
    if "b" in inputs:
        result["db"] = Expected("bound", to_float64(dY.sum(axis=axes)), to_float64(np.abs(dY).sum(axis=axes)), P + 1)
    return result


for _kind, _group in (("embedding", "dora_embedding"), ("conv", "dora_conv1d"), ("conv", "dora_conv2d"), ("conv", "dora_conv3d")):
    for _action, _oracle in (("forward", _forward), ("merge", _merge), ("unmerge", _unmerge), ("backward", _backward)):
        def _bound(inputs: Inputs, params: Params, _k: str = _kind, _f=_oracle) -> dict[str, Expected]:
            return _f(_k, inputs, params)

        _bound.__doc__ = f"DoRA on {_kind}: {_action} (module docstring)."
        register(f"{_group}.{_action}", "SPEC 4.3, 3.4, C.3" if _action == "unmerge" else "SPEC 4.3, C.3")(_bound)
