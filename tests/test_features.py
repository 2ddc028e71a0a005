"""The feature matrix (lora_ref.features): docs/features.md matches the table, and every cell of
kind/variant × feature is tested here: a supported cell by its check, a refused cell by its
typed error.

Oracles. Mixed-batch rows against the single-adapter float64 forward of the kind on those rows
(linear/conv/embedding.forward, dora.forward); gradients against central finite differences of
the float64 loss L = Σ dy · y. ΔW, DoRA's gain g = m/‖W + ΔW‖ and the merged weights come from
the SPEC formulas written in tests/features_cases.py with numpy.einsum. PEFT's own layers are the
peer oracle in tests/test_peers_peft_features.py.

Tolerances. Every compared value is a float64 sum of products (plus, for DoRA, a norm: a sum of
squares, a square root and a division), so each route is within γ_N·P of the exact value, P the
same expression on absolute values (times max(1, |g|) for DoRA) and N an upper bound on the
chain of roundings: N = 2·|W| + 16 covers the inner length (≤ |W|), the norm's length (≤ |W|),
the rank (≤ 3 per adapter) and the few additions. Two routes differ by at most 2·γ_N·P.
Finite differences: L is affine in each single entry of x, A, B, lora_bias and m (DoRA's n is
held constant, as PEFT detaches it; for A and B that is done by differencing the plain LoRA
term weighted by g, see below), so a central difference with h = 1 is exact in real arithmetic
and off only by the roundings of the two evaluations, ≤ γ_N·Q each with Q = Σ|dy|·P at
|inputs| + 1; with the backward's own error, 2·γ_N·Q bounds |FD − grad|.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from features_cases import MODULE, Case, delta_oracle, dora_gain, make_case, weight_shape
from lora_ref import conv as conv_kind
from lora_ref import dora, embedding, linear
from lora_ref.combine import combine
from lora_ref.dropout import dropout_mask
from lora_ref.errors import MergeStateError
from lora_ref.features import DOC, FEATURES, ONNX_FEATURES, SPEC, VARIANTS, Variant, cell, render, with_spec_rows
from lora_ref.kinds import kind_of
from lora_ref.ledger import MergeLedger
from lora_ref.mixed_batch import LoraFactors, active_forward, mixed_backward, mixed_forward
from lora_ref.models import LayerModel
from lora_ref.numerics import gamma
from lora_ref.optim import AdamW
from lora_ref.train import init_adapter, teacher_task, train_mixed
from lora_ref.tree import AdapterTree, TreeNode, TreeSwitcher, merge_path

U64 = 2.0**-53
CELLS = [(v.name, f) for v in VARIANTS for f in FEATURES if f not in ONNX_FEATURES]  # ONNX cells: test_features_onnx.py


def test_doc_and_spec_match_the_table():
    assert DOC.read_text(encoding="utf-8") == render(), "run `python -m lora_ref.features` to regenerate docs/features.md"
    spec = SPEC.read_text(encoding="utf-8")
    assert with_spec_rows(spec) == spec, "run `python -m lora_ref.features` to regenerate SPEC M.8"
    assert spec.count("| DoRA ") >= sum(v.dora for v in VARIANTS) * len(FEATURES)  # one row per cell


def chain(case: Case) -> int:
    return 2 * case.W.size + 16


def single_forward(case: Case, f: LoraFactors | None, x, mask=None) -> np.ndarray:
    """The single-adapter float64 forward of the case's kind (None: the base) on rows x."""
    v, W = case.variant, case.W
    if f is None:
        A, B = kind_of(v.kind).zero_factors(W.shape, fan_in_fan_out=v.fan_in_fan_out)
        f = LoraFactors(A, B, 0.0, kind=v.kind)
    if f.magnitude is not None:
        layer = dora.build(v.kind, W, f.A, f.B, f.scale, f.magnitude, fan_in_fan_out=v.fan_in_fan_out, geometry=case.geometry)
        return dora.forward(layer, x, bias=case.bias, dropout_mask=mask, out_dtype=np.float64)
    if v.kind == "linear":
        return linear.forward(x, W, f.A, f.B, f.scale, bias=case.bias, lora_bias=f.lora_bias, dropout_mask=mask,
                              fan_in_fan_out=v.fan_in_fan_out, out_dtype=np.float64)
    if v.kind == "embedding":
        return embedding.forward(x, W, f.A, f.B, f.scale, out_dtype=np.float64)
    return conv_kind.forward(x, W, f.A, f.B, f.scale, geometry=case.geometry, bias=case.bias, lora_bias=f.lora_bias,
                             dropout_mask=mask, out_dtype=np.float64)


