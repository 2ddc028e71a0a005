"""Peer test: ``lora-ref merge`` of a transformers model directory loads with ``from_pretrained`` and matches PEFT.

A tiny random Llama is built from a config (nothing from a hub), saved with ``save_pretrained``
(one file, and sharded through ``max_shard_size``) with a word-level tokenizer beside it; a PEFT
LoRA adapter (random A and B) is saved for it. ``lora-ref merge DIR ADAPTER -o OUT`` must give a
folder that ``AutoModelForCausalLM.from_pretrained(OUT)`` loads, and ``unmerge`` with the residual
must give back every file of DIR byte for byte.

The bounds. With W* = W + s·B·A exact, lora-ref writes W_o = round32(W*), so |W_o − W*| ≤ u|W*|
(u = 2^-24). PEFT's fp32 merge_and_unload computes W_p = fl(W + fl(fl(B·A)·s)), so
|W_p − W*| ≤ u|W*| + (1 + u)·γ_{r+1}·s|B||A| (a dot product of length r, one scaling, one addition).
Hence, elementwise, |W_o − W_p| ≤ 2u|W*| + (1 + u)·γ_{r+1}·s|B||A|  (checked on the loaded weights).

Logits are compared in float64 (``from_pretrained(OUT, dtype=float64)`` against PEFT merging the
float64 base with the float64 adapter, W_p64 = W* up to γ_{r+1}(u64)·(|W| + s|B||A|)), so the
forward's own rounding (~depth·u64 relative) is negligible against the weights' difference
δ = u|W*| + γ_{r+1}(u64)·(|W| + s|B||A|). To first order |f(W_o) − f(W_p64)| ≤ |J|·δ with J the
Jacobian of the logits in the targeted weights (computed with torch.func at W_p64); the bound used
is 2·|J|·δ + 1e-12·max|logits|: the factor 2 covers the second-order remainder (δ is 2^-24
relative, so the remainder is ~2^-24 of the first-order term) and the floor covers the float64
forward's rounding.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require_peer
from lora_ref.dtypes import UNIT_ROUNDOFF
from lora_ref.numerics import gamma

U32, U64 = UNIT_ROUNDOFF[np.dtype(np.float32)], UNIT_ROUNDOFF[np.dtype(np.float64)]
V, E, FF, LAYERS, R, ALPHA = 67, 32, 48, 2, 4, 8
TARGETS = ["q_proj", "v_proj"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ref", *args], capture_output=True, text=True, timeout=300)


def _build(tmp_path: Path, torch, max_shard_size: str | None) -> tuple[Path, Path]:
    transformers = require_peer("transformers")
    peft = require_peer("peft")
    tokenizers = require_peer("tokenizers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=FF, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = tmp_path / "base"
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(base, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                         eos_token="t2").save_pretrained(base)
    lora = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), lora).save_pretrained(tmp_path / "ad")
    return base, tmp_path / "ad"


def _peft_merged(base: Path, adapter: Path, torch, dtype):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return peft.PeftModel.from_pretrained(model, adapter, torch_dtype=dtype, autocast_adapter_dtype=False).merge_and_unload().eval()


def _factors(adapter: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module weight name -> (A, B) in float64, read with the safetensors package."""
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight"):
            (tensors[k].astype(np.float64), tensors[k.replace("lora_A", "lora_B")].astype(np.float64))
            for k in tensors if ".lora_A." in k}


@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["single", "sharded"])
def test_merged_model_directory_loads_and_matches_peft_merge_and_unload(torch, tmp_path: Path, max_shard_size) -> None:
    import transformers

    base, adapter = _build(tmp_path, torch, max_shard_size)
    assert (base / ("model.safetensors.index.json" if max_shard_size else "model.safetensors")).exists()
    residual = tmp_path / ("res" if max_shard_size else "res.safetensors")
    done = cli("merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--residual", str(residual))
    assert done.returncode == 0, done.stderr

    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # as stored: float32
    peer = _peft_merged(base, adapter, torch, torch.float32)
    assert type(ours) is type(peer) and (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    words = "t5 t9 t66 t3"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(words)["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(base)(words)["input_ids"]
    mine, theirs = ours.state_dict(), peer.state_dict()
    assert sorted(mine) == sorted(theirs)
    factors, s = _factors(adapter), ALPHA / R
    for name, tensor in mine.items():
        got, want = tensor.numpy().astype(np.float64), theirs[name].numpy().astype(np.float64)
        if name not in factors:
            assert np.array_equal(got, want), name  # untargeted tensors: copied bit for bit
            continue
        A, B = factors[name]
        exact = transformers.LlamaForCausalLM.from_pretrained(base).state_dict()[name].numpy().astype(np.float64) + s * B @ A
        bound = 2 * U32 * np.abs(exact) + (1 + U32) * gamma(R + 1, U32) * s * (np.abs(B) @ np.abs(A))
        assert np.all(np.abs(got - want) <= bound), name

    ids = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(1))
    ours64 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    peer64 = _peft_merged(base, adapter, torch, torch.float64)
    with torch.no_grad():
        got = ours64(ids, use_cache=False).logits
        want = peer64(ids, use_cache=False).logits
    params = {name: p.detach() for name, p in peer64.named_parameters() if name in factors}
    rest = {**{n: p.detach() for n, p in peer64.named_parameters() if n not in factors}, **dict(peer64.named_buffers())}
    jacobian = torch.func.jacrev(
        lambda ws: torch.func.functional_call(peer64, {**rest, **ws}, (ids,), {"use_cache": False}).logits)(params)
    base64 = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float64).state_dict()
    first_order = torch.zeros_like(want)
    for name, (A, B) in factors.items():
        exact = base64[name].numpy() + s * B @ A
        delta = U32 * np.abs(exact) + gamma(R + 1, U64) * (np.abs(base64[name].numpy()) + s * np.abs(B) @ np.abs(A))
        first_order += (jacobian[name].abs() * torch.from_numpy(delta)).sum(dim=(-2, -1))
    bound = 2 * first_order + 1e-12 * want.abs().max()
    assert torch.all((got - want).abs() <= bound), float(((got - want).abs() / bound).max())
    assert float((got - want).abs().max()) > 0  # the comparison sees the weights' rounding: not vacuous

    done = cli("unmerge", str(tmp_path / "out"), str(adapter), "-o", str(tmp_path / "back"), "--residual", str(residual))
    assert done.returncode == 0 and "exactly" in done.stdout, done.stderr
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == sorted(p.name for p in base.iterdir())
    for item in base.iterdir():
        assert (tmp_path / "back" / item.name).read_bytes() == item.read_bytes(), item.name
