"""Conv1d/2d/3d LoRA (SPEC 4.2) against an exact rational oracle, within derived bounds.

Oracle: inputs converted exactly to Fractions; the conv is evaluated by explicit loops over
output positions, with padding written out index by index (zeros, reflect, replicate,
circular: an implementation independent of numpy.pad):

    y[n, o, p] = Σ_{c, κ} x[n, c, src(p·stride + κ·dilation)] W[o, c, κ] + b[o]
                 + s Σ_j B[o, j] Σ_{c, κ} x̃[n, c, src(·)] A[j, c, κ] + s lora_bias[o]

Forward bound (as test_linear): |ŷ − y| ≤ u_t|y| + (1+u_t)·γ_K(u64)·M + η_t/2 with M the
oracle on |inputs| and K = C·∏k + r + 6 roundings per term (a sum of C·∏k products, the
dropout multiply, a sum of r, s, three adds).

Backward: L = Σ dy ∘ y is affine in each of x, W, A, B separately, so for a direction V,
L(θ + V) − L(θ) (exact, rational) is exactly ⟨∂L/∂θ, V⟩. The float64 gradient has every
component within γ_G(u64)·M_i with G = the number of scalars involved (every term of every
gradient sum passes through fewer roundings than that), and the float64 dot product with V
adds γ_{|V|}; both are bounded via M_dir = the same difference on |inputs|, |dy|, |V|.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lora_ref.conv import ConvDelta, ConvGeometry, ConvGroupsError, ConvOps, backward, forward
from lora_ref.dtypes import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, bits_of, float64, resolve_dtype, round_to
from lora_ref.errors import ConfigError, ShapeError
from lora_ref.merge import fast_roundtrip_bound, merge, unmerge
from lora_ref.numerics import exact, gamma, to_float

from helpers import error_log, finite_max, oracle_conv, rounding_bound

STORAGE = ["float32", "float16", "bfloat16"]
U64 = UNIT_ROUNDOFF[float64]
LOG, _print_errors = error_log("Conv LoRA vs exact oracle")


# -- the exact oracle -----------------------------------------------------------------------------


def oracle_forward(e: dict, geo: dict):
    args = (geo["stride"], geo["dilation"], geo["pads"], geo["mode"])
    x_drop = e["x"] if e["mask"] is None else e["x"] * e["mask"]
    hidden = oracle_conv(x_drop, e["A"], *args)  # [N, r, *out]
    B2 = e["B"].reshape(e["B"].shape[0], -1)
    y = oracle_conv(e["x"], e["W"], *args) + np.moveaxis(np.tensordot(hidden, B2, axes=([1], [1])), -1, 1) * e["s"]
    shape = (1, -1) + (1,) * (y.ndim - 2)
    if e["bias"] is not None:
        y = y + e["bias"].reshape(shape)
    if e["lora_bias"] is not None:
        y = y + e["lora_bias"].reshape(shape) * e["s"]
    return y


# -- cases ------------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw: st.DrawFn, dtypes=STORAGE + ["float64"]) -> dict:
    """A Conv1d/2d/3d LoRA layer with every geometry option (1x1 and Conv3d 1x1x1 included)."""
    dtype = resolve_dtype(draw(st.sampled_from(dtypes)))
    d = draw(st.integers(1, 3))
    kmax = 3 if d < 3 else 2
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    span = [dl * (k - 1) + 1 for dl, k in zip(dilation, kernel)]
    spatial = tuple(s + draw(st.integers(0, 3 if d < 3 else 1)) for s in span)
    if draw(st.booleans()) and d < 3:
        padding, stride = "same", (1,) * d
        totals = [dl * (k - 1) for dl, k in zip(dilation, kernel)]
        pads = [(t // 2, t - t // 2) for t in totals]
        assume(all(hi < s for (_, hi), s in zip(pads, spatial)))  # reflect needs pad < size
    else:
        stride = tuple(draw(st.integers(1, 2)) for _ in range(d))
        padding = tuple(draw(st.integers(0, min(2, s - 1))) for s in spatial)
        pads = [(p, p) for p in padding]
    N, C, O, r = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 2.0 ** draw(st.integers(-4, 3))

    def sample(shape):
        return round_to(rng.normal(0, scale, shape), dtype)

    p = draw(st.sampled_from([0.0, 0.5]))
    case = {
        "dtype": dtype,
        "x": sample((N, C) + spatial),
        "W": sample((O, C) + kernel),
        "A": sample((r, C) + kernel),
        "B": sample((O, r) + (1,) * d),
        "s": draw(st.sampled_from([0.5, 2.0, 16 / 3])),
        "bias": sample((O,)) if draw(st.booleans()) else None,
        "lora_bias": sample((O,)) if draw(st.booleans()) else None,
        "mask": (rng.random((N, C) + spatial) >= p) / (1 - p) if p else None,
        "geometry": ConvGeometry(stride=stride, padding=padding, dilation=dilation, padding_mode=mode),
        "geo": {"stride": stride, "dilation": dilation, "pads": pads, "mode": mode},
    }
    out = ConvOps(case["W"], case["A"], case["B"], 1.0, case["geometry"]).base(np.zeros((1, C) + spatial)).shape[2:]
    case["dy"] = sample((N, O) + out)
    return case


def exact_case(case: dict) -> dict:
    names = ("x", "W", "A", "B", "bias", "lora_bias", "mask", "dy")
    return {**{k: exact(case[k]) for k in names}, "s": Fraction(case["s"])}


def absolute(e: dict) -> dict:
    return {k: (np.abs(v) if isinstance(v, np.ndarray) else abs(v) if isinstance(v, Fraction) else v) for k, v in e.items()}


def run_forward(case: dict, **kw) -> np.ndarray:
    return forward(case["x"], case["W"], case["A"], case["B"], case["s"], geometry=case["geometry"], bias=case["bias"],
                   lora_bias=case["lora_bias"], dropout_mask=case["mask"], **kw)


def depth(case: dict) -> int:
    return int(np.prod(case["A"].shape[1:])) + case["A"].shape[0] + 6


# -- forward ----------------------------------------------------------------------------------------


@given(case=conv_cases())
def test_forward_matches_exact_oracle(case: dict) -> None:
    e = exact_case(case)
    want, magnitude = to_float(oracle_forward(e, case["geo"])), to_float(oracle_forward(absolute(e), case["geo"]))
    assume(np.all(magnitude < finite_max(case["dtype"]) / 2) if case["dtype"] != float64 else True)
    got = run_forward(case)
    assert got.dtype == case["dtype"] and got.shape == want.shape
    LOG.check(f"forward {case['dtype']}", got, want, rounding_bound(want, magnitude, depth(case), case["dtype"]))


# -- backward ---------------------------------------------------------------------------------------


@given(case=conv_cases(dtypes=["float64"]), which=st.sampled_from(["x", "W", "A", "B"]))
def test_backward_is_the_exact_directional_derivative(case: dict, which: str) -> None:
    """⟨grad, V⟩ vs L(θ + V) − L(θ) in exact arithmetic (module doc)."""
    rng = np.random.default_rng(0)
    V = rng.normal(0, 1, case[which].shape)
    e = exact_case(case)
    moved = {**e, which: e[which] + exact(V)}

    def loss(ex):
        return (oracle_forward(ex, case["geo"]) * ex["dy"]).sum()

    want = float(loss(moved) - loss(e))
    ae = absolute(e)
    magnitude = float(loss({**ae, which: ae[which] + exact(np.abs(V))}) - loss(ae))
    grads = backward(case["x"], case["dy"], case["W"], case["A"], case["B"], case["s"], geometry=case["geometry"],
                     dropout_mask=case["mask"], want_base_grads=True)
    got = float(np.sum({"x": grads.dx, "W": grads.dW, "A": grads.dA, "B": grads.dB}[which] * V))
    G = sum(np.size(case[k]) for k in ("x", "W", "A", "B", "dy"))
    bound = (gamma(G, U64) + gamma(V.size + 1, U64) * (1 + gamma(G, U64))) * magnitude
    LOG.check(f"backward d{which} (directional)", np.array(got), np.array(want), np.array(bound))


@given(case=conv_cases(dtypes=STORAGE))
def test_backward_rounds_once_to_each_tensors_dtype(case: dict) -> None:
    wide = {k: (v.astype(float64) if isinstance(v, np.ndarray) and v.dtype != bool else v) for k, v in case.items()}
    g = backward(case["x"], case["dy"], case["W"], case["A"], case["B"], case["s"], geometry=case["geometry"], dropout_mask=case["mask"])
    g64 = backward(wide["x"], wide["dy"], wide["W"], wide["A"], wide["B"], case["s"], geometry=case["geometry"], dropout_mask=case["mask"])
    for got, ref in ((g.dx, g64.dx), (g.dA, g64.dA), (g.dB, g64.dB)):
        assert got.dtype == case["dtype"]
        assert np.array_equal(bits_of(got), bits_of(round_to(ref, case["dtype"])))


# -- delta and merge ----------------------------------------------------------------------------------


@given(case=conv_cases())
def test_merged_conv_equals_lora_conv(case: dict) -> None:
    """conv(x, W') with W' = round_t(W + ΔW) vs the LoRA forward, both evaluated in float64.

    conv(x, W + ΔW) = conv(x, W) + lora(x) exactly, and W' is within u_t|W + ΔW| + η_t/2 of
    W + ΔW, so the two differ by at most u_t·conv(|x|, |W+Δ|) + (η_t/2)·conv(|x|, 1) plus the
    two float64 evaluations' γ_K(u64) on their magnitudes. (The magnitudes are evaluated with
    ConvOps on absolute values; the values compared come from the two different paths.)
    """
    case = {**case, "mask": None, "bias": None, "lora_bias": None}
    delta = ConvDelta(case["A"], case["B"], case["s"])
    merged = merge(case["W"], delta).weight
    assume(np.all(np.isfinite(merged.astype(float64))))
    geometry, x64 = case["geometry"], case["x"].astype(float64)
    y_merged = ConvOps(merged, case["A"], case["B"], case["s"], geometry).base(x64)
    y_lora = run_forward(case, out_dtype="float64")

    def abs_conv(kernel):
        return ConvOps(np.abs(kernel), np.abs(case["A"]), np.abs(case["B"]), abs(case["s"]), geometry)

    absx = np.abs(x64)
    u_t = 0.0 if case["dtype"] == float64 else UNIT_ROUNDOFF[case["dtype"]]
    eta = 0.0 if case["dtype"] == float64 else SMALLEST_SUBNORMAL[case["dtype"]]
    lora_mag = abs_conv(case["W"]).base(absx) + abs_conv(case["W"]).lora(absx)
    bound = (u_t * abs_conv(case["W"].astype(float64) + delta.full()).base(absx)
             + eta / 2 * abs_conv(np.ones(case["W"].shape)).base(absx)
             + gamma(depth(case) + 2, U64) * (abs_conv(merged.astype(float64)).base(absx) + lora_mag))
    LOG.check(f"merged vs unmerged forward {case['dtype']}", y_merged, y_lora, bound)


def test_delta_1x1_and_kxk_and_conv3d_1x1() -> None:
    """ΔW[o, c, κ] = s Σ_j B[o, j] A[j, c, κ] against exact sums, for 1x1, kxk and Conv3d 1x1x1:
    r products, r − 1 adds and the scale give |error| ≤ γ_{r+1}(u64)·s·Σ_j |B||A|."""
    rng = np.random.default_rng(3)
    r, s = 2, 0.5
    for kernel in [(1,), (3,), (1, 1), (3, 2), (1, 1, 1), (1, 1, 3), (2, 2, 2)]:
        A, B = rng.normal(size=(r, 3) + kernel), rng.normal(size=(4, r) + (1,) * len(kernel))
        want, mag = np.zeros((4, 3) + kernel), np.zeros((4, 3) + kernel)
        for o, c in np.ndindex(4, 3):
            for tap in np.ndindex(*kernel):
                terms = [Fraction(B[(o, j) + (0,) * len(kernel)]) * Fraction(A[(j, c) + tap]) for j in range(r)]
                want[(o, c) + tap] = float(Fraction(s) * sum(terms))
                mag[(o, c) + tap] = float(Fraction(s) * sum(abs(t) for t in terms))
        got = ConvDelta(A, B, s).full()
        assert got.shape == want.shape
        LOG.check("delta vs exact sums", got, want, gamma(r + 2, U64) * mag)


@st.composite
def weight_and_conv_delta(draw: st.DrawFn, special: bool):
    dtype = resolve_dtype(draw(st.sampled_from(STORAGE)))
    d = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(d))
    O, C, r = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w_scale = 2.0 ** draw(st.integers(-20, 4))
    d_scale = w_scale * 2.0 ** draw(st.integers(-12, 12))
    W = round_to(rng.normal(0, w_scale, (O, C) + kernel), dtype)
    if special:
        width = np.dtype(bits_of(W).dtype).itemsize * 8
        raw = rng.integers(0, 2**width, W.size, dtype=np.uint64).astype(bits_of(W).dtype)
        pick = rng.random(W.size) < 0.5
        flat = bits_of(W).reshape(-1).copy()
        flat[pick] = raw[pick]
        W = flat.view(dtype).reshape(W.shape)
    A = rng.normal(0, np.sqrt(d_scale), (r, C) + kernel).astype(np.float32)
    B = rng.normal(0, np.sqrt(d_scale), (O, r) + (1,) * d).astype(np.float32)
    return W, ConvDelta(A, B, draw(st.sampled_from([0.5, 1.0, 3.0])), module="conv")


@given(wd=weight_and_conv_delta(special=False))
def test_fast_round_trip_within_bound(wd) -> None:
    W, delta = wd
    merged = merge(W, delta).weight
    assume(np.all(np.isfinite(merged.astype(float64))))
    back = unmerge(merged, delta)
    LOG.check(f"fast round trip {W.dtype}", back, W.astype(float64), fast_roundtrip_bound(W, delta.full()))


@given(wd=weight_and_conv_delta(special=True))
def test_exact_round_trip_is_bitwise(wd) -> None:
    W, delta = wd
    result = merge(W, delta, exact=True)
    back = unmerge(result.weight, delta, residual=result.residual)
    assert np.array_equal(bits_of(back), bits_of(W))


# -- bad input ---------------------------------------------------------------------------------------


def test_groups_and_bad_shapes_are_refused_naming_the_module() -> None:
    W, A, B = np.zeros((4, 3, 3, 3)), np.zeros((2, 3, 3, 3)), np.zeros((4, 2, 1, 1))
    with pytest.raises(ConvGroupsError, match="enc.conv"):
        ConvOps(W, A, B, 1.0, ConvGeometry(groups=2), module="enc.conv")
    for bad_A, bad_B in [(np.zeros((2, 3, 3, 2)), B), (A, np.zeros((4, 2, 3, 3))), (np.zeros((2, 3, 3)), B), (A, np.zeros((4, 3, 1, 1)))]:
        with pytest.raises(ShapeError, match="enc.conv"):
            ConvOps(W, bad_A, bad_B, 1.0, ConvGeometry(), module="enc.conv")
    with pytest.raises(ShapeError, match="enc.conv"):
        ConvDelta(A, np.zeros((4, 2, 3, 1)), 1.0, module="enc.conv")
    for bad in (ConvGeometry(padding_mode="mirror"), ConvGeometry(stride=0), ConvGeometry(padding=-1), ConvGeometry(dilation=(1, 0))):
        with pytest.raises(ConfigError):
            ConvOps(W, A, B, 1.0, bad)
    with pytest.raises(ConfigError):
        ConvOps(W, A, B, 1.0, ConvGeometry(padding="same", stride=2)).pads((3, 3))
    with pytest.raises(ShapeError):
        forward(np.zeros((1, 2, 5, 5)), W, A, B, 1.0)  # 2 input channels, weight wants 3
