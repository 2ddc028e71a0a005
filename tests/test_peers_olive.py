"""Olive interop (olive-ai, the ``peers`` extra): ``olive convert-adapters`` files load into lora-ref's dynamic
graphs, for a Llama (names ``model.…``, which Olive strips to) and a non-Llama architecture (BERT:
Olive keeps PEFT's ``base_model.model.`` prefix).

Olive is the oracle of its own file format: the files are written by Olive's CLI code (run
in-process through ``olive.cli.launcher.main``), read back by ONNX Runtime, and the graph run with
them must equal, bit for bit, the graph fed lora-ref's own tensors of the same PEFT adapter (A^T
and s·B^T, each rounded once: what Olive computes too), and differ from the base model.
Recorded deviation: Olive's convert-adapters scales every module by the config's lora_alpha / r
(rank_pattern and alpha_pattern ignored); lora-ref uses each module's own scale, so a file from
an adapter with patterns differs (:func:`test_olive_ignores_alpha_pattern`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import require_peer

ort = require_peer("onnxruntime")
require_peer("olive")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lora_ref import load_adapter  # noqa: E402
from lora_ref.export import adapter_tensors, build_graph, open_session, read_onnx_adapter, slots_from_model  # noqa: E402

D = 32


def olive_convert(adapter_dir, output) -> None:
    """``olive convert-adapters -a ADAPTER -o OUTPUT`` in this process (Olive's CLI entry point)."""
    from olive.cli.launcher import main

    main(["convert-adapters", "-a", str(adapter_dir), "-o", str(output), "--dtype", "float32", "--disable_telemetry"],
         called_as_console_script=False)


def linear_graph(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x -> one MatMul per module (initializers named ``<module>.weight``, [in, out]), each an output."""
    nodes = [helper.make_node("MatMul", ["x", f"{m}.weight"], [f"y{i}"]) for i, m in enumerate(weights)]
    inits = [numpy_helper.from_array(np.ascontiguousarray(W.T), f"{m}.weight") for m, W in weights.items()]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(weights))]
    g = helper.make_graph(nodes, "linears", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])], outs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _peft_adapter(torch, arch: str, folder, **lora):
    """A tiny random ``arch`` (llama / bert) from a config with a PEFT adapter saved to ``folder``; its base weights by module."""
    import peft
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    if arch == "llama":
        base = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=D, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()
        targets = ["q_proj", "v_proj"]
    else:
        base = BertModel(BertConfig(vocab_size=61, hidden_size=D, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=4)).eval()
        targets = ["query", "value"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **lora))
    model.save_pretrained(folder)
    return {name[len("base_model.model."):-len(".base_layer")]: module.weight.detach().numpy()
            for name, module in model.named_modules() if name.endswith(".base_layer")}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_olive_files_load_into_lora_ref_dynamic_graphs(torch, tmp_path, arch):
    weights = _peft_adapter(torch, arch, tmp_path / "adapter")
    olive_convert(tmp_path / "adapter", tmp_path / "olive.onnx_adapter")
    adapter = load_adapter(tmp_path / "adapter")
    x = np.random.default_rng(2).standard_normal((3, D)).astype(np.float32)
    olive_names = set(read_onnx_adapter(tmp_path / "olive.onnx_adapter"))
    assert all(n.startswith("base_model.model.") == (arch == "bert") for n in olive_names)
    for scheme in ("peft", "olive"):
        graph, _ = build_graph(linear_graph(weights), [adapter], "dynamic", adapter_names=scheme)
        onnx.save(graph, str(tmp_path / f"{scheme}.onnx"))
        slots = slots_from_model(graph)
        ours = adapter_tensors(adapter, slots)
        if scheme == "olive":
            assert set(ours) == olive_names  # the olive scheme writes Olive's own names
        session = open_session(tmp_path / f"{scheme}.onnx")
        loaded = session.load_adapter(tmp_path / "olive.onnx_adapter")
        assert sorted(loaded.tensors) == sorted(ours)
        assert all(np.array_equal(loaded.tensors[k], ours[k]) for k in ours)  # Olive's A^T, s·B^T = lora-ref's, bit for bit
        via_olive = session.run({"x": x}, loaded)
        fed = session.run({"x": x, **ours}, None)
        base = session.run({"x": x}, None)
        for got, want, plain in zip(via_olive, fed, base):
            assert np.array_equal(got, want) and not np.array_equal(got, plain)
        if scheme == "olive":  # ORT's own LoraAdapter + RunOptions, without lora-ref's renaming
            raw = ort.InferenceSession(str(tmp_path / "olive.onnx"), providers=["CPUExecutionProvider"])
            options = ort.RunOptions()
            lora = ort.LoraAdapter()
            lora.Load(str(tmp_path / "olive.onnx_adapter"))
            options.add_active_adapter(lora)
            for got, want in zip(raw.run(None, {"x": x}, options), fed):
                assert np.array_equal(got, want)


def test_olive_ignores_alpha_pattern(torch, tmp_path):
    """A recorded Olive deviation: one global scale lora_alpha / r; lora-ref's file uses each module's alpha_pattern."""
    weights = _peft_adapter(torch, "llama", tmp_path / "adapter", alpha_pattern={"v_proj": 2.0})
    olive_convert(tmp_path / "adapter", tmp_path / "olive.onnx_adapter")
    adapter = load_adapter(tmp_path / "adapter")
    graph, _ = build_graph(linear_graph(weights), [adapter], "dynamic")
    ours = adapter_tensors(adapter, slots_from_model(graph))
    theirs = read_onnx_adapter(tmp_path / "olive.onnx_adapter")
    q, v = "model.layers.0.self_attn.q_proj.lora_B.weight", "model.layers.0.self_attn.v_proj.lora_B.weight"
    assert np.array_equal(theirs[q], ours[q])  # default alpha: the same scale
    assert adapter.scale_for(v.removesuffix(".lora_B.weight")) == 2.0 / 4
    assert np.allclose(theirs[v], ours[v] * (8 / 4) / (2.0 / 4), rtol=1e-6)  # Olive scaled v by 8/4, not 2/4


def test_lora_ref_files_load_into_an_olive_extract_adapters_graph(torch, tmp_path):
    """Olive's ExtractAdapters on a dynamo-exported PEFT Llama (offline): its graph takes A^T and unscaled B^T and
    multiplies by the exported adapter's s itself. lora-ref's convert-adapters writes, for the exported adapter,
    exactly Olive's extracted tensors (bit for bit, so the same logits as Olive's own file)."""
    import peft
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict
    from olive.passes.onnx.extract_adapters import ExtractAdapters
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_ref.export import convert_adapters

    torch.manual_seed(5)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=D, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora).eval()
    model.save_pretrained(tmp_path / "x")

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids, use_cache=False).logits

    ids = torch.tensor([[3, 7, 1, 9, 4]])
    torch.onnx.export(Logits(model), (ids,), str(tmp_path / "peft.onnx"), dynamo=True, dynamic_shapes={"ids": {0: "b", 1: "s"}})
    extract = create_pass_from_dict(ExtractAdapters, {"make_inputs": True}, disable_search=True)
    extract.run(ONNXModelHandler(str(tmp_path / "peft.onnx")), str(tmp_path / "extracted"))
    graph = tmp_path / "extracted" / "peft.onnx"
    olive_file = tmp_path / "extracted" / "adapter_weights.onnx_adapter"
    report = convert_adapters([load_adapter(tmp_path / "x")], graph, tmp_path / "converted")
    assert report["scheme"] == "olive_extract"
    converted = next(iter(report["adapters"].values()))["file"]
    ours, theirs = read_onnx_adapter(converted), read_onnx_adapter(olive_file)
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])

    def logits(path=None):
        options = ort.RunOptions()
        if path is not None:
            adapter = ort.LoraAdapter()
            adapter.Load(str(path))
            options.add_active_adapter(adapter)
        return session.run(None, {"ids": ids.numpy()}, options)[0]

    assert np.array_equal(logits(converted), logits(olive_file))
    assert not np.array_equal(logits(olive_file), logits())
    # another adapter with alpha 4 (s = 1) on the graph exported with s = 2: B_g = (1 / 2)·B^T, exact (a power of two)
    torch.manual_seed(6)
    other = peft.get_peft_model(LlamaForCausalLM(base.config).eval(), dataclasses.replace(lora, lora_alpha=4))
    other.save_pretrained(tmp_path / "y")
    report = convert_adapters([load_adapter(tmp_path / "y")], graph, tmp_path / "converted_y")
    got = read_onnx_adapter(next(iter(report["adapters"].values()))["file"])
    layer = other.get_submodule("base_model.model.model.layers.0.self_attn.v_proj")
    stem = "inner.base_model.model.model.layers.0.self_attn.v_proj"
    assert np.array_equal(got[f"{stem}.lora_B.default.weight"], layer.lora_B["default"].weight.detach().numpy().T / 2)
    assert np.array_equal(got[f"{stem}.lora_A.default.weight"], layer.lora_A["default"].weight.detach().numpy().T)
