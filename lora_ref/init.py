"""Creating new adapters: PEFT 0.21's init methods, as functions of explicit random draws.

Given the same draws as torch, an adapter made here equals PEFT's (SPEC 4.4):

    default   Linear/Conv: A = round_t(−b_t + 2b_t·U), U ~ U[0, 1) of A's shape, B = 0, with
              b_t = round_t(√3·(√(2/6)/√fan_in)) ≈ 1/√fan_in (kaiming_uniform, a = √5: torch
              evaluates the bound in float64 and converts it to the tensor's dtype), fan_in = in·∏k;
              Embedding (reversed, as PEFT): A = 0, B = round_t(N), N ~ N(0, 1) of B's shape
    gaussian  Linear/Conv: A = round_t(N·σ_t), σ_t = round_t(1/r), N ~ N(0, 1), B = 0 (torch
              converts std to the tensor's dtype); Embedding: as default (PEFT ignores it)
    pissa     Linear: W = V S Uᴴ (float64 SVD), A = diag(√(S_r/s)) Uᴴ_r, B = V_r diag(√(S_r/s)),
              W_new = round_t(W − s B̂ Â)   (Â, B̂: A and B as rounded to their dtype)
    olora     Linear: W = Q R (float64 Householder QR), A = R[:r], B = Q[:, :r],
              W_new = round_t(W − s B̂ Â)

(W in [out, in] orientation; fan_in_fan_out weights are transposed in and out.) Singular
vectors and QR factors are defined up to a sign per component; the spec fixes it — the
largest-magnitude entry of each row of Uᴴ_r is positive (first one on ties), and diag(R) ≥ 0 —
so A and B are unique; B A, and so W_new, does not depend on the choice. A/B are rounded once
to ``dtype`` (PEFT: float32). ``draws`` are float arrays (torch: ``torch.rand`` /
``torch.randn`` after the same seed); without them ``rng`` (a NumPy Generator or seed) is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from .config import lora_scale
from .dtypes import check_float_array, float32, float64, resolve_dtype, round_to
from .errors import ConfigError, ShapeError
from .kinds import Kind, KindName, kind_of

#: PEFT 0.21's init methods (``init_lora_weights``).
Method = Literal["default", "gaussian", "pissa", "olora"]
METHODS: tuple[Method, ...] = get_args(Method)


@dataclass(frozen=True)
class InitResult:
    """lora_A, lora_B (PEFT layouts of the kind), and for PiSSA/OLoRA the rewritten base weight."""

    A: np.ndarray
    B: np.ndarray
    base: np.ndarray | None = None


def kaiming_uniform_bound(fan_in: int) -> float:
    """b of torch's kaiming_uniform_(a=√5), evaluated in float64 as torch does: √3·(gain/√fan_in)."""
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


def _draws(draws: np.ndarray | None, rng: np.random.Generator | int | None, shape: tuple[int, ...], normal: bool) -> np.ndarray:
    if draws is not None:
        check_float_array(draws, "draws")
        draws = np.asarray(draws, dtype=float64)
        if draws.shape != shape:
            raise ShapeError(f"draws have shape {draws.shape}, expected {shape}")
        return draws
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return generator.standard_normal(shape) if normal else generator.random(shape)


def init_lora(
    kind: KindName | Kind,
    weight: np.ndarray,
    r: int,
    lora_alpha: float,
    *,
    method: Method = "default",
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    draws: np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
    dtype: object = float32,
) -> InitResult:
    """A new adapter's factors for one module (module doc); ``weight`` is the base weight.

    Only its shape matters for default/gaussian; PiSSA and OLoRA (Linear only) read it and
    return the new base in its dtype.
    """
    if method not in METHODS:
        raise ConfigError(f"init method {method!r} is not supported; expected one of {METHODS}")
    dtype = resolve_dtype(dtype)
    scale = lora_scale(r, lora_alpha, use_rslora)
    layer = kind_of(kind)
    A_shape, B_shape = layer.lora_shapes(tuple(np.shape(weight)), r, fan_in_fan_out=fan_in_fan_out)
    decomposition = method in ("pissa", "olora")
    if decomposition and not layer.decomposition_init:
        raise ConfigError(f"init method {method!r} is defined for Linear layers only (PEFT 0.21 rejects it on {layer.name})")
    if layer.reversed_init:  # PEFT's embeddings: A = 0, B ~ N(0, 1), whatever the method string says
        N = _draws(draws, rng, B_shape, normal=True)
        return InitResult(np.zeros(A_shape, dtype), round_to(N, dtype))
    if method == "default":
        bound = float(round_to(np.float64(kaiming_uniform_bound(int(np.prod(A_shape[1:])))), dtype))
        U = _draws(draws, rng, A_shape, normal=False)
        return InitResult(round_to(-bound + 2 * bound * U, dtype), np.zeros(B_shape, dtype))
    if method == "gaussian":
        N = _draws(draws, rng, A_shape, normal=True)
        sigma = float(round_to(np.float64(1.0 / r), dtype))
        return InitResult(round_to(N * sigma, dtype), np.zeros(B_shape, dtype))
    return _decomposition_init(np.asarray(weight), r, scale, method, fan_in_fan_out, dtype)


def _decomposition_init(weight: np.ndarray, r: int, scale: float, method: str, fan_in_fan_out: bool, dtype: np.dtype) -> InitResult:
    check_float_array(weight, "base weight")
    W = np.asarray(weight).astype(float64)
    W = W.T if fan_in_fan_out else W
    if not np.all(np.isfinite(W)):
        raise ConfigError(f"{method} init needs a finite base weight")
    if r > min(W.shape):
        raise ConfigError(f"{method} init needs r <= min(out, in) = {min(W.shape)}, got r={r}")
    if method == "pissa":
        V, S, Uh = np.linalg.svd(W, full_matrices=False)
        V, Uh = V[:, :r], Uh[:r]
        lead = np.argmax(np.abs(Uh), axis=1)  # first index of the largest |entry| per row
        sign = np.where(Uh[np.arange(r), lead] < 0, -1.0, 1.0)
        root = np.sqrt(S[:r] / scale)
        A64 = (root * sign)[:, None] * Uh
        B64 = V * (root * sign)[None, :]
    else:
        Q, R = np.linalg.qr(W, mode="reduced")
        sign = np.where(np.diag(R)[:r] < 0, -1.0, 1.0)
        A64 = sign[:, None] * R[:r]
        B64 = Q[:, :r] * sign[None, :]
    A, B = round_to(A64, dtype), round_to(B64, dtype)
    new_base = W - scale * (B.astype(float64) @ A.astype(float64))  # the adapted model reproduces W
    new_base = new_base.T if fan_in_fan_out else new_base
    return InitResult(A, B, round_to(new_base, weight.dtype))


def init_magnitude(W: np.ndarray, delta, axis: int, *, dtype: object = float32) -> np.ndarray:
    """DoRA's initial magnitude m = n = ‖W + ΔW‖ per output channel (``axis`` of W), rounded once."""
    from .dora import weight_norm

    return round_to(weight_norm(W, delta, axis), resolve_dtype(dtype))
