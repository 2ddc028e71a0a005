"""Peer tests for composition against PEFT 0.21.2 on torch CPU:
mixed-batch forward vs PEFT's ``adapter_names``; ``cat`` and ``linear`` vs ``add_weighted_adapter``.

Tolerances. Two float64 evaluations of a sum of products of length n differ by at most
2·γ_n(u64)·P, P the same expression on absolute values (γ_n(u) = n·u/(1 − n·u)). Where PEFT
works in float32 (add_weighted_adapter on float32 adapters), its result carries up to k float32
roundings per element (k counted at each comparison), ≤ γ_k(u32)·P.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import require_peer
from lora_ref.adapter import Adapter, LoraModule, save_adapter
from lora_ref.combine import combine
from lora_ref.config import LoraConfig
from lora_ref.mixed_batch import LoraFactors, factors_for, mixed_forward
from lora_ref.numerics import gamma

U64, U32 = 2.0**-53, 2.0**-24
LAYERS = {"proj": (5, 7), "head": (3, 5)}  # module -> (out, in)


def torch_net(torch, weights: dict[str, np.ndarray], dtype):
    """A torch module with Linear layers named as in LAYERS; forward runs ``proj`` only."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (o, i) in LAYERS.items():
                setattr(self, name, torch.nn.Linear(i, o, dtype=dtype))

        def forward(self, x):
            return self.proj(x)

    net = Net()
    with torch.no_grad():
        for name in LAYERS:
            getattr(net, name).weight.copy_(torch.tensor(weights[f"{name}.weight"]))
            getattr(net, name).bias.copy_(torch.tensor(weights[f"{name}.bias"]))
    return net


def base_weights(seed: int, dtype=np.float64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (o, i) in LAYERS.items():
        out[f"{name}.weight"] = rng.normal(size=(o, i)).astype(dtype)
        out[f"{name}.bias"] = rng.normal(size=o).astype(dtype)
    return out


def random_adapter(r: int, alpha: float, rslora: bool, seed: int, dtype=np.float64, name="a") -> Adapter:
    rng = np.random.default_rng(seed)
    modules = {m: LoraModule(m, rng.normal(size=(r, i)).astype(dtype), rng.normal(0, 0.5, size=(o, r)).astype(dtype))
               for m, (o, i) in LAYERS.items()}
    return Adapter(LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(LAYERS)), modules, name=name)


def load_into_peft(peft, net, adapters: list[Adapter], root):
    for a in adapters:
        save_adapter(a, root / a.name)
    wrapped = peft.PeftModel.from_pretrained(net, str(root / adapters[0].name), adapter_name=adapters[0].name)
    for a in adapters[1:]:
        wrapped.load_adapter(str(root / a.name), adapter_name=a.name)
    wrapped.eval()
    return wrapped


def test_mixed_batch_forward_matches_peft_adapter_names(tmp_path):
    torch = require_peer("torch")
    peft = require_peer("peft")
    weights = base_weights(0)
    adapters = [random_adapter(2, 4.0, False, 1, name="a0"), random_adapter(3, 9.0, True, 2, name="a1"),
                random_adapter(5, 2.5, False, 3, name="a2")]
    net = load_into_peft(peft, torch_net(torch, weights, torch.float64), adapters, tmp_path)
    x = np.random.default_rng(4).normal(size=(9, 4, 7))  # [batch, seq, in]: routing is per batch row
    index = np.array([0, -1, 2, 1, 1, -1, 0, 2, 2])
    with torch.no_grad():
        theirs = net(torch.tensor(x), adapter_names=["__base__" if i < 0 else f"a{i}" for i in index]).numpy()
    factors = factors_for(adapters, "proj")
    ours = mixed_forward(x, weights["proj.weight"], factors, index, bias=weights["proj.bias"])
    P = mixed_forward(np.abs(x), np.abs(weights["proj.weight"]),
                      [LoraFactors(np.abs(f.A), np.abs(f.B), abs(f.scale)) for f in factors], index,
                      bias=np.abs(weights["proj.bias"]))
    assert np.all(np.abs(ours - theirs) <= 2 * gamma(7 + 5 + 3, U64) * P)


def peft_factors(net, adapter_name: str, module: str) -> tuple[np.ndarray, np.ndarray, float]:
    layer = getattr(net.base_model.model, module)
    return (layer.lora_A[adapter_name].weight.detach().numpy().astype(np.float64),
            layer.lora_B[adapter_name].weight.detach().numpy().astype(np.float64),
            float(layer.scaling[adapter_name]))


