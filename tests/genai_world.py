"""Tiny Llama models, PEFT adapters and onnxruntime-genai builds of them, for test_genai.py and bench/bench_genai.py.

Needs torch, transformers, peft, tokenizers and onnxruntime-genai (the ``.venv-genai`` of
scripts/test_genai.sh). Nothing is downloaded: the model comes from a config with random weights,
the tokenizer is a word-level one over ``t0 … t{V-1}``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def build_hf(folder: Path, config: dict, seed: int = 0) -> Path:
    """A random LlamaForCausalLM from ``config`` and a word-level tokenizer, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**config)).eval().save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(folder)
    return folder


def build_adapter(hf: Path, folder: Path, targets: list[str], r: int, *, rslora: bool = False, seed: int = 0) -> Path:
    """A PEFT LoRA adapter (random A and B, alpha = 2r) on ``targets`` of the model in ``hf``."""
    import peft
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    peft.get_peft_model(LlamaForCausalLM.from_pretrained(hf), config).save_pretrained(folder)
    return folder


def build_genai(hf: Path, folder: Path, precision: str = "fp32", *extra_options: str) -> Path:
    """genai's model builder on the local HF folder ``hf`` (CPU), e.g. extra ``fuse_qkv=false``, ``accuracy_level=1``."""
    args = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(folder), "-p", precision,
            "-e", "cpu", "-c", str(folder.parent / "builder-cache")]
    if extra_options:
        args += ["--extra_options", *extra_options]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return folder
