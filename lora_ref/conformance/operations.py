"""The operation table: for each operation name, its exact oracle and its error-bound depth K.

An oracle takes the case inputs (storage dtype, PEFT layout) and parameters and returns, per
output, an :class:`Expected`: either a *bounded* output (the exact value rounded once to
float64, the magnitude M = the same expression on |inputs| and |s|, and K; see
``bounds.py``) or a *bitwise* output (the exact bits an implementation must return).
Oracles use :mod:`.exact` only, never the reference implementation, so the reference is
tested against an independent evaluation.

To add an operation: write ``oracle(inputs, params) -> dict[str, Expected]`` and register it
with :func:`register`; add cases to ``catalog.py``; teach ``reference_impl.py`` to run it.

Depth K for the Linear operations (rows = product of x's leading axes; in, out, r the layer
sizes). Each term's path: its contraction lengths (additions), its multiplications (at most
three: input × A × B, or × mask), two roundings for computing s = alpha/r or alpha/sqrt(r)
and one for rounding s itself, and up to three additions of bias / base / LoRA terms:
    forward y   K = in + r + 6        backward dx K = out + r + 6
    dA          K = out + rows + 6    dB          K = in + rows + 6
    dW          K = rows + 2          db          K = rows + 1          dlora_bias  K = rows + 4
    merge / unmerge (W ± s B A)       K = r + 6
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from ..errors import ConfigError
from .exact import Dyadic, combine, sqrt_fraction

Inputs = Mapping[str, np.ndarray]
Params = Mapping[str, Any]


@dataclass(frozen=True)
class Expected:
    """One output of a case: ``check`` is "bound" (value, magnitude, depth; with ``slack``, an absolute
    per-element amount added to the tolerance), "bitwise" (value in t), "equals" (bitwise the
    implementation's own output ``same_as``; ``value`` gives the shape), "factor" (returned, only its
    dtype and shape are checked; ``value`` gives the shape) or "product" (not returned: the runner forms
    ``factors[0] @ factors[1]`` in float64 and bounds it like "bound", plus an absolute ``slack`` per element)."""

    check: str
    value: np.ndarray
    magnitude: np.ndarray | None = None
    depth: int = 0
    slack: np.ndarray | None = None
    factors: tuple[str, str] | None = None
    same_as: str | None = None

    def reshaped(self, shape: tuple[int, ...]) -> Expected:
        """The same output with its value and magnitude reshaped (e.g. rows back to [batch, seq, n])."""
        return Expected(self.check, self.value.reshape(shape), None if self.magnitude is None else self.magnitude.reshape(shape),
                        self.depth, self.slack, self.factors, self.same_as)


@dataclass(frozen=True)
class Operation:
    """An operation of the SPEC: its name, SPEC section and oracle."""

    name: str
    spec: str
    oracle: Callable[[Inputs, Params], dict[str, Expected]]


OPERATIONS: dict[str, Operation] = {}


def register(name: str, spec: str) -> Callable:
    """Decorator: add ``oracle`` to the table under ``name``."""

    def wrap(oracle: Callable[[Inputs, Params], dict[str, Expected]]) -> Callable:
        OPERATIONS[name] = Operation(name, spec, oracle)
        return oracle

    return wrap


def exact_scale(params: Params) -> Fraction:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, as an exact rational (SPEC 2.2)."""
    r, alpha = params["r"], Fraction(params["lora_alpha"])
    if not isinstance(r, int) or r <= 0:
        raise ConfigError(f"case parameter r must be a positive integer, got {r!r}")
    return alpha / sqrt_fraction(Fraction(r)) if params.get("use_rslora", False) else alpha / r


def exact_input(inputs: Inputs, name: str, absolute: bool = False) -> Dyadic:
    """Input ``name`` as exact dyadic rationals, or their absolute values (for the bound's magnitudes)."""
    value = Dyadic.of(inputs[name], what=name)
    return value.abs() if absolute else value


def scale_term(params: Params, absolute: bool = False) -> Fraction:
    """The exact scale s, or |s| (for the bound's magnitudes)."""
    s = exact_scale(params)
    return abs(s) if absolute else s


