"""Weighted combination of adapters into one new adapter: ``cat``, ``svd``, ``linear`` (SPEC M.3).

For adapters i = 1..n with weights w_i, module by module, the target is the weighted sum of
deltas  Δ = Σ_i c_i B_i A_i  with  c_i = w_i · s_i  (s_i the adapter's own scale for the
module: alpha/r, or alpha/sqrt(r) with rsLoRA, rank_pattern and alpha_pattern applied).
Every method computes in float64 and rounds each stored factor once to the output dtype.

* ``cat`` (exact): A = [c_1 A_1; ...; c_n A_n] (ranks stacked), B = [B_1, ..., B_n], so
  B A = Σ c_i B_i A_i in real arithmetic. The only error is the rounding of c_i A_i to the
  output dtype t: |B A − Δ| ≤ u_t Σ_i |c_i| |B_i| |A_i| elementwise (none when c_i is a power
  of two and A_i is already in t, or with t = float64 up to u_64).
* ``svd`` (rank k): the best rank-k approximation of Δ (Eckart–Young). Δ is never formed:
  with B_cat = Q_1 R_1 and A_cat^T = Q_2 R_2 (thin QR), Δ = Q_1 (R_1 R_2^T) Q_2^T, and the
  SVD of the small R×R core (R = Σ r_i) gives Δ's singular values σ_1 >= σ_2 >= ... The kept
  factors are split evenly, B = U_k Σ_k^{1/2}, A = Σ_k^{1/2} V_k^T. The truncation error is
  reported exactly from the discarded spectrum: ||Δ − B A||_F = sqrt(Σ_{j>k} σ_j^2).
* ``linear`` (PEFT-compatible, *not* the weighted sum): PEFT's ``add_weighted_adapter(...,
  combination_type="linear")``: with a_i = sign(c_i) sqrt|c_i| and b_i = sqrt|c_i|,
  A = Σ a_i A_i, B = Σ b_i B_i (all ranks equal). Then
  B A = Σ_i c_i B_i A_i + Σ_{i≠j} b_i a_j B_i A_j: the second sum is the cross terms, which
  PEFT keeps. It is reproduced for compatibility; the report gives its size.

The result's config has r = the largest module rank (smaller modules are zero-padded, which
changes nothing), lora_alpha = r and use_rslora = False, so its scale is exactly 1 and B A is
the combined delta. (PEFT copies use_rslora from the first adapter while setting alpha = r, so
with rsLoRA sources its combined adapter is scaled by sqrt(r) instead of 1; see SPEC.)
Every layer kind works (Linear, fan_in_fan_out, Embedding, Conv): the kind's A is read as the
matrix A.reshape(r, -1) and B as B.reshape(out, r), the formulas above apply to them, and the
stored factors get the kind's shapes back. ``lora_bias`` (cat and svd): the combined layer's
bias term must be Σ_i w_i s_i b_i = Σ_i c_i b_i, and since the result's scale is 1 it is stored
as lora_bias = Σ c_i b_i, in float64 in adapter order and rounded once (the bias has no rank,
so svd truncates nothing of it); ``linear`` mixes B with weights sqrt|c_i|, which defines no
bias, so it refuses lora_bias. DoRA adapters are refused for every method: each layer is
(m_i/n_i)(W + ΔW_i) with n_i depending on W, so no weighted sum of them is a LoRA delta plus one
magnitude (both refusals raise :class:`~lora_ref.errors.UnsupportedFeatureError`).
Every combination reports, per module, ||B A − Δ||_F of the *stored* factors, evaluated from
the factors in float64 (:func:`factored_frobenius`), so the user sees what each method costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from .adapter import Adapter, LoraModule
from .carried import replacing
from .dtypes import float64, resolve_dtype, round_to
from .errors import CarriedTensorError, ConfigError, ShapeError, UnsupportedFeatureError

#: PEFT's ``combination_type`` values this module implements (module doc).
Method = Literal["cat", "svd", "linear"]
METHODS: tuple[Method, ...] = get_args(Method)


@dataclass(frozen=True)
class ModuleReport:
    """What combining did to one module.

    ``target_rank``: Σ r_i, the rank of the stacked factors; ``rank``: the stored rank;
    ``singular_values``: Δ's spectrum (svd only); ``discarded_frobenius``: sqrt(Σ_{j>k} σ_j²)
    (svd only, 0 otherwise); ``delta_frobenius``: ||Δ||_F; ``stored_error_frobenius``:
    ||B A − Δ||_F of the stored factors (rounding, truncation and, for linear, cross terms).
    """

    module: str
    target_rank: int
    rank: int
    delta_frobenius: float
    stored_error_frobenius: float
    discarded_frobenius: float = 0.0
    singular_values: tuple[float, ...] = ()


@dataclass
class CombineResult:
    adapter: Adapter
    method: Method
    weights: tuple[float, ...]
    modules: dict[str, ModuleReport] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "weights": list(self.weights),
            "rank": self.adapter.config.r,
            "modules": {name: dataclasses.asdict(report) for name, report in sorted(self.modules.items())},
        }


def factored_frobenius(left: np.ndarray, right: np.ndarray) -> float:
    """||left @ right||_F for left [m, k], right [k, n] without forming the product.

    With left = Q_1 R_1 and right^T = Q_2 R_2 (thin QR, Q orthonormal), ||left right||_F =
    ||R_1 R_2^T||_F; no cancellation, so a tiny difference of two factored matrices is
    measured to float64 relative accuracy, unlike sqrt(trace(...)) of Gram matrices.
    """
    if left.shape[1] == 0:
        return 0.0
    r1 = np.linalg.qr(left, mode="r")
    r2 = np.linalg.qr(right.T, mode="r")
    return float(np.linalg.norm(r1 @ r2.T))


def combine(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    method: Method,
    *,
    rank: int | None = None,
    name: str = "combined",
    dtype: object = None,
) -> CombineResult:
    """Combine ``adapters`` with ``weights`` by ``method`` (module doc).

    ``rank``: target rank for svd (default: the largest source rank, as PEFT); refused for
    cat and linear. ``dtype``: the stored dtype (default: the first adapter's lora_A dtype).
    """
    weights = _check_inputs(adapters, weights, method, rank)
    carrying = [a.name for a in adapters if replacing(a.carried_tensors())]
    if carrying:  # never dropped silently: a weighted sum of full copies is no LoRA combination
        raise CarriedTensorError(f"adapter(s) {', '.join(carrying[:3])} carry modules_to_save / trainable-token / bias "
                                 "tensors, which combine cannot weigh; combine adapters without them")
    modules = sorted({m for adapter in adapters for m in adapter.modules})
    factors = {module: _module_factors(adapters, weights, module) for module in modules}
    if method == "svd" and rank is None:
        rank = max(a.modules[m].rank for a in adapters for m in a.modules)
    out_dtype = resolve_dtype(dtype) if dtype is not None else next(iter(adapters[0].modules.values())).A.dtype
    built: dict[str, tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] = {}
    reports: dict[str, ModuleReport] = {}
    for module, (kind, terms, biases) in factors.items():
        A_shape, B_shape = terms[0][1].shape, terms[0][2].shape  # the kind's layout: reshaped to matrices below
        B_cat = np.concatenate([B.reshape(B.shape[0], -1) for _, _, B in terms], axis=1)
        A_cat = np.concatenate([c * A.reshape(A.shape[0], -1) for c, A, _ in terms], axis=0)  # Δ = B_cat A_cat
        sigma: np.ndarray = np.zeros(0)
        discarded = 0.0
        if method == "cat":
            A_new, B_new = A_cat, B_cat
        elif method == "linear":
            if len({A.shape[0] for _, A, _ in terms}) > 1:
                raise ConfigError(f"{module}: linear needs equal ranks, got {[A.shape[0] for _, A, _ in terms]}; use cat or svd")
            a = [math.copysign(math.sqrt(abs(c)), c) if c != 0 else 0.0 for c, _, _ in terms]
            b = [math.sqrt(abs(c)) for c, _, _ in terms]
            A_new = sum(ai * A.reshape(A.shape[0], -1) for ai, (_, A, _) in zip(a, terms))
            B_new = sum(bi * B.reshape(B.shape[0], -1) for bi, (_, _, B) in zip(b, terms))
        else:
            A_new, B_new, sigma = _truncated_svd(B_cat, A_cat, rank)
            discarded = float(math.sqrt(float(np.sum(sigma[rank:] ** 2))))
        A_store, B_store = round_to(A_new, out_dtype), round_to(B_new, out_dtype)
        error = factored_frobenius(
            np.concatenate([B_store.astype(float64), -B_cat], axis=1),
            np.concatenate([A_store.astype(float64), A_cat], axis=0),
        )
        k = A_store.shape[0]
        bias = None if biases is None else round_to(biases, out_dtype)
        built[module] = (kind, A_store.reshape((k,) + A_shape[1:]), B_store.reshape((B_shape[0], k) + B_shape[2:]), bias)
        reports[module] = ModuleReport(
            module=module,
            target_rank=int(A_cat.shape[0]),
            rank=int(k),
            delta_frobenius=factored_frobenius(B_cat, A_cat),
            stored_error_frobenius=error,
            discarded_frobenius=discarded,
            singular_values=tuple(float(v) for v in sigma),
        )
    r = max(A.shape[0] for _, A, _, _ in built.values())
    lora_modules = {m: LoraModule(name=m, A=_pad_rank(A, r, 0), B=_pad_rank(B, r, 1), lora_bias=bias, kind=kind)
                    for m, (kind, A, B, bias) in built.items()}
    config = dataclasses.replace(
        adapters[0].config, r=r, lora_alpha=r, use_rslora=False, rank_pattern={}, alpha_pattern={},
        target_modules=modules, exclude_modules=None,
    )
    return CombineResult(Adapter(config=config, modules=lora_modules, name=name), method, tuple(weights), reports)


def _pad_rank(factor: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """``factor`` zero-padded along its rank ``axis`` (A: 0, B: 1) to ``rank`` (adds exact zeros to B A)."""
    if factor.shape[axis] == rank:
        return factor
    widths = [(0, 0)] * factor.ndim
    widths[axis] = (0, rank - factor.shape[axis])
    return np.pad(factor, widths)


def _truncated_svd(B_cat: np.ndarray, A_cat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-k factors of Δ = B_cat A_cat via QR + SVD of the R×R core; returns (A, B, σ)."""
    q1, r1 = np.linalg.qr(B_cat)
    q2, r2 = np.linalg.qr(A_cat.T)
    u, sigma, vt = np.linalg.svd(r1 @ r2.T)
    kept = min(k, sigma.size)
    root = np.sqrt(sigma[:kept])
    B = np.zeros((B_cat.shape[0], k), float64)
    A = np.zeros((k, A_cat.shape[1]), float64)
    B[:, :kept] = (q1 @ u[:, :kept]) * root
    A[:kept] = root[:, None] * (vt[:kept] @ q2.T)
    return A, B, sigma


def _check_inputs(adapters: Sequence[Adapter], weights: Sequence[float], method: Method, rank: int | None) -> list[float]:
    if method not in METHODS:
        raise ConfigError(f"unknown combination method {method!r}; expected one of {', '.join(METHODS)}")
    if not adapters:
        raise ConfigError("combine needs at least one adapter")
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(adapters)} adapter(s) but {len(weights)} weight(s); give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite, got {weights}")
    if rank is not None and method != "svd":
        raise ConfigError(f"--rank applies to svd only; {method} fixes the rank itself")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    for field_name in ("fan_in_fan_out", "base_model_name_or_path"):
        values = {getattr(a.config, field_name) for a in adapters} - {None}
        if len(values) > 1:
            raise ConfigError(f"adapters disagree on {field_name}: {sorted(map(str, values))}; they must share one base")
    for adapter in adapters:
        for module in adapter.modules.values():
            if module.magnitude is not None or adapter.config.use_dora:
                raise UnsupportedFeatureError(
                    f"{module.name} in adapter {adapter.name!r} is DoRA: its layer is (m/n)(W + ΔW) with n depending on W, "
                    "so a weighted sum of DoRA layers is no LoRA delta plus one magnitude; merge them instead")
            if module.lora_bias is not None and method == "linear":
                raise UnsupportedFeatureError(
                    f"{module.name} in adapter {adapter.name!r} has a lora_bias: linear mixes B with weights sqrt|c_i| "
                    "(cross terms), which defines no bias; use cat or svd (both store Σ c_i lora_bias_i exactly)")
    return weights


