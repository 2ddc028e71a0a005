"""The ONNX cells of the feature matrix (lora_ref.features, features ``onnx_*``): every variant × graph kind
is exported for real and run in ONNX Runtime, or refused with the typed error the table names.

Oracle: each site's output against the core's float64 forward of the unmerged layer (linear /
embedding / conv / dora ``forward``) at the input ORT computed there, within
``lora_ref.export.parity.layer_bound`` (γ_K(u_t) M + 2 γ_K(2^-53) M, K = n + r + 4, M the magnitude
of every term, DoRA's gain included, plus the gain's own error where the graph computes or gathers
it): the checks of ``tests/test_export_layers.py`` (``check_sites``), here driven by the table.
fan_in_fan_out has no float64 model layer there (its base weight is stored [in, out]), so its
single-layer model is checked against ``linear.forward`` / ``dora.forward`` with fan_in_fan_out,
within the same bound evaluated on Wᵀ (the magnitudes do not depend on the storage order).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import require_peer

require_peer("onnxruntime")
require_peer("onnx")

from test_export_layers import CONV, EMBED, MLP, _conv3d_model, _feeds, check_sites  # noqa: E402

from lora_ref import dora, linear  # noqa: E402
from lora_ref.export import adapter_tensors, build_graph, models, open_session, slots_from_model  # noqa: E402
from lora_ref.export.parity import dora_gain_error, layer_bound  # noqa: E402
from lora_ref.features import FEATURES, ONNX_FEATURES, VARIANTS, Variant, cell  # noqa: E402

CELLS = [(v.name, f) for v in VARIANTS for f in ONNX_FEATURES]
CONV3D = _conv3d_model()
GRAPH_KIND = {"onnx_merged": "merged", "onnx_dynamic": "dynamic", "onnx_batched": "batched"}


def _fifo_model() -> models.SmallModel:
    """GPT-2 Conv1D: y = x W + b with W stored [in, out] (``fc.weight``), as PEFT's fan_in_fan_out layers hold it."""
    rng = np.random.default_rng(21)
    weights = {"fc.weight": (rng.standard_normal((7, 5)) / np.sqrt(7)).astype(np.float32),
               "fc.bias": (rng.standard_normal(5) / np.sqrt(7)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["mm"], name="fc.matmul"),
             helper.make_node("Add", ["mm", "fc.bias"], ["y"], name="fc.bias_add")]
    graph = helper.make_graph(nodes, "fifo", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 7])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    proto.ir_version = 9
    return models.SmallModel("fifo", proto, weights, ["fc"], reference=None)


FIFO = _fifo_model()
FIFO_TORCH = dataclasses.replace(FIFO, weights={"fc.weight": FIFO.weights["fc.weight"].T, "fc.bias": FIFO.weights["fc.bias"]})


def _model_and_modules(v: Variant) -> tuple[models.SmallModel, list[str]]:
    if v.fan_in_fan_out:
        return FIFO, ["fc"]
    if v.kind == "embedding":
        return EMBED, ["embed"]
    if v.kind == "conv":
        return {1: CONV, 2: CONV, 3: CONV3D}[v.conv_dims], [{1: "conv2", 2: "conv1", 3: "conv3"}[v.conv_dims]]
    return MLP, MLP.linear_modules


def _adapter(v: Variant, model, modules, seed: int, name: str):
    """A random adapter of the variant; ``patterns``: rsLoRA with r and alpha from rank_pattern / alpha_pattern."""
    r = 3 if v.patterns else 2 + seed % 2
    shaped = FIFO_TORCH if model is FIFO else model  # factors and magnitudes from the [out, in] view of a fan_in_fan_out weight
    adapter = models.random_adapter(shaped, r, seed=seed, modules=modules, name=name, lora_bias=v.lora_bias, use_dora=v.dora,
                                    use_rslora=v.patterns)
    config = adapter.config
    if v.patterns:
        config = dataclasses.replace(config, r=8, lora_alpha=16.0, rank_pattern={m: r for m in modules},
                                     alpha_pattern={m: 7.0 for m in modules})
    if v.fan_in_fan_out:
        config = dataclasses.replace(config, fan_in_fan_out=True)
    return dataclasses.replace(adapter, config=config)


