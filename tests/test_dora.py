"""DoRA on Linear, Conv and Embedding (SPEC 4.3) against an exact oracle, within derived bounds.

Oracle: Fractions everywhere except the norm: n_c = sqrt(float(Σ exact V²)) (relative error
≤ 2·u64: one correctly rounded conversion, halved by the square root, and the sqrt's own
rounding); g = m / n then exact. eval: y = g(base(x) + lora(x)) + b; dropout:
y = base(x) + b + (g − 1) base(x̃) + g lora(x̃).

Forward bound: the reference's n carries γ_{N+r+4}(u64) relative error (N squares summed, each
V element through r + 2 roundings), g one more rounding, the rest γ_K as for the plain layer;
so |ŷ − y| ≤ u_t|y| + (1+u_t)·γ_{K+N+r+10}(u64)·(|g|·M + M_base + |b|) + η_t/2, with M the
oracle of base + lora on |inputs| and M_base = base(|x|) (the dropout formula's unscaled term).

Backward (n constant, as PEFT detaches it): with n frozen, L = Σ dy ∘ y is linear in each of x,
A, B and m separately, so the exact L(θ + V) − L(θ) at frozen n is ⟨∂L/∂θ, V⟩; bound as in
test_conv, plus n's and g's relative error.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lora_ref import dora
from lora_ref.adapter import Adapter, LoraModule, load_adapter, save_adapter
from lora_ref.config import LoraConfig
from lora_ref.conv import ConvGeometry
from lora_ref.deltas import delta_for
from lora_ref.dtypes import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, bits_of, float64, resolve_dtype, round_to
from lora_ref.errors import ConfigError, FileFormatError, ShapeError
from lora_ref.kinds import kind_of
from lora_ref.linear import LinearDelta
from lora_ref.merge import merge, unmerge
from lora_ref.safetensors_io import load_file, save_file
from lora_ref.numerics import exact, gamma, to_float

from helpers import error_log, finite_max, oracle_conv

STORAGE = ["float32", "float16", "bfloat16"]
U64 = UNIT_ROUNDOFF[float64]
LOG, _print_errors = error_log("DoRA vs exact oracle")


# -- per-kind exact maps -------------------------------------------------------------------------------


class Kind:
    """Exact base/lora maps and W + ΔW for one layer kind, on Fraction arrays."""

    def __init__(self, case: dict) -> None:
        self.case = case

    def channel(self, y):  # move the output-channel axis last
        return y if self.case["kind"] != "conv" else np.moveaxis(y, 1, -1)

    def unchannel(self, y):
        return y if self.case["kind"] != "conv" else np.moveaxis(y, -1, 1)

    def base(self, x, W):
        kind = self.case["kind"]
        if kind == "linear":
            return x @ (W.T if self.case["ffo"] else W).T
        if kind == "embedding":
            return W[self.case["x"]]
        return oracle_conv(x, W, (1,) * (W.ndim - 2), (1,) * (W.ndim - 2), [(1, 1)] * (W.ndim - 2), "zeros")

    def lora(self, x, A, B, s):
        kind = self.case["kind"]
        if kind == "linear":
            return ((x @ A.T) @ B.T) * s
        if kind == "embedding":
            return (A.T[self.case["x"]] @ B.T) * s
        hidden = oracle_conv(x, A, (1,) * (A.ndim - 2), (1,) * (A.ndim - 2), [(1, 1)] * (A.ndim - 2), "zeros")
        return np.moveaxis(np.tensordot(hidden, B.reshape(B.shape[0], -1), axes=([1], [1])), -1, 1) * s

    def V_channels_first(self, W, A, B, s):
        """W + ΔW with the output channel as axis 0, flattened to [C, rest]."""
        kind = self.case["kind"]
        if kind == "linear":
            W_oi = W.T if self.case["ffo"] else W
            return W_oi + (B @ A) * s
        if kind == "embedding":
            return (W + (A.T @ B.T) * s).T
        r = A.shape[0]
        return W.reshape(W.shape[0], -1) + (B.reshape(-1, r) @ A.reshape(r, -1)) * s


def oracle(case: dict, e: dict, *, n_frozen=None):
    """(y exact, n float64 used). ``n_frozen`` replaces n (backward: n is a constant)."""
    k = Kind(case)
    Vc = k.V_channels_first(e["W"], e["A"], e["B"], e["s"])
    if n_frozen is None:
        n = np.array([math.sqrt(float(sum(v * v for v in row))) for row in Vc.reshape(Vc.shape[0], -1)])
    else:
        n = n_frozen
    g = np.array([Fraction(mi) / Fraction(ni) for mi, ni in zip(e["m"].reshape(-1), n)], dtype=object)
    x = e["x"]
    if e["mask"] is None:
        y = k.channel(k.base(x, e["W"]) + k.lora(x, e["A"], e["B"], e["s"])) * g
    else:
        xd = x * e["mask"]
        y = k.channel(k.base(x, e["W"])) + k.channel(k.base(xd, e["W"])) * (g - 1) + k.channel(k.lora(xd, e["A"], e["B"], e["s"])) * g
    if e["bias"] is not None:
        y = y + e["bias"]
    return k.unchannel(y), n


@st.composite
def dora_cases(draw: st.DrawFn, dtypes=STORAGE + ["float64"], kinds=("linear", "conv", "embedding")) -> dict:
    dtype = resolve_dtype(draw(st.sampled_from(dtypes)))
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 2.0 ** draw(st.integers(-4, 3))
    r, out = draw(st.integers(1, 3)), draw(st.integers(1, 4))

    def sample(shape, sc=scale):
        return round_to(rng.normal(0, sc, shape), dtype)

    ffo = False
    if kind == "linear":
        n_in, rows = draw(st.integers(1, 5)), draw(st.integers(1, 3))
        ffo = draw(st.booleans())
        x = sample((rows, n_in))
        W, A, B = sample((n_in, out) if ffo else (out, n_in)), sample((r, n_in)), sample((out, r))
    elif kind == "conv":
        d = draw(st.integers(1, 2))
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(d))
        C = draw(st.integers(1, 2))
        x = sample((1, C) + tuple(k + draw(st.integers(0, 2)) for k in kernel))
        W, A, B = sample((out, C) + kernel), sample((r, C) + kernel), sample((out, r) + (1,) * d)
    else:
        V = draw(st.integers(1, 6))
        x = rng.integers(0, V, (draw(st.integers(1, 4)),))
        W, A, B = sample((V, out)), sample((r, V)), sample((out, r))
    m_shape = (1, out) + (1,) * (W.ndim - 2) if kind == "conv" and draw(st.booleans()) else (out,)
    m = round_to(rng.uniform(0.25, 2.0, m_shape) * np.where(rng.random(m_shape) < 0.2, -1, 1) * scale, dtype)
    p = 0.0 if kind == "embedding" else draw(st.sampled_from([0.0, 0.5]))
    case = {"dtype": dtype, "kind": kind, "ffo": ffo, "x": x, "W": W, "A": A, "B": B, "m": m,
            "s": draw(st.sampled_from([0.5, 2.0, 4 / 3])),
            "bias": sample((out,)) if draw(st.booleans()) else None,
            "mask": (rng.random(x.shape) >= p) / (1 - p) if p else None}
    layer = build(case)
    assume(np.all(layer.n > 0))  # a zero row of W + ΔW has no direction: g undefined
    case["dy"] = sample(layer.ops.base(x if kind == "embedding" else x.astype(float64)).shape)
    return case


def build(case: dict, **override) -> dora.Dora:
    c = {**case, **override}
    if c["kind"] == "linear":
        return dora.linear(c["W"], c["A"], c["B"], c["s"], c["m"], fan_in_fan_out=c["ffo"], module="layer")
    if c["kind"] == "conv":
        return dora.conv(c["W"], c["A"], c["B"], c["s"], c["m"], geometry=ConvGeometry(padding=1), module="layer")
    return dora.embedding(c["W"], c["A"], c["B"], c["s"], c["m"], module="layer")


def exact_case(case: dict) -> dict:
    e = {k: exact(case[k]) for k in ("W", "A", "B", "m", "bias", "mask", "dy")}
    e["x"] = case["x"] if case["kind"] == "embedding" else exact(case["x"])
    e["s"] = Fraction(case["s"])
    return e


def absolute(e: dict, case: dict) -> dict:
    out = {k: (np.abs(v) if isinstance(v, np.ndarray) and v.dtype == object else v) for k, v in e.items()}
    out["s"] = abs(e["s"])
    if case["kind"] == "embedding":
        out["x"] = e["x"]
    return out


def depth(case: dict) -> int:
    """K + N + r + 10 of the module doc, with K and N taken generously as the input sizes."""
    return int(case["W"].size + case["A"].size + 2 * case["A"].shape[0] + 12)


def magnitudes(case: dict, e: dict) -> np.ndarray:
    """|g|·M + M_base + |b| on the oracle's absolute values (module doc)."""
    k = Kind(case)
    ae = absolute(e, case)
    _, n = oracle(case, e)
    g = np.abs(np.array([float(Fraction(mi) / Fraction(ni)) for mi, ni in zip(e["m"].reshape(-1), n)]))
    x = ae["x"]
    M = to_float(k.channel(k.base(x, ae["W"]) + k.lora(x, ae["A"], ae["B"], ae["s"])))
    total = M * g + to_float(k.channel(k.base(x, ae["W"])))
    if ae["bias"] is not None:
        total = total + to_float(ae["bias"])
    return k.unchannel(total)


