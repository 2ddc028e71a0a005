"""Exported graphs in ONNX Runtime against the float64 reference: merged, dynamic, batched.

Oracle: the core's float64 Linear forward (lora_ref.linear.forward) at each LoRA site, fed the
input x̂ that ONNX Runtime actually computed there (the graph is given x̂ and ŷ as extra
outputs). Tolerance: lora_ref.export.parity.site_bound, |ŷ - y| <= γ_K (|x̂||W|^T + |b| +
s|x̂||A|^T|B|^T), K = in + r + 4 roundings in the graph's dtype (u = 2^-24 float32, 2^-11
float16), plus the same bound at u = 2^-53 for the float64 oracle's own rounding. Errors are
reported in units of that bound (must be <= 1).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require_peer

require_peer("onnxruntime")
require_peer("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lora_ref.adapter import Adapter  # noqa: E402
from lora_ref.linear import forward as linear_forward  # noqa: E402
from lora_ref.mixed_batch import factors_for, mixed_forward  # noqa: E402
from lora_ref.export import AdapterCache, build_graph, models, open_session, save_model  # noqa: E402
from lora_ref.export.editing import lora_a_name, lora_b_name, lora_factors  # noqa: E402
from lora_ref.export.parity import expose, site_bound  # noqa: E402

#: Each example builds graphs and sessions: a fifth of the profile's count (ci: 8, deep: 200).
EXAMPLES = max(1, settings.default.max_examples // 5)
MLP = models.mlp(in_features=12, hidden=24, out_features=10, seed=3)
BLOCK = models.transformer_block(d_model=16, heads=2, d_ff=32, seed=4)
WORST: dict[str, float] = {}  # worst error / bound per check


@pytest.fixture(scope="module", autouse=True)
def report_worst_errors():
    """After the module: the worst error seen per check, in units of its bound (shown with pytest -s)."""
    yield
    for label, ratio in sorted(WORST.items()):
        print(f"\n{label:<20} worst error = {ratio:.3g} x bound", end="")


def _inputs(model: models.SmallModel, batch: int, seed: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    width = model.weights[f"{model.linear_modules[0]}.weight"].shape[1]
    shape = (batch, width) if model.name == "mlp" else (batch, 5, width)
    return rng.standard_normal(shape).astype(dtype)


def _site_bias(graph: onnx.ModelProto, site) -> np.ndarray | None:
    node = graph.graph.node[site.node]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        return next(onnx.numpy_helper.to_array(t) for t in graph.graph.initializer if t.name == node.input[2])
    return None


def _bound(model, module, x, bias, adapter: Adapter | None, dtype) -> np.ndarray:
    """The site's elementwise bound at x: the graph's (dtype) plus the float64 oracle's own rounding."""
    W = model.weights[f"{module}.weight"]
    kwargs = {"bias": bias}
    if adapter is not None and module in adapter.modules:
        lora = adapter.modules[module]
        kwargs.update(A=lora.A, B=lora.B, scale=adapter.scale_for(module))
    return site_bound(x, W, dtype=dtype, **kwargs) + site_bound(x, W, dtype=np.float64, **kwargs)


def _expected(model, module, x, bias, adapter: Adapter | None, dtype):
    """(float64 reference at x, elementwise bound) for one site."""
    W = model.weights[f"{module}.weight"]
    if adapter is not None and module in adapter.modules:
        lora, s = adapter.modules[module], adapter.scale_for(module)
        y = linear_forward(x, W, lora.A, lora.B, s, bias=bias, out_dtype=np.float64)
    else:
        y = np.asarray(x, np.float64) @ W.astype(np.float64).T + (0 if bias is None else bias.astype(np.float64))
    return y, _bound(model, module, x, bias, adapter, dtype)


def check_sites(label, model, graph, sites, run, row_adapters, dtype=np.float32) -> float:
    """Run ``graph`` with its site tensors exposed; compare every site row with its adapter's reference."""
    names = [n for module_sites in sites.values() for s in module_sites for n in (s.x, s.y)]
    exposed = expose(graph, names)
    session = open_session(exposed)
    values = dict(zip([o.name for o in session.session.get_outputs()], run(session)))
    worst = 0.0
    for module, module_sites in sites.items():
        for site in module_sites:
            x, y = values[site.x], values[site.y]
            bias = _site_bias(model.onnx, site)  # site.node indexes the base graph
            for row, adapter in enumerate(row_adapters):
                want, bound = _expected(model, module, x[row], bias, adapter, dtype)
                err = np.abs(y[row].astype(np.float64) - want)
                assert np.all(err <= bound), f"{label} {module} row {row}: error/bound {np.max(err / bound):.3g}"
                worst = max(worst, float(np.max(err / bound)))
    WORST[label] = max(WORST.get(label, 0.0), worst)
    return worst


def _outputs(session, feeds):
    return session.session.run(None, feeds)


