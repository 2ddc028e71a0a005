"""Oracles for the layer kinds beyond Linear: Embedding, mixed batch and DoRA (SPEC 4); Conv in ``conv_operations.py``.

Same rules as ``operations.py``: exact dyadic arithmetic, one rounding to float64, a
magnitude M and a depth K per output (bounds.py). Depths:

    embedding.forward  y = W[ids] + s Aᵀ[ids] Bᵀ                 K = r + 6
    embedding.merge    W + s Aᵀ Bᵀ (unmerge: W' − s Aᵀ Bᵀ)       K = r + 6
    embedding.backward dB = s dYᵀ Aᵀ[ids]                        K = P + 6      (P = number of ids)
                       dA = s (G B)ᵀ, dW = G, G[v] = Σ_{id_p = v} dY[p]   K = P + D + 6, P + 1
    mixed_batch.forward  y[b] = x[b] Wᵀ + b + s_i (x[b] A_iᵀ) B_iᵀ, i = index[b] (−1: base only)
                                                                  K = in + max r_i + 6
    mixed_batch.backward dx = dY W + s_i ((dY B_i) A_i) per row   K = out + max r_i + 6
                       dA.i = s_i (dY_i B_i)ᵀ X_i, dB.i = s_i dY_iᵀ (X_i A_iᵀ) over adapter i's rows
                                                                  K = out + rows + 6, in + rows + 6
    dora.forward (Linear, eval)   y = g ∘ (x Wᵀ + s (x Aᵀ) Bᵀ) + b,  g = m / ‖W + s B A‖_row
    dora.merge (Linear)           W' = g ∘ (W + s B A)
    dora.unmerge (Linear, exact)  round trip: W_merged as dora.merge, W_restored = W bit for bit
    dora.unmerge (Linear, fast)   W = W_merged / g − s B A with the merge-time norm n given      K = r + 9
    dora.backward (Linear, eval)  G = g ∘ dY: dx, dA, dB as Linear LoRA with dY -> G; dm = Σ dY ∘ z / n; db

DoRA is not a sum of products (a norm, a square root, a division), so its bound is derived
to first order: with z = x Wᵀ + s (x Aᵀ) Bᵀ (error ≤ γ_{K1} M_z, K1 = in + r + 6), V = W + sBA
(elementwise error ≤ γ_{r+6} N, N = |W| + |s||B||A|) and n_c = ‖V_c‖ (computed norm error
≤ ‖N_c‖ γ_{r+6} + γ_{in+2} n_c), g = m/n has relative error ≤ γ_{r+6}‖N_c‖/n_c + γ_{in+3}, so

    |ŷ − y| ≤ γ_{K1+3} (|g| M_z + |g z| (‖N_c‖/n_c + 2) + |b|)

and the stored depth is 2(K1 + 3): γ_{2K} ≥ 2γ_K leaves a factor 2 for the second-order
terms (products of two relative errors, each ≤ γ_K ≪ 1). Merge likewise:
|Ŵ' − W'| ≤ γ_{r+in+9} |g| (N + |V| (‖N_c‖/n_c + 2)), stored with depth 2(r + in + 9).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from .exact import Dyadic, sqrt_fraction, to_float64
from .operations import Expected, Inputs, Params, _linear_delta, bounded, exact_input, exact_scale, merge_expected, register, scale_term


# -- Embedding --------------------------------------------------------------------------------
def _embedding_forward(inputs: Inputs, params: Params, absolute: bool) -> list:
    ids = np.asarray(inputs["ids"]).reshape(-1)
    W, A, B = (exact_input(inputs, n, absolute) for n in ("W", "A", "B"))
    shape = tuple(inputs["ids"].shape) + (W.shape[1],)
    base = W[ids].reshape(*shape)
    lora = (A.T[ids] @ B.T).reshape(*shape)
    return [(Fraction(1), base), (scale_term(params, absolute), lora)]


@register("embedding.forward", "SPEC 4.1, C.3")
def embedding_forward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """y = W[ids] + s Aᵀ[ids] Bᵀ; ids int64 of any shape, W [V, D], A [r, V], B [D, r]."""
    shape = tuple(inputs["ids"].shape) + (inputs["W"].shape[1],)
    return {"y": bounded(_embedding_forward(inputs, params, False), _embedding_forward(inputs, params, True), shape,
                         inputs["A"].shape[0] + 6)}


@register("embedding.merge", "SPEC 4.1, C.3")
def embedding_merge(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """W_merged = round_t(W + s Aᵀ Bᵀ), [V, D]."""
    return {"W_merged": merge_expected(inputs["W"], _embedding_delta(inputs, params), +1, inputs["A"].shape[0] + 6)}


@register("embedding.unmerge", "SPEC 4.1, C.3")
def embedding_unmerge(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """W = round_t(W_merged − s Aᵀ Bᵀ) (fast mode)."""
    return {"W": merge_expected(inputs["W_merged"], _embedding_delta(inputs, params), -1, inputs["A"].shape[0] + 6)}


def _embedding_delta(inputs: Inputs, params: Params):
    def delta(absolute: bool):
        return scale_term(params, absolute), exact_input(inputs, "A", absolute).T @ exact_input(inputs, "B", absolute).T

    return delta


def _scatter_rows(ids: np.ndarray, rows: Dyadic, count: int) -> Dyadic:
    """G[v] = Σ_{p: ids[p] = v} rows[p], exactly ([count, width])."""
    G = np.empty((count, rows.shape[1]), dtype=object)
    G[...] = 0
    for p, v in enumerate(ids.tolist()):
        G[v] = G[v] + rows.ints[p]
    return Dyadic(G, rows.exp)


def _embedding_backward(inputs: Inputs, params: Params, absolute: bool) -> dict[str, list]:
    ids = np.asarray(inputs["ids"]).reshape(-1)
    A, B = exact_input(inputs, "A", absolute), exact_input(inputs, "B", absolute)
    dY = exact_input(inputs, "dy", absolute).reshape(-1, B.shape[0])
    s = scale_term(params, absolute)
    G = _scatter_rows(ids, dY, A.shape[1])
    terms = {"dA": [(s, (G @ B).T)], "dB": [(s, dY.T @ A.T[ids])]}
    if params.get("want_base_grads", False):
        terms["dW"] = [(Fraction(1), G)]
    return terms


@register("embedding.backward", "SPEC 4.1, C.3")
def embedding_backward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """dA = s (G B)ᵀ [r, V], dB = s dYᵀ Aᵀ[ids] [D, r], dW = G [V, D] (G: dY scatter-added by id)."""
    terms, abs_terms = _embedding_backward(inputs, params, False), _embedding_backward(inputs, params, True)
    P, D = int(np.asarray(inputs["ids"]).size), inputs["B"].shape[0]
    shapes = {"dA": inputs["A"].shape, "dB": inputs["B"].shape, "dW": inputs["W"].shape}
    depth = {"dA": P + D + 6, "dB": P + 6, "dW": P + 1}
    return {n: bounded(terms[n], abs_terms[n], tuple(shapes[n]), depth[n]) for n in terms}


# -- Mixed batch --------------------------------------------------------------------------------
def _rows(inputs: Inputs, name: str, absolute: bool) -> Dyadic:
    """x or dy [batch, ..., n] as rows [batch·∏..., n]."""
    value = exact_input(inputs, name, absolute)
    return value.reshape(-1, value.shape[-1])


def _row_index(inputs: Inputs) -> np.ndarray:
    """The adapter index of every row: index[b] repeated over batch row b's sequence positions."""
    index = np.asarray(inputs["index"]).reshape(-1)
    per_row = int(np.prod(inputs["x"].shape[1:-1], dtype=np.int64))
    return np.repeat(index, per_row)


