"""Peer test: PEFT on a tiny Llama exported by torch's dynamo exporter vs our ONNX graphs in ORT.

Runs examples/peft_to_onnx.py (tiny Llama from a config, two PEFT adapters with non-zero B,
torch.onnx.export(dynamo=True), merged/dynamic/batched graphs). Then, at every LoRA site of
every graph, the output ORT computed is compared with PEFT's own LoRA layer evaluated in
float64 (module.double()) on the input ORT computed there, within the forward-error bound
lora_ref.export.parity.site_bound (γ_K at float32's u = 2^-24, K = in + r + 4, plus the same at
u = 2^-53 for the float64 peer). End to end the logits are also printed relative to max|logits|.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import require_peer
from helpers import load_example

torch = require_peer("torch")
require_peer("peft")
require_peer("transformers")
require_peer("onnxruntime")

import onnx  # noqa: E402

from lora_ref.export import locate_targets, open_session  # noqa: E402
from lora_ref.export.parity import expose, site_bound  # noqa: E402



@pytest.fixture(scope="module")
def example(tmp_path_factory):
    module = load_example("peft_to_onnx")
    workdir = tmp_path_factory.mktemp("peft_to_onnx")
    figures = module.main(workdir)
    return module, workdir, figures


def _peft_layers(module, adapter_dir):
    """The PEFT model with ``adapter_dir`` in float64, and its LoRA layers by module path."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(module.tiny_llama()), adapter_dir).double().eval()
    return model, lambda path: model.base_model.model.get_submodule(path)


def _check(graph_path, sites, feeds, run, row_layers, label, base_layers):
    """Every site of ``graph_path``: ORT's output vs the row's float64 PEFT layer (None: its base layer)."""
    graph = onnx.load(str(graph_path))
    session = open_session(expose(graph, [n for s in sites.values() for site in s for n in (site.x, site.y)]))
    values = dict(zip([o.name for o in session.session.get_outputs()], run(session, feeds)))
    worst = 0.0
    for path, module_sites in sites.items():
        for site in module_sites:
            x, y = values[site.x], values[site.y]
            for row, layers in enumerate(row_layers):
                layer = layers(path) if layers is not None else None
                base = (layer if layer is not None else base_layers(path)).base_layer
                with torch.no_grad():
                    xin = torch.from_numpy(x[row].astype(np.float64))
                    want = (layer(xin) if layer is not None else base(xin)).numpy()
                W = base.weight.detach().numpy()
                kwargs = {}
                if layer is not None:
                    kwargs = {"A": layer.lora_A["default"].weight.detach().numpy(), "B": layer.lora_B["default"].weight.detach().numpy(),
                              "scale": layer.scaling["default"]}
                bound = site_bound(x[row], W, dtype=np.float32, **kwargs) + site_bound(x[row], W, dtype=np.float64, **kwargs)
                err = np.abs(y[row].astype(np.float64) - want)
                assert np.all(err <= bound), f"{label} {path} row {row}: error/bound {np.max(err / bound):.3g}"
                worst = max(worst, float(np.max(err / bound)))
    print(f"{label}: worst error {worst:.3g} x bound")
    return worst


def test_all_graph_kinds_match_peft_at_every_lora_site(example):
    module, workdir, figures = example
    adapter_dirs = [workdir / "adapter_a", workdir / "adapter_b"]
    base_graph = onnx.load(str(workdir / "llama.onnx"))
    peft_a, layers_a = _peft_layers(module, adapter_dirs[0])
    peft_b, layers_b = _peft_layers(module, adapter_dirs[1])
    paths = sorted({name.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
                    for name, _ in peft_a.named_modules() if name.endswith(".lora_A")})
    assert len(paths) == 14  # 2 layers x 7 projections
    sites = locate_targets(base_graph, paths)
    assert {s[0].found_by for s in sites.values()} == {"name scopes"}
    feeds = {"input_ids": module.example_ids(module.tiny_llama().config.vocab_size).numpy()}
    plain = lambda session, f: session.session.run(None, f)  # noqa: E731
    _check(workdir / "merged.onnx", sites, feeds, plain, [layers_a] * 3, "merged (adapter a)", layers_a)
    _check(workdir / "dynamic.onnx", sites, feeds, plain, [None] * 3, "dynamic, no adapter", layers_a)
    dynamic = open_session(workdir / "dynamic.onnx")
    for name, layers in (("adapter_a", layers_a), ("adapter_b", layers_b)):
        loaded = dynamic.load_adapter(workdir / "onnx_adapters" / f"{name}.onnx_adapter")
        _check(workdir / "dynamic.onnx", sites, feeds, lambda s, f, a=loaded: s.run(f, s.load_adapter(a.path)),
               [layers] * 3, f"dynamic + {name}.onnx_adapter", layers_a)
    _check(workdir / "batched.onnx", sites, feeds, lambda s, f: s.run_batched(f, [0, 1, -1]),
           [layers_a, layers_b, None], "batched rows a, b, base", layers_a)
    # The adapters change the logits by far more than the ORT-vs-torch float32 difference, so a
    # graph that dropped or mis-scaled an adapter could not pass the end-to-end figures either.
    float32 = [v for k, v in figures.items() if "vs PEFT" in k and "float16" not in k]
    assert figures["adapter effect: PEFT(a) vs base"] > 1e3 * max(float32)
