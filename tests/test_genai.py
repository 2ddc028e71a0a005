"""onnxruntime-genai end to end: genai's builder makes the models, lora-ref exports them, genai runs them.

Marked ``genai``: the default run deselects these (onnxruntime-genai installs the CPU
``onnxruntime`` over onnxruntime-gpu's files, so it lives in its own venv); ``scripts/test_genai.sh``
runs them with LORA_REF_REQUIRE_PEERS=1.

Oracle: PEFT on torch in float64 (the exact forward up to float64 error), on the same base weights;
for the int4 model, on the weights ORT's own MatMulNBits computes with (read out by running each
quantized node on the identity, x = I_K gives y = W^T), so only the float32 arithmetic differs.

Tolerance: genai computes in float32 with other op orders and fused kernels (GroupQueryAttention,
SkipSimplifiedLayerNormalization) than torch. Each float32 op's error is bounded relative to its
absolute sum (γ_K, SPEC E.5), and the exported branch adds at each site at most
γ_{in+r+4}·s|x||A||B|, of the same order. So genai's distance to the float64 oracle may be a small
multiple of torch float32's own distance to it on the same input (ε32, measured in the same run)
plus the rounding of the logits themselves: tol = 8·ε32 + 16·u32·max|logits|. Every comparison
also checks that the adapter moves the logits by far more than tol, so a dropped or misplaced
adapter fails.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import require_peer

pytestmark = pytest.mark.genai

U32 = 2.0**-24
PROMPT = [1, 5, 9, 13, 40, 77]
STEPS = 4
#: vocab 101 is unequal to every other width (64, 96, 16, 32): genai's builder takes any Linear of
#: the vocabulary's width for the LM head. head_dim 16: genai's CPU GroupQueryAttention needs a multiple of 16.
CONFIG = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False)
ADAPTERS = {  # name: (target modules, r, use_rslora)
    "attn": (["q_proj", "k_proj", "v_proj", "o_proj"], 4, False),
    "mixed": (["q_proj", "v_proj", "gate_proj", "down_proj"], 2, True),
    "konly": (["k_proj", "up_proj"], 3, False),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, torch):
    """An HF folder, PEFT adapters, and genai's fp32 fused / fp32 unfused / int4 / own-adapter models of it."""
    require_peer("onnxruntime_genai")
    from genai_world import build_adapter, build_genai, build_hf

    root = tmp_path_factory.mktemp("genai")
    hf = build_hf(root / "hf", CONFIG)
    for seed, (name, (targets, r, rslora)) in enumerate(ADAPTERS.items()):
        build_adapter(hf, root / name, targets, r, rslora=rslora, seed=10 + seed)
    build_genai(hf, root / "fp32")
    build_genai(hf, root / "fp32u", "fp32", "fuse_qkv=false")
    # accuracy_level=1: float32 compute on the dequantized weights (4 would quantize activations to int8)
    build_genai(hf, root / "int4", "int4", "accuracy_level=1")
    build_genai(hf, root / "own", "fp32", f"adapter_path={root / 'attn'}")
    return root


def _export(world, source, mode, *adapters, extra=()):
    from lora_ref.cli import main

    out = world / f"{source}-{mode}-{'-'.join(adapters)}"
    if not out.exists():
        assert main(["export", str(world / source), *(str(world / a) for a in adapters), "--mode", mode, "-o", str(out), *extra]) == 0
    return out


def _genai(folder, adapter=None, *, model=None, adapters=None):
    """First-step logits [V] at the last prompt position and the greedy continuation, from genai."""
    import onnxruntime_genai as og

    model = model or og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + STEPS, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        if adapters is None:
            adapters = og.Adapters(model)
            adapters.load(str(folder / f"{adapter}.onnx_adapter"), adapter)
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(PROMPT)
    first = np.array(generator.get_output("logits"), np.float64).reshape(-1, CONFIG["vocab_size"])[-1]
    while not generator.is_done():
        generator.generate_next_token()
    return first, list(np.asarray(generator.get_sequence(0))[len(PROMPT):])


