"""Helpers the test modules share (test modules never import each other).

* :class:`ErrorLog` and :func:`error_log`: the largest observed error per label in units of its
  bound, printed at the end of each module;
* :func:`rounding_bound`: u_t·|y| + (1 + u_t)·γ_K(u64)·M + η_t/2, the bound of a float64
  evaluation rounded once to t (``tests/test_linear.py``'s module doc derives it);
* the exact oracles on Fraction object arrays: Linear (:func:`oracle_forward`, with the
  :func:`linear_cases` strategy and :func:`exact_case` / :func:`oracle_of`), Conv (:func:`oracle_conv`);
* :func:`finite_max`: the largest finite value of a dtype;
* :func:`load_example`: a script of examples/ imported as a module.

γ_k and the exact conversions (:func:`lora_ref.numerics.gamma`, ``exact``, ``to_float``) live in
:mod:`lora_ref.numerics`.
"""

from __future__ import annotations

import importlib.util
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import strategies as st

from lora_ref.config import lora_scale
from lora_ref.dropout import dropout_mask
from lora_ref.dtypes import BITS_VIEW, SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, float64, resolve_dtype, round_to
from lora_ref.numerics import exact, gamma

DTYPES = ["float32", "float16", "bfloat16", "float64"]
U64 = UNIT_ROUNDOFF[float64]


class ErrorLog:
    """The largest observed error in units of its bound, per label; printed at module teardown."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.worst: dict[str, float] = {}

    def check(self, label: str, got: np.ndarray, want: np.ndarray, bound: np.ndarray) -> None:
        """Assert |got − want| <= bound elementwise (got in any float dtype; want, bound float64)."""
        got64 = np.asarray(got).astype(float64)
        err = np.abs(got64 - np.asarray(want, dtype=float64))
        bound = np.asarray(bound, dtype=float64)
        assert np.all(err <= bound), (
            f"{label}: error {err.max():.3e} exceeds bound; worst ratio {np.max(err / np.maximum(bound, 1e-300)):.3g}"
        )
        ratio = float(np.max(err / np.where(bound > 0, bound, 1.0), initial=0.0))
        self.worst[label] = max(self.worst.get(label, 0.0), ratio)

    def print(self, request: pytest.FixtureRequest) -> None:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or not self.worst:
            return
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():  # print past pytest's output capture
            reporter.write_line("")
            reporter.write_line(f"{self.title}: max observed error in units of its bound")
            for label, ratio in sorted(self.worst.items()):
                reporter.write_line(f"  {label:<44} {ratio:.3g}")


def error_log(title: str):
    """(log, fixture): an :class:`ErrorLog` and a module-scoped autouse fixture printing it.

    Use as ``LOG, _print_errors = error_log("...")`` at a test module's top level.
    """
    log = ErrorLog(title)

    @pytest.fixture(scope="module", autouse=True)
    def _print_errors(request: pytest.FixtureRequest):
        yield
        log.print(request)

    return log, _print_errors


def rounding_bound(want: np.ndarray, magnitude: np.ndarray, k: int, dtype: np.dtype) -> np.ndarray:
    """u_t·|y| + (1 + u_t)·γ_k(u64)·M + η_t/2 (module doc); float64 has no final rounding."""
    u_t = 0.0 if dtype == float64 else UNIT_ROUNDOFF[dtype]
    floor = 0.0 if dtype == float64 else SMALLEST_SUBNORMAL[dtype] / 2
    # one more γ term covers the rounding of M and |y| themselves to float64 here
    return u_t * np.abs(want) + (1 + u_t) * gamma(k + 2, U64) * magnitude + floor


# -- exact oracles ---------------------------------------------------------------------------------


def oracle_forward(x, W, A, B, s, bias=None, lora_bias=None, mask=None, fan_in_fan_out=False):
    """SPEC 2.3 in exact arithmetic on Fraction object arrays (W stored [in, out] with fan_in_fan_out)."""
    W_oi = W.T if fan_in_fan_out else W
    lora_in = x if mask is None else x * mask
    y = x @ W_oi.T + ((lora_in @ A.T) @ B.T) * s
    if bias is not None:
        y = y + bias
    if lora_bias is not None:
        y = y + lora_bias * s
    return y


def absolute(case: dict) -> dict:
    return {k: (np.abs(v) if isinstance(v, np.ndarray) else abs(v) if isinstance(v, Fraction) else v)
            for k, v in case.items()}


@st.composite
def linear_cases(draw: st.DrawFn, dtypes=DTYPES, max_dim: int = 5) -> dict:
    """Random Linear LoRA inputs of one storage dtype; every option drawn."""
    dtype = resolve_dtype(draw(st.sampled_from(dtypes)))
    rows, n_in, n_out, r = (draw(st.integers(1, 3)), draw(st.integers(1, max_dim)),
                            draw(st.integers(1, max_dim)), draw(st.integers(1, 4)))
    lead = (rows,) if draw(st.booleans()) else (1, rows)  # leading axes are flattened
    fan_in_fan_out = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    magnitude = 2.0 ** draw(st.integers(-6, 3))

    def sample(shape, scale=1.0):
        return round_to(rng.normal(0, scale * magnitude, shape), dtype)

    alpha = draw(st.integers(1, 64))
    use_rslora = draw(st.booleans())
    p = draw(st.sampled_from([0.0, 0.1, 0.5]))
    return {
        "dtype": dtype,
        "x": sample(lead + (n_in,)),
        "W": sample((n_in, n_out) if fan_in_fan_out else (n_out, n_in)),
        "A": sample((r, n_in)),
        "B": sample((n_out, r)),
        "s": lora_scale(r, alpha, use_rslora),
        "bias": sample((n_out,)) if draw(st.booleans()) else None,
        "lora_bias": sample((n_out,)) if draw(st.booleans()) else None,
        "mask": dropout_mask(lead + (n_in,), p, seed) if p else None,
        "fan_in_fan_out": fan_in_fan_out,
        "dy": sample(lead + (n_out,)),
    }


def exact_case(case: dict) -> dict:
    names = ("x", "W", "A", "B", "bias", "lora_bias", "mask")
    return {**{k: exact(case[k]) for k in names}, "s": Fraction(case["s"]), "fan_in_fan_out": case["fan_in_fan_out"]}


def oracle_of(e: dict):
    return oracle_forward(e["x"], e["W"], e["A"], e["B"], e["s"], e["bias"], e["lora_bias"], e["mask"], e["fan_in_fan_out"])


def source_index(i: int, n: int, before: int, mode: str) -> int | None:
    """Which input element padded position i copies (None: a zero), written from torch's docs."""
    j = i - before
    if 0 <= j < n:
        return j
    if mode == "zeros":
        return None
    if mode == "replicate":
        return min(max(j, 0), n - 1)
    if mode == "circular":
        return j % n
    return -j if j < 0 else 2 * (n - 1) - j  # reflect (edge not repeated); needs pad < n


