"""PEFT adapter -> ONNX Runtime, three ways, checked against PEFT's own output.

1. Build a tiny Llama-style model from a config (nothing is downloaded) and two PEFT LoRA
   adapters on all attention and MLP projections, with non-zero lora_B.
2. Export the base model with torch's dynamo exporter (wrapped to return logits, use_cache=False).
3. With lora_ref.export write the merged graph (also in float16), the dynamic graph (+ one
   .onnx_adapter per adapter) and the batched graph (both adapters in banks), and run each in
   ONNX Runtime.
4. Compare the logits with PEFT's: the merged graph and the dynamic graph with each adapter
   against the PEFT model with that adapter, the batched graph row by row (adapter 0, adapter 1,
   base).

Run:  python examples/peft_to_onnx.py [WORKDIR]
The differences are printed relative to max|logits|, next to the same figure for the base
model exported alone (the ORT-vs-torch float32 noise floor of this model).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lora_ref import load_adapter
from lora_ref.export import AdapterCache, export, open_session

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LogitsOnly(torch.nn.Module):
    """Wrap a causal LM so the exported graph maps input_ids -> logits, without a KV cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def example_ids(vocab_size: int) -> torch.Tensor:
    """The token ids every run of the example feeds (batch 3, sequence 7)."""
    return torch.randint(0, vocab_size, (3, 7), generator=torch.Generator().manual_seed(3))


def make_adapter(base: LlamaForCausalLM, directory: Path, *, r: int, alpha: float, seed: int) -> Path:
    """Save a PEFT adapter with random (non-zero) lora_A and lora_B to ``directory``."""
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    model.unload()  # take the LoRA layers out again: ``base`` is shared
    return directory


def peft_logits(base: LlamaForCausalLM, adapter_dir: Path | None, ids: torch.Tensor) -> np.ndarray:
    """Logits of PEFT's model (float32) with the adapter loaded, or of the base model."""
    from peft import PeftModel

    with torch.no_grad():
        if adapter_dir is None:
            return base(input_ids=ids, use_cache=False).logits.numpy()
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        try:
            return model(input_ids=ids, use_cache=False).logits.numpy()
        finally:
            model.unload()


def main(workdir: Path) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    base = tiny_llama()
    dirs = [make_adapter(base, workdir / "adapter_a", r=4, alpha=8, seed=1),
            make_adapter(base, workdir / "adapter_b", r=8, alpha=4, seed=2)]
    ids = example_ids(base.config.vocab_size)
    onnx_path = workdir / "llama.onnx"
    program = torch.onnx.export(LogitsOnly(base).eval(), (ids,), dynamo=True, input_names=["input_ids"], output_names=["logits"],
                                dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}})
    program.save(str(onnx_path))

    adapters = [load_adapter(d, name=d.name) for d in dirs]
    expected = [peft_logits(base, d, ids) for d in dirs]
    expected_base = peft_logits(base, None, ids)
    feeds = {"input_ids": ids.numpy()}
    scale = float(np.abs(expected_base).max())
    figures: dict[str, float] = {}

    figures["adapter effect: PEFT(a) vs base"] = float(np.abs(expected[0] - expected_base).max()) / scale
    figures["base graph vs torch"] = float(np.abs(open_session(onnx_path).run(feeds)[0] - expected_base).max()) / scale
    report = export(onnx_path, adapters[:1], "merged", workdir / "merged.onnx")
    print(f"found {len(report.sites)} modules by: {sorted(set(report.found_by().values()))}")
    figures["merged vs PEFT"] = float(np.abs(open_session(report.output).run(feeds)[0] - expected[0]).max()) / scale

    report = export(onnx_path, adapters, "dynamic", workdir / "dynamic.onnx", adapter_out=workdir / "onnx_adapters")
    session = open_session(report.output)
    print(f"dynamic graph runs on {session.describe()}")
    figures["dynamic, no adapter vs base"] = float(np.abs(session.run(feeds)[0] - expected_base).max()) / scale
    for adapter, want in zip(adapters, expected):
        loaded = session.load_adapter(report.adapter_files[adapter.name])  # ORT's LoraAdapter + RunOptions
        figures[f"dynamic + {adapter.name}.onnx_adapter vs PEFT"] = float(np.abs(session.run(feeds, loaded)[0] - want).max()) / scale
    cache = AdapterCache(session)  # IOBinding: switching binds other tensors, no new session
    for adapter in adapters:
        cache.add(adapter.name, adapter)
    for _ in range(3):
        for adapter, want in zip(adapters, expected):
            cache.activate(adapter.name)
            key = f"dynamic, cache switch to {adapter.name} vs PEFT"
            figures[key] = max(figures.get(key, 0.0), float(np.abs(cache.run(feeds)[0] - want).max()) / scale)

    half = export(onnx_path, adapters[:1], "merged", workdir / "merged_fp16.onnx", dtype="float16")
    figures["merged float16 vs PEFT (float32)"] = float(np.abs(open_session(half.output).run(feeds)[0] - expected[0]).max()) / scale

    report = export(onnx_path, adapters, "batched", workdir / "batched.onnx")
    rows = open_session(report.output).run_batched(feeds, [0, 1, -1])[0]
    figures["batched rows (a, b, base) vs PEFT"] = max(
        float(np.abs(rows[0] - expected[0][0]).max()), float(np.abs(rows[1] - expected[1][1]).max()),
        float(np.abs(rows[2] - expected_base[2]).max())) / scale
    width = max(len(k) for k in figures)
    print("max |ONNX Runtime - PEFT| / max|logits|   (unit roundoff: float32 6.0e-08, float16 4.9e-04)")
    for key, value in figures.items():
        print(f"  {key:<{width}}  {value:.2e}")
    return figures


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