def _peft(world, adapter=None, *, weights=None, dtype="float64"):
    """(first-step logits [V], greedy continuation) from PEFT on torch in ``dtype``; ``weights`` replace base tensors."""
    import peft
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(world / "hf").eval()
    if weights:
        state = model.state_dict()
        state.update({k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()})
        model.load_state_dict(state)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, world / adapter).eval()
    model = model.to(getattr(torch, dtype))
    ids, margin = list(PROMPT), np.inf
    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        for _ in range(STEPS):
            logits = np.sort(model(torch.tensor([ids])).logits[0, -1].double().numpy())
            margin = min(margin, logits[-1] - logits[-2])
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return first, ids[len(PROMPT):], margin


def _compare(world, got, adapter, weights=None):
    exact, tokens, margin = _peft(world, adapter, weights=weights)
    f32, _, _ = _peft(world, adapter, weights=weights, dtype="float32")
    tol = 8 * np.abs(f32 - exact).max() + 16 * U32 * np.abs(exact).max()
    logits, greedy = got
    err = np.abs(logits - exact).max()
    assert err <= tol, (adapter, err, tol)
    if adapter is not None:
        base, _, _ = _peft(world, None, weights=weights)
        assert np.abs(exact - base).max() > 100 * tol, "the adapter must move the logits far more than the tolerance"
    if margin > 2 * tol:  # greedy tokens are decided unless two logits lie within the tolerance
        assert greedy == tokens, (greedy, tokens)
    return err / tol


@pytest.mark.parametrize("source", ["fp32", "fp32u"])
@pytest.mark.parametrize("adapter", ["attn", "mixed", "konly"])
def test_merged_genai_models_match_peft(world, source, adapter):
    folder = _export(world, source, "merged", adapter)
    _compare(world, _genai(folder), adapter)


@pytest.mark.parametrize("source", ["fp32", "fp32u"])
def test_dynamic_genai_model_switches_adapters_like_peft(world, source):
    """One og.Model, adapters A -> B -> none -> A -> C through og.Adapters / set_active_adapter."""
    import onnxruntime_genai as og

    folder = _export(world, source, "dynamic", "attn", "mixed", "konly")
    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    for name in ADAPTERS:
        adapters.load(str(folder / f"{name}.onnx_adapter"), name)
    for name in ["attn", "mixed", None, "attn", "konly"]:
        _compare(world, _genai(folder, name, model=model, adapters=adapters), name)


