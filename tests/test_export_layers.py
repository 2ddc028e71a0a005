"""Layer kinds beyond plain Linear LoRA: merged Linear + lora_bias, Embedding, Conv, DoRA; lora_bias
in dynamic and batched graphs (and their .onnx_adapter files and the adapter cache).

Two oracles:
* the initializers: each merged weight (and lora_bias bias) equals, bit for bit, the core's
  ``merge(W, target_delta(adapter, target, base=W))`` on the torch-layout weight (transposed
  where the graph stores it [in, out]): the exporter must call the same function, no other;
* the sites in ONNX Runtime: every site's output against the core's float64 forward of the
  unmerged layer (linear/embedding/conv/dora ``forward``) at the input x̂ ORT computed there,
  within lora_ref.export.parity.layer_bound: γ_K(u_t) M + 2 γ_K(2^-53) M, M the magnitude of
  all terms (DoRA's gain included), K = n + r + 4 (n: in for Linear, in·Πk for Conv, 0 for
  Embedding), the second term covering the float64 oracle's own roundings (its sums, and for
  DoRA the norm: at most n/2 + 3 more, < K). Errors are reported in units of the bound.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from conftest import require_peer

require_peer("onnxruntime")
require_peer("onnx")

from lora_ref.checkpoint import merge_targets, target_delta  # noqa: E402
from lora_ref.conv import ConvGeometry  # noqa: E402
from lora_ref.deltas import delta_for  # noqa: E402
from lora_ref.merge import merge  # noqa: E402
from lora_ref.export import (  # noqa: E402
    AdapterCache,
    AdapterNameError,
    ExportConfigError,
    UnsupportedGraphError,
    adapter_tensors,
    build_graph,
    export,
    locate_targets,
    models,
    open_session,
    read_onnx_adapter,
    slots_from_model,
)
from lora_ref.export.names import read_layouts  # noqa: E402
from lora_ref.export.parity import dora_gain_error, expose, layer_bound  # noqa: E402

#: Each example builds a graph and a session, for each of 11 cases: a quarter of the profile's count (ci: 2, deep: 50).
EXAMPLES = max(1, settings.default.max_examples // 4)
MLP = models.mlp(in_features=7, hidden=9, out_features=5, seed=11)
BLOCK = models.transformer_block(d_model=8, heads=2, d_ff=12, seed=12)
EMBED = models.embedding_model(vocab=17, dim=6, out_features=5, seed=13)
CONV = models.conv_model(channels=2, size=5, hidden=3, out_channels=4, seed=14)
VARIANTS = {"plain": {}, "lora_bias": {"lora_bias": True}, "dora": {"use_dora": True}}
WORST: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_worst_errors():
    yield
    for label, ratio in sorted(WORST.items()):
        print(f"\n{label:<28} worst error = {ratio:.3g} x bound", end="")


def _feeds(model: models.SmallModel, batch: int, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if model is EMBED:
        return {"ids": rng.integers(0, 17, (batch, 3))}
    if model is CONV:
        return {"x": rng.standard_normal((batch, 2, 5, 5)).astype(dtype)}
    if model is MLP:
        return {"x": rng.standard_normal((batch, 7)).astype(dtype)}
    return {"x": rng.standard_normal((batch, 3, 8)).astype(dtype)}


def _init(graph: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in graph.graph.initializer if t.name == name)


def _adapter(model, variant, r, seed, **kwargs):
    return models.random_adapter(model, r, seed=seed, **VARIANTS[variant], **kwargs)


def _usable(model, variant) -> bool:
    """lora_bias needs a base bias to merge into (the block's attention has none)."""
    return not (variant == "lora_bias" and model is BLOCK)


CASES = [(m, v) for m in (MLP, BLOCK, EMBED, CONV) for v in VARIANTS if _usable(m, v)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-{c[1]}")
@settings(max_examples=EXAMPLES)
@given(r=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_merged_initializers_are_the_core_merge_bit_for_bit(case, r, seed):
    model, variant = case
    adapter = _adapter(model, variant, r, seed)
    graph, sites = build_graph(model.onnx, [adapter], "merged")
    for key, target in merge_targets(adapter).items():
        module, part = target
        base = model.weights[key]
        want = merge(base, target_delta(adapter, target, base=base)).weight
        site = sites[module][0]
        name = site.weight if part == "weight" else site.bias
        got = _init(graph, name)
        if part == "weight" and site.layout == "in_out":
            got = got.T
        assert np.array_equal(got.reshape(want.shape).view(np.uint32), want.view(np.uint32)), f"{variant} {key}"
    untouched = {t.name for t in model.onnx.graph.initializer} - {
        (s.weight if p == "weight" else s.bias) for k, (m, p) in merge_targets(adapter).items() for s in sites[m]}
    for name in untouched:
        np.testing.assert_array_equal(_init(graph, name), _init(model.onnx, name))


def _site_output(model: models.SmallModel, site) -> tuple[str, bool]:
    """The tensor holding the site's output, and whether it includes the base bias."""
    if site.bias_node is not None and site.bias_node != site.node:
        return model.onnx.graph.node[site.bias_node].output[0], True
    return site.y, site.bias is not None


def _bound(model, module, x, adapter, include_bias, dtype, graph_kind="merged"):
    """layer_bound in ``dtype`` plus twice the float64 oracle's; a DoRA gain applied as its own factor
    (dynamic: computed in the graph, batched: gathered) adds its relative error (parity.dora_gain_error)."""
    W = model.weights[f"{module}.weight"]
    lora = adapter.modules.get(module) if adapter is not None else None
    kwargs = {"kind": model.kind(module), "geometry": model.geometry.get(module),
              "bias": model.weights.get(f"{module}.bias") if include_bias else None}
    gain_error = None
    if lora is not None:
        kwargs.update(A=lora.A, B=lora.B, scale=adapter.scale_for(module), lora_bias=lora.lora_bias)
        if lora.magnitude is not None:
            kwargs["gain"] = delta_for(adapter, module, base=W).gain
            if graph_kind != "merged":
                gain_error = dora_gain_error(W, lora.A, lora.B, adapter.scale_for(module), kind=model.kind(module),
                                             in_graph=graph_kind == "dynamic", dtype=dtype)
    return layer_bound(x, W, dtype=dtype, gain_error=gain_error, **kwargs) + 2 * layer_bound(x, W, dtype=np.float64, **kwargs)


def check_sites(label, model, graph, sites, run, row_adapters, dtype=np.float32, graph_kind="merged"):
    """Run ``graph`` (``run(session)``) with site tensors exposed; each row vs its adapter's float64 layer.

    ``graph_kind`` says how a DoRA gain is applied (see :func:`_bound`)."""
    outputs = {m: _site_output(model, s) for m, module_sites in sites.items() for s in module_sites}
    names = [n for m, module_sites in sites.items() for s in module_sites for n in (s.x, outputs[m][0])]
    session = open_session(expose(graph, names))
    values = dict(zip([o.name for o in session.session.get_outputs()], run(session)))
    worst = 0.0
    for module, module_sites in sites.items():
        for site in module_sites:
            name, include_bias = outputs[module]
            for row, adapter in enumerate(row_adapters):
                x, y = values[site.x][row : row + 1], values[name][row : row + 1].astype(np.float64)
                want = model.layer(module, x, adapter, bias=include_bias)
                bound = _bound(model, module, x, adapter, include_bias, dtype, graph_kind)
                err = np.abs(y - want)
                assert np.all(err <= bound), f"{label} {module} row {row}: error/bound {np.max(err / bound):.3g}"
                worst = max(worst, float(np.max(err / bound)))
    WORST[label] = max(WORST.get(label, 0.0), worst)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-{c[1]}")
@settings(max_examples=EXAMPLES)
@given(r=st.integers(1, 5), seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_merged_sites_match_float64_reference(case, r, seed, batch):
    model, variant = case
    adapter = _adapter(model, variant, r, seed)
    graph, sites = build_graph(model.onnx, [adapter], "merged")
    feeds = _feeds(model, batch, seed)
    check_sites(f"merged {model.name} {variant}", model, graph, sites, lambda s: s.session.run(None, feeds), [adapter] * batch)


@pytest.mark.parametrize("model", [EMBED, CONV], ids=lambda m: m.name)
def test_two_dora_adapters_merge_in_order_float16(model):
    """float16 export: merged in float64 (each DoRA norm from the weight as merged so far), rounded once."""
    first, second = _adapter(model, "dora", 2, 1, name="a"), _adapter(model, "dora", 3, 2, name="b")
    graph, sites = build_graph(model.onnx, [first, second], "merged", dtype="float16")
    for module, module_sites in sites.items():
        W = model.weights[f"{module}.weight"].astype(np.float64)
        for adapter in (first, second):
            W = merge(W, delta_for(adapter, module, base=W)).weight
        got = _init(graph, module_sites[0].weight)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, W.astype(np.float16))  # one rounding float64 -> float16 (RNE)


def _strip_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for node in out.graph.node:
        del node.metadata_props[:]
    return out


def _anonymous(model: onnx.ModelProto) -> onnx.ModelProto:
    out = _strip_metadata(model)
    rename = {t.name: f"anonymous_{k}" for k, t in enumerate(out.graph.initializer)}
    for tensor in out.graph.initializer:
        tensor.name = rename[tensor.name]
    for node in out.graph.node:
        for pos, name in enumerate(node.input):
            node.input[pos] = rename.get(name, name)
    return out


@pytest.mark.parametrize("model", [EMBED, CONV], ids=lambda m: m.name)
def test_embedding_and_conv_weights_found_by_scope_name_and_value(model):
    kinds = model.kinds
    modules = [m for m in model.linear_modules if m in kinds]
    scoped = locate_targets(model.onnx, modules, kinds=kinds)
    found = {m: s[0].found_by for m, s in scoped.items()}
    assert found == ({"embed": "name scopes"} if model is EMBED else {"conv1": "initializer name", "conv2": "name scopes"})
    if model is EMBED:  # without metadata the table is still found by its name
        assert locate_targets(_strip_metadata(model.onnx), modules, kinds=kinds)["embed"][0].found_by == "initializer name"
    anonymous = _anonymous(model.onnx)
    by_value = locate_targets(anonymous, modules, kinds=kinds, base_weights=model.weights)
    assert {s[0].found_by for s in by_value.values()} == {"value match"}
    adapter = _adapter(model, "dora", 3, 5)
    feeds = _feeds(model, 2, 5)
    named = open_session(build_graph(model.onnx, [adapter], "merged")[0]).run(feeds)[0]
    found_graph, _ = build_graph(anonymous, [adapter], "merged", base_weights=model.weights)
    np.testing.assert_array_equal(open_session(found_graph).run(feeds)[0], named)


def test_tied_embedding_merges_into_a_copy_for_the_lookup_only():
    """A table read by the Gather and (transposed) by an output projection: only the lookup is adapted."""
    graph = onnx.ModelProto.FromString(EMBED.onnx.SerializeToString())
    graph.graph.node.extend([
        helper.make_node("Transpose", ["embed.weight"], ["embed_T"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "embed_T"], ["logits"], name="lm_head"),
    ])
    graph.graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "seq", 17]))
    adapter = _adapter(EMBED, "plain", 2, 3, modules=["embed"])
    sites = locate_targets(graph, ["embed"], kinds=EMBED.kinds)
    assert [graph.graph.node[s.node].op_type for s in sites["embed"]] == ["Gather"]
    merged, _ = build_graph(graph, [adapter], "merged")
    W = EMBED.weights["embed.weight"]
    gather = next(n for n in merged.graph.node if n.op_type == "Gather")
    transpose = next(n for n in merged.graph.node if n.op_type == "Transpose" and n.output[0] == "embed_T")
    np.testing.assert_array_equal(_init(merged, gather.input[0]), merge(W, delta_for(adapter, "embed")).weight)
    assert transpose.input[0] == "embed.weight" and _init(merged, "embed.weight").tobytes() == W.tobytes()
    feeds = _feeds(EMBED, 2, 3)
    _, logits, h = open_session(expose(merged, ["h"])).run(feeds)
    assert not np.array_equal(h, open_session(expose(graph, ["h"])).run(feeds)[2])


