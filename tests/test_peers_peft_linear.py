"""Peer tests: lora-ref's Linear LoRA against PEFT 0.21.2 on torch 2.13.0 (CPU, float32).

Models are tiny torch modules with several nn.Linear layers and a GPT-2 built from a small
GPT2Config (no download; GPT-2's Conv1D stores W as [in, out], so PEFT uses fan_in_fan_out).
Every adapter has a non-zero lora_B (set at random after get_peft_model), alpha != r, and the
variants cover rsLoRA, rank_pattern/alpha_pattern and lora_bias.

Bounds: torch evaluates in float32 in some order; for a result in which each term passes
through at most K float32 roundings, |ŷ_torch − y| ≤ γ_K(u32)·M with M the same expression on
absolute values. lora-ref rounds its float64 evaluation once: |ŷ_ours − y| ≤ u32·|y| +
γ_K(u64)·M + η32/2. So |ŷ_torch − ŷ_ours| ≤ γ_K(u32)·M + u32·|y| + γ_K(u64)·M + η32/2, with M
and |y| computed here in float64 (their own rounding is covered by the γ_K(u64) term twice).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import require_peer
from lora_ref.adapter import Adapter, LoraModule, load_adapter, save_adapter
from lora_ref.checkpoint import merge_checkpoint
from lora_ref.config import LoraConfig as RefConfig
from lora_ref.dtypes import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, float32, float64
from lora_ref.linear import LinearDelta, backward, forward
from lora_ref.merge import merge
from lora_ref.safetensors_io import load_file, save_file
from lora_ref.numerics import gamma

from helpers import error_log

U32, U64, ETA32 = UNIT_ROUNDOFF[float32], UNIT_ROUNDOFF[float64], SMALLEST_SUBNORMAL[float32]
LOG, _print_errors = error_log("Peers (PEFT 0.21.2, torch 2.13.0 float32)")


def peer_bound(y: np.ndarray, magnitude: np.ndarray, k: int) -> np.ndarray:
    """γ_K(u32)·M + u32·|y| + 2·γ_K(u64)·M + η32/2 (module doc)."""
    return gamma(k, U32) * magnitude + U32 * np.abs(y) + 2 * gamma(k + 2, U64) * magnitude + ETA32 / 2


# -- models ------------------------------------------------------------------------------------------------


def tiny_mlp(torch):
    """Two blocks of q_proj (8->8), up_proj (8->12, no bias), down_proj (12->8)."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            self.up_proj = nn.Linear(8, 12, bias=False)
            self.down_proj = nn.Linear(12, 8)

        def forward(self, x):
            return x + self.down_proj(torch.relu(self.up_proj(self.q_proj(x))))

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.layers:
                x = block(x)
            return x

    torch.manual_seed(0)
    return Tiny()