def _dequantized(folder):
    """HF state-dict entries holding the weights ORT's MatMulNBits nodes of ``folder`` compute with.

    Read out by running each node alone on the identity (y = I_K W^T = W^T): ORT is the oracle,
    independent of lora_ref's own dequantization, which is checked against it bit for bit.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from lora_ref.export.locate import GraphIndex, TargetSite
    from lora_ref.export.quantized import dequantize

    model = onnx.load(str(folder / "model.onnx"))
    index = GraphIndex(model.graph)
    weights = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        K, N = attrs["K"], attrs["N"]
        single = helper.make_model(
            helper.make_graph([node], "one", [helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, [K, K])],
                              [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, [K, N])],
                              [index.initializers[n] for n in node.input[1:] if n]),
            opset_imports=list(model.opset_import))
        single.ir_version = model.ir_version
        WT = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {node.input[0]: np.eye(K, dtype=np.float32)})[0]
        site = TargetSite("m", i, node.input[0], node.output[0], node.input[1], "nbits", K, N, "test")
        np.testing.assert_array_equal(dequantize(model.graph, site).astype(np.float32), WT.T)
        path = node.name.split("/")  # /model/layers.0/attn/qkv_proj/MatMul_Q4
        if path[1] == "lm_head":
            weights["lm_head.weight"] = WT.T
            continue
        layer, block, proj = path[2], path[3], path[4]
        prefix = f"model.{layer}.{'self_attn' if block == 'attn' else block}"
        if proj == "qkv_proj":
            q = CONFIG["num_attention_heads"] * CONFIG["head_dim"]
            kv = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
            for name, rows in zip(("q_proj", "k_proj", "v_proj"), np.split(WT.T, [q, q + kv])):
                weights[f"{prefix}.{name}.weight"] = rows
        else:
            weights[f"{prefix}.{proj}.weight"] = WT.T
    return weights


def test_int4_models_keep_the_base_and_match_peft_on_the_dequantized_weights(world):
    import onnx

    weights = _dequantized(world / "int4")
    base = onnx.load(str(world / "int4" / "model.onnx"))
    quantized = {t.name: t.SerializeToString() for t in base.graph.initializer if t.name.endswith(("_Q4", "_scales"))}
    merged = _export(world, "int4", "merged", "attn", "mixed")
    dynamic = _export(world, "int4", "dynamic", "attn", "mixed", "konly")
    for folder in (merged, dynamic):  # the int4 base bit for bit
        out = {t.name: t.SerializeToString() for t in onnx.load(str(folder / "model.onnx")).graph.initializer}
        assert all(out[name] == blob for name, blob in quantized.items())
    _compare(world, _genai(world / "int4"), None, weights)
    for name in ("attn", "konly"):
        _compare(world, _genai(dynamic, name), name, weights)
    # the merged model carries both adapters, one after the other: PEFT with both active, merged in order
    import peft
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(world / "hf").eval()
    state = model.state_dict()
    state.update({k: torch.from_numpy(v) for k, v in weights.items()})
    model.load_state_dict(state)
    model = peft.PeftModel.from_pretrained(model, world / "attn", adapter_name="attn")
    model.load_adapter(world / "mixed", adapter_name="mixed")
    model.base_model.set_adapter(["attn", "mixed"])
    model = model.double().eval()
    with torch.no_grad():
        exact = model(torch.tensor([PROMPT])).logits[0, -1].numpy()
        f32 = model.float()(torch.tensor([PROMPT])).logits[0, -1].double().numpy()
    tol = 8 * np.abs(f32 - exact).max() + 16 * U32 * np.abs(exact).max()
    assert np.abs(_genai(merged)[0] - exact).max() <= tol


def test_genai_names_match_genais_own_adapter_graph(world):
    """lora-ref's genai-named .onnx_adapter holds the tensors genai's builder bakes in for the same adapter."""
    import onnx

    from lora_ref.export import read_onnx_adapter

    own = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(world / "own" / "model.onnx")).graph.initializer
           if ".lora_" in t.name}
    folder = _export(world, "fp32u", "dynamic", "attn")
    ours = read_onnx_adapter(folder / "attn.onnx_adapter")
    assert sorted(ours) == sorted(own)
    for name, value in own.items():
        if ".lora_A." in name:
            np.testing.assert_array_equal(ours[name], value)  # A^T: a transpose, exact
        else:  # genai scales B in float32 (one rounding of s·B, as lora-ref, but s itself rounded first)
            np.testing.assert_allclose(ours[name], value, rtol=2 * U32, atol=0)


def test_convert_adapters_for_an_extracted_genai_graph(world, tmp_path, capsys):
    """genai's own adapter graph with its LoRA constants made inputs (what Olive's ExtractAdapters does): convert-adapters fits it."""
    import onnx
    from onnx import helper

    from lora_ref.cli import main

    model = onnx.load(str(world / "own" / "model.onnx"))
    for tensor in model.graph.initializer:
        if ".lora_" in tensor.name:
            dims = ["r" if (i == 1) == (".lora_A." in tensor.name) else d for i, d in enumerate(tensor.dims)]
            model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, dims))
    onnx.save(model, str(tmp_path / "extracted.onnx"))
    assert main(["convert-adapters", str(world / "attn"), "--graph", str(tmp_path / "extracted.onnx"),
                 "-o", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scheme"] == "genai" and report["adapters"]["attn"]["tensors"] == 16
    from lora_ref.export import read_onnx_adapter

    converted = read_onnx_adapter(tmp_path / "out" / "attn.onnx_adapter")
    exported = read_onnx_adapter(_export(world, "fp32u", "dynamic", "attn") / "attn.onnx_adapter")
    assert sorted(converted) == sorted(exported)
    assert all(np.array_equal(converted[k], exported[k]) for k in converted)
    assert main(["convert-adapters", str(world / "mixed"), "--graph", str(tmp_path / "extracted.onnx"),
                 "-o", str(tmp_path / "out2")]) == 2  # gate/down have no input in that graph: refused, nothing written
    assert not (tmp_path / "out2").exists()


#: fp16: genai 0.18's fp16 CPU model of a grouped-query config (num_key_value_heads < heads) fails to generate
#: (ORT's inserted fp16 -> fp32 Cast after repeat_kv's Reshape: "Shape mismatch attempting to re-use buffer
#: {1,1,64} != {1,4,64}"; enable_mem_pattern / enable_cpu_mem_arena / graph_optimization_level do not help);
#: with num_key_value_heads = heads it generates, so the fp16 tests use that config.
CONFIG16 = {**CONFIG, "num_key_value_heads": CONFIG["num_attention_heads"]}
U16 = 2.0**-11


@pytest.fixture(scope="module")
def world16(tmp_path_factory, torch):
    """An MHA HF folder, the "attn" and "mixed" adapters, and genai's fp16 (fused) model of it."""
    require_peer("onnxruntime_genai")
    from genai_world import build_adapter, build_genai, build_hf

    root = tmp_path_factory.mktemp("genai16")
    hf = build_hf(root / "hf", CONFIG16)
    for seed, name in enumerate(("attn", "mixed")):
        targets, r, rslora = ADAPTERS[name]
        build_adapter(hf, root / name, targets, r, rslora=rslora, seed=20 + seed)
    build_genai(hf, root / "fp16", "fp16")
    return root