def test_refusals_are_typed_and_name_the_module():
    zero_m = _adapter(MLP, "dora", 2, 0)
    zero_m.modules["fc1"].magnitude[1] = 0.0
    with pytest.raises(ExportConfigError, match="magnitude entry is exactly 0"):
        build_graph(MLP.onnx, [zero_m], "dynamic")
    build_graph(MLP.onnx, [zero_m], "batched")  # a batched graph stores m/n itself: a zero gain is just a zero gain
    with pytest.raises(UnsupportedGraphError, match="attn.q_proj.*has none"):
        build_graph(BLOCK.onnx, [_adapter(BLOCK, "lora_bias", 2, 0, modules=["attn.q_proj"])], "merged")
    grouped = onnx.ModelProto.FromString(CONV.onnx.SerializeToString())
    grouped.graph.node[0].attribute.append(helper.make_attribute("group", 2))
    with pytest.raises(UnsupportedGraphError, match="group=2"):
        locate_targets(grouped, ["conv1"], kinds=CONV.kinds)


# -- lora_bias and Embedding LoRA in dynamic and batched graphs -------------------------------

#: (model, modules): lora_bias where the graph has a base bias (Gemm C, MatMul + Add) and where it has none;
#: the embedding model adds Embedding LoRA (no lora_bias there) next to a biased Linear; the conv
#: model has Conv2d (padding 1) and Conv1d (stride 2) LoRA, lora_bias on both.
BIAS_CASES = [(MLP, None), (BLOCK, None), (EMBED, None), (CONV, None)]