def tiny_gpt2(torch):
    transformers = require_peer("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(1)
    return transformers.GPT2LMHeadModel(config).eval()


def randomize_lora(torch, peft_model, seed: int) -> None:
    """Non-zero B (and lora_B.bias when present), A redrawn too, so nothing is at its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


VARIANTS = {
    "alpha!=r": dict(r=4, lora_alpha=12, target_modules=["q_proj", "up_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=12, use_rslora=True, target_modules=["q_proj", "up_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=6, target_modules=["q_proj", "up_proj", "down_proj"],
                     rank_pattern={"down_proj": 2, r"layers\.1\.q_proj": 6}, alpha_pattern={"up_proj": 5, "q_proj": 9}),
    "lora_bias+dropout(eval)": dict(r=3, lora_alpha=7, target_modules=["q_proj", "down_proj"], lora_bias=True,
                                    lora_dropout=0.1),
}


def peft_mlp(torch, variant: str, seed: int = 0):
    peft = require_peer("peft")
    base = tiny_mlp(torch)
    base_state = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**VARIANTS[variant]))
    randomize_lora(torch, model, seed)
    model.eval()
    return base, base_state, model


def lora_layers(model) -> dict[str, object]:
    """PEFT LoRA layers by module path (without the base_model.model. prefix)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def saved_adapter(model, tmp_path: Path) -> Adapter:
    model.save_pretrained(str(tmp_path))
    return load_adapter(tmp_path)


# -- forward and gradients ----------------------------------------------------------------------------


def compare_layer(torch, name: str, layer, adapter: Adapter, base_state: dict, fan_in_fan_out: bool, seed: int) -> None:
    """One LoRA layer: PEFT forward/autograd vs lora_ref forward/backward, within peer_bound."""
    lora = adapter.modules[name]
    s = adapter.scale_for(name)
    assert s == layer.scaling["default"]  # same per-module scale (rank/alpha patterns, rsLoRA)
    W, b = base_state[f"{name}.weight"], base_state.get(f"{name}.bias")
    n_in = W.shape[0] if fan_in_fan_out else W.shape[1]
    n_out = W.shape[1] if fan_in_fan_out else W.shape[0]
    r = lora.rank
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 2, n_in)).astype(np.float32)
    dy = rng.normal(size=(3, 2, n_out)).astype(np.float32)

    base_layer = layer.get_base_layer()
    base_layer.weight.requires_grad_(True)
    if base_layer.bias is not None:
        base_layer.bias.requires_grad_(True)
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        p.requires_grad_(True)
    params = [base_layer.weight, base_layer.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_B["default"].bias]
    for p in params:
        if p is not None:
            p.grad = None
    x_t = torch.tensor(x, requires_grad=True)
    y_t = layer(x_t)
    (y_t * torch.tensor(dy)).sum().backward()

    ours = forward(x, W, lora.A, lora.B, s, bias=b, lora_bias=lora.lora_bias, fan_in_fan_out=fan_in_fan_out)
    assert ours.dtype == np.float32
    y64 = forward(x, W, lora.A, lora.B, s, bias=b, lora_bias=lora.lora_bias, fan_in_fan_out=fan_in_fan_out,
                  out_dtype="float64")
    ab = lambda a: None if a is None else np.abs(a.astype(float64))  # noqa: E731
    magnitude = forward(ab(x), ab(W), ab(lora.A), ab(lora.B), abs(s), bias=ab(b), lora_bias=ab(lora.lora_bias),
                        fan_in_fan_out=fan_in_fan_out, out_dtype="float64")
    k_forward = n_in + r + 6
    LOG.check("forward (ours vs PEFT)", y_t.detach().numpy(), ours.astype(float64), peer_bound(y64, magnitude, k_forward))

    grads = backward(x, dy, W, lora.A, lora.B, s, fan_in_fan_out=fan_in_fan_out, want_base_grads=True)
    g64 = backward(x.astype(float64), dy.astype(float64), W.astype(float64), lora.A.astype(float64),
                   lora.B.astype(float64), s, fan_in_fan_out=fan_in_fan_out, want_base_grads=True)
    g_abs = backward(ab(x), ab(dy), ab(W), ab(lora.A), ab(lora.B), abs(s), fan_in_fan_out=fan_in_fan_out,
                     want_base_grads=True)
    k_grad = 6 + n_in + n_out + r + 6  # rows (6) + both dot lengths + rank + products/adds
    pairs = {
        "dx": x_t.grad, "dA": layer.lora_A["default"].weight.grad, "dB": layer.lora_B["default"].weight.grad,
        "dW": base_layer.weight.grad, "db": None if base_layer.bias is None else base_layer.bias.grad,
        "dlora_bias": None if lora.lora_bias is None else layer.lora_B["default"].bias.grad,
    }
    for grad_name, theirs in pairs.items():
        if theirs is None:
            continue
        got = getattr(grads, grad_name)
        want64, mag = getattr(g64, grad_name), getattr(g_abs, grad_name)
        LOG.check(f"{grad_name} (ours vs torch autograd)", theirs.numpy(), got.astype(float64),
                  peer_bound(want64, mag, k_grad))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mlp_forward_and_gradients_match_peft(torch, tmp_path: Path, variant: str) -> None:
    _, base_state, model = peft_mlp(torch, variant)
    adapter = saved_adapter(model, tmp_path)
    layers = lora_layers(model)
    assert set(adapter.modules) == set(layers) and len(layers) >= 4
    for i, (name, layer) in enumerate(sorted(layers.items())):
        assert adapter.modules[name].rank == layer.r["default"]
        compare_layer(torch, name, layer, adapter, base_state, fan_in_fan_out=False, seed=i)


def test_gpt2_conv1d_forward_and_gradients_match_peft(torch, tmp_path: Path) -> None:
    peft = require_peer("peft")
    base = tiny_gpt2(torch)
    base_state = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
    config = peft.LoraConfig(r=4, lora_alpha=10, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             rank_pattern={"c_proj": 2})
    model = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_lora(torch, model, 3)
    adapter = saved_adapter(model, tmp_path)
    assert adapter.config.fan_in_fan_out is True
    layers = lora_layers(model)
    assert len(layers) == 6  # c_attn, attn.c_proj, mlp.c_proj in each of 2 blocks
    for i, (name, layer) in enumerate(sorted(layers.items())):
        assert base_state[f"{name}.weight"].shape[0] == adapter.modules[name].A.shape[1]  # Conv1D: [in, out]
        compare_layer(torch, name, layer, adapter, base_state, fan_in_fan_out=True, seed=10 + i)


# -- merge ------------------------------------------------------------------------------------------------