# -- forward ---------------------------------------------------------------------------------------------


@given(case=dora_cases())
def test_forward_matches_exact_oracle(case: dict) -> None:
    e = exact_case(case)
    want = to_float(oracle(case, e)[0])
    M = magnitudes(case, e)
    t = case["dtype"]
    if t != float64:
        assume(np.all(M < finite_max(t) / 4))
    got = dora.forward(build(case), case["x"], bias=case["bias"], dropout_mask=case["mask"])
    assert got.dtype == t and got.shape == want.shape
    u_t = 0.0 if t == float64 else UNIT_ROUNDOFF[t]
    eta = 0.0 if t == float64 else SMALLEST_SUBNORMAL[t] / 2
    bound = u_t * np.abs(want) + (1 + u_t) * gamma(depth(case), U64) * M + eta
    label = "dropout" if case["mask"] is not None else "eval"
    LOG.check(f"forward {case['kind']} {label} {t}", got, want, bound)


@given(case=dora_cases(dtypes=["float64"], kinds=("linear", "conv")))
def test_dropout_formula_with_mask_one_is_the_eval_formula(case: dict) -> None:
    case = {**case, "mask": None}
    layer = build(case)
    ones = np.ones(case["x"].shape)
    eval_y = dora.forward(layer, case["x"], bias=case["bias"])
    train_y = dora.forward(layer, case["x"], bias=case["bias"], dropout_mask=ones)
    LOG.check("dropout(mask=1) vs eval", train_y, eval_y, 2 * gamma(depth(case), U64) * magnitudes(case, exact_case(case)))