def test_fp16_genai_models_keep_float16_and_match_peft(world16):
    """Merged and dynamic exports of genai's fp16 model stay float16 and follow PEFT.

    Tolerance as for float32 with float16's rounding: torch's float16 forward on the same weights
    measures ε16 (weights and activations rounded as genai's are), tol = 8·ε16 + 16·u16·max|logits|.
    The adapter must move the logits by more than tol (a dropped adapter fails).
    """
    import onnx
    import onnxruntime_genai as og

    merged = _export(world16, "fp16", "merged", "attn")
    dynamic = _export(world16, "fp16", "dynamic", "attn", "mixed")
    for folder in (merged, dynamic):
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer
                   if ".lora_" in t.name or t.name.endswith("MatMul.weight"))
    model = og.Model(str(dynamic))
    adapters = og.Adapters(model)
    for name in ("attn", "mixed"):
        adapters.load(str(dynamic / f"{name}.onnx_adapter"), name)
    runs = [(merged, "attn", None), (dynamic, "attn", model), (dynamic, "mixed", model), (dynamic, None, model)]
    for folder, name, shared in runs:
        exact, _, _ = _peft(world16, name)
        f16, _, _ = _peft(world16, name, dtype="float16")
        tol = 8 * np.abs(f16 - exact).max() + 16 * U16 * np.abs(exact).max()
        if shared is not None:
            logits, _ = _genai(folder, name, model=shared, adapters=adapters)
        else:
            logits, _ = _genai(folder)
        assert np.abs(logits - exact).max() <= tol, (folder.name, name, np.abs(logits - exact).max(), tol)
        if name is not None:
            base, _, _ = _peft(world16, None)
            assert np.abs(exact - base).max() > tol, (name, np.abs(exact - base).max(), tol)
