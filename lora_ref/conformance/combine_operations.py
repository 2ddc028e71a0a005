"""Oracles for weighted combination of adapters (SPEC M.3): ``combine.cat`` and ``combine.svd``.

Inputs: A.i [r_i, in], B.i [out, r_i] for adapters i (params ``adapters[i]`` with r, lora_alpha,
use_rslora, scale) and ``weights`` w_i; the target is Δ = Σ_i c_i B_i A_i, c_i = w_i s_i.

``combine.cat`` returns the stacked factors A = [c_1 A_1; ...] [R, in] and B = [B_1, ...] [out, R]
(R = Σ r_i). B is a copy: checked bitwise. Each element of A is one product c_i A_i[j, l], bounded
with M = |c_i||A_i| and K = 5 (two roundings computing s = alpha/√r, one in s as given, one for
w·s, one for the product).

``combine.svd`` (rank k) returns A [k, in] and B [out, k]; a rank-k factorisation is not unique
(signs, how Σ is split), so the check is on the product B̂Â, formed by the runner in float64
(a ``product`` output, C.2), against Δ. Elementwise, |(B̂Â − Δ)_il| ≤ ‖B̂Â − Δ‖₂, and

    ‖B̂Â − Δ‖₂ ≤ σ_{k+1} + 2‖δΔ‖₂ + |B̂Â − BA|

(Eckart–Young and Weyl for the exact rank-k truncation of the perturbed Δ + δΔ that a backward
stable QR + SVD computes; B, A its unrounded factors). Stored as the bound's two parts:

* compute part (``K``, magnitude M): ‖δΔ‖₂ ≤ γ_K(u_c) M with M = ‖B_cat‖_F ‖A_cat‖_F ≥ ‖Δ‖₂ and
  K = 4 (out·R + in·R + R² + R): Householder QR backward errors γ̃_{out·R}, γ̃_{in·R} (Higham
  Thm 19.4), the R×R core's SVD and the products (γ_R each), with the γ̃ constant taken as 2 and
  a factor 2 for ‖δΔ‖ entering twice. M is exact (its square is rational).
* slack (storage part, per case dtype t): σ_{k+1} (0 when k ≥ R) plus the rounding of the stored
  factors, |B̂Â − BA| ≤ (2u_t + u_t²)|B||A| + η_t(1 + u_t) Σ_j √σ_j + k η_t², with |B||A| ≤ σ_1
  elementwise for the even split B = U_k Σ_k^½, A = Σ_k^½ V_kᵀ (rows of U, V have norm ≤ 1), and
  k·u_64·σ_1 for the runner's float64 product. The singular values come from a float64 SVD of Δ
  (accurate to ~u_64 σ_1; 2^-40 σ_1 is added for it), and the slack is rounded *up* to 8
  significant bits, so LAPACK differences in the last bits do not move a frozen vector.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ..dtypes import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, float64
from .exact import Dyadic, combine, sqrt_fraction, to_float64
from .operations import Expected, Inputs, Params, exact_scale, register

#: Roundings in one element of cat's A: s = alpha/√r (2), s as given (1), w·s (1), (w s)·A (1).
CAT_DEPTH = 5


def _coefficients(params: Params) -> list[Fraction]:
    """c_i = w_i s_i, exactly (s_i to 2^-200 under rsLoRA)."""
    return [Fraction(w) * exact_scale(adapter) for w, adapter in zip(params["weights"], params["adapters"])]


def _factors(inputs: Inputs, count: int) -> list[tuple[Dyadic, Dyadic]]:
    return [(Dyadic.of(inputs[f"A.{i}"], what=f"A.{i}"), Dyadic.of(inputs[f"B.{i}"], what=f"B.{i}")) for i in range(count)]


def _lora_bias(inputs: Inputs, coefficients: list[Fraction]) -> dict[str, Expected]:
    """lora_bias = Σ c_i b_i over the adapters that have one (K = CAT_DEPTH + n − 1: each product's
    roundings and the n − 1 additions); nothing when no adapter has a lora_bias."""
    present = [(c, Dyadic.of(inputs[f"lora_bias.{i}"], what=f"lora_bias.{i}")) for i, c in enumerate(coefficients) if f"lora_bias.{i}" in inputs]
    if not present:
        return {}
    shape = present[0][1].shape
    return {"lora_bias": Expected("bound", combine(present, shape), combine([(abs(c), b.abs()) for c, b in present], shape),
                                  CAT_DEPTH + len(coefficients) - 1)}


@register("combine.cat", "SPEC M.3, C.3")
def combine_cat(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """A = [c_1 A_1; ...; c_n A_n] (bounded, K = 5), B = [B_1, ..., B_n] (bitwise), along the rank axis of
    any kind's factors (Embedding A [r, V], B [D, r]; Conv A [r, C, *k], B [O, r, 1, ...]); lora_bias = Σ c_i b_i."""
    coefficients = _coefficients(params)
    factors = _factors(inputs, len(coefficients))
    values, magnitudes = [], []
    for c, (A, _) in zip(coefficients, factors):
        values.append(combine([(c, A)], A.shape))
        magnitudes.append(combine([(abs(c), A.abs())], A.shape))
    B = np.concatenate([np.asarray(inputs[f"B.{i}"]) for i in range(len(coefficients))], axis=1)
    return {"A": Expected("bound", np.concatenate(values, axis=0), np.concatenate(magnitudes, axis=0), CAT_DEPTH),
            "B": Expected("bitwise", B), **_lora_bias(inputs, coefficients)}