def _mixed_forward(inputs: Inputs, params: Params, absolute: bool) -> list:
    X, W = _rows(inputs, "x", absolute), exact_input(inputs, "W", absolute)
    index = _row_index(inputs)
    terms = [(Fraction(1), X @ W.T)]
    if "b" in inputs:
        terms.append((Fraction(1), exact_input(inputs, "b", absolute).reshape(1, -1)))
    for i, adapter in enumerate(params["adapters"]):
        rows = index == i
        if not rows.any():
            continue
        lora = (X @ exact_input(inputs, f"A.{i}", absolute).T) @ exact_input(inputs, f"B.{i}", absolute).T
        lora.ints[~rows] = 0  # rows routed elsewhere contribute nothing (Python int zeros)
        terms.append((scale_term(adapter, absolute), lora))
    return terms


@register("mixed_batch.forward", "SPEC M.1, C.3")
def mixed_batch_forward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Row b uses adapter index[b] (A.i [r_i, in], B.i [out, r_i], params adapters[i]); −1 = base only.
    x may be [batch, in] or [batch, ..., in] (index[b] applies to every position of batch row b)."""
    shape = tuple(inputs["x"].shape[:-1]) + (inputs["W"].shape[0],)
    max_r = max(inputs[f"A.{i}"].shape[0] for i in range(len(params["adapters"])))
    terms, abs_terms = _mixed_forward(inputs, params, False), _mixed_forward(inputs, params, True)
    flat = (int(np.prod(shape[:-1], dtype=np.int64)), shape[-1])
    return {"y": bounded(terms, abs_terms, flat, inputs["x"].shape[-1] + max_r + 6).reshaped(shape)}


def _mixed_backward(inputs: Inputs, params: Params, absolute: bool) -> dict[str, list]:
    X, W = _rows(inputs, "x", absolute), exact_input(inputs, "W", absolute)
    dY = _rows(inputs, "dy", absolute)
    index = _row_index(inputs)
    terms = {"dx": [(Fraction(1), dY @ W)]}
    for i, adapter in enumerate(params["adapters"]):
        A, B = exact_input(inputs, f"A.{i}", absolute), exact_input(inputs, f"B.{i}", absolute)
        rows = np.flatnonzero(index == i)
        s = scale_term(adapter, absolute)
        dYi, Xi = dY[rows], X[rows]
        lora_dx = (dY @ B) @ A
        lora_dx.ints[index != i] = 0  # rows of other adapters and of the base
        terms["dx"].append((s, lora_dx))
        terms[f"dA.{i}"] = [(s, (dYi @ B).T @ Xi)]
        terms[f"dB.{i}"] = [(s, dYi.T @ (Xi @ A.T))]
    return terms


@register("mixed_batch.backward", "SPEC M.1, C.3")
def mixed_batch_backward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """dx for every row, and dA.i, dB.i from adapter i's rows only (zeros for an adapter without rows)."""
    terms, abs_terms = _mixed_backward(inputs, params, False), _mixed_backward(inputs, params, True)
    out_f, in_f = inputs["W"].shape
    rows = int(np.prod(inputs["x"].shape[:-1], dtype=np.int64))
    max_r = max(inputs[f"A.{i}"].shape[0] for i in range(len(params["adapters"])))
    result = {"dx": bounded(terms["dx"], abs_terms["dx"], (rows, in_f), out_f + max_r + 6).reshaped(tuple(inputs["x"].shape))}
    for i in range(len(params["adapters"])):
        result[f"dA.{i}"] = bounded(terms[f"dA.{i}"], abs_terms[f"dA.{i}"], tuple(inputs[f"A.{i}"].shape), out_f + rows + 6)
        result[f"dB.{i}"] = bounded(terms[f"dB.{i}"], abs_terms[f"dB.{i}"], tuple(inputs[f"B.{i}"].shape), in_f + rows + 6)
    return result