def _module_factors(adapters: Sequence[Adapter], weights: Sequence[float], module: str):
    """(kind, [(c_i, A_i, B_i)], Σ c_i lora_bias_i or None) in float64 for the adapters that target
    ``module``, in the kind's layout; kinds and the layer's shape checked."""
    terms, kinds_seen, bias = [], set(), None
    for adapter, w in zip(adapters, weights):
        lora = adapter.modules.get(module)
        if lora is None:
            continue
        c = w * adapter.scale_for(module)
        terms.append((c, lora.A.astype(float64), lora.B.astype(float64)))
        kinds_seen.add(lora.kind)
        if lora.lora_bias is not None:  # b = Σ c_i b_i: the combined layer's bias term, exactly the weighted sum
            bias = (0.0 if bias is None else bias) + c * lora.lora_bias.astype(float64)
    if len(kinds_seen) > 1:
        raise ConfigError(f"{module}: adapters disagree on the layer kind: {sorted(kinds_seen)}; different bases?")
    shapes = {(B.shape[0],) + A.shape[1:] for _, A, B in terms}
    if len(shapes) > 1:
        raise ShapeError(f"{module}: adapters disagree on the layer's (out, in) shape: {sorted(shapes)}; different bases?")
    return kinds_seen.pop(), terms, bias