def oracle_conv(x, kernel, stride, dilation, pads, mode):
    """Exact conv on Fraction object arrays: x [N, C, *S], kernel [K, C, *k] -> [N, K, *out]."""
    N, C, S = x.shape[0], x.shape[1], x.shape[2:]
    k = kernel.shape[2:]
    out = tuple((s + lo + hi - dl * (kk - 1) - 1) // st_ + 1 for s, (lo, hi), dl, kk, st_ in zip(S, pads, dilation, k, stride))
    y = np.empty((N, kernel.shape[0]) + out, dtype=object)
    flat_kernel = kernel.reshape(kernel.shape[0], -1)
    for p in np.ndindex(*out):
        patch = np.empty((N, C) + k, dtype=object)
        for tap in np.ndindex(*k):
            src = [source_index(pi * st_ + t * dl, s, lo, mode) for pi, st_, t, dl, s, (lo, _) in zip(p, stride, tap, dilation, S, pads)]
            for n in range(N):
                for c in range(C):
                    patch[(n, c) + tap] = Fraction(0) if None in src else x[(n, c) + tuple(src)]
        y[(slice(None), slice(None)) + p] = patch.reshape(N, -1) @ flat_kernel.T
    return y


def finite_max(dtype: np.dtype) -> float:
    return float(np.array([np.inf], float64).astype(dtype).view(BITS_VIEW[dtype]).__sub__(1)
                 .astype(BITS_VIEW[dtype]).view(dtype).astype(float64)[0])


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """examples/<name>.py imported as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
