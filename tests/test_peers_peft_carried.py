"""Peer test: PEFT 0.21.2 adapters that carry trained heads and token rows, merged and exported by lora-ref.

Two tiny models from configs (random init, no download): RoBERTa with ``task_type="SEQ_CLS"``
(PEFT adds ``modules_to_save=["classifier", "score"]``: RoBERTa's head is classifier.dense +
classifier.out_proj) and BERT with ``task_type="TOKEN_CLS"`` plus ``trainable_token_indices`` on
the word embeddings. Every trainable tensor (LoRA B, the head copies, the token rows) is
perturbed, so the heads are not the base's. Then:

1. **What PEFT saves**: the file's non-LoRA keys are exactly the stripped ``modules_to_save``
   keys and ``...token_adapter.trainable_tokens_delta`` (lora_ref.carried's documented layout).
2. **Checkpoint merge** (``lora-ref merge`` on the base state_dict): against PEFT's own
   ``merge_and_unload()`` in float64. Carried tensors must be bit-equal to PEFT's (a float32
   copy into a float32 base: no rounding). A LoRA weight W' = round_32(W + sΔ) vs PEFT's float64
   W + s·B·A: |ours − peft| ≤ u₃₂|peft| + γ_{r+2}(u₆₄)·(|W| + |s||B||A|) (one float32 rounding
   of the sum; PEFT's float64 product and add, r + 2 roundings, Higham §3.1).
   Exact unmerge with the residual gives the base bytes back; a fast unmerge is refused.
3. **End to end**: the model loaded with our merged checkpoint, and ONNX Runtime on the merged
   graph ``lora-ref export --mode merged`` writes, against PEFT's forward. As in
   tests/test_peers_onnx.py, the adapters (heads included) change the logits by more than 10³
   times our difference from PEFT, so a merge that ignored a head could not pass; the carried
   initializers in the graph are also checked bit for bit. Dynamic and batched graphs refuse
   these adapters with a typed error naming the modules.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import require_peer

torch = require_peer("torch")
peft = require_peer("peft")
transformers = require_peer("transformers")
require_peer("onnxruntime")

from lora_ref.adapter import PREFIX  # noqa: E402
from lora_ref.cli import main  # noqa: E402
from lora_ref.dtypes import UNIT_ROUNDOFF  # noqa: E402
from lora_ref.safetensors_io import load_file, save_file  # noqa: E402

TOKENS = [1, 3, 5]


def _models():
    common = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=48, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    roberta = lambda: transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**common))  # noqa: E731
    bert = lambda: transformers.BertForTokenClassification(transformers.BertConfig(**common))  # noqa: E731
    return {
        "roberta-seq-cls": (roberta, dict(task_type="SEQ_CLS")),
        "bert-token-cls": (bert, dict(task_type="TOKEN_CLS", trainable_token_indices={"word_embeddings": TOKENS})),
    }


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, **({"use_cache": False} if hasattr(self.model.config, "use_cache") else {}))
        return out.logits


@pytest.fixture(scope="module", params=list(_models()))
def case(request, tmp_path_factory, torch):
    make, extra = _models()[request.param]
    work = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    base = make().eval()
    save_file(work / "base.safetensors", {k: v.detach().numpy().copy() for k, v in base.state_dict().items()})
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], **extra))
    with torch.no_grad():  # trained-looking values for every trainable tensor: LoRA B, head copies, token rows
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(work / "adapter")
    return request.param, make, base, model.eval(), work


def _peft64(base, work):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), work / "adapter").double().eval()
    return model


def test_peft_saves_what_carried_documents(case):
    name, _, _, model, work = case
    keys = [k for k in load_file(work / "adapter" / "adapter_model.safetensors") if ".lora_" not in k]
    heads = {"roberta-seq-cls": {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                                 "classifier.out_proj.bias"},
             "bert-token-cls": {"classifier.weight", "classifier.bias", "bert.embeddings.word_embeddings"
                                ".token_adapter.trainable_tokens_delta"}}[name]
    assert {k.removeprefix(PREFIX) for k in keys} == heads


def _check_against_merge_and_unload(base, work) -> int:
    """``lora-ref merge`` of ``work/adapter`` into ``work/base.safetensors`` vs PEFT's float64 merge_and_unload
    (bounds in the module doc); returns how many tensors differ from the base."""
    assert main(["merge", str(work / "base.safetensors"), str(work / "adapter"), "-o", str(work / "merged.safetensors"),
                 "--residual", str(work / "residual.safetensors")]) == 0
    ours = load_file(work / "merged.safetensors")
    peft_model = _peft64(base, work)
    factors = {n.removeprefix("base_model.model."): (m.base_layer.weight.detach().numpy(), m, m.scaling["default"])
               for n, m in peft_model.named_modules() if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    reference = {k: v.detach().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    base_tensors = load_file(work / "base.safetensors")
    changed = 0
    for key, value in ours.items():
        want = reference[key]
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in factors:
            W, layer, s = factors[module]
            embedding = "default" in getattr(layer, "lora_embedding_A", {})
            A = (layer.lora_embedding_A if embedding else layer.lora_A)["default"]
            B = (layer.lora_embedding_B if embedding else layer.lora_B)["default"]
            A, B = (t.detach().numpy() if embedding else t.weight.detach().numpy() for t in (A, B))
            g = (A.shape[0] + 2) * UNIT_ROUNDOFF[np.dtype(np.float64)]
            delta = abs(s) * np.abs(B) @ np.abs(A)
            bound = UNIT_ROUNDOFF[np.dtype(np.float32)] * np.abs(want) + g / (1 - g) * (np.abs(W) + (delta.T if embedding else delta))
            assert np.all(np.abs(value.astype(np.float64) - want) <= bound), key
        else:  # copied, or replaced by a carried tensor: exactly PEFT's value (float32 into float32)
            assert np.array_equal(value.astype(np.float64), want), key
        changed += not np.array_equal(value, base_tensors[key])
    # exact unmerge restores the base bytes
    assert main(["unmerge", str(work / "merged.safetensors"), str(work / "adapter"), "-o", str(work / "back.safetensors"),
                 "--residual", str(work / "residual.safetensors")]) == 0
    assert (work / "back.safetensors").read_bytes() == (work / "base.safetensors").read_bytes()
    return changed


def test_checkpoint_merge_matches_peft_merge_and_unload(case, capsys):
    name, _, base, _, work = case
    # every head tensor (RoBERTa: 4, BERT: 2) and the token rows replaced, and the 2 LoRA weights merged
    assert _check_against_merge_and_unload(base, work) == {"roberta-seq-cls": 4 + 2, "bert-token-cls": 2 + 1 + 2}[name]
    assert "exactly" in capsys.readouterr().out
    # a fast unmerge cannot restore replaced tensors
    assert main(["unmerge", str(work / "merged.safetensors"), str(work / "adapter"), "-o", str(work / "fast.safetensors"),
                 "--fast"]) == 2
    assert "--residual" in capsys.readouterr().err


def _save_peft(base, config, work):
    save_file(work / "base.safetensors", {k: v.detach().numpy().copy() for k, v in base.state_dict().items()})
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(work / "adapter")


def test_embedding_lora_base_layer_copy_and_trainable_biases(tmp_path, torch, capsys):
    """LoRA on embed_tokens (PEFT saves the frozen ``base_layer.weight``) and ``bias="all"``."""
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, tie_word_embeddings=False)).eval()
    _save_peft(llama, peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), tmp_path / "emb")
    keys = [k for k in load_file(tmp_path / "emb" / "adapter" / "adapter_model.safetensors") if "lora_" not in k]
    assert keys == [PREFIX + "model.embed_tokens.base_layer.weight"]
    assert _check_against_merge_and_unload(llama, tmp_path / "emb") == 2  # q_proj and embed_tokens merged
    # another base (a different embedding than the one the adapter was trained on): refused, not merged over
    other = {k: np.array(v) for k, v in load_file(tmp_path / "emb" / "base.safetensors").items()}
    other["model.embed_tokens.weight"][0, 0] += 1
    save_file(tmp_path / "other.safetensors", other)
    assert main(["merge", str(tmp_path / "other.safetensors"), str(tmp_path / "emb" / "adapter"),
                 "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "frozen copy" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    # exports check the copy against the graph's weight, and it is no replacement: dynamic graphs take it too
    ids = _ids(40)
    torch.onnx.export(LogitsOnly(copy.deepcopy(llama)), (ids,), dynamo=True, input_names=["input_ids"],
                      output_names=["logits"]).save(str(tmp_path / "llama.onnx"))
    for mode in ("merged", "dynamic"):
        assert main(["export", str(tmp_path / "llama.onnx"), str(tmp_path / "emb" / "adapter"), "--mode", mode,
                     "-o", str(tmp_path / f"{mode}.onnx")]) == 0, capsys.readouterr().err

    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=48), add_pooling_layer=False).eval()
    _save_peft(bert, peft.LoraConfig(r=2, target_modules=["query", "value"], bias="all"), tmp_path / "bias")
    keys = [k for k in load_file(tmp_path / "bias" / "adapter" / "adapter_model.safetensors") if "lora_" not in k]
    assert PREFIX + "encoder.layer.0.attention.self.query.base_layer.bias" in keys and len(keys) > 4
    assert _check_against_merge_and_unload(bert, tmp_path / "bias") == 2 + len(keys)  # LoRA weights + every bias


def _ids(vocab: int) -> torch.Tensor:
    return torch.tensor([[0, 1, 2, 3, 4, 5, 7, 9], [5, 3, 1, 8, 2, 6, 4, 2]]) % vocab


def test_merged_model_and_onnx_graph_match_peft(case, tmp_path, capsys):
    import onnx

    from lora_ref.carried import classify
    from lora_ref.config import LoraConfig
    from lora_ref.export import locate_targets, open_session

    name, make, base, _, work = case
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        want = _peft64(base, work)(input_ids=ids).logits.numpy()
        plain = copy.deepcopy(base).double()(input_ids=ids).logits.numpy()
    if not (work / "merged.safetensors").exists():
        assert main(["merge", str(work / "base.safetensors"), str(work / "adapter"), "-o", str(work / "merged.safetensors")]) == 0
    merged = make().eval()
    merged.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in load_file(work / "merged.safetensors").items()})
    with torch.no_grad():
        ours = merged.double()(input_ids=ids).logits.numpy()
    program = torch.onnx.export(LogitsOnly(copy.deepcopy(base)).eval(), (ids,), dynamo=True, input_names=["input_ids"],
                                output_names=["logits"])
    program.save(str(tmp_path / "base.onnx"))
    assert main(["export", str(tmp_path / "base.onnx"), str(work / "adapter"), "--mode", "merged",
                 "-o", str(tmp_path / "merged.onnx")]) == 0
    graph = open_session(tmp_path / "merged.onnx")
    onnx_out = graph.session.run(None, {"input_ids": ids.numpy()})[0].astype(np.float64)
    scale = np.max(np.abs(want))
    effect = np.max(np.abs(want - plain)) / scale
    diffs = {"merged checkpoint": np.max(np.abs(ours - want)) / scale, "merged ONNX (ORT)": np.max(np.abs(onnx_out - want)) / scale}
    with capsys.disabled():
        print(f"\n{name}: adapter effect {effect:.3g}; " + ", ".join(f"{k} vs PEFT {v:.3g}" for k, v in diffs.items()))
    assert effect > 1e3 * max(diffs.values()), diffs
    # the carried initializers are the copies, bit for bit (transposed where the graph stores [in, out])
    model = onnx.load(str(tmp_path / "merged.onnx"))
    file = load_file(work / "adapter" / "adapter_model.safetensors")
    extra = {k: v for k, v in file.items() if ".lora_" not in k}
    config = LoraConfig.load(work / "adapter")
    carried = classify(config, extra)
    kinds = {c.target.rsplit(".", 1)[0]: ("embedding" if c.rows else "linear") for c in carried.values()}
    sites = locate_targets(model, list(kinds), kinds=kinds)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for c in carried.values():
        site = sites[c.target.rsplit(".", 1)[0]][0]
        if c.target.endswith(".bias"):
            got = inits[site.bias]
            assert np.array_equal(got, c.values), c.key
        elif c.rows is not None:
            assert np.array_equal(inits[site.weight][list(c.rows)], c.values), c.key
        else:
            got = inits[site.weight]
            assert np.array_equal(got.T if site.layout == "in_out" else got, c.values), c.key
    for mode in ("dynamic", "batched"):
        assert main(["export", str(tmp_path / "base.onnx"), str(work / "adapter"), "--mode", mode,
                     "-o", str(tmp_path / f"{mode}.onnx")]) == 2
        assert "modules_to_save" in capsys.readouterr().err and not (tmp_path / f"{mode}.onnx").exists()