# -- backward --------------------------------------------------------------------------------------------


@given(case=dora_cases(dtypes=["float64"]), which=st.sampled_from(["x", "A", "B", "m"]))
def test_backward_is_the_directional_derivative_at_constant_norm(case: dict, which: str) -> None:
    if which == "x" and case["kind"] == "embedding":
        which = "m"
    layer = build(case)
    V = np.random.default_rng(2).normal(0, 1, np.shape(case[which]))
    e = exact_case(case)
    _, n = oracle(case, e)
    moved = {**e, which: e[which] + exact(V)}
    dy = e["dy"]

    def loss(ex):
        return (oracle(case, ex, n_frozen=n)[0] * dy).sum()

    want = float(loss(moved) - loss(e))
    g = dora.backward(layer, case["x"], case["dy"], case["A"], case["B"], dropout_mask=case["mask"])
    got = float(np.sum({"x": g.dx, "A": g.dA, "B": g.dB, "m": g.dmagnitude}[which] * V))
    ae = absolute(e, case)
    ae_dy = {**ae, "m": np.abs(e["m"])}
    abs_moved = {**ae_dy, which: ae_dy[which] + exact(np.abs(V))}
    magnitude = float((oracle(case, abs_moved, n_frozen=n)[0] * np.abs(dy)).sum() - (oracle(case, ae_dy, n_frozen=n)[0] * np.abs(dy)).sum())
    # the dropout formula's (g − 1) is not sign-definite, so the oracle on |inputs| does not dominate
    # every term of the difference; adding Σ|dy|·|y|(|inputs|) covers the (g − 1)·base term's size
    magnitude += float((np.abs(oracle(case, ae_dy, n_frozen=n)[0]) * np.abs(dy)).sum()) if which != "m" else 0.0
    G = depth(case) + int(np.size(case["x"]) + np.size(case["dy"]))
    bound = (gamma(G, U64) + gamma(V.size + 1, U64) * (1 + gamma(G, U64))) * abs(magnitude)
    LOG.check(f"backward d{which} {case['kind']}", np.array(got), np.array(want), np.array(bound))
    assert g.dmagnitude.shape == np.shape(case["m"])