@pytest.mark.parametrize("case", BIAS_CASES, ids=lambda c: c[0].name)
@settings(max_examples=EXAMPLES)
@given(r=st.integers(1, 5), seed=st.integers(0, 2**16), max_rank=st.sampled_from([None, 6]))
def test_dynamic_graph_with_lora_bias_matches_reference(case, r, seed, max_rank):
    model, modules = case
    biased = _adapter(model, "lora_bias", r, seed, modules=modules, name="biased")
    plain = _adapter(model, "plain", 2, seed + 1, modules=modules, name="plain")
    graph, sites = build_graph(model.onnx, [biased, plain], "dynamic", max_rank=max_rank)
    slots = slots_from_model(graph)
    assert {name for name in slots if name.endswith(".lora_B.bias")} == {
        f"{m}.lora_B.bias" for m, lora in biased.modules.items() if lora.lora_bias is not None}
    feeds = _feeds(model, 2, seed)
    for adapter in (biased, plain, None):
        tensors = adapter_tensors(adapter, slots) if adapter is not None else {}
        check_sites(f"dynamic lora_bias {model.name}", model, graph, sites,
                    lambda s, t=tensors: s.session.run(None, {**feeds, **t}), [adapter, adapter])
    base = open_session(model.onnx).run(feeds)[0]
    np.testing.assert_array_equal(open_session(graph).run(feeds)[0], base)  # defaults: rank 0 and a zero bias