def merge_bound(W: np.ndarray, A: np.ndarray, B: np.ndarray, s: float, fan_in_fan_out: bool) -> np.ndarray:
    """|W'_peft − W'_ours| for W' ≈ E = W + sBA (elementwise).

    PEFT: (B @ A) in float32 (r products, r−1 sums), times s, then W + Δ: within
    u32|E| + (1 + u32)γ_{r+2}(u32)(|W| + |s||B||A|) + η/2 of E. Ours: within
    u32|E| + (1 + u32)γ_{r+3}(u64)(...) + η/2. The sum bounds the difference."""
    r = A.shape[0]
    BA = np.abs(B.astype(float64)) @ np.abs(A.astype(float64)) * abs(s)
    E = (B.astype(float64) @ A.astype(float64)) * s
    if fan_in_fan_out:
        BA, E = BA.T, E.T
    W64 = W.astype(float64)
    magnitude = np.abs(W64) + BA
    E = np.abs(W64 + E)
    return 2 * U32 * E + (1 + U32) * (gamma(r + 2, U32) + gamma(r + 5, U64)) * magnitude + ETA32


@pytest.mark.parametrize("model_kind", ["mlp-patterns", "mlp-lora_bias", "gpt2"])
def test_merged_weights_match_merge_and_unload(torch, tmp_path: Path, model_kind: str) -> None:
    peft = require_peer("peft")
    if model_kind == "gpt2":
        base = tiny_gpt2(torch)
        base_state = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=10, use_rslora=True, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
        randomize_lora(torch, model, 5)
    else:
        _, base_state, model = peft_mlp(torch, "patterns" if model_kind == "mlp-patterns" else "lora_bias+dropout(eval)",
                                        seed=7)
    adapter = saved_adapter(model, tmp_path / "adapter")
    peft_merged = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    # ours, through the checkpoint path (base safetensors keyed as state_dict)
    save_file(tmp_path / "base.safetensors", {k: np.ascontiguousarray(v) for k, v in base_state.items()})
    merge_checkpoint(tmp_path / "base.safetensors", adapter, tmp_path / "merged.safetensors")
    ours = load_file(tmp_path / "merged.safetensors")
    assert set(ours) == set(base_state)
    fan_in_fan_out = adapter.config.fan_in_fan_out
    for name, lora in adapter.modules.items():
        key = f"{name}.weight"
        bound = merge_bound(base_state[key], lora.A, lora.B, adapter.scale_for(name), fan_in_fan_out)
        LOG.check("merged weight (ours vs merge_and_unload)", peft_merged[key], ours[key].astype(float64), bound)
        # and the library merge agrees with the checkpoint path bit for bit
        direct = merge(base_state[key], LinearDelta(lora.A, lora.B, adapter.scale_for(name),
                                                    fan_in_fan_out=fan_in_fan_out)).weight
        assert direct.tobytes() == ours[key].tobytes()
    for key in base_state:  # tensors the adapter does not touch are copied unchanged
        if key.removesuffix(".weight") not in adapter.modules and not (
            key.endswith(".bias") and adapter.config.lora_bias and key.removesuffix(".bias") in adapter.modules
        ):
            assert ours[key].tobytes() == np.ascontiguousarray(base_state[key]).tobytes(), key


def test_lora_bias_is_merged_into_the_base_bias(torch, tmp_path: Path) -> None:
    """PEFT's merge adds s·lora_bias to the base layer's bias; the merged model must equal the adapted one."""
    require_peer("peft")
    _, base_state, model = peft_mlp(torch, "lora_bias+dropout(eval)", seed=8)
    adapter = saved_adapter(model, tmp_path / "adapter")
    peft_merged = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    save_file(tmp_path / "base.safetensors", {k: np.ascontiguousarray(v) for k, v in base_state.items()})
    merge_checkpoint(tmp_path / "base.safetensors", adapter, tmp_path / "merged.safetensors")
    ours = load_file(tmp_path / "merged.safetensors")
    for name, lora in adapter.modules.items():
        key = f"{name}.bias"
        s = adapter.scale_for(name)
        exact = base_state[key].astype(float64) + s * lora.lora_bias.astype(float64)
        # PEFT: s·lora_bias rounded, then the add rounded (2 float32 roundings); ours: one
        bound = 3 * U32 * (np.abs(base_state[key].astype(float64)) + abs(s) * np.abs(lora.lora_bias.astype(float64))) + ETA32
        LOG.check("merged lora_bias (ours vs merge_and_unload)", peft_merged[key], ours[key].astype(float64), bound)
        assert np.all(np.abs(ours[key].astype(float64) - exact) <= U32 * np.abs(exact) + 2 * gamma(3, U64) * np.abs(exact) + ETA32)


# -- adapters we write, loaded by PEFT ---------------------------------------------------------------------