# -- merge --------------------------------------------------------------------------------------------------


def lora_source(case: dict):
    return kind_of(case["kind"]).delta(case["A"], case["B"], case["s"], fan_in_fan_out=case["ffo"], module="layer")


def merge_source(case: dict) -> dora.DoraDelta:
    axis = kind_of(case["kind"]).dora_axis(case["ffo"])
    return dora.dora_delta(lora_source(case), case["m"], case["W"], axis)


@given(case=dora_cases())
def test_merged_forward_equals_unmerged_forward(case: dict) -> None:
    """base(x; round_t(g(W + ΔW))) vs the eval forward, both in float64: the merged weight's one
    rounding moves the output by at most u_t·base(|x|; |g(W+Δ)|) + (η_t/2)·base(|x|; 1), plus the
    float64 evaluations (γ on the magnitudes)."""
    case = {**case, "mask": None, "bias": None}
    src = merge_source(case)
    merged = merge(case["W"], src).weight
    assume(np.all(np.isfinite(merged.astype(float64))))
    layer = build(case)
    x_in = case["x"] if case["kind"] == "embedding" else case["x"].astype(float64)
    y_unmerged = dora.forward(layer, case["x"], out_dtype="float64")
    merged_layer = build({**case, "W": merged})
    y_merged = merged_layer.ops.base(x_in)
    exact_merged = np.abs(src.merge_block(slice(None), case["W"].astype(float64)))
    u_t = 0.0 if case["dtype"] == float64 else UNIT_ROUNDOFF[case["dtype"]]
    eta = 0.0 if case["dtype"] == float64 else SMALLEST_SUBNORMAL[case["dtype"]] / 2
    absx = np.abs(x_in) if case["kind"] != "embedding" else x_in
    bound = (u_t * build({**case, "W": exact_merged}).ops.base(absx) + eta * build({**case, "W": np.ones_like(exact_merged)}).ops.base(absx)
             + 2 * gamma(depth(case), U64) * (np.abs(build({**case, "W": merged.astype(float64)}).ops.base(absx)) + magnitudes(case, exact_case(case))))
    LOG.check(f"merged vs unmerged {case['kind']} {case['dtype']}", y_merged, y_unmerged, bound)


@given(case=dora_cases(dtypes=STORAGE))
def test_fast_round_trip_within_bound(case: dict) -> None:
    src = merge_source(case)
    merged = merge(case["W"], src).weight
    assume(np.all(np.isfinite(merged.astype(float64))))
    back = unmerge(merged, src)
    LOG.check(f"fast round trip {case['kind']} {case['dtype']}", back, case["W"].astype(float64), dora.fast_roundtrip_bound(case["W"], src))


