"""``.onnx_adapter`` files through ONNX Runtime's own reader, name checks, and the session runtime."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require_peer

ort = require_peer("onnxruntime")

from lora_ref.errors import FileFormatError  # noqa: E402
from lora_ref.export import (  # noqa: E402
    AdapterCache,
    AdapterNameError,
    ProviderFallbackWarning,
    adapter_tensors,
    build_graph,
    models,
    open_session,
    slots_from_model,
    slots_from_session,
    write_onnx_adapter,
)
from lora_ref.export.editing import lora_factors  # noqa: E402

#: Each example builds graphs and sessions: a fifth of the profile's count (ci: 8, deep: 200).
EXAMPLES = max(1, settings.default.max_examples // 5)
BLOCK = models.transformer_block(d_model=16, heads=2, d_ff=24, seed=6)
X = np.random.default_rng(6).standard_normal((2, 4, 16)).astype(np.float32)


def _graph(max_rank=None):
    adapters = [models.random_adapter(BLOCK, 4, seed=1, name="a"), models.random_adapter(BLOCK, 2, seed=2, name="b")]
    graph, _ = build_graph(BLOCK.onnx, adapters, "dynamic", max_rank=max_rank)
    return graph, adapters


@settings(max_examples=EXAMPLES)
@given(r=st.integers(1, 8), alpha=st.floats(0.25, 64), seed=st.integers(0, 2**16), max_rank=st.sampled_from([None, 8]))
def test_round_trip_through_ort_reader(tmp_path_factory, r, alpha, seed, max_rank):
    graph, _ = _graph(max_rank)
    adapter = models.random_adapter(BLOCK, r, alpha=alpha, seed=seed, modules=["attn.v_proj", "mlp.down_proj"])
    slots = slots_from_model(graph)
    tensors = adapter_tensors(adapter, slots)
    path = write_onnx_adapter(tmp_path_factory.mktemp("a") / "x.onnx_adapter", tensors, slots, adapter_version=7)
    reader = ort.AdapterFormat.read_adapter(str(path))  # ORT's own reader
    assert reader.get_adapter_version() == 7
    got = {k: v.numpy() for k, v in reader.get_parameters().items()}
    assert sorted(got) == sorted(tensors)
    for module in adapter.modules:  # independent of adapter_tensors: the factors from the PEFT tensors
        A, B = lora_factors(adapter, module, np.float32, pad_to=max_rank)
        np.testing.assert_array_equal(got[f"{module}.lora_A.weight"], A)
        np.testing.assert_array_equal(got[f"{module}.lora_B.weight"], B)
        lora = adapter.modules[module]
        np.testing.assert_array_equal(A[:, :r], lora.A.T)  # exact: a transpose
        # B = round32(s B^T): within one float32 rounding of the float64 product
        exact = adapter.scale_for(module) * lora.B.astype(np.float64).T
        assert np.all(np.abs(B[:r].astype(np.float64) - exact) <= 2.0**-24 * np.abs(exact))
    # Running through ORT's LoraAdapter + RunOptions equals feeding the same tensors as inputs.
    session = open_session(graph)
    loaded = session.load_adapter(path)
    via_ort = session.run({"x": X}, loaded)[0]
    via_feeds = session.run({"x": X, **tensors})[0]
    np.testing.assert_array_equal(via_ort, via_feeds)
    assert not np.array_equal(via_feeds, session.run({"x": X})[0])


def test_names_that_do_not_fit_are_refused_on_write_and_load(tmp_path):
    graph, adapters = _graph()
    slots = slots_from_model(graph)
    good = adapter_tensors(adapters[0], slots)
    renamed = {k.replace("attn.", "self_attn."): v for k, v in good.items()}
    with pytest.raises(AdapterNameError, match="not LoRA inputs of the graph"):
        write_onnx_adapter(tmp_path / "bad.onnx_adapter", renamed, slots)
    assert not (tmp_path / "bad.onnx_adapter").exists()
    # a file written by someone else (here: ORT's writer directly) with foreign names
    writer = ort.AdapterFormat()
    arrays = {k: np.ascontiguousarray(v) for k, v in renamed.items()}
    writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    writer.export_adapter(str(tmp_path / "foreign.onnx_adapter"))
    session = open_session(graph)
    with pytest.raises(AdapterNameError, match="self_attn"):
        session.load_adapter(tmp_path / "foreign.onnx_adapter")
    # rank disagreement between A and B, wrong dtype, wrong static axis
    broken = dict(good)
    broken["attn.q_proj.lora_B.weight"] = broken["attn.q_proj.lora_B.weight"][:1]
    with pytest.raises(AdapterNameError, match="disagree on the rank"):
        write_onnx_adapter(tmp_path / "x.onnx_adapter", broken, slots)
    with pytest.raises(AdapterNameError, match="float64"):
        write_onnx_adapter(tmp_path / "x.onnx_adapter", {k: v.astype(np.float64) for k, v in good.items()}, slots)
    fixed_slots = slots_from_model(_graph(max_rank=8)[0])
    with pytest.raises(AdapterNameError, match="expects"):
        write_onnx_adapter(tmp_path / "x.onnx_adapter", good, fixed_slots)  # rank 4 tensors, graph wants 8
    with pytest.raises(AdapterNameError, match="without lora_B"):
        write_onnx_adapter(tmp_path / "x.onnx_adapter", {"attn.q_proj.lora_A.weight": good["attn.q_proj.lora_A.weight"]}, slots)
    (tmp_path / "junk.onnx_adapter").write_bytes(b"not an adapter")
    with pytest.raises(FileFormatError):
        session.load_adapter(tmp_path / "junk.onnx_adapter")


def test_session_slots_match_model_slots():
    graph, _ = _graph()
    session = open_session(graph)
    from_session, from_model = slots_from_session(session.session), slots_from_model(graph)
    assert sorted(from_session) == sorted(from_model)
    assert all(from_session[k].shape[0] == from_model[k].shape[0] for k in from_model if k.endswith("lora_A.weight"))


def test_cache_binds_only_inputs_not_run_options():
    """The cache works through IOBinding inputs; ORT would ignore RunOptions adapters there."""
    graph, adapters = _graph()
    session = open_session(graph)
    cache = AdapterCache(session)
    cache.add("a", adapters[0])
    cache.activate("a")
    want = session.run({"x": X, **adapter_tensors(adapters[0], session.slots)})[0]
    np.testing.assert_array_equal(cache.run({"x": X})[0], want)
    shorter = X[:1, :3]  # other batch and sequence length in the same binding
    np.testing.assert_array_equal(cache.run({"x": shorter})[0], session.run({"x": shorter, **adapter_tensors(adapters[0], session.slots)})[0])
    with pytest.raises(Exception, match="not in the cache"):
        cache.activate("missing")


def test_provider_report_and_fallback_warning():
    graph, _ = _graph()
    session = open_session(graph, providers=["cpu"])
    assert session.provider == "CPUExecutionProvider" and session.device == "cpu"
    assert session.describe().startswith("CPUExecutionProvider (all ")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = open_session(graph, providers=["tensorrt", "cuda", "cpu"])  # no GPU on this machine
    if session.provider == "CPUExecutionProvider":
        assert any(issubclass(w.category, ProviderFallbackWarning) for w in caught)
    np.testing.assert_array_equal(session.run({"x": X})[0], open_session(graph).run({"x": X})[0])