def test_adapters_we_write_load_in_peft(torch, tmp_path: Path) -> None:
    peft = require_peer("peft")
    base = tiny_mlp(torch)
    base_state = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
    # lora_bias needs a base bias to merge into (PEFT refuses otherwise): up_proj has none
    config = RefConfig(r=4, lora_alpha=12, use_rslora=True, target_modules=["q_proj", "down_proj"],
                       rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.0\.down_proj": 3}, lora_bias=True)
    rng = np.random.default_rng(4)
    modules = {}
    for key, W in base_state.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and config.targets(name):
            r = config.rank_for(name)
            modules[name] = LoraModule(name, A=(0.3 * rng.normal(size=(r, W.shape[1]))).astype(np.float32),
                                       B=(0.3 * rng.normal(size=(W.shape[0], r))).astype(np.float32),
                                       lora_bias=(0.3 * rng.normal(size=W.shape[0])).astype(np.float32))
    ours = Adapter(config, modules)
    save_adapter(ours, tmp_path / "ours")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    layers = lora_layers(model)
    assert set(layers) == set(modules)
    for i, (name, layer) in enumerate(sorted(layers.items())):
        # PEFT loaded our tensors bit for bit, with our per-module rank and scale
        assert layer.lora_A["default"].weight.detach().numpy().tobytes() == modules[name].A.tobytes()
        assert layer.lora_B["default"].weight.detach().numpy().tobytes() == modules[name].B.tobytes()
        assert layer.lora_B["default"].bias.detach().numpy().tobytes() == modules[name].lora_bias.tobytes()
        assert layer.scaling["default"] == ours.scale_for(name)
        compare_layer(torch, name, layer, ours, base_state, fan_in_fan_out=False, seed=20 + i)
    # whole model: PEFT's output with our adapter vs lora_ref's merged weights in plain torch
    save_file(tmp_path / "base.safetensors", base_state)
    merge_checkpoint(tmp_path / "base.safetensors", load_adapter(tmp_path / "ours"), tmp_path / "merged.safetensors")
    merged_model = tiny_mlp(torch)
    merged_model.load_state_dict({k: torch.tensor(v) for k, v in load_file(tmp_path / "merged.safetensors").items()})
    x = torch.tensor(rng.normal(size=(4, 8)).astype(np.float32))
    with torch.no_grad():
        adapted, merged_out = model(x).numpy(), merged_model(x).numpy()
    # Not a derived bound (six layers and ReLUs in float32): a relative 1e-4 of the output scale
    # is ~1000 u32, while a gross error (a missing lora_bias, a wrong scale) is O(1) relative
    assert np.max(np.abs(adapted - merged_out)) < 1e-4 * float(np.max(np.abs(adapted)))


# -- config semantics vs PEFT ------------------------------------------------------------------------------


def test_config_defaults_match_peft(torch) -> None:
    peft = require_peer("peft")
    theirs, ours = peft.LoraConfig(), RefConfig()
    for field in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "use_rslora", "use_dora", "bias", "lora_bias",
                  "rank_pattern", "alpha_pattern"):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_pattern_resolution_matches_peft(torch) -> None:
    from peft.utils.other import get_pattern_key

    rng = np.random.default_rng(0)
    words = ["model", "layers", "0", "1", "11", "self_attn", "q_proj", "v_proj", "mlp", "down_proj", "h", "c_attn"]
    key_pool = ["q_proj", "v_proj", "self_attn.q_proj", "layers.1.self_attn.q_proj", r"layers\.1\..*", "1.mlp.down_proj",
                r".*\.0\..*_proj", "proj", "c_attn", "h.0.c_attn", "down_proj"]
    for _ in range(300):
        module = ".".join(rng.choice(words, size=rng.integers(1, 6)))
        keys = list(dict.fromkeys(rng.choice(key_pool, size=rng.integers(0, 5))))
        ranks = {k: int(rng.integers(1, 9)) for k in keys}
        alphas = {k: int(rng.integers(1, 40)) for k in reversed(keys)}
        config = RefConfig(r=16, lora_alpha=32, rank_pattern=ranks, alpha_pattern=alphas)
        assert config.rank_for(module) == ranks.get(get_pattern_key(ranks.keys(), module), 16), (module, ranks)
        assert config.alpha_for(module) == alphas.get(get_pattern_key(alphas.keys(), module), 32), (module, alphas)


def test_peft_config_json_round_trips_through_ours(torch, tmp_path: Path) -> None:
    _, _, model = peft_mlp(torch, "patterns")
    model.save_pretrained(str(tmp_path))
    original = json.loads((tmp_path / "adapter_config.json").read_text())
    config = RefConfig.load(tmp_path)
    config.save(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again == original
