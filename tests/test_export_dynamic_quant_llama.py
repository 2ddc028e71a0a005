"""A tiny Llama (transformers, from a config) exported by torch's dynamo exporter and quantized by
``onnxruntime.quantization.quantize_dynamic`` (int8 weights per output column, uint8 activations at run
time), with a PEFT adapter on all seven projections: the dynamic and batched graphs against PEFT.

At every site the exported graph computes ŷ = C + (x·A_g)·B_g with C the untouched quantized base
(DynamicQuantizeLinear → MatMulInteger → Cast → Mul, as ONNX Runtime fuses it), so the adapter's
effect is isolated and checked against PEFT's own LoRA term L = layer(x) − base_layer(x) in float64
on the input ORT computed there: |ŷ − (C + L)| ≤ γ_K·(|C| + |s||x||A^T||B^T|), K = in + r + 4 (SPEC
E.5 with C for x·W^T; the float64 peer's own error is far below). With no adapter (rank 0 defaults;
every batched row −1) the logits are the quantized graph's bit for bit.
"""

from __future__ import annotations


import numpy as np
import pytest

from conftest import require_peer
from helpers import load_example

torch = require_peer("torch")
require_peer("peft")
require_peer("transformers")
ort = require_peer("onnxruntime")

import onnx  # noqa: E402

from lora_ref import load_adapter  # noqa: E402
from lora_ref.export import adapter_tensors, build_graph, locate_targets, slots_from_model  # noqa: E402
from lora_ref.export.models import ort_dynamic  # noqa: E402
from lora_ref.export.parity import expose  # noqa: E402
from lora_ref.numerics import gamma  # noqa: E402

U32 = 2.0**-24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(example module, quantized graph, adapter dir, the PEFT model in float64, ids)."""
    from peft import PeftModel

    example = load_example("peft_to_onnx")
    folder = tmp_path_factory.mktemp("llama_dynamic_quant")
    base = example.tiny_llama()
    adapter_dir = example.make_adapter(base, folder / "adapter", r=4, alpha=8, seed=1)
    ids = example.example_ids(base.config.vocab_size)
    program = torch.onnx.export(example.LogitsOnly(base).eval(), (ids,), dynamo=True, input_names=["input_ids"],
                                output_names=["logits"], dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}})
    program.save(str(folder / "llama.onnx"))
    quantized = ort_dynamic(onnx.load(str(folder / "llama.onnx")), per_channel=True)
    peft_model = PeftModel.from_pretrained(example.tiny_llama(), adapter_dir).double().eval()
    return quantized, adapter_dir, peft_model, ids.numpy()


def _run(model: onnx.ModelProto, feeds: dict, outputs=()) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(expose(model, list(outputs)).SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_quantize_dynamic_llama_keeps_the_base_and_matches_peft_at_every_site(world):
    quantized, adapter_dir, peft_model, ids = world
    adapter = load_adapter(adapter_dir)
    paths = sorted(adapter.modules)
    assert len(paths) == 14  # 2 layers x 7 projections
    sites = locate_targets(quantized, paths)
    assert all(s[0].found_by == "name scopes" and s[0].integer is not None for s in sites.values())
    plain = _run(quantized, {"input_ids": ids})["logits"]
    dynamic, _ = build_graph(quantized, [adapter], "dynamic")
    batched, _ = build_graph(quantized, [adapter], "batched")
    assert np.array_equal(_run(dynamic, {"input_ids": ids})["logits"], plain)  # rank-0 defaults: the base bit for bit
    assert np.array_equal(_run(batched, {"input_ids": ids, "adapter_index": np.full(3, -1, np.int64)})["logits"], plain)
    names = [n for s in sites.values() for n in (s[0].x, s[0].y, f"{s[0].y}.base")]
    rows = np.array([1.0, 0.0, 1.0]).reshape(3, 1, 1)
    for graph, feeds, active in ((dynamic, {"input_ids": ids, **adapter_tensors(adapter, slots_from_model(dynamic))}, np.ones((3, 1, 1))),
                                 (batched, {"input_ids": ids, "adapter_index": np.array([0, -1, 0], np.int64)}, rows)):
        out = _run(graph, feeds, names)
        changed = False
        for path, (site, *_) in sites.items():
            layer = peft_model.base_model.model.get_submodule(path)
            x = out[site.x].astype(np.float64)
            with torch.no_grad():
                xs = torch.from_numpy(x)
                lora = (layer(xs) - layer.base_layer(xs)).numpy() * active
            s = layer.scaling["default"]
            A, B = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
            M = abs(s) * (np.abs(x) @ np.abs(A).T) @ np.abs(B).T * active
            C, y = out[f"{site.y}.base"].astype(np.float64), out[site.y].astype(np.float64)
            bound = gamma(site.in_features + A.shape[0] + 4, U32) * (np.abs(C) + M)
            assert np.all(np.abs(y - (C + lora)) <= bound), path
            changed |= bool(np.abs(lora).max() > 100 * bound.max())
        assert changed  # the adapter's effect stands far above the tolerance