@pytest.mark.parametrize("case", BIAS_CASES, ids=lambda c: c[0].name)
@settings(max_examples=EXAMPLES)
@given(seed=st.integers(0, 2**16), index=st.lists(st.integers(-1, 2), min_size=1, max_size=4))
def test_batched_graph_with_lora_bias_rows_use_their_own_adapter(case, seed, index):
    model, modules = case
    adapters = [_adapter(model, "lora_bias", 3, seed, modules=modules, name="b3"),
                _adapter(model, "plain", 1, seed + 1, modules=modules, name="p1"),
                _adapter(model, "lora_bias", 2, seed + 2, modules=(modules or model.linear_modules)[:1], name="partial")]
    graph, sites = build_graph(model.onnx, adapters, "batched")
    biased = next(m for m, lora in adapters[0].modules.items() if lora.lora_bias is not None)
    bank = _init(graph, f"{biased}.lora_B.bias.bank")
    assert bank.shape[0] == 3 and not bank[1].any()  # the adapter without lora_bias has a zero row
    feeds = _feeds(model, len(index), seed)
    check_sites(f"batched lora_bias {model.name}", model, graph, sites, lambda s: s.run_batched(feeds, index),
                [adapters[i] if i >= 0 else None for i in index])


def test_lora_bias_onnx_adapter_file_and_cache(tmp_path):
    biased = _adapter(BLOCK, "lora_bias", 3, 7, name="biased")
    plain = _adapter(BLOCK, "plain", 2, 8, name="plain")
    report = export(BLOCK.onnx, [biased, plain], "dynamic", tmp_path / "d.onnx", adapter_out=tmp_path / "adapters")
    session = open_session(report.output)
    written = read_onnx_adapter(report.adapter_files["biased"])  # ORT's own reader
    for module, lora in biased.modules.items():
        want = (biased.scale_for(module) * lora.lora_bias.astype(np.float64)).astype(np.float32)  # one rounding
        np.testing.assert_array_equal(written[f"{module}.lora_B.bias"], want)
    feeds = _feeds(BLOCK, 2, 7)
    cache = AdapterCache(session)
    cache.add("biased", biased)
    cache.add("plain", session.load_adapter(report.adapter_files["plain"]))
    for name, adapter in (("biased", biased), ("plain", plain), ("biased", biased), (None, None)):
        cache.activate(name)
        via_cache = cache.run(feeds)[0]
        tensors = adapter_tensors(adapter, session.slots) if adapter is not None else {}
        np.testing.assert_array_equal(via_cache, session.run({**feeds, **tensors})[0], err_msg=str(name))
        if adapter is not None:
            loaded = session.load_adapter(report.adapter_files[name])
            np.testing.assert_array_equal(session.run(feeds, loaded)[0], via_cache)
    unbiased_graph, _ = build_graph(BLOCK.onnx, [plain], "dynamic")
    with pytest.raises(AdapterNameError, match="lora_B.bias"):
        adapter_tensors(biased, slots_from_model(unbiased_graph))