@given(case=dora_cases(dtypes=STORAGE), special=st.booleans())
def test_exact_round_trip_is_bitwise(case: dict, special: bool) -> None:
    W = case["W"]
    if special:  # NaN payloads, ±inf, -0, subnormals, elements near the dtype's largest value
        rng = np.random.default_rng(W.size)
        bits = bits_of(W).reshape(-1).copy()
        raw = rng.integers(0, 2 ** (8 * bits.itemsize), bits.size, dtype=np.uint64).astype(bits.dtype)
        pick = rng.random(bits.size) < 0.3
        bits[pick] = raw[pick]
        W = bits.view(W.dtype).reshape(W.shape)
    src = dora.DoraDelta(lora_source(case), case["m"], merge_source(case).norm, kind_of(case["kind"]).dora_axis(case["ffo"]))
    result = merge(W, src, exact=True, allow_nonfinite=True)
    back = unmerge(result.weight, src, residual=result.residual)
    assert np.array_equal(bits_of(back), bits_of(W))


# -- files and bad input -------------------------------------------------------------------------------------


def _adapter(tmp_path, magnitude, use_dora=True):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], use_dora=use_dora)
    module = LoraModule("proj", np.ones((2, 3), np.float32), np.ones((4, 2), np.float32), magnitude=magnitude)
    return cfg, module


def test_bad_magnitudes_and_missing_norms_are_refused_naming_the_module(tmp_path) -> None:
    W, A, B = np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 2))
    with pytest.raises(ShapeError, match="layers.0.proj"):
        dora.linear(W, A, B, 1.0, np.ones(3), module="layers.0.proj")
    with pytest.raises(ShapeError, match="layers.0.conv"):
        dora.conv(np.ones((4, 3, 3, 3)), np.ones((2, 3, 3, 3)), np.ones((4, 2, 1, 1)), 1.0, np.ones((4, 1, 1, 1)), module="layers.0.conv")
    with pytest.raises(ShapeError, match="layers.0.proj"):
        dora.DoraDelta(LinearDelta(A, B, 1.0, module="layers.0.proj"), np.ones(5), np.ones(4), 0)
    with pytest.raises(ConfigError, match="embed"):
        layer = dora.embedding(np.ones((5, 4)), np.ones((2, 5)), np.ones((4, 2)), 1.0, np.ones(4), module="embed")
        dora.forward(layer, np.array([1]), dropout_mask=np.ones(1))
    # files: DoRA without magnitude, magnitude without use_dora, magnitude of the wrong length
    cfg, module = _adapter(tmp_path, np.ones(4, np.float32))
    save_adapter(Adapter(cfg, {"proj": module}), tmp_path / "ok")
    tensors = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    for name, edit, error in [
        ("no_magnitude", lambda t: t.pop("base_model.model.proj.lora_magnitude_vector"), FileFormatError),
        ("short_magnitude", lambda t: t.__setitem__("base_model.model.proj.lora_magnitude_vector", np.ones(3, np.float32)), ShapeError),
    ]:
        (tmp_path / name).mkdir()
        edited = dict(tensors)
        edit(edited)
        save_file(tmp_path / name / "adapter_model.safetensors", edited)
        cfg.save(tmp_path / name)
        with pytest.raises(error, match="proj"):
            load_adapter(tmp_path / name)
    (tmp_path / "not_dora").mkdir()
    save_file(tmp_path / "not_dora" / "adapter_model.safetensors", tensors)
    LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]).save(tmp_path / "not_dora")
    with pytest.raises(ConfigError, match="proj"):
        load_adapter(tmp_path / "not_dora")
    adapter = load_adapter(tmp_path / "ok")
    with pytest.raises(dora.DoraNormMissingError, match="proj"):
        delta_for(adapter, "proj")  # neither the base weight (merge) nor the cached norm (unmerge)