def magnitude_P(case: Case, x, factors, index, shift: float = 0.0) -> np.ndarray:
    """P: the forward on |inputs| + shift, plain LoRA terms, times max(1, |g|) on DoRA rows (+1 for the dropout form)."""
    absf = [None if f is None else LoraFactors(np.abs(f.A) + shift, np.abs(f.B) + shift, abs(f.scale),
                                               None if f.lora_bias is None else np.abs(f.lora_bias) + shift, None, f.kind)
            for f in factors]
    xa = x if x.dtype.kind in "iu" else np.abs(x) + shift
    bias = None if case.bias is None else np.abs(case.bias)
    P = mixed_forward(xa, np.abs(case.W) + shift, absf, index, bias=bias, out_dtype=np.float64, **case.options)
    G = max([1.0] + [float(np.max(np.abs(dora_gain(case.variant, case.W, f)))) + 1.0 for f in factors
                     if f is not None and f.magnitude is not None])
    return P * G


def routing(case: Case, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    index = rng.integers(-1, len(case.adapters), size=case.x.shape[0])
    index[:3] = [-1, 0, 1]  # base, two adapters always present
    mask = dropout_mask(case.x.shape, 0.3, rng) if kind_of(case.variant.kind).dropout else None
    return index, mask


# -- the cells -----------------------------------------------------------------------------

def check_mixed_forward(v: Variant, seed: int) -> None:
    case = make_case(v, seed)
    factors = case.factors
    index, mask = routing(case, seed)
    for m in (None, mask) if mask is not None else (None,):
        y = mixed_forward(case.x, case.W, factors, index, bias=case.bias, dropout_mask=m, **case.options)
        bound = 2 * gamma(chain(case), U64) * magnitude_P(case, case.x, factors, index)
        for i in range(-1, len(factors)):
            rows = np.flatnonzero(index == i)
            if rows.size == 0:
                continue
            f = factors[i] if i >= 0 else None
            want = single_forward(case, f, case.x[rows], None if m is None or f is None else m[rows])
            assert np.all(np.abs(y[rows] - want) <= bound[rows]), (v.name, i)
            if f is not None and f.magnitude is not None and m is None:  # g_i ∘ (base + lora_i) + b, g from the oracle
                g = dora_gain(v, case.W, f).reshape([-1 if a == (1 if v.kind == "conv" else y.ndim - 1) else 1 for a in range(y.ndim)])
                plain = single_forward(dataclasses.replace(case, bias=None), dataclasses.replace(f, magnitude=None), case.x[rows])
                bias = 0.0 if case.bias is None else case.bias.reshape(g.shape[1:])
                assert np.all(np.abs(y[rows] - (g * plain + bias)) <= bound[rows]), (v.name, i, "dora oracle")
    y32 = mixed_forward(case.x.astype(np.float32) if case.float_input else case.x, case.W.astype(np.float32),
                        [None if f is None else dataclasses.replace(
                            f, A=f.A.astype(np.float32), B=f.B.astype(np.float32)) for f in factors], index,
                        bias=None if case.bias is None else case.bias.astype(np.float32), **case.options)
    assert y32.dtype == np.float32  # one rounding of the float64 value, to x's (or W's) dtype


def fd(loss, array: np.ndarray) -> np.ndarray:
    """Central differences with h = 1 of an affine function of each entry (module doc)."""
    grad = np.zeros(array.shape)
    for pos in np.ndindex(*array.shape):
        keep = array[pos]
        array[pos] = keep + 1.0
        plus = loss()
        array[pos] = keep - 1.0
        minus = loss()
        array[pos] = keep
        grad[pos] = (plus - minus) / 2.0
    return grad


def check_mixed_backward(v: Variant, seed: int) -> None:
    case = make_case(v, seed, batch=4)
    factors = [None if f is None else dataclasses.replace(f, A=f.A.copy(), B=f.B.copy(),
               lora_bias=None if f.lora_bias is None else f.lora_bias.copy(),
               magnitude=None if f.magnitude is None else f.magnitude.copy()) for f in case.factors]
    index, mask = routing(case, seed)
    x = case.x.copy()
    y = mixed_forward(x, case.W, factors, index, bias=case.bias, dropout_mask=mask, **case.options)
    dy = np.random.default_rng(seed + 1).normal(size=y.shape)
    g = mixed_backward(x, dy, case.W, factors, index, dropout_mask=mask, **case.options)
    Q = float(np.sum(np.abs(dy) * magnitude_P(case, x, factors, index, shift=1.0)))
    tol = 2 * gamma(chain(case), U64) * Q

    def loss(fs=factors, weights=dy):
        return float(np.sum(weights * mixed_forward(x, case.W, fs, index, bias=case.bias, dropout_mask=mask, **case.options)))

    if case.float_input:
        assert np.max(np.abs(fd(loss, x) - g.dx)) <= tol
    else:
        assert g.dx is None
    for i, f in enumerate(factors):
        if f is None:
            assert g.dA[i] is None
            continue
        if not np.any(index == i):
            assert not np.any(g.dA[i]) and not np.any(g.dB[i])  # no rows, exact zeros
        if f.magnitude is None:
            fields = [("A", g.dA[i]), ("B", g.dB[i])] + ([("lora_bias", g.dlora_bias[i])] if f.lora_bias is not None else [])
            for name, grad in fields:
                assert np.max(np.abs(fd(loss, getattr(f, name)) - grad)) <= tol, (v.name, i, name)
            continue
        assert np.max(np.abs(fd(loss, f.magnitude) - g.dmagnitude[i])) <= tol, (v.name, i, "magnitude")
        # n detached: dA, dB are those of the plain LoRA term g ∘ lora(x̃) with g fixed, i.e. the
        # plain term's gradients under the cotangent g ∘ dy on adapter i's rows.
        gain = dora_gain(v, case.W, f)
        axis = 1 if v.kind == "conv" else -1
        shape = [1] * dy.ndim
        shape[axis] = -1
        weighted = dy * gain.reshape(shape)
        plain = list(factors)
        plain[i] = dataclasses.replace(f, magnitude=None)
        for name, grad in (("A", g.dA[i]), ("B", g.dB[i])):
            assert np.max(np.abs(fd(lambda: loss(plain, weighted), getattr(plain[i], name)) - grad)) <= tol * (1 + gain.max()), name


def check_train_dropout(v: Variant, seed: int) -> None:
    from features_cases import CONV
    geometry = CONV[v.conv_dims][0] if v.conv_dims else None
    model = LayerModel(v.kind, weight_shape(v), geometry=geometry, fan_in_fan_out=v.fan_in_fan_out, seed=seed)
    rng = np.random.default_rng(seed)
    case = make_case(v, seed, batch=48)
    inputs = case.x
    teachers = [init_adapter(model, 2, 2.0, seed=seed + 10 + k, init_B="normal", lora_bias=v.lora_bias, use_dora=v.dora)
                for k in range(2)]
    tasks = [teacher_task(model, t, inputs if k == 0 else rng.permutation(inputs)) for k, t in enumerate(teachers)]

    def run(p: float, run_seed: int):
        students = [init_adapter(model, 2, 2.0, seed=seed + 20 + k, name=f"s{k}", lora_dropout=p, lora_bias=v.lora_bias,
                                 use_dora=v.dora) for k in range(2)]
        history = train_mixed(model, students, tasks, steps=25, batch_size=8, seed=run_seed,
                              optimizers=[AdamW(lr=2e-2, weight_decay=0.0) for _ in range(2)])
        return students, history

    a, history = run(0.2, 1)
    b, _ = run(0.2, 1)
    c, _ = run(0.0, 1)
    for sa, sb, sc in zip(a, b, c):  # reproducible from the seed; dropout matters where the kind takes it
        la, lb, lc = sa.modules[MODULE], sb.modules[MODULE], sc.modules[MODULE]
        assert all(np.array_equal(x_, y_) for x_, y_ in zip(la.arrays().values(), lb.arrays().values()))
        assert np.array_equal(la.B, lc.B) == (not kind_of(v.kind).dropout)
        assert la.lora_bias is not None if v.lora_bias else la.lora_bias is None
        assert (la.magnitude is not None) == v.dora
    for k in range(2):
        first, last = history.first_last(k)
        assert last < first, (v.name, k, first, last)


def combine_case(v: Variant, seed: int, equal_ranks: bool = False):
    case = make_case(v, seed, missing=False)
    if equal_ranks:  # linear needs one rank: cut every adapter to rank 1
        for a in case.adapters:
            lora = a.modules[MODULE]
            lora.A, lora.B = lora.A[:1], lora.B[:, :1]
            a.config = dataclasses.replace(a.config, r=1, rank_pattern={MODULE: 1} if v.patterns else {})
    weights = list(np.random.default_rng(seed).uniform(-2, 2, len(case.adapters)))
    return case, weights


def check_combine(v: Variant, seed: int, method: str) -> None:
    case, weights = combine_case(v, seed, equal_ranks=method == "linear")
    terms = [(w * a.scale_for(MODULE), a.modules[MODULE]) for w, a in zip(weights, case.adapters)]
    R = sum(t.rank for _, t in terms)
    result = combine(case.adapters, weights, method, rank=R if method == "svd" else None)
    got = result.adapter.modules[MODULE]
    assert got.kind == v.kind and result.adapter.scale_for(MODULE) == 1.0
    stored = delta_oracle(v, got.A, got.B, 1.0)
    if method == "linear":  # PEFT's formula with its cross terms: Σ_i Σ_j b_i a_j B_i A_j
        a = [np.sign(c) * np.sqrt(abs(c)) for c, _ in terms]
        b = [np.sqrt(abs(c)) for c, _ in terms]
        want = sum(b[i] * a[j] * delta_oracle(v, tj.A, ti.B, 1.0) for i, (_, ti) in enumerate(terms) for j, (_, tj) in enumerate(terms))
        P = sum(abs(b[i] * a[j]) * np.abs(delta_oracle(v, np.abs(tj.A), np.abs(ti.B), 1.0))
                for i, (_, ti) in enumerate(terms) for j, (_, tj) in enumerate(terms))
    else:
        want = sum(delta_oracle(v, t.A, t.B, c) for c, t in terms)
        P = sum(np.abs(delta_oracle(v, np.abs(t.A), np.abs(t.B), abs(c))) for c, t in terms)
    if method == "svd":  # backward-stable QR + SVD: ‖error‖_F ≤ 8 (m + n + R) u ‖P‖_F (as tests/test_combine.py)
        m, n = got.B.shape[0], int(np.prod(got.A.shape[1:]))
        assert np.linalg.norm(stored - want) <= 8 * (m + n + R) * U64 * np.linalg.norm(P)
    else:
        assert np.all(np.abs(stored - want) <= 2 * gamma(R * len(terms) + 4, U64) * P)
    if v.lora_bias:
        bias = sum(c * t.lora_bias for c, t in terms)
        assert np.all(np.abs(got.lora_bias - bias) <= gamma(len(terms) + 1, U64) * sum(abs(c) * np.abs(t.lora_bias) for c, t in terms))


def check_active_stack(v: Variant, seed: int) -> None:
    case = make_case(v, seed, missing=False)
    stack = case.factors
    y = active_forward(case.x, case.W, stack, bias=case.bias, **{k: o for k, o in case.options.items()})
    merged_W = case.W + sum(delta_oracle(v, f.A, f.B, f.scale) for f in stack)
    bias = case.bias
    if v.lora_bias:
        bias = bias + sum(f.scale * f.lora_bias for f in stack)
    want = single_forward(dataclasses.replace(case, W=merged_W, bias=bias), None, case.x)
    P_W = np.abs(case.W) + sum(np.abs(delta_oracle(v, np.abs(f.A), np.abs(f.B), abs(f.scale))) for f in stack)
    P_bias = None if bias is None else np.abs(case.bias) + sum(abs(f.scale) * np.abs(f.lora_bias) for f in stack) if v.lora_bias else (
        None if bias is None else np.abs(bias))
    xa = case.x if not case.float_input else np.abs(case.x)
    P = single_forward(dataclasses.replace(case, W=P_W, bias=P_bias), None, xa)
    n = chain(case) + 3 * len(stack) + len(stack)
    assert np.all(np.abs(y - want) <= 2 * gamma(n, U64) * P)


def merge_step_oracle(v: Variant, W_prev: np.ndarray, f: LoraFactors) -> tuple[np.ndarray, np.ndarray]:
    """(W after merging f onto W_prev, elementwise bound): W + ΔW, or g ∘ (W + ΔW) with n from W_prev (SPEC 3.1, 4.3)."""
    V = W_prev + delta_oracle(v, f.A, f.B, f.scale)
    P = np.abs(W_prev) + np.abs(delta_oracle(v, np.abs(f.A), np.abs(f.B), abs(f.scale)))
    n = 2 * W_prev.size + 16
    if f.magnitude is None:
        return V, gamma(n, U64) * P
    axis = 1 if v.kind == "embedding" or v.fan_in_fan_out else 0
    shape = [1] * V.ndim
    shape[axis] = -1
    g = dora_gain(v, W_prev, f).reshape(shape)
    return g * V, 2 * gamma(n, U64) * np.abs(g) * P


def check_merged_stack(v: Variant, seed: int) -> None:
    case = make_case(v, seed, missing=False)
    weights = {f"{MODULE}.weight": case.W.copy()}
    if v.lora_bias:
        weights[f"{MODULE}.bias"] = case.bias.copy()
    ledger = MergeLedger(weights, exact=True)
    order = list(np.random.default_rng(seed).permutation(len(case.adapters)))
    states = [{k: w.copy() for k, w in weights.items()}]
    for i in order:
        adapter = case.adapters[i]
        f = case.factors[i]
        want, bound = merge_step_oracle(v, weights[f"{MODULE}.weight"].copy(), f)
        ledger.merge(adapter)
        assert np.all(np.abs(weights[f"{MODULE}.weight"] - want) <= bound)
        if v.lora_bias:
            assert np.all(np.abs(weights[f"{MODULE}.bias"] - states[-1][f"{MODULE}.bias"] - f.scale * f.lora_bias)
                          <= U64 * (np.abs(weights[f"{MODULE}.bias"]) + abs(f.scale * f.lora_bias)) * 2)
        states.append({k: w.copy() for k, w in weights.items()})
    with pytest.raises(MergeStateError):
        ledger.unmerge(case.adapters[order[0]])  # not the last merged: LIFO only
    for i in reversed(order):
        ledger.unmerge(case.adapters[i])
        states.pop()
        assert all(np.array_equal(weights[k], states[-1][k]) for k in weights)  # exact: bit for bit
    # the same adapters as a tree: any switch sequence lands bitwise on merging the path from scratch
    names = [a.name for a in case.adapters]
    tree = AdapterTree([TreeNode(names[0], None, case.adapters[0]), TreeNode(names[1], names[0], case.adapters[1]),
                        TreeNode(names[2], None, case.adapters[2])])
    live = {k: w.copy() for k, w in states[0].items()}
    switcher = TreeSwitcher(tree, live)
    for target in (names[1], names[2], names[0], None, names[1]):
        switcher.switch(target)
        fresh = merge_path(tree, states[0], target)
        assert all(np.array_equal(live[k], fresh[k]) for k in live)


CHECKS = {
    "mixed_forward": check_mixed_forward,
    "mixed_backward": check_mixed_backward,
    "train_dropout": check_train_dropout,
    "combine_cat": lambda v, seed: check_combine(v, seed, "cat"),
    "combine_linear": lambda v, seed: check_combine(v, seed, "linear"),
    "combine_svd": lambda v, seed: check_combine(v, seed, "svd"),
    "active_stack": check_active_stack,
    "merged_stack": check_merged_stack,
}


def refuse(v: Variant, feature: str, seed: int) -> None:
    """Call the refused feature on the variant (it must raise the cell's error)."""
    if feature.startswith("combine_"):
        case, weights = combine_case(v, seed, equal_ranks=True)
        combine(case.adapters, weights, feature.removeprefix("combine_"))
    elif feature == "active_stack":
        case = make_case(v, seed, missing=False)
        active_forward(case.x, case.W, case.factors, bias=case.bias, **case.options)
    else:
        raise AssertionError(f"no refusal check for {feature}")


def test_every_feature_has_a_check():
    assert set(CHECKS) == set(FEATURES) - set(ONNX_FEATURES)


@pytest.mark.parametrize("variant_name,feature", CELLS)
def test_cell(variant_name, feature):
    v = next(v for v in VARIANTS if v.name == variant_name)
    c = cell(v, feature)
    for seed in (1, 2):
        if c.supported:
            CHECKS[feature](v, seed)
        else:
            with pytest.raises(c.error) as info:
                refuse(v, feature, seed)
            assert "DoRA" in str(info.value) or "lora_bias" in str(info.value)