def bounded(terms: list[tuple[Fraction, Dyadic]], abs_terms: list[tuple[Fraction, Dyadic]], shape: tuple[int, ...], depth: int) -> Expected:
    """An Expected from exact terms Σ c_i T_i and their absolute counterparts Σ |c_i| |T|_i."""
    return Expected("bound", combine(terms, shape), combine(abs_terms, shape), depth)


class _Linear:
    """Exact pieces of a Linear LoRA layer, for the values and (absolute=True) the magnitudes."""

    def __init__(self, inputs: Inputs, params: Params, absolute: bool) -> None:
        def get(name: str) -> Dyadic | None:
            if name not in inputs:
                return None
            value = Dyadic.of(inputs[name], what=name)
            return value.abs() if absolute else value

        self.s = abs(exact_scale(params)) if absolute else exact_scale(params)
        W = get("W")
        self.W = None if W is None else (W.T if params.get("fan_in_fan_out", False) else W)  # [out, in]
        self.A, self.B = get("A"), get("B")
        self.b, self.lora_bias, self.mask = get("b"), get("lora_bias"), get("dropout_mask")
        self.in_features = self.A.shape[1]
        self.out_features = self.B.shape[0]

    def rows(self, name: str, inputs: Inputs, absolute: bool) -> Dyadic:
        value = Dyadic.of(inputs[name], what=name)
        value = value.abs() if absolute else value
        return value.reshape(-1, value.shape[-1])



def _linear_forward(inputs: Inputs, params: Params, absolute: bool) -> tuple[list, tuple[int, ...]]:
    lin = _Linear(inputs, params, absolute)
    X = lin.rows("x", inputs, absolute)
    Xm = X if lin.mask is None else X * lin.mask.reshape(-1, lin.in_features)
    base = X @ lin.W.T
    if lin.b is not None:
        base = base + lin.b.reshape(1, -1)
    lora = (Xm @ lin.A.T) @ lin.B.T
    if lin.lora_bias is not None:
        lora = lora + lin.lora_bias.reshape(1, -1)
    shape = tuple(inputs["x"].shape[:-1]) + (lin.out_features,)
    return [(Fraction(1), base.reshape(*shape)), (lin.s, lora.reshape(*shape))], shape


@register("linear.forward", "SPEC 2.3, C.3")
def linear_forward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """y = x W^T + b + s ((x ∘ mask) A^T) B^T + s lora_bias; the mask only when given (training)."""
    terms, shape = _linear_forward(inputs, params, False)
    abs_terms, _ = _linear_forward(inputs, params, True)
    depth = inputs["A"].shape[1] + inputs["A"].shape[0] + 6
    return {"y": bounded(terms, abs_terms, shape, depth)}


def _linear_backward(inputs: Inputs, params: Params, absolute: bool) -> tuple[dict[str, list], dict[str, tuple[int, ...]]]:
    lin = _Linear(inputs, params, absolute)
    X = lin.rows("x", inputs, absolute)
    dY = lin.rows("dy", inputs, absolute)
    mask = None if lin.mask is None else lin.mask.reshape(-1, lin.in_features)
    Xm = X if mask is None else X * mask
    dYB = dY @ lin.B  # [rows, r]
    lora_dx = dYB @ lin.A
    if mask is not None:
        lora_dx = lora_dx * mask
    x_shape = tuple(inputs["x"].shape)
    terms = {
        "dx": [(Fraction(1), (dY @ lin.W).reshape(*x_shape)), (lin.s, lora_dx.reshape(*x_shape))],
        "dA": [(lin.s, dYB.T @ Xm)],
        "dB": [(lin.s, dY.T @ (Xm @ lin.A.T))],
    }
    shapes = {"dx": x_shape, "dA": tuple(inputs["A"].shape), "dB": tuple(inputs["B"].shape)}
    if params.get("want_base_grads", False):
        dW = dY.T @ X
        terms["dW"] = [(Fraction(1), dW.T if params.get("fan_in_fan_out", False) else dW)]
        terms["db"] = [(Fraction(1), dY.sum(axis=0))]
        shapes["dW"], shapes["db"] = tuple(inputs["W"].shape), (lin.out_features,)
        if "lora_bias" in inputs:
            terms["dlora_bias"] = [(lin.s, dY.sum(axis=0))]
            shapes["dlora_bias"] = (lin.out_features,)
    return terms, shapes