def test_embedding_adapter_file_round_trip(tmp_path):
    """Embedding LoRA in a dynamic graph: <m>.lora_A.weight = A^T [V, r], <m>.lora_B.weight = s B^T [r, D]."""
    adapter = _adapter(EMBED, "plain", 3, 9, modules=["embed"], name="emb")
    report = export(EMBED.onnx, [adapter], "dynamic", tmp_path / "d.onnx", adapter_out=tmp_path / "a", max_rank=4)
    written = read_onnx_adapter(report.adapter_files["emb"])
    lora = adapter.modules["embed"]
    assert sorted(written) == ["embed.lora_A.weight", "embed.lora_B.weight"]
    np.testing.assert_array_equal(written["embed.lora_A.weight"][:, :3], lora.A.T)  # a transpose: exact
    assert written["embed.lora_A.weight"].shape == (17, 4) and not written["embed.lora_A.weight"][:, 3:].any()
    session = open_session(report.output)
    feeds = _feeds(EMBED, 2, 9)
    via_file = session.run(feeds, session.load_adapter(report.adapter_files["emb"]))[0]
    np.testing.assert_array_equal(via_file, session.run({**feeds, **written})[0])
    sites = locate_targets(EMBED.onnx, ["embed"], kinds=EMBED.kinds)
    check_sites("dynamic embedding file", EMBED, report.model, sites, lambda s: s.session.run(None, {**feeds, **written}),
                [adapter, adapter])


def _switch_and_compare(session, report, feeds, base, adapters, order):
    """An AdapterCache holding ``adapters`` (the first from its .onnx_adapter file, the others as Adapters),
    activated in ``order`` (None: the base): each output equals plain feeds and the file run bit for bit,
    and None gives ``base``. Returns the cache."""
    cache = AdapterCache(session)
    for k, (name, adapter) in enumerate(adapters.items()):
        cache.add(name, session.load_adapter(report.adapter_files[name]) if k == 0 else adapter)
    for name in order:
        cache.activate(name)
        via_cache = cache.run(feeds)[0]
        tensors = adapter_tensors(adapters[name], session.slots) if name is not None else {}
        np.testing.assert_array_equal(via_cache, session.run({**feeds, **tensors})[0], err_msg=str(name))
        if name is None:
            np.testing.assert_array_equal(via_cache, base)
        else:
            np.testing.assert_array_equal(session.run(feeds, session.load_adapter(report.adapter_files[name]))[0], via_cache)
    return cache


def test_conv_adapter_file_cache_and_live_switching(tmp_path):
    """Conv LoRA in a dynamic graph: <m>.lora_A.weight = A [r, C, *k], <m>.lora_B.weight = s·B [O, r, 1...].

    The .onnx_adapter file (ORT's own reader), the adapter cache and plain feeds give the same
    outputs bit for bit while one session switches between adapters of different ranks and back to
    the base (rank-0 defaults), and every site stays within the bound of the float64 reference.
    """
    wide = _adapter(CONV, "lora_bias", 3, 21, name="wide")
    narrow = _adapter(CONV, "plain", 1, 22, name="narrow")
    report = export(CONV.onnx, [wide, narrow], "dynamic", tmp_path / "d.onnx", adapter_out=tmp_path / "a")
    written = read_onnx_adapter(report.adapter_files["wide"])
    lora = wide.modules["conv1"]
    assert written["conv1.lora_A.weight"].shape == lora.A.shape  # [r, C, 3, 3]: PEFT's layout, exact
    np.testing.assert_array_equal(written["conv1.lora_A.weight"], lora.A)
    want_b = (wide.scale_for("conv1") * lora.B.astype(np.float64)).astype(np.float32)  # one rounding
    np.testing.assert_array_equal(written["conv1.lora_B.weight"], want_b)
    session = open_session(report.output)
    feeds = _feeds(CONV, 2, 21)
    base = open_session(CONV.onnx).run(feeds)[0]
    cache = _switch_and_compare(session, report, feeds, base, {"wide": wide, "narrow": narrow}, ["wide", "narrow", None, "wide"])
    sites = locate_targets(CONV.onnx, CONV.linear_modules, kinds=CONV.kinds)
    for adapter in (wide, narrow):
        tensors = adapter_tensors(adapter, session.slots)
        check_sites("dynamic conv switching", CONV, report.model, sites,
                    lambda s, t=tensors: s.session.run(None, {**feeds, **t}), [adapter, adapter])
    with pytest.raises(AdapterNameError, match="conv1.lora_A.weight has shape"):
        cache.add("transposed", {"conv1.lora_A.weight": np.zeros((2, 3, 3, 3), np.float32),
                                 "conv1.lora_B.weight": np.zeros((2, 3, 1, 1), np.float32)})