# -- DoRA (Linear) ------------------------------------------------------------------------------
def _dora_pieces(inputs: Inputs, params: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(V exact Fractions [out, in], N = |W| + |s||B||A| as Fractions, n_c exact-ish, ‖N_c‖)."""
    s = exact_scale(params)
    W, A, B = (exact_input(inputs, n, False) for n in ("W", "A", "B"))
    V = combine_fractions([(Fraction(1), W), (s, B @ A)])
    N = combine_fractions([(Fraction(1), W.abs()), (abs(s), B.abs() @ A.abs())])
    norms = np.array([sqrt_fraction(sum((v * v for v in row), Fraction(0))) for row in V], dtype=object)
    abs_norms = np.array([sqrt_fraction(sum((v * v for v in row), Fraction(0))) for row in N], dtype=object)
    return V, N, norms, abs_norms


def combine_fractions(terms: list[tuple[Fraction, Dyadic]]) -> np.ndarray:
    """Σ c_i T_i exactly, as an object array of Fractions."""
    total = None
    for c, t in terms:
        part = t.fractions() * c
        total = part if total is None else total + part
    return total


def _dora_mask(inputs: Inputs, X: np.ndarray) -> np.ndarray | None:
    """The training mask as Fractions shaped like X (None at inference)."""
    if "dropout_mask" not in inputs:
        return None
    return exact_input(inputs, "dropout_mask", False).fractions().reshape(X.shape)


@register("dora.forward", "SPEC 4.3, C.3")
def dora_forward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Linear DoRA, g = m / ‖W + s B A‖ per output row (n constant):

        eval (no mask)   y = g ∘ (x Wᵀ + s (x Aᵀ) Bᵀ) + b
        training (mask)  y = x Wᵀ + b + (g − 1) ∘ (x̃ Wᵀ) + g ∘ s (x̃ Aᵀ) Bᵀ,   x̃ = x ∘ mask   (SPEC 4.3, PEFT's formula)

    Bound (module docstring): the eval one; with a mask each of the three terms is bounded by its
    magnitude, and g's (and g − 1's) error by |g| (|x̃||W| + |s||x̃||A||B|)(‖N_c‖/n_c + 2); K one more (the mask).
    """
    s = exact_scale(params)
    _, _, norms, abs_norms = _dora_pieces(inputs, params)
    m = exact_input(inputs, "magnitude", False).fractions()
    g = m / norms
    X, W, A, B = (exact_input(inputs, n, False).fractions() for n in ("x", "W", "A", "B"))
    Xa, Wa, Aa, Ba = (np.abs(t) for t in (X, W, A, B))
    mask = _dora_mask(inputs, X)
    b = exact_input(inputs, "b", False).fractions() if "b" in inputs else np.zeros(len(m), dtype=object) + Fraction(0)
    ratio = (abs_norms / norms)[None, :]
    k1 = inputs["x"].shape[1] + inputs["A"].shape[0] + 6
    if mask is None:
        z, Mz = X @ W.T + s * ((X @ A.T) @ B.T), Xa @ Wa.T + abs(s) * ((Xa @ Aa.T) @ Ba.T)
        y = g[None, :] * z + b[None, :]
        magnitude = abs(g)[None, :] * Mz + abs(g[None, :] * z) * (ratio + 2) + np.abs(b)[None, :]
        return {"y": Expected("bound", to_float64(y), to_float64(magnitude), 2 * (k1 + 3))}
    Xd = X * mask
    Xda = np.abs(Xd)
    base_d, lora_d = Xd @ W.T, s * ((Xd @ A.T) @ B.T)
    Mbase_d, Mlora_d = Xda @ Wa.T, abs(s) * ((Xda @ Aa.T) @ Ba.T)
    y = X @ W.T + b[None, :] + (g - 1)[None, :] * base_d + g[None, :] * lora_d
    magnitude = (Xa @ Wa.T + np.abs(b)[None, :] + np.abs(g - 1)[None, :] * Mbase_d + abs(g)[None, :] * Mlora_d
                 + abs(g)[None, :] * (Mbase_d + Mlora_d) * (ratio + 2))
    return {"y": Expected("bound", to_float64(y), to_float64(magnitude), 2 * (k1 + 4))}


@register("dora.backward", "SPEC 4.3, C.3")
def dora_backward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Linear DoRA backward, n constant, with G = g ∘ dY and x̃ = x ∘ mask (x̃ = x without a mask):

        eval      dx = G W + s ((G B) A)
        training  dx = dY W + mask ∘ (((g − 1) ∘ dY) W + s ((G B) A))            (SPEC 4.3)
        both      dA = s (G B)ᵀ X̃, dB = s Gᵀ (X̃ Aᵀ), dmagnitude = Σ_rows dY ∘ (x̃ Wᵀ + s (x̃ Aᵀ) Bᵀ) / n, db = Σ_rows dY

    Bound (module docstring): g's relative error is ≤ γ_{Kg}(‖N_c‖/n_c + 1), Kg = in + r + 9, so the
    g-weighted outputs get M = the same expression on |G| ∘ (‖N_c‖/n_c + 2) and K = 2 (Kc + Kg)
    (+ 2 with a mask: one more multiplication on each path).
    """
    s = exact_scale(params)
    _, _, norms, abs_norms = _dora_pieces(inputs, params)
    g = exact_input(inputs, "magnitude", False).fractions() / norms
    rho = abs_norms / norms + 2
    X, W, A, B, dY = (exact_input(inputs, n, False).fractions() for n in ("x", "W", "A", "B", "dy"))
    mask = _dora_mask(inputs, X)
    Xd = X if mask is None else X * mask
    Xda, Wa, Aa, Ba, dYa = (np.abs(t) for t in (Xd, W, A, B, dY))
    G, Ga = dY * g[None, :], dYa * (np.abs(g) * rho)[None, :]
    z = Xd @ W.T + s * ((Xd @ A.T) @ B.T)
    Mz = Xda @ Wa.T + abs(s) * ((Xda @ Aa.T) @ Ba.T)
    rows, in_f, r, out_f = X.shape[0], X.shape[1], A.shape[0], W.shape[0]
    kg = in_f + r + 9 + (0 if mask is None else 1)
    if mask is None:
        dx = (G @ W + s * ((G @ B) @ A), Ga @ Wa + abs(s) * ((Ga @ Ba) @ Aa))
    else:
        Gm1, Gm1a = dY * (g - 1)[None, :], dYa * (np.abs(g - 1) + np.abs(g) * rho)[None, :]
        dx = (dY @ W + mask * (Gm1 @ W + s * ((G @ B) @ A)), dYa @ Wa + np.abs(mask) * (Gm1a @ Wa + abs(s) * ((Ga @ Ba) @ Aa)))
    values = {
        "dx": (*dx, 2 * (out_f + r + 6 + kg)),
        "dA": (s * ((G @ B).T @ Xd), abs(s) * ((Ga @ Ba).T @ Xda), 2 * (out_f + rows + 6 + kg)),
        "dB": (s * (G.T @ (Xd @ A.T)), abs(s) * (Ga.T @ (Xda @ Aa.T)), 2 * (in_f + rows + 6 + kg)),
        "dmagnitude": ((dY * z).sum(axis=0) / norms, (dYa * (Mz + np.abs(z) * rho[None, :])).sum(axis=0) / norms,
                       2 * (in_f + r + rows + 8 + kg)),
        "db": (dY.sum(axis=0), dYa.sum(axis=0), rows + 1),
    }
    return {name: Expected("bound", to_float64(v), to_float64(m), k) for name, (v, m, k) in values.items()}


def dora_fast_unmerge(inputs: Inputs, params: Params, delta, axis: int) -> dict[str, Expected]:
    """Fast DoRA unmerge of any kind with the merge-time norm n given (input ``norm``, one entry per channel):

        W = round_t(W_merged / g − ΔW),  g = m / n along W's channel ``axis``           (SPEC 4.3)

    ``delta(absolute)`` gives (c, D) with ΔW = c D. Every element is a two-term sum (n_c/m_c) W' − c D:
    K = r + 9 (ΔW's r + 6, the division m / n, the division by g, the subtraction), M = |n/m| |W'| + |c| |D|.
    n is the norm the implementation's own merge used; it is not recomputed from W_merged (‖W'_c‖ = m_c).
    """
    Wm = exact_input(inputs, "W_merged", False).fractions()
    inv_g = exact_input(inputs, "norm", False).fractions() / exact_input(inputs, "magnitude", False).fractions()
    shape = [1] * Wm.ndim
    shape[axis] = -1
    inv_g = inv_g.reshape(shape)
    (c, D), (abs_c, abs_D) = delta(False), delta(True)
    value = inv_g * Wm - c * D.fractions()
    magnitude = np.abs(inv_g) * np.abs(Wm) + abs_c * abs_D.fractions()
    return {"W": Expected("bound", to_float64(value), to_float64(magnitude), inputs["A"].shape[0] + 9)}


@register("dora.unmerge", "SPEC 4.3, 3.4, C.3")
def dora_unmerge(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Exact: the round trip, W_merged bounded as dora.merge, W_restored = W's bits. Fast (``exact`` false):
    :func:`dora_fast_unmerge` with the merge-time norm as the input ``norm``."""
    if not params.get("exact", False):
        return dora_fast_unmerge(inputs, params, _linear_delta(inputs, params), 1 if params.get("fan_in_fan_out", False) else 0)
    return {**dora_merge(inputs, params), "W_restored": Expected("bitwise", np.array(inputs["W"]))}


@register("dora.merge", "SPEC 4.3, C.3")
def dora_merge(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Linear DoRA merge: W' = round_t(g ∘ (W + s B A)), g = m / ‖W + s B A‖ per output row."""
    V, N, norms, abs_norms = _dora_pieces(inputs, params)
    g = exact_input(inputs, "magnitude", False).fractions() / norms
    value = g[:, None] * V
    magnitude = np.abs(g)[:, None] * (N + np.abs(V) * ((abs_norms / norms)[:, None] + 2))
    depth = 2 * (inputs["A"].shape[0] + inputs["W"].shape[1] + 9)
    return {"W_merged": Expected("bound", to_float64(value), to_float64(magnitude), depth)}