@register("linear.backward", "SPEC 2.4, C.3")
def linear_backward(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """dx = dY W + s((dY B) A)∘mask, dA = s (dY B)^T (X∘mask), dB = s dY^T ((X∘mask) A^T), dW = dY^T X, db = Σ dY,
    and with a lora_bias input dlora_bias = s Σ dY (the base gradients only with want_base_grads)."""
    terms, shapes = _linear_backward(inputs, params, False)
    abs_terms, _ = _linear_backward(inputs, params, True)
    r, in_features = inputs["A"].shape
    out_features = inputs["B"].shape[0]
    rows = int(np.prod(inputs["x"].shape[:-1], dtype=np.int64))
    depth = {"dx": out_features + r + 6, "dA": out_features + rows + 6, "dB": in_features + rows + 6,
             "dW": rows + 2, "db": rows + 1, "dlora_bias": rows + 4}
    return {name: bounded(terms[name], abs_terms[name], shapes[name], depth[name]) for name in terms}


def merge_expected(W: np.ndarray, delta: Callable[[bool], tuple[Fraction, Dyadic]], sign: int, depth: int) -> Expected:
    """Exact W ± c·D (``delta(absolute)`` gives the rational c and dyadic D, shaped like W).

    Non-finite elements of W pass through (NaN stays NaN, ±inf stays ±inf); the rest is bounded.
    """
    with np.errstate(invalid="ignore"):  # a signaling NaN is quieted by the cast: only NaN-ness is used
        wide = np.asarray(W, dtype=np.float64)
    finite = np.isfinite(wide)
    base = Dyadic.of(np.where(finite, W, np.zeros_like(W)), what="W")
    shape = tuple(W.shape)
    c, D = delta(False)
    abs_c, abs_D = delta(True)
    value = combine([(Fraction(1), base), (sign * c, D)], shape)
    magnitude = combine([(Fraction(1), base.abs()), (abs_c, abs_D)], shape)
    return Expected("bound", np.where(finite, value, wide), np.where(finite, magnitude, 0.0), depth)


def _linear_delta(inputs: Inputs, params: Params) -> Callable[[bool], tuple[Fraction, Dyadic]]:
    def delta(absolute: bool) -> tuple[Fraction, Dyadic]:
        lin = _Linear({k: v for k, v in inputs.items() if k in ("A", "B")}, params, absolute)
        BA = lin.B @ lin.A
        return lin.s, BA.T if params.get("fan_in_fan_out", False) else BA

    return delta


def _merge_expected(W: np.ndarray, inputs: Inputs, params: Params, sign: int) -> Expected:
    return merge_expected(W, _linear_delta(inputs, params), sign, inputs["A"].shape[0] + 6)


@register("linear.merge", "SPEC 3.1, C.3")
def linear_merge(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """W_merged = round_t(W + s B A) (one rounding; with fan_in_fan_out the delta is transposed)."""
    return {"W_merged": _merge_expected(inputs["W"], inputs, params, +1)}


@register("linear.unmerge", "SPEC 3.2-3.4, C.3")
def linear_unmerge(inputs: Inputs, params: Params) -> dict[str, Expected]:
    """Fast: W = round_t(W_merged − s B A). Exact: from W, merge exactly then unmerge with the
    implementation's own residual; W_merged is bounded as a merge, W_restored must be W's bits."""
    if not params.get("exact", False):
        return {"W": _merge_expected(inputs["W_merged"], inputs, params, -1)}
    return {"W_merged": _merge_expected(inputs["W"], inputs, params, +1),
            "W_restored": Expected("bitwise", np.array(inputs["W"]))}


from . import cell_operations, combine_operations, conv_operations, dora_operations, layer_operations  # noqa: E402,F401  (register the conv, embedding, mixed-batch and DoRA operations)
from . import tree_operations  # noqa: E402,F401  (trees and merged stacks; imports the DoRA oracles)