def _conv3d_model() -> models.SmallModel:
    """One Conv3d ``conv3`` (k 3, dilation 2, padding 2, strides (1, 2, 1), bias): the geometry the A conv must copy."""
    rng = np.random.default_rng(15)
    weights = {"conv3.weight": (rng.standard_normal((3, 2, 3, 3, 3)) / np.sqrt(54)).astype(np.float32),
               "conv3.bias": (rng.standard_normal(3) / np.sqrt(54)).astype(np.float32)}
    geometry = {"conv3": ConvGeometry(stride=(1, 2, 1), padding=2, dilation=2)}
    node = helper.make_node("Conv", ["x", "conv3.weight", "conv3.bias"], ["y"], name="conv3", kernel_shape=[3, 3, 3],
                            pads=[2] * 6, strides=[1, 2, 1], dilations=[2, 2, 2])
    graph = helper.make_graph([node], "conv3d", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 5, 6, 5])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 5, 3, 5])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    proto.ir_version = 9
    small = models.SmallModel("conv3d", proto, weights, ["conv3"], reference=None, kinds={"conv3": "conv"}, geometry=geometry)
    small.reference = lambda x, adapter: small.layer("conv3", x, adapter)
    return small


def test_conv3d_dynamic_and_batched_match_reference():
    """Conv3d falls out of the same code (lora_bias, plain and DoRA): dynamic (switching in one session) and batched rows vs float64."""
    model = _conv3d_model()
    adapters = [_adapter(model, "lora_bias", 2, 31, name="a"), _adapter(model, "plain", 3, 32, name="b"),
                _adapter(model, "dora", 2, 34, name="d")]
    rng = np.random.default_rng(33)
    feeds = {"x": rng.standard_normal((3, 2, 5, 6, 5)).astype(np.float32)}
    sites = locate_targets(model.onnx, ["conv3"], kinds=model.kinds)
    graph, _ = build_graph(model.onnx, adapters, "dynamic")
    slots = slots_from_model(graph)
    assert slots["conv3.lora_A.weight"].shape == ("conv3.lora_r", 2, 3, 3, 3)
    assert slots["conv3.lora_B.weight"].shape == (3, "conv3.lora_r", 1, 1, 1)
    for adapter in (*adapters, None):
        tensors = adapter_tensors(adapter, slots) if adapter is not None else {}
        check_sites("dynamic conv3d", model, graph, sites, lambda s, t=tensors: s.session.run(None, {**feeds, **t}), [adapter] * 3,
                    graph_kind="dynamic")
    graph, _ = build_graph(model.onnx, adapters, "batched")
    check_sites("batched conv3d", model, graph, sites, lambda s: s.run_batched(feeds, [1, -1, 2]), [adapters[1], None, adapters[2]],
                graph_kind="batched")


def test_conv_banks_can_be_fed_with_other_adapter_counts_and_ranks():
    """A batched conv graph takes fed banks of another N and r_max (the bank inputs' axes are symbolic)."""
    adapters = [_adapter(CONV, "lora_bias", r, seed, name=f"a{seed}") for r, seed in ((2, 41), (3, 42), (1, 43))]
    small, _ = build_graph(CONV.onnx, adapters[:2], "batched")
    large, sites = build_graph(CONV.onnx, adapters, "batched", max_rank=5)
    banks = {t.name: numpy_helper.to_array(t) for t in large.graph.initializer if t.name.endswith(".bank")}
    assert banks["conv1.lora_A.bank"].shape == (3, 5, 2, 3, 3) and banks["conv1.lora_B.bank"].shape == (3, 3, 5, 1, 1)
    feeds = _feeds(CONV, 4, 44)
    index = [2, -1, 0, 1]
    check_sites("batched conv fed banks", CONV, small, sites, lambda s: s.run_batched({**feeds, **banks}, index),
                [adapters[i] if i >= 0 else None for i in index])