@pytest.mark.parametrize("rslora", [False, True])
def test_cat_matches_peft_add_weighted_adapter(tmp_path, rslora):
    torch = require_peer("torch")
    peft = require_peer("peft")
    adapters = [random_adapter(2, 4.0, rslora, 5, np.float32, "a0"), random_adapter(3, 6.0, rslora, 6, np.float32, "a1")]
    weights = [0.7, -1.3]
    net = load_into_peft(peft, torch_net(torch, base_weights(1, np.float32), torch.float32), adapters, tmp_path)
    net.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type="cat")
    result = combine(adapters, weights, "cat")
    for module in LAYERS:
        A_p, B_p, s_p = peft_factors(net, "mix", module)
        ours = result.adapter.modules[module]
        c = np.concatenate([np.full(a.config.r, w * a.scale_for(module)) for a, w in zip(adapters, weights)])
        A_src = np.concatenate([a.modules[module].A for a in adapters]).astype(np.float64)
        # PEFT: (A·w)·s in float32 (2 roundings, plus s itself held as a Python float); ours: c·A rounded once.
        assert np.all(np.abs(ours.A - A_p) <= (gamma(2, U32) + U32) * np.abs(c[:, None] * A_src))
        np.testing.assert_array_equal(ours.B, B_p)  # B blocks are copied unchanged on both sides
        if rslora:  # documented PEFT deviation: alpha = r is kept with use_rslora, so s = r / sqrt(r)
            assert math.isclose(s_p, math.sqrt(result.adapter.config.r), rel_tol=4 * U64)
        else:
            assert s_p == result.adapter.scale_for(module) == 1.0


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_peft_add_weighted_adapter(tmp_path, rslora):
    torch = require_peer("torch")
    peft = require_peer("peft")
    adapters = [random_adapter(3, a, rslora, 7 + k, np.float32, f"a{k}") for k, a in enumerate((4.0, 12.0, 1.5))]
    weights = [0.5, -2.0, 1.25]
    net = load_into_peft(peft, torch_net(torch, base_weights(2, np.float32), torch.float32), adapters, tmp_path)
    net.add_weighted_adapter(["a0", "a1", "a2"], weights, "mix", combination_type="linear")
    result = combine(adapters, weights, "linear")
    n = len(adapters)
    for module in LAYERS:
        A_p, B_p, s_p = peft_factors(net, "mix", module)
        ours = result.adapter.modules[module]
        coef = [abs(w * a.scale_for(module)) ** 0.5 for a, w in zip(adapters, weights)]
        P_A = sum(c * np.abs(a.modules[module].A.astype(np.float64)) for c, a in zip(coef, adapters))
        P_B = sum(c * np.abs(a.modules[module].B.astype(np.float64)) for c, a in zip(coef, adapters))
        # PEFT: coefficients rounded to float32 (1), products (1), a sum of n terms (n − 1); ours: 1.
        k = n + 2
        assert np.all(np.abs(ours.A - A_p) <= (gamma(k, U32) + U32) * P_A)
        assert np.all(np.abs(ours.B - B_p) <= (gamma(k, U32) + U32) * P_B)
        expected_scale = math.sqrt(3) if rslora else 1.0  # PEFT keeps use_rslora with alpha = r = 3
        assert math.isclose(s_p, expected_scale, rel_tol=4 * U64)
        assert result.adapter.scale_for(module) == 1.0


@pytest.mark.parametrize("rslora", [False, True])
def test_svd_delta_matches_peft_and_its_rslora_double_scaling(tmp_path, rslora):
    """Full rank (k = R): both sides reproduce Δ = Σ c_i B_i A_i. PEFT runs its SVD in float32:
    backward stable, so its factors are exact for Δ + E with ||E||_F ≤ c·(m + n)·u32·||Δ||_F
    (we allow c = 8), plus the float32 storage of both factors (2·u32·||Δ||_F, k·u32 from B A)."""
    torch = require_peer("torch")
    peft = require_peer("peft")
    adapters = [random_adapter(2, 4.0, rslora, 5, np.float32, "a0"), random_adapter(3, 6.0, rslora, 6, np.float32, "a1")]
    weights = [0.7, -1.3]
    net = load_into_peft(peft, torch_net(torch, base_weights(1, np.float32), torch.float32), adapters, tmp_path)
    net.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type="svd", svd_rank=5)
    result = combine(adapters, weights, "svd", rank=5, dtype="float64")
    for module, (m, n) in LAYERS.items():
        A_p, B_p, s_p = peft_factors(net, "mix", module)
        ours = result.adapter.modules[module]
        target = ours.B @ ours.A
        norm = float(np.linalg.norm(target))
        assert result.modules[module].stored_error_frobenius <= 8 * (m + n + 5) * U64 * norm
        expected_scale = math.sqrt(5) if rslora else 1.0  # the documented PEFT deviation (SPEC M.7)
        assert math.isclose(s_p, expected_scale, rel_tol=4 * U64)
        if 5 > min(m, n):  # PEFT deviation (SPEC M.7): U is cut to min(m, n) columns, Vh keeps k rows
            assert B_p.shape[1] == min(m, n) != A_p.shape[0] == 5
            continue
        assert float(np.linalg.norm(B_p @ A_p - target)) <= (8 * (m + n) + 2 + 5) * U32 * norm