def _fifo_feeds(batch: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 7)).astype(np.float32)}


def _fifo_check(label, graph, run, row_adapters, graph_kind, x):
    """The fan_in_fan_out model's output (one layer) at input x vs the core's float64 forward with fan_in_fan_out (module doc)."""
    y = run(open_session(graph))[0]
    W, b = FIFO.weights["fc.weight"], FIFO.weights["fc.bias"]
    for row, adapter in enumerate(row_adapters):
        xr, yr = x[row : row + 1], y[row : row + 1].astype(np.float64)
        lora = adapter.modules["fc"] if adapter is not None else None
        if lora is None:
            want = xr.astype(np.float64) @ W + b
            bound = 2 * layer_bound(xr, W.T, dtype=np.float32, kind="linear", bias=b)
        else:
            s = adapter.scale_for("fc")
            kwargs = dict(kind="linear", bias=b, A=lora.A, B=lora.B, scale=s, lora_bias=lora.lora_bias)
            gain_error = None
            if lora.magnitude is not None:
                layer = dora.linear(W, lora.A, lora.B, s, lora.magnitude, fan_in_fan_out=True)
                want = dora.forward(layer, xr, bias=b, out_dtype=np.float64)
                kwargs["gain"] = layer.g
                if graph_kind != "merged":
                    gain_error = dora_gain_error(W.T, lora.A, lora.B, s, kind="linear", in_graph=graph_kind == "dynamic",
                                                 dtype=np.float32)
            else:
                want = linear.forward(xr, W, lora.A, lora.B, s, bias=b, lora_bias=lora.lora_bias, fan_in_fan_out=True,
                                      out_dtype=np.float64)
            bound = layer_bound(xr, W.T, dtype=np.float32, gain_error=gain_error, **kwargs) + 2 * layer_bound(
                xr, W.T, dtype=np.float64, **kwargs)
        err = np.abs(yr - want)
        assert np.all(err <= bound), f"{label} row {row}: error/bound {np.max(err / bound):.3g}"


def export_cell(v: Variant, feature: str, seed: int) -> None:
    """Export the variant's tiny model as ``feature``'s graph kind, run it in ONNX Runtime, check every site."""
    model, modules = _model_and_modules(v)
    kind = GRAPH_KIND[feature]
    batch = 3
    feeds = _fifo_feeds(batch, seed) if model is FIFO else _feeds(model, batch, seed) if model is not CONV3D else {
        "x": np.random.default_rng(seed).standard_normal((batch, 2, 5, 6, 5)).astype(np.float32)}
    adapters = [_adapter(v, model, modules, seed + i, f"a{i}") for i in range(2 if kind == "batched" else 1)]
    graph, sites = build_graph(model.onnx, adapters, kind)
    label = f"{kind} {v.name}"
    if kind == "merged":
        run, rows = (lambda s: s.session.run(None, feeds)), [adapters[0]] * batch
    elif kind == "dynamic":
        tensors = adapter_tensors(adapters[0], slots_from_model(graph))
        run, rows = (lambda s: s.session.run(None, {**feeds, **tensors})), [adapters[0]] * batch
    else:
        index = [1, -1, 0]
        run, rows = (lambda s: s.run_batched(feeds, index)), [adapters[i] if i >= 0 else None for i in index]
    if model is FIFO:
        _fifo_check(label, graph, run, rows, kind, feeds["x"])
    else:
        check_sites(label, model, graph, sites, run, rows, graph_kind=kind)


def test_onnx_features_are_in_the_table():
    assert set(ONNX_FEATURES) <= set(FEATURES) and set(GRAPH_KIND) == set(ONNX_FEATURES)


@pytest.mark.parametrize("variant_name,feature", CELLS)
def test_onnx_cell(variant_name, feature):
    v = next(v for v in VARIANTS if v.name == variant_name)
    c = cell(v, feature)
    if c.supported:
        export_cell(v, feature, 5)
    else:
        with pytest.raises(c.error) as info:
            export_cell(v, feature, 5)
        assert c.reason.split(":")[0] in str(info.value), (c.reason, str(info.value))