# -- DoRA in dynamic and batched graphs ------------------------------------------------------

#: Linear as Gemm with its bias inside (MLP), MatMul + Add and bias-free MatMul (BLOCK), Embedding (EMBED),
#: Conv2d (padding 1) and Conv1d (stride 2) with their bias inside the Conv (CONV).
DORA_MODELS = [MLP, BLOCK, EMBED, CONV]


@pytest.mark.parametrize("model", DORA_MODELS, ids=lambda m: m.name)
@settings(max_examples=EXAMPLES)
@given(r=st.integers(1, 5), seed=st.integers(0, 2**16), max_rank=st.sampled_from([None, 6]))
def test_dynamic_graph_with_dora_computes_the_norm_in_the_graph(model, r, seed, max_rank):
    """One session: a DoRA adapter, a second one, a plain LoRA adapter (m left at its default 0: no
    scaling) and none, each site vs the float64 DoRA/LoRA layer within layer_bound + the in-graph gain's ρ."""
    dora, other = _adapter(model, "dora", r, seed, name="dora"), _adapter(model, "dora", 2, seed + 1, name="other")
    plain = _adapter(model, "plain", 3, seed + 2, name="plain")
    graph, sites = build_graph(model.onnx, [dora, other, plain], "dynamic", max_rank=max_rank)
    slots = slots_from_model(graph)
    assert {n for n in slots if n.endswith(".lora_magnitude_vector")} == {f"{m}.lora_magnitude_vector" for m in dora.modules}
    feeds = _feeds(model, 2, seed)
    for adapter in (dora, other, plain, None):
        tensors = adapter_tensors(adapter, slots) if adapter is not None else {}
        if adapter is dora:
            for module, lora in dora.modules.items():  # m itself (one rounding), not m / n
                np.testing.assert_array_equal(tensors[f"{module}.lora_magnitude_vector"], lora.magnitude.astype(np.float32))
        check_sites(f"dynamic dora {model.name}", model, graph, sites, lambda s, t=tensors: s.session.run(None, {**feeds, **t}),
                    [adapter, adapter], graph_kind="dynamic")
    base = open_session(model.onnx).run(feeds)[0]
    np.testing.assert_array_equal(open_session(graph).run(feeds)[0], base)  # defaults: rank 0, m = 0 -> gain exactly 1


@pytest.mark.parametrize("model", DORA_MODELS, ids=lambda m: m.name)
@settings(max_examples=EXAMPLES)
@given(seed=st.integers(0, 2**16), index=st.lists(st.integers(-1, 2), min_size=1, max_size=4))
def test_batched_graph_with_dora_rows_use_their_own_gain(model, seed, index):
    """Rows with different DoRA adapters, a plain one (gain row 1) and -1 (the base, bit for bit)."""
    adapters = [_adapter(model, "dora", 3, seed, name="d3"), _adapter(model, "plain", 1, seed + 1, name="p1"),
                _adapter(model, "dora", 2, seed + 2, modules=model.linear_modules[:1], name="partial")]
    graph, sites = build_graph(model.onnx, adapters, "batched")
    module = model.linear_modules[0]
    bank = _init(graph, f"{module}.lora_dora_gain.bank")
    W = model.weights[f"{module}.weight"]
    for i in (0, 2):  # g_i = m_i / ||W + dW_i||, the core's float64 gain rounded once
        np.testing.assert_array_equal(bank[i], delta_for(adapters[i], module, base=W).gain.astype(np.float32))
    assert np.all(bank[1] == 1)
    feeds = _feeds(model, len(index), seed)
    check_sites(f"batched dora {model.name}", model, graph, sites, lambda s: s.run_batched(feeds, index),
                [adapters[i] if i >= 0 else None for i in index], graph_kind="batched")
    out = open_session(graph).run_batched(feeds, index)[0]
    base = open_session(model.onnx).run(feeds)[0]
    rows = [k for k, i in enumerate(index) if i < 0]
    np.testing.assert_array_equal(out[rows], base[rows])