@settings(max_examples=EXAMPLES)
@given(model=st.sampled_from([MLP, BLOCK]), r=st.integers(1, 9), alpha=st.floats(0.5, 32), rslora=st.booleans(),
       seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_merged_graph_matches_reference(model, r, alpha, rslora, seed, batch):
    adapter = models.random_adapter(model, r, alpha=alpha, seed=seed, use_rslora=rslora)
    graph, sites = build_graph(model.onnx, [adapter], "merged")
    x = _inputs(model, batch, seed)
    check_sites("merged", model, graph, sites, lambda s: _outputs(s, {"x": x}), [adapter] * batch)


def test_merged_graph_changes_only_targeted_initializers():
    adapter = models.random_adapter(BLOCK, 4, seed=1, modules=["attn.q_proj", "mlp.up_proj"])
    graph, sites = build_graph(BLOCK.onnx, [adapter], "merged")
    before = {t.name: onnx.numpy_helper.to_array(t) for t in BLOCK.onnx.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed == {"attn.q_proj.weight", "w_up"}
    assert [n.SerializeToString() for n in graph.graph.node] == [n.SerializeToString() for n in BLOCK.onnx.graph.node]


@settings(max_examples=EXAMPLES)
@given(model=st.sampled_from([MLP, BLOCK]), ranks=st.lists(st.integers(1, 8), min_size=1, max_size=3),
       seed=st.integers(0, 2**16), max_rank=st.sampled_from([None, 8]))
def test_dynamic_graph_each_adapter_and_none(model, ranks, seed, max_rank):
    adapters = [models.random_adapter(model, r, seed=seed + i, name=f"a{i}") for i, r in enumerate(ranks)]
    graph, sites = build_graph(model.onnx, adapters, "dynamic", max_rank=max_rank)
    x = _inputs(model, 2, seed)
    check_sites("dynamic/none", model, graph, sites, lambda s: _outputs(s, {"x": x}), [None, None])
    for adapter in adapters:
        feeds = {"x": x}
        for module in adapter.modules:
            slot_rank = max_rank
            feeds[lora_a_name(module)], feeds[lora_b_name(module)] = lora_factors(adapter, module, np.float32, pad_to=slot_rank)
        check_sites("dynamic", model, graph, sites, lambda s: _outputs(s, feeds), [adapter, adapter])


def test_dynamic_graph_without_adapter_is_base_graph():
    """With the default rank-0 inputs the LoRA branch adds exact zeros: same bits as the base graph."""
    x = _inputs(BLOCK, 3, 0)
    graph, _ = build_graph(BLOCK.onnx, [models.random_adapter(BLOCK, 4)], "dynamic")
    base = open_session(BLOCK.onnx).run({"x": x})[0]
    np.testing.assert_array_equal(open_session(graph).run({"x": x})[0], base)


def test_switching_adapters_in_one_live_session_many_times():
    adapters = [models.random_adapter(BLOCK, r, seed=10 + r, name=f"r{r}") for r in (2, 4, 8)]
    graph, sites = build_graph(BLOCK.onnx, adapters, "dynamic")
    x = _inputs(BLOCK, 2, 7)
    names = [n for module_sites in sites.values() for s in module_sites for n in (s.x, s.y)]
    session = open_session(expose(graph, names))
    output_names = [o.name for o in session.session.get_outputs()]
    cache = AdapterCache(session)
    for adapter in adapters:
        cache.add(adapter.name, adapter)
    first: dict[str | None, list[np.ndarray]] = {}
    order = [None, "r2", "r8", "r4", "r2", None, "r8"] * 4
    for name in order:
        cache.activate(name)
        outputs = cache.run({"x": x})
        if name not in first:
            first[name] = outputs
            adapter = next((a for a in adapters if a.name == name), None)
            check_sites("cache switch", BLOCK, graph, sites, lambda s, o=outputs: o, [adapter, adapter])
        for got, want, label in zip(outputs, first[name], output_names):
            np.testing.assert_array_equal(got, want, err_msg=f"adapter {name}, output {label}")
    assert cache.active == "r8" and len(cache) == 3


@settings(max_examples=EXAMPLES)
@given(model=st.sampled_from([MLP, BLOCK]), seed=st.integers(0, 2**16),
       index=st.lists(st.integers(-1, 2), min_size=1, max_size=5))
def test_batched_graph_rows_use_their_own_adapter(model, seed, index):
    adapters = [models.random_adapter(model, r, seed=seed + r, name=f"r{r}") for r in (1, 3, 6)]
    adapters[1] = models.random_adapter(model, 3, seed=seed, name="partial", modules=model.linear_modules[:1])
    graph, sites = build_graph(model.onnx, adapters, "batched")
    x = _inputs(model, len(index), seed)
    check_sites("batched", model, graph, sites, lambda s: s.run_batched({"x": x}, index),
                [adapters[i] if i >= 0 else None for i in index])


@settings(max_examples=EXAMPLES)
@given(model=st.sampled_from([MLP, BLOCK]), ranks=st.lists(st.integers(1, 8), min_size=1, max_size=5),
       seed=st.integers(0, 2**16), data=st.data(), max_rank=st.sampled_from([None, 12]))
def test_batched_graph_is_the_mixed_batch_of_the_reference(model, ranks, seed, data, max_rank):
    """Each site of the batched graph, the whole batch at once, against the core's mixed batch (SPEC M.1).

    Oracle: lora_ref.mixed_batch.mixed_forward (float64, grouped: the base over the batch, one LoRA
    product per adapter over its rows) at the x̂ ONNX Runtime computed there, with the same random
    routing, rows of -1 (base only) and adapters on some modules only among them. Tolerance, per
    row: the float32 site bound of that row's adapter, γ_K (|x̂||W|ᵀ + |b| + s|x̂||A|ᵀ|B|ᵀ), K = in + r + 4
    (the bank's zero padding to r_max adds exact zeros, so r is the adapter's own rank), plus the
    same bound at u = 2^-53 for the oracle's rounding.
    """
    adapters = [models.random_adapter(model, r, seed=seed + i, name=f"a{i}",
                                      modules=model.linear_modules[: 1 + i % len(model.linear_modules)] if i % 2 else None)
                for i, r in enumerate(ranks)]
    index = data.draw(st.lists(st.integers(-1, len(adapters) - 1), min_size=1, max_size=8), label="index")
    graph, sites = build_graph(model.onnx, adapters, "batched", max_rank=max_rank)
    x = _inputs(model, len(index), seed)
    names = [n for module_sites in sites.values() for site in module_sites for n in (site.x, site.y)]
    session = open_session(expose(graph, names))
    values = dict(zip([o.name for o in session.session.get_outputs()], session.run_batched({"x": x}, index)))
    for module, module_sites in sites.items():
        for site in module_sites:
            x_site, bias = values[site.x], _site_bias(model.onnx, site)
            want = mixed_forward(x_site, model.weights[f"{module}.weight"], factors_for(adapters, module), index,
                                 bias=bias, out_dtype=np.float64)
            bound = np.stack([_bound(model, module, x_site[row], bias, adapters[i] if i >= 0 else None, np.float32)
                              for row, i in enumerate(index)])
            err = np.abs(values[site.y].astype(np.float64) - want)
            assert np.all(err <= bound), f"{module} index {index}: error/bound {np.max(err / bound):.3g}"
            WORST["batched/mixed"] = max(WORST.get("batched/mixed", 0.0), float(np.max(err / bound)))


@pytest.mark.parametrize("mode", ["merged", "dynamic", "batched"])
def test_float16_graphs_match_reference(mode):
    adapter = models.random_adapter(MLP, 4, seed=5)
    graph, sites = build_graph(MLP.onnx, [adapter], mode, dtype="float16")
    assert all(t.data_type != onnx.TensorProto.FLOAT for t in graph.graph.initializer)
    x = _inputs(MLP, 2, 5, np.float16)
    if mode == "dynamic":
        feeds = {"x": x}
        for module in adapter.modules:
            feeds[lora_a_name(module)], feeds[lora_b_name(module)] = lora_factors(adapter, module, np.float16)
        run = lambda s: _outputs(s, feeds)  # noqa: E731
    elif mode == "batched":
        run = lambda s: s.run_batched({"x": x}, [0, 0])  # noqa: E731
    else:
        run = lambda s: _outputs(s, {"x": x})  # noqa: E731
    check_sites(f"float16 {mode}", MLP, graph, sites, run, [adapter, adapter], dtype=np.float16)


@pytest.mark.parametrize("mode", ["merged", "dynamic", "batched"])
def test_graphs_pass_checker_and_are_readable(mode, tmp_path):
    from lora_ref.export import runtime_limits

    graph, _ = build_graph(BLOCK.onnx, [models.random_adapter(BLOCK, 4), models.random_adapter(BLOCK, 2, seed=1)][: 1 if mode == "merged" else 2], mode)
    onnx.checker.check_model(graph, full_check=True)
    path = save_model(graph, tmp_path / f"{mode}.onnx")
    written = onnx.load(str(path))
    assert written.ir_version <= runtime_limits().ir_version
    open_session(path)


def test_external_data_round_trip(tmp_path):
    adapter = models.random_adapter(BLOCK, 4)
    graph, _ = build_graph(BLOCK.onnx, [adapter], "merged")
    x = _inputs(BLOCK, 2, 1)
    inline = open_session(graph).run({"x": x})[0]
    path = save_model(graph, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(open_session(path).run({"x": x})[0], inline)


def test_external_data_of_a_graph_without_large_tensors_is_no_file(tmp_path):
    """external_data=True on a graph whose tensors are all below EXTERNAL_MIN_BYTES: onnx writes no data
    file, so there is none to move into place (this was a confusing ENOENT "cannot write" refusal)."""
    graph = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "c")]), opset_imports=[helper.make_opsetid("", 17)])
    path = save_model(graph, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    np.testing.assert_array_equal(open_session(path).run({"x": np.array([3.0, 4.0], np.float32)})[0], [4.0, 6.0])