def _round_up(value: float, bits: int = 8) -> float:
    """The smallest float with ``bits`` significant bits that is >= value (value >= 0)."""
    if value <= 0:
        return 0.0
    mantissa, exponent = math.frexp(value)
    return math.ldexp(math.ceil(mantissa * 2**bits), exponent - bits)


@register("combine.svd", "SPEC M.3, C.3")
def combine_svd(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """B̂Â (the runner's float64 product of the returned factors) against Δ, within the module docstring's bound."""
    coefficients = _coefficients(params)
    # any kind's factors as matrices A_i [r_i, in], B_i [out, r_i] (Conv: in = C·∏k; the runner flattens likewise)
    factors = [(A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])) for A, B in _factors(inputs, len(coefficients))]
    k = int(params["rank"])
    A_tail, B_tail = tuple(inputs["A.0"].shape[1:]), tuple(inputs["B.0"].shape[2:])
    out_f, in_f = inputs["B.0"].shape[0], int(np.prod(A_tail))
    R = sum(A.shape[0] for A, _ in factors)
    delta = to_float64(sum((B.fractions() @ A.fractions()) * c for c, (A, B) in zip(coefficients, factors)))
    norm_B = sum((v * v for _, B in factors for v in B.fractions().reshape(-1)), Fraction(0))
    norm_A = sum((c * c * v * v for c, (A, _) in zip(coefficients, factors) for v in A.fractions().reshape(-1)), Fraction(0))
    M = float(sqrt_fraction(norm_B * norm_A))
    sigma = np.linalg.svd(delta, compute_uv=False)
    t = np.asarray(inputs["A.0"]).dtype  # the case dtype: the stored factors are rounded to it
    u_t, eta_t = UNIT_ROUNDOFF[t], SMALLEST_SUBNORMAL[t]
    kept = sigma[:k]
    slack = (float(sigma[k]) if k < sigma.size else 0.0) + 2.0**-40 * float(sigma[0])
    slack += (2 * u_t + u_t * u_t) * float(sigma[0]) + eta_t * (1 + u_t) * float(np.sqrt(kept).sum()) + k * eta_t * eta_t
    slack += k * UNIT_ROUNDOFF[float64] * float(sigma[0])
    shape = delta.shape
    depth = 4 * (out_f * R + in_f * R + R * R + R)
    return {"BA": Expected("product", delta, np.full(shape, M), depth, slack=np.full(shape, _round_up(slack)), factors=("B", "A")),
            "A": Expected("factor", np.zeros((k,) + A_tail)), "B": Expected("factor", np.zeros((out_f, k) + B_tail)),
            **_lora_bias(inputs, coefficients)}
