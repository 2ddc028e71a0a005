"""Optional peer: llama.cpp's own logits with our GGUF adapters vs PEFT in float64 (marker ``llamacpp``).

Run with scripts/test_llamacpp.sh (installs llama-cpp-python, built from source). Skipped unless
LORA_REF_LLAMACPP=1. The base GGUF is a tiny random transformers Llama written the way
convert_hf_to_gguf.py writes it (gguf's name map, LlamaModel.permute on q/k), with
``tokenizer.ggml.model = no_vocab`` so token ids are fed directly.

Tolerance, measured in the same run (a full network has no useful closed-form bound): e_0 is
llama.cpp's error on the base model alone (float32 compute, against transformers in float64);
with our adapter (and with the adapter merged into the GGUF by lora-ref) the error must stay within
10 e_0, and the file the vendored converter would
write for the same rsLoRA adapter (alpha = lora_alpha, factors as they are) must be off by more
than 100 e_0 — the silent loss this tool exists to prevent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import require_peer
from lora_ref.adapter import load_adapter

pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(os.environ.get("LORA_REF_LLAMACPP") != "1",
                                 reason="llama.cpp peer: run scripts/test_llamacpp.sh (LORA_REF_LLAMACPP=1)")]

V, E, H, KV, FF, LAYERS = 48, 64, 4, 2, 96, 2
TOKENS = [3, 17, 5, 40, 22, 9, 31, 1]


def _permute(weights, n_head: int, n_head_kv: int | None):  # convert_hf_to_gguf.py LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _write_base(gguf, model, path: Path) -> None:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(E)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_rope_dimension_count(E // H)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("no_vocab")
    for name, t in model.state_dict().items():
        if name.endswith("q_proj.weight"):
            t = _permute(t, H, H)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, H, KV)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_logits(llama_cpp, base: Path, lora: Path | None) -> np.ndarray:
    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    # float32 KV cache (type 0 = GGML_TYPE_F32; the default F16 cache adds ~1e-4 relative)
    llm = llama_cpp.Llama(model_path=str(base), n_ctx=32, n_batch=32, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0,
                          **kwargs)
    llm.eval(TOKENS)
    logits = np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    llm.close()
    return logits


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_llama_cpp_logits_with_our_adapter_match_peft(torch, tmp_path: Path) -> None:
    llama_cpp, gguf = require_peer("llama_cpp"), require_peer("gguf")
    transformers, peft = require_peer("transformers"), require_peer("peft")
    from lora_ref.gguf_adapter import to_gguf
    from lora_ref.gguf_checkpoint import merge_gguf

    config = transformers.LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=FF, num_hidden_layers=LAYERS,
                                      num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    _write_base(gguf, model, tmp_path / "base.gguf")
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        base_logits = model.double()(ids, use_cache=False).logits[0].numpy()
    model.float()
    e0 = _rel(_llama_logits(llama_cpp, tmp_path / "base.gguf", None), base_logits)

    lcfg = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                           "gate_proj", "up_proj", "down_proj"], rank_pattern={"v_proj": 4},
                           alpha_pattern={"o_proj": 4.0, "layers.1.mlp.up_proj": 0.0})
    pm = peft.get_peft_model(model, lcfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pm.save_pretrained(tmp_path / "ad")
    with torch.no_grad():
        want = pm.double()(ids, use_cache=False).logits[0].numpy()
    to_gguf(load_adapter(tmp_path / "ad"), tmp_path / "base.gguf", tmp_path / "ours.gguf")
    e1 = _rel(_llama_logits(llama_cpp, tmp_path / "base.gguf", tmp_path / "ours.gguf"), want)

    # what convert_lora_to_gguf.py writes: alpha = lora_alpha, factors as they are (q/k rows permuted)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    w = gguf.GGUFWriter(tmp_path / "vendored.gguf", "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    for name, layer in pm.named_modules():
        if "default" not in getattr(layer, "lora_A", {}):
            continue
        hf = name.removeprefix("base_model.model.") + ".weight"
        A, B = layer.lora_A["default"].weight.detach().float(), layer.lora_B["default"].weight.detach().float()
        if hf.endswith("q_proj.weight"):
            B = _permute(B, H, H)
        elif hf.endswith("k_proj.weight"):
            B = _permute(B, H, KV)
        stem = names.get_name(hf, try_suffixes=(".weight",))
        w.add_tensor(stem + ".lora_a", A.numpy())
        w.add_tensor(stem + ".lora_b", B.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    e2 = _rel(_llama_logits(llama_cpp, tmp_path / "base.gguf", tmp_path / "vendored.gguf"), want)
    # and the adapter merged into the GGUF model by lora-ref (exact residual kept), run without an adapter
    merge_gguf(tmp_path / "base.gguf", load_adapter(tmp_path / "ad"), tmp_path / "merged.gguf",
               residual_path=tmp_path / "r.safetensors")
    e3 = _rel(_llama_logits(llama_cpp, tmp_path / "merged.gguf", None), want)
    print(f"\nllama.cpp vs float64 logits: base {e0:.3g}, our adapter {e1:.3g}, merged model {e3:.3g}, "
          f"vendored-converter file {e2:.3g}")
    assert e1 <= 10 * e0
    assert e3 <= 10 * e0
    assert e2 >= 100 * e0
