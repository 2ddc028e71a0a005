"""A PEFT adapter trained on a fused projection (Phi-3's ``qkv_proj``, ``gate_up_proj``) applied to a graph
with separate q/k/v (gate/up) MatMuls, as genai's builder writes with ``fuse_qkv=false`` or any
exporter of an unfused architecture with the same weights.

Oracles: PEFT itself (a tiny transformers Phi3 from a config, float64 forward of its LoRA layers)
for the dynamic graph, with the bound of SPEC E.5 per output, |ŷ − y| ≤ γ_K·M, K = in + r + 4,
M = |h||W|^T + |s|(|h||A^T|)|B^T|; and, for merged graphs, the core's merge of the fused weight
(lora-ref's merged export of the fused graph): the parts' merged weights are its rows bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_peer

ort = require_peer("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lora_ref import load_adapter  # noqa: E402
from lora_ref.export import adapter_tensors, build_graph, slots_from_model  # noqa: E402
from lora_ref.export.names import read_layouts  # noqa: E402
from lora_ref.numerics import gamma  # noqa: E402

D, HEADS, KV_HEADS, I = 32, 4, 2, 24  # noqa: E741
Q, KV = D, D // HEADS * KV_HEADS
ATTN, MLP = "model.layers.0.self_attn", "model.layers.0.mlp"
PARTS = {"qkv": (f"{ATTN}.qkv_proj", [("q_proj", Q), ("k_proj", KV), ("v_proj", KV)]),
         "gu": (f"{MLP}.gate_up_proj", [("gate_proj", I), ("up_proj", I)])}


def graph(weights: dict[str, np.ndarray], *, fused: bool) -> onnx.ModelProto:
    """h -> qkv, gu with genai's names; ``fused``: one MatMul per projection, else one per part and a Concat."""
    nodes, inits = [], []
    for out, (module, parts) in PARTS.items():
        W = weights[module]  # [Σw, D], torch layout
        if fused:
            name = module.replace(".self_attn.", ".attn.") + ".MatMul.weight"
            inits.append(numpy_helper.from_array(np.ascontiguousarray(W.T), name))
            nodes.append(helper.make_node("MatMul", ["h", name], [out]))
            continue
        pieces, row = [], 0
        for leaf, width in parts:
            stem = module.rpartition(".")[0].replace(".self_attn", ".attn") + "." + leaf
            inits.append(numpy_helper.from_array(np.ascontiguousarray(W[row:row + width].T), f"{stem}.MatMul.weight"))
            nodes.append(helper.make_node("MatMul", ["h", f"{stem}.MatMul.weight"], [f"{stem}.out"]))
            pieces.append(f"{stem}.out")
            row += width
        nodes.append(helper.make_node("Concat", pieces, [out], axis=-1))
    g = helper.make_graph(nodes, "phi3_like", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", D])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in PARTS], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def phi3(torch, tmp_path_factory):
    """(PEFT Phi3 model in float64, the lora-ref adapter loaded from its files, base weights by module)."""
    import peft
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(vocab_size=53, hidden_size=D, intermediate_size=I, num_hidden_layers=1, num_attention_heads=HEADS,
                        num_key_value_heads=KV_HEADS, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(3)
    base = Phi3ForCausalLM(config).eval()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"], init_lora_weights=False,
                           rank_pattern={"gate_up_proj": 3}, alpha_pattern={"gate_up_proj": 5.0})
    model = peft.get_peft_model(base, lora).eval()
    folder = tmp_path_factory.mktemp("phi3_adapter")
    model.save_pretrained(folder)
    model = model.double()
    weights = {m: model.get_submodule(f"base_model.model.{m}").base_layer.weight.detach().float().numpy() for m, _ in PARTS.values()}
    return model, load_adapter(folder), weights


def test_dynamic_parts_match_peft_on_the_fused_modules(phi3, torch):
    model, adapter, weights = phi3
    unfused = graph(weights, fused=False)
    notes: dict[str, str] = {}
    dynamic, sites = build_graph(unfused, [adapter], "dynamic", notes=notes)
    assert sorted(sites) == sorted(f"{m.rpartition('.')[0]}.{leaf}" for m, parts in PARTS.values() for leaf, _ in parts)
    assert "rows of the adapter's fused module" in notes[f"{ATTN}.k_proj"]
    slots = slots_from_model(dynamic)
    layouts, _ = read_layouts(dynamic, {s.module for s in slots.values()})
    h = np.random.default_rng(4).standard_normal((2, 3, D)).astype(np.float32)
    session = ort.InferenceSession(dynamic.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip(PARTS, session.run(None, {"h": h, **adapter_tensors(adapter, slots, layouts)})))
    base = dict(zip(PARTS, session.run(None, {"h": h})))
    for name, (module, _) in PARTS.items():
        layer = model.get_submodule(f"base_model.model.{module}")
        with torch.no_grad():
            want = layer(torch.from_numpy(h.astype(np.float64))).numpy()
        A, B = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
        s = layer.scaling["default"]
        W = weights[module].astype(np.float64)
        M = np.abs(h) @ np.abs(W).T + abs(s) * (np.abs(h) @ np.abs(A).T) @ np.abs(B).T
        bound = gamma(D + A.shape[0] + 4, 2.0**-24) * M
        assert np.all(np.abs(out[name] - want) <= bound), name
        assert np.abs(want - h @ W.T).max() > 100 * bound.max()  # the adapter's effect is far above the tolerance
        assert np.all(np.abs(base[name] - h @ W.T) <= gamma(D, 2.0**-24) * np.abs(h) @ np.abs(W).T)  # no adapter: the base


def test_merged_parts_are_the_rows_of_the_merged_fused_weight(phi3):
    _, adapter, weights = phi3
    merged_parts, _ = build_graph(graph(weights, fused=False), [adapter], "merged")
    merged_fused, _ = build_graph(graph(weights, fused=True), [adapter], "merged")
    parts = {t.name: numpy_helper.to_array(t) for t in merged_parts.graph.initializer}
    fused = {t.name: numpy_helper.to_array(t) for t in merged_fused.graph.initializer}
    for module, pieces in PARTS.values():
        stem = module.replace(".self_attn.", ".attn.")
        parent = stem.rpartition(".")[0]
        joined = np.concatenate([parts[f"{parent}.{leaf}.MatMul.weight"] for leaf, _ in pieces], axis=1)
        assert joined.tobytes() == fused[f"{stem}.MatMul.weight"].tobytes(), module
        assert not np.array_equal(joined, weights[module].T)  # the adapter changed it


def test_convert_adapters_splits_the_fused_module_for_a_graph_without_its_record(phi3, tmp_path):
    """A graph whose dynamic inputs name the parts (genai / Olive, no lora-ref record) gets the fused adapter's rows."""
    _, adapter, weights = phi3
    dynamic, _ = build_graph(graph(weights, fused=False), [adapter], "dynamic", adapter_names="genai")
    slots = slots_from_model(dynamic)
    recorded = adapter_tensors(adapter, slots, read_layouts(dynamic, {s.module for s in slots.values()})[0])
    del dynamic.metadata_props[:]  # as genai's builder would write it: names only
    bare = adapter_tensors(adapter, slots, read_layouts(dynamic, {s.module for s in slots.values()})[0])
    assert sorted(bare) == sorted(recorded) and all(np.array_equal(bare[k], recorded[k]) for k in bare)
    assert "model.layers.0.attn.k_proj.lora_B.MatMul.weight" in bare


def test_export_writes_part_named_adapter_files_and_reports_the_split(phi3, tmp_path):
    from lora_ref.export import export, read_onnx_adapter

    _, adapter, weights = phi3
    report = export(graph(weights, fused=False), [adapter], "dynamic", tmp_path / "g.onnx", adapter_out=tmp_path / "files")
    assert report.notes[f"{MLP}.up_proj"].startswith(f"rows of the adapter's fused module {MLP}.gate_up_proj")
    written = read_onnx_adapter(report.adapter_files[adapter.name])
    slots = slots_from_model(report.model)
    expected = adapter_tensors(adapter, slots, read_layouts(report.model, {s.module for s in slots.values()})[0])
    assert sorted(written) == sorted(expected) and all(np.array_equal(written[k], expected[k]) for k in written)
    assert f"{ATTN}.v_proj.lora_B.weight" in written