def test_dora_onnx_adapter_file_cache_and_refusals(tmp_path):
    """The .onnx_adapter file carries m as <m>.lora_magnitude_vector; file, cache and feeds agree bit for bit
    while one session switches DoRA -> plain -> base -> DoRA; a DoRA adapter does not fit a graph without the slot."""
    dora, plain = _adapter(BLOCK, "dora", 3, 51, name="dora"), _adapter(BLOCK, "plain", 2, 52, name="plain")
    report = export(BLOCK.onnx, [dora, plain], "dynamic", tmp_path / "d.onnx", adapter_out=tmp_path / "a")
    written = read_onnx_adapter(report.adapter_files["dora"])  # ORT's own reader
    for module, lora in dora.modules.items():
        np.testing.assert_array_equal(written[f"{module}.lora_magnitude_vector"], lora.magnitude)
    assert not any(k.endswith("lora_magnitude_vector") for k in read_onnx_adapter(report.adapter_files["plain"]))
    session = open_session(report.output)
    feeds = _feeds(BLOCK, 2, 51)
    base = open_session(BLOCK.onnx).run(feeds)[0]
    _switch_and_compare(session, report, feeds, base, {"dora": dora, "plain": plain}, ["dora", "plain", None, "dora"])
    plain_graph, _ = build_graph(BLOCK.onnx, [plain], "dynamic")
    with pytest.raises(AdapterNameError, match="lora_magnitude_vector"):
        adapter_tensors(dora, slots_from_model(plain_graph))


def test_float16_dynamic_dora_norm_does_not_overflow():
    """A table with entries near 300 has squares past 65504 (float16's max): the in-graph norm
    squares and sums in float32, so the float16 graph stays within the float16 bound (float16
    squares would give n = inf, g = 0); batched gains come from float64 anyway. ORT's CPU
    provider runs float16 elementwise ops in float32 itself, so the graph's own Cast is also
    checked structurally (CUDA and TensorRT have native float16 kernels)."""
    model = models.embedding_model(vocab=17, dim=6, out_features=5, seed=61)
    model.weights["embed.weight"] *= 300  # the reference reads this dict; the graph's table below
    table = next(t for t in model.onnx.graph.initializer if t.name == "embed.weight")
    table.CopyFrom(numpy_helper.from_array(model.weights["embed.weight"], "embed.weight"))
    adapter = _adapter(model, "dora", 2, 62, modules=["embed"], name="d")
    feeds = _feeds(EMBED, 2, 63)
    graph, sites = build_graph(model.onnx, [adapter], "dynamic", dtype="float16")
    tensors = adapter_tensors(adapter, slots_from_model(graph))
    assert tensors["embed.lora_magnitude_vector"].dtype == np.float16
    producers = {o: n for n in graph.graph.node for o in n.output}
    square = next(n for n in graph.graph.node if n.op_type == "Mul" and n.output[0].startswith("embed.lora_dora_V_sq"))
    cast = producers[square.input[0]]
    assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.FLOAT
    check_sites("dynamic dora float16", model, graph, sites, lambda s: s.session.run(None, {**feeds, **tensors}), [adapter] * 2,
                dtype=np.float16, graph_kind="dynamic")


@pytest.mark.parametrize("scheme", ["olive", "genai"])
def test_dora_magnitude_input_follows_the_naming_scheme(scheme):
    """Under --adapter-names olive/genai the magnitude input is <stem>.lora_magnitude_vector of that
    scheme's stem, and the graph computes what the peft-named graph computes, bit for bit."""
    adapter = _adapter(BLOCK, "dora", 3, 71, name="d")
    feeds = _feeds(BLOCK, 2, 71)
    outputs = {}
    for names in ("peft", scheme):
        graph, _ = build_graph(BLOCK.onnx, [adapter], "dynamic", adapter_names=names)
        slots = slots_from_model(graph)
        magnitudes = sorted(n for n in slots if n.endswith(".lora_magnitude_vector"))
        assert len(magnitudes) == len(adapter.modules)
        layouts, _ = read_layouts(graph, {slot.module for slot in slots.values()})
        outputs[names] = open_session(graph).run({**feeds, **adapter_tensors(adapter, slots, layouts)})[0]
    np.testing.assert_array_equal(outputs[scheme], outputs["peft"])
