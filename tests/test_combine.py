"""Weighted combination (SPEC M.3): cat exactness, svd error = discarded spectrum (against an
independent dense SVD), PEFT's linear with its cross terms, rsLoRA scaling, files, CLI, bad input.

Tolerances. Δ = Σ c_i B_i A_i evaluated in float64 is within γ_n(u64)·P of exact, with
P = Σ |c_i| |B_i| |A_i| and n = R + 2 (R = Σ r_i). Storing c_i A_i in dtype t adds u_t·P.
Singular values and QR factors from LAPACK are backward stable: they are exact for Δ + E with
||E||_F ≤ c·(m + n)·u64·||Δ||_F; we allow c = 8, and by Weyl/Mirsky any Frobenius tail of the
spectrum moves by at most ||E||_F.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.adapter import Adapter, LoraModule, load_adapter, save_adapter
from lora_ref.cli import main
from lora_ref.combine import combine
from lora_ref.config import LoraConfig
from lora_ref.dtypes import UNIT_ROUNDOFF, round_to
from lora_ref.errors import ConfigError, ShapeError
from lora_ref.numerics import gamma

U64 = 2.0**-53
MODULES = {"q": (6, 5), "v": (4, 7)}  # module -> (out, in)


def make_adapter(rng, r, alpha, rslora=False, dtype=np.float64, modules=MODULES, name="a"):
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(modules))
    mods = {m: LoraModule(m, round_to(rng.normal(size=(r, i)), dtype), round_to(rng.normal(size=(o, r)), dtype))
            for m, (o, i) in modules.items()}
    return Adapter(cfg, mods, name=name)


def weighted_delta(adapters, weights, module):
    """Σ w_i s_i B_i A_i in float64, and its absolute-value twin P."""
    total, absolute = 0.0, 0.0
    for a, w in zip(adapters, weights):
        if module in a.modules:
            c = w * a.scale_for(module)
            A, B = a.modules[module].A.astype(np.float64), a.modules[module].B.astype(np.float64)
            total = total + c * (B @ A)
            absolute = absolute + abs(c) * (np.abs(B) @ np.abs(A))
    return total, absolute


def stored_delta(result, module):
    m = result.adapter.modules[module]
    return result.adapter.scale_for(module) * (m.B.astype(np.float64) @ m.A.astype(np.float64))


adapters_strategy = st.tuples(
    st.integers(0, 2**32 - 1),
    st.lists(st.tuples(st.integers(1, 4), st.sampled_from([1.0, 4.0, 16.0, 3.5]), st.booleans()), min_size=1, max_size=4),
)


def build(params, dtype=np.float64):
    seed, specs = params
    rng = np.random.default_rng(seed)
    adapters = [make_adapter(rng, r, alpha, rs, dtype, name=f"a{i}") for i, (r, alpha, rs) in enumerate(specs)]
    weights = list(rng.uniform(-2, 2, len(adapters)))
    return adapters, weights


@given(adapters_strategy, st.sampled_from([np.float64, np.float32, np.float16]))
def test_cat_is_the_exact_weighted_sum(params, dtype):
    adapters, weights = build(params, dtype)
    result = combine(adapters, weights, "cat")
    R = sum(a.config.r for a in adapters)
    assert result.adapter.config.r == R and result.adapter.scale_for("q") == 1.0
    for module in MODULES:
        target, P = weighted_delta(adapters, weights, module)
        bound = (UNIT_ROUNDOFF[np.dtype(dtype)] + 2 * gamma(R + 2, U64)) * P
        assert np.all(np.abs(stored_delta(result, module) - target) <= bound)


@given(adapters_strategy, st.integers(1, 8))
def test_svd_error_is_the_discarded_spectrum(params, k):
    adapters, weights = build(params)
    result = combine(adapters, weights, "svd", rank=k)
    assert result.adapter.config.r == k
    for module, (m, n) in MODULES.items():
        target, _ = weighted_delta(adapters, weights, module)
        sigma = np.linalg.svd(target, compute_uv=False)  # independent oracle: dense SVD of Δ
        tail = float(np.sqrt(np.sum(sigma[k:] ** 2)))
        tol = 8 * (m + n + result.modules[module].target_rank) * U64 * float(np.linalg.norm(target))
        report = result.modules[module]
        assert abs(report.discarded_frobenius - tail) <= tol
        actual = float(np.linalg.norm(stored_delta(result, module) - target))  # Eckart–Young: B A is optimal
        assert abs(actual - tail) <= 2 * tol
        assert abs(report.stored_error_frobenius - actual) <= 2 * tol
        assert abs(report.delta_frobenius - np.linalg.norm(target)) <= tol


@given(adapters_strategy)
def test_linear_is_peft_formula_with_cross_terms(params):
    seed, specs = params
    rng = np.random.default_rng(seed)
    r = specs[0][0]
    adapters = [make_adapter(rng, r, alpha, rs, name=f"a{i}") for i, (_, alpha, rs) in enumerate(specs)]
    weights = list(rng.uniform(-2, 2, len(adapters)))
    result = combine(adapters, weights, "linear")
    for module in MODULES:
        c = [w * a.scale_for(module) for a, w in zip(adapters, weights)]
        a_coef = [np.sign(ci) * np.sqrt(abs(ci)) for ci in c]
        b_coef = [np.sqrt(abs(ci)) for ci in c]
        A = [a.modules[module].A for a in adapters]
        B = [a.modules[module].B for a in adapters]
        diagonal, P = weighted_delta(adapters, weights, module)
        cross = sum((b_coef[i] * a_coef[j]) * (B[i] @ A[j]) for i in range(len(A)) for j in range(len(A)) if i != j)
        P_all = sum(b_coef[i] * abs(a_coef[j]) * (np.abs(B[i]) @ np.abs(A[j])) for i in range(len(A)) for j in range(len(A)))
        n = len(A) * (r + 2) + 2
        assert np.all(np.abs(stored_delta(result, module) - (diagonal + cross)) <= 2 * gamma(n, U64) * P_all)
        cross_norm = float(np.linalg.norm(cross)) if len(A) > 1 else 0.0
        tol = 2 * gamma(n, U64) * float(np.linalg.norm(P_all)) + 8 * (sum(MODULES[module]) + 2 * r * len(A)) * U64 * float(np.linalg.norm(P_all))
        assert abs(result.modules[module].stored_error_frobenius - cross_norm) <= tol


def test_single_rslora_adapter_survives_every_method_with_scale_one():
    rng = np.random.default_rng(5)
    a = make_adapter(rng, 4, 8.0, rslora=True)  # s = 8 / sqrt(4) = 4
    for method, rank in (("cat", None), ("svd", 4), ("linear", None)):
        result = combine([a], [1.0], method, rank=rank)
        assert not result.adapter.config.use_rslora and result.adapter.config.lora_alpha == result.adapter.config.r
        for module in MODULES:
            target, P = weighted_delta([a], [1.0], module)
            assert np.allclose(stored_delta(result, module), target, rtol=0, atol=float(8 * 20 * U64 * np.abs(P).max()))


def test_modules_present_in_some_adapters_and_zero_padding(tmp_path):
    rng = np.random.default_rng(1)
    a = make_adapter(rng, 2, 2.0, modules={"q": MODULES["q"]}, name="a")
    b = make_adapter(rng, 3, 6.0, modules=MODULES, name="b")
    result = combine([a, b], [1.0, 0.5], "cat")
    assert result.modules["q"].target_rank == 5 and result.modules["v"].target_rank == 3
    assert result.adapter.modules["v"].A.shape[0] == 5 and not result.adapter.modules["v"].A[3:].any()
    save_adapter(result.adapter, tmp_path / "out")
    loaded = load_adapter(tmp_path / "out")
    assert loaded.config.target_modules == ["q", "v"] and loaded.scale_for("v") == 1.0
    for module in MODULES:
        target, P = weighted_delta([a, b], [1.0, 0.5], module)
        assert np.all(np.abs(loaded.modules[module].B @ loaded.modules[module].A - target) <= 3 * gamma(7, U64) * P)


def test_bad_input_is_typed():
    rng = np.random.default_rng(2)
    a, b = make_adapter(rng, 2, 2.0), make_adapter(rng, 3, 2.0)
    with pytest.raises(ConfigError):
        combine([a, b], [1.0], "cat")
    with pytest.raises(ConfigError):
        combine([a, b], [1.0, 1.0], "ties")
    with pytest.raises(ConfigError):
        combine([a, b], [1.0, 1.0], "cat", rank=2)
    with pytest.raises(ConfigError):
        combine([a, b], [1.0, 1.0], "svd", rank=0)
    with pytest.raises(ConfigError):
        combine([a, b], [1.0, 1.0], "linear")  # unequal ranks
    with pytest.raises(ConfigError):
        combine([a, b], [1.0, float("nan")], "cat")
    with pytest.raises(ConfigError):
        combine([], [], "cat")
    other = make_adapter(rng, 2, 2.0, modules={"q": (3, 5)})
    with pytest.raises(ShapeError):
        combine([a, other], [1.0, 1.0], "cat")
    a.config.base_model_name_or_path, b.config.base_model_name_or_path = "org/one", "org/two"
    with pytest.raises(ConfigError):
        combine([a, b], [1.0, 1.0], "cat")
    dora = make_adapter(rng, 2, 2.0)
    dora.config.use_dora = True
    with pytest.raises(ConfigError):
        combine([dora], [1.0], "cat")


def test_cli_combine(tmp_path, capsys):
    rng = np.random.default_rng(3)
    dirs = []
    for i in range(2):
        save_adapter(make_adapter(rng, 2, 4.0, dtype=np.float32), tmp_path / f"a{i}")
        dirs.append(str(tmp_path / f"a{i}"))
    out = tmp_path / "svd"
    assert main(["combine", *dirs, "--weights", "1", "-0.5", "--method", "svd", "--rank", "3", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank"] == 3 and set(report["modules"]) == set(MODULES)
    assert load_adapter(out).modules["q"].A.dtype == np.float32
    assert main(["combine", *dirs, "--method", "linear", "-o", str(tmp_path / "lin")]) == 0
    assert "cross terms" in capsys.readouterr().out
    for bad in (["--weights", "1", "--method", "cat"], ["--method", "cat", "--rank", "2"], ["--method", "linear", "--weights", "1", "inf"]):
        target = tmp_path / "bad"
        assert main(["combine", *dirs, *bad, "-o", str(target)]) == 2
        assert not target.exists()
    assert main(["combine", str(tmp_path / "missing"), "--method", "cat", "-o", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
