"""Graphs shaped like onnxruntime-genai's, built with onnx.helper: ORT validation, genai names, fused
projections, MatMulNBits, adapter-name schemes, convert-adapters. (The real genai builder and runtime
are in test_genai.py, marker ``genai``.)

The graph: h = SimplifiedLayerNormalization(x) (ORT's op in the default domain: onnx.checker
rejects it), then qkv = h·W_qkv (fused [D, Q+2KV], or three MatMuls and a Concat, or one int4
MatMulNBits) and gu = h·W_gu (fused gate/up [D, 2I], or two MatMuls). Outputs h, qkv, gu, so every
site is checked from its own input (SPEC E.5) against a float64 oracle.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require_peer

ort = require_peer("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lora_ref.adapter import Adapter, LoraModule  # noqa: E402
from lora_ref.config import LoraConfig  # noqa: E402
from lora_ref.errors import FileFormatError  # noqa: E402
from lora_ref.export import (  # noqa: E402
    AdapterNameError,
    GraphTargetNotFoundError,
    UnsupportedGraphError,
    adapter_tensors,
    build_graph,
    open_session,
    slots_from_model,
)
from lora_ref.export.graphio import check_graph, load_model  # noqa: E402
from lora_ref.export.names import read_layouts  # noqa: E402

D, Q, KV, I = 32, 32, 16, 24  # noqa: E741 - I as in intermediate_size
WIDTHS = {"q_proj": Q, "k_proj": KV, "v_proj": KV, "gate_proj": I, "up_proj": I}
ATTN = "model.layers.0.self_attn"
MLP = "model.layers.0.mlp"
MODULES = {f"{ATTN}.{p}": w for p, w in WIDTHS.items() if p.endswith(("q_proj", "k_proj", "v_proj"))}
MODULES.update({f"{MLP}.{p}": w for p, w in WIDTHS.items() if p in ("gate_proj", "up_proj")})
U32 = 2.0**-24
BLOCK = 16


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Torch-layout [out, in] float32 weights of the five projections."""
    rng = np.random.default_rng(seed)
    return {m: (rng.standard_normal((w, D)) / np.sqrt(D)).astype(np.float32) for m, w in MODULES.items()}


def _quantize(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 blocks of W [N, K] in MatMulNBits' layout: (B_q [N, K/bs, bs/2] uint8, scales [N, K/bs])."""
    N, K = W.shape
    blocks = W.reshape(N, K // BLOCK, BLOCK).astype(np.float64)
    scales = np.abs(blocks).max(axis=2) / 7
    q = np.clip(np.rint(blocks / scales[..., None]), -8, 7).astype(np.int64) + 8
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, scales.astype(np.float32)


def genai_graph(weights: dict[str, np.ndarray], *, fused: bool = True, int4: bool = False, dtype=np.float32) -> onnx.ModelProto:
    """The genai-shaped graph of the module docstring (genai's initializer and node names), in ``dtype``."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = {m: w.astype(dtype) for m, w in weights.items()}
    x = helper.make_tensor_value_info("x", elem, ["batch", "seq", D])
    outs = [helper.make_tensor_value_info(n, elem, None) for n in ("h", "qkv", "gu")]
    inits = [numpy_helper.from_array(np.ones(D, dtype), "model.layers.0.input_layernorm.weight")]
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "model.layers.0.input_layernorm.weight"], ["h"],
                              axis=-1, epsilon=1e-5, name="/model/layers.0/input_layernorm/LayerNorm")]
    groups = {"qkv": ("attn", "qkv_proj", [f"{ATTN}.{p}" for p in ("q_proj", "k_proj", "v_proj")]),
              "gu": ("mlp", "gate_up_proj", [f"{MLP}.{p}" for p in ("gate_proj", "up_proj")])}
    for out, (block, fused_name, parts) in groups.items():
        if fused:
            W = np.concatenate([weights[m] for m in parts], axis=0)  # [Σw, D]
            stem = f"model.layers.0.{block}.{fused_name}"
            if int4:
                packed, scales = _quantize(W)
                inits += [numpy_helper.from_array(packed, f"{stem}.MatMul.weight_Q4"),
                          numpy_helper.from_array(scales, f"{stem}.MatMul.weight_scales")]
                nodes.append(helper.make_node("MatMulNBits", ["h", f"{stem}.MatMul.weight_Q4", f"{stem}.MatMul.weight_scales"],
                                              [out], domain="com.microsoft", K=D, N=W.shape[0], bits=4, block_size=BLOCK,
                                              accuracy_level=1, name=f"/{stem}/MatMul_Q4"))
            else:
                inits.append(numpy_helper.from_array(np.ascontiguousarray(W.T), f"{stem}.MatMul.weight"))
                nodes.append(helper.make_node("MatMul", ["h", f"{stem}.MatMul.weight"], [out], name=f"/{stem}/MatMul"))
        else:
            pieces = []
            for m in parts:
                stem = m.replace(".self_attn.", ".attn.")
                inits.append(numpy_helper.from_array(np.ascontiguousarray(weights[m].T), f"{stem}.MatMul.weight"))
                nodes.append(helper.make_node("MatMul", ["h", f"{stem}.MatMul.weight"], [f"{stem}.out"], name=f"/{stem}/MatMul"))
                pieces.append(f"{stem}.out")
            nodes.append(helper.make_node("Concat", pieces, [out], axis=-1))
    graph = helper.make_graph(nodes, "genai_like", [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def adapter(modules: dict[str, int], *, seed: int = 1, name: str = "a", rslora: bool = False) -> Adapter:
    """A PEFT adapter with rank modules[m] on each module m (random A, non-zero B)."""
    rng = np.random.default_rng(seed)
    loras = {m: LoraModule(m, (rng.standard_normal((r, D)) / np.sqrt(D)).astype(np.float32),
                           (rng.standard_normal((MODULES[m], r)) * 0.5).astype(np.float32)) for m, r in modules.items()}
    config = LoraConfig(r=max(modules.values()), lora_alpha=8.0, target_modules=list(modules), use_rslora=rslora,
                        rank_pattern={m: r for m, r in modules.items()})
    return Adapter(config, loras, name=name)


def _run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


X = np.random.default_rng(5).standard_normal((2, 3, D)).astype(np.float32)
SUBSETS = [{f"{ATTN}.q_proj": 4, f"{ATTN}.k_proj": 2, f"{ATTN}.v_proj": 3},
           {f"{ATTN}.k_proj": 2},  # only the middle slice
           {f"{ATTN}.v_proj": 1, f"{MLP}.up_proj": 5},
           {f"{ATTN}.q_proj": 2, f"{MLP}.gate_proj": 3, f"{MLP}.up_proj": 2}]


def _exact(h: np.ndarray, weights, adapters, base: dict[str, np.ndarray] | None = None) -> tuple[dict, dict]:
    """(exact outputs qkv/gu in float64, the E.5 magnitude M per output) at input h, adapters applied in order."""
    h64 = h.astype(np.float64)
    exact, bound = {}, {}
    for out, parts in (("qkv", [f"{ATTN}.{p}" for p in ("q_proj", "k_proj", "v_proj")]),
                       ("gu", [f"{MLP}.{p}" for p in ("gate_proj", "up_proj")])):
        ys, ms = [], []
        for m in parts:
            W = (base or weights)[m].astype(np.float64)
            y, M = h64 @ W.T, np.abs(h64) @ np.abs(W).T
            for a in adapters:
                if m in a.modules:
                    lora, s = a.modules[m], a.scale_for(m)
                    y = y + s * (h64 @ lora.A.T.astype(np.float64)) @ lora.B.T.astype(np.float64)
                    M = M + abs(s) * (np.abs(h64) @ np.abs(lora.A.T)) @ np.abs(lora.B.T)
            ys.append(y)
            ms.append(M)
        exact[out], bound[out] = np.concatenate(ys, -1), np.concatenate(ms, -1)
    return exact, bound


def _gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


def test_checker_rejects_genai_graphs_but_onnxruntime_runs_them(tmp_path):
    model = genai_graph(_weights())
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    assert check_graph(model, where="m") == "onnxruntime"
    onnx.save(model, str(tmp_path / "m.onnx"))
    load_model(tmp_path / "m.onnx")  # accepted
    broken = genai_graph(_weights())
    broken.graph.node.append(helper.make_node("NoSuchOp", ["h"], ["z"]))
    with pytest.raises(FileFormatError, match="neither onnx.checker nor ONNX Runtime"):
        check_graph(broken, where="broken")


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), subset=st.sampled_from(SUBSETS), rslora=st.booleans(), half=st.booleans())
def test_fused_merge_is_bit_identical_to_merging_the_unfused_weights(seed, subset, rslora, half):
    weights = _weights(seed)
    dtype = np.float16 if half else np.float32  # a float16 genai model stays float16
    adapters = [adapter(subset, seed=seed, rslora=rslora), adapter({f"{ATTN}.q_proj": 2}, seed=seed + 1, name="b")]
    fused, sites = build_graph(genai_graph(weights, dtype=dtype), adapters, "merged")
    unfused, _ = build_graph(genai_graph(weights, fused=False, dtype=dtype), adapters, "merged")
    got = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    parts = {t.name: numpy_helper.to_array(t) for t in unfused.graph.initializer}
    for stem, names in (("model.layers.0.attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                        ("model.layers.0.mlp.gate_up_proj", ("gate_proj", "up_proj"))):
        block = stem.rsplit(".", 1)[0]
        expected = np.concatenate([parts[f"{block}.{n}.MatMul.weight"] for n in names], axis=1)
        assert got[f"{stem}.MatMul.weight"].dtype == expected.dtype == dtype
        assert got[f"{stem}.MatMul.weight"].tobytes() == expected.tobytes()
    assert all(s[0].fused is not None for s in sites.values())


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), subset=st.sampled_from(SUBSETS))
def test_fused_dynamic_branch_matches_the_exact_forward_per_slice(seed, subset):
    weights = _weights(seed)
    chosen = adapter(subset, seed=seed, rslora=seed % 2 == 0)
    all_modules = {m: 1 for m in MODULES}  # the graph gets every slot; the adapter fills some
    graph, _ = build_graph(genai_graph(weights), [adapter(all_modules, seed=99, name="shape")], "dynamic")
    slots = slots_from_model(graph)
    assert sorted({s.module for s in slots.values()}) == sorted([f"{ATTN}.qkv_proj", f"{MLP}.gate_up_proj"])
    layouts, scheme = read_layouts(graph, {s.module for s in slots.values()})
    tensors = adapter_tensors(chosen, slots, layouts)
    out = _run(graph, {"x": X, **tensors})
    base = _run(graph, {"x": X})
    plain = _run(genai_graph(weights), {"x": X})
    for name in ("qkv", "gu"):
        assert np.array_equal(base[name], plain[name])  # no adapter: the base bit for bit
    exact, M = _exact(out["h"], weights, [chosen])
    stacked = sum(subset.values())
    for name in ("qkv", "gu"):
        K = D + stacked + 4
        assert np.all(np.abs(out[name] - exact[name]) <= _gamma(K) * M[name]), name
    moved = np.abs(out["qkv"] - base["qkv"]).max(axis=(0, 1))
    for m, (start, stop) in ((f"{ATTN}.q_proj", (0, Q)), (f"{ATTN}.k_proj", (Q, Q + KV)), (f"{ATTN}.v_proj", (Q + KV, Q + 2 * KV))):
        assert (moved[start:stop].max() > 0) == (m in subset), m  # untouched slices stay exactly the base


def _nbits_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Module -> the weight [out, in] ORT's MatMulNBits computes with: each node alone at x = I_D gives W^T (ORT as oracle)."""
    weights = {}
    for node, parts in zip([n for n in model.graph.node if n.op_type == "MatMulNBits"],
                           ([f"{ATTN}.{p}" for p in ("q_proj", "k_proj", "v_proj")], [f"{MLP}.{p}" for p in ("gate_proj", "up_proj")])):
        alone = onnx.ModelProto.FromString(model.SerializeToString())
        del alone.graph.node[:], alone.graph.input[:], alone.graph.output[:]
        alone.graph.node.append(node)
        alone.graph.input.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [D, D]))
        alone.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
        WT = _run(alone, {"h": np.eye(D, dtype=np.float32)})[node.output[0]]
        cuts = np.cumsum([MODULES[m] for m in parts])[:-1]
        for m, part in zip(parts, np.split(WT, cuts, axis=1)):
            weights[m] = part.T
    return weights


def test_int4_base_stays_bit_for_bit_with_the_lora_beside_it():
    weights = _weights(3)
    model = genai_graph(weights, int4=True)
    a = adapter(SUBSETS[0], seed=4)
    b = adapter(SUBSETS[2], seed=5, name="b")
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    dynamic, sites = build_graph(model, [a, b], "dynamic")
    notes: dict[str, str] = {}
    merged, _ = build_graph(model, [a, b], "merged", notes=notes)
    assert all(s[0].quantized for s in sites.values())
    assert all("quantized base kept bit for bit" in notes[m] for m in sites)
    for graph in (dynamic, merged):
        after = {t.name: t.SerializeToString() for t in graph.graph.initializer}
        assert all(after[name] == blob for name, blob in before.items() if "lora" not in name)
    dequantized = _nbits_weights(model)
    slots = slots_from_model(dynamic)
    layouts, _ = read_layouts(dynamic, {s.module for s in slots.values()})
    out = _run(dynamic, {"x": X, **adapter_tensors(a, slots, layouts)})
    exact, M = _exact(out["h"], weights, [a], base=dequantized)
    for name in ("qkv", "gu"):
        assert np.all(np.abs(out[name] - exact[name]) <= _gamma(D + 9 + 4) * M[name]), name
    both = _run(merged, {"x": X})
    exact, M = _exact(both["h"], weights, [a, b], base=dequantized)
    for name in ("qkv", "gu"):
        assert np.all(np.abs(both[name] - exact[name]) <= _gamma(D + 15 + 4) * M[name]), name


@pytest.mark.parametrize("int4", [False, True], ids=["fused-float", "fused-int4"])
def test_batched_gives_each_row_its_adapter_on_fused_and_quantized_sites(int4):
    """Per-row adapters on fused qkv/gate_up sites (float and int4 MatMulNBits): row i of the batched
    graph is the exact forward with adapter index[i] (-1: the base bit for bit), bound E.5 with K =
    D + R + 4, R the largest stacked rank (the zero padding adds exact zeros)."""
    from lora_ref.export import open_session

    weights = _weights(6)
    model = genai_graph(weights, int4=int4)
    adapters = [adapter(SUBSETS[0], seed=7, name="a"), adapter(SUBSETS[2], seed=8, name="b", rslora=True),
                adapter(SUBSETS[3], seed=9, name="c")]
    graph, sites = build_graph(model, adapters, "batched")
    assert all(s[0].quantized == int4 and s[0].fused is not None for s in sites.values())
    index = np.array([0, 1, -1, 2, 1])
    x = np.random.default_rng(10).standard_normal((len(index), 3, D)).astype(np.float32)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        onnx.save(graph, str(Path(folder) / "b.onnx"))
        got = open_session(Path(folder) / "b.onnx").run_batched({"x": x}, index.tolist())
    out = dict(zip(["h", "qkv", "gu"], got))
    plain = _run(model, {"x": x})
    base = _nbits_weights(model) if int4 else None
    R = max(sum(subset.values()) for subset in (SUBSETS[0], SUBSETS[2], SUBSETS[3]))
    for row, i in enumerate(index):
        chosen = [] if i < 0 else [adapters[i]]
        exact, M = _exact(out["h"][row:row + 1], weights, chosen, base=base)
        for name in ("qkv", "gu"):
            if i < 0:
                assert np.array_equal(out[name][row], plain[name][row]), name
            else:
                assert np.all(np.abs(out[name][row:row + 1] - exact[name]) <= _gamma(D + R + 4) * M[name]), (row, name)


def test_adapter_name_schemes():
    weights = _weights()
    a = adapter(SUBSETS[0])
    names = {}
    for scheme in ("peft", "olive", "genai"):
        graph, _ = build_graph(genai_graph(weights, fused=False), [a], "dynamic", adapter_names=scheme)
        names[scheme] = sorted(slots_from_model(graph))
    assert names["peft"][0] == f"{ATTN}.k_proj.lora_A.weight"
    assert names["olive"] == names["peft"]  # paths starting "model." keep no prefix (Olive's Llama behaviour)
    assert names["genai"][0] == "model.layers.0.attn.k_proj.lora_A.MatMul.weight"


def test_olive_prefixed_adapter_file_fits_a_peft_named_graph(tmp_path):
    weights = _weights()
    a = adapter(SUBSETS[1])
    graph, _ = build_graph(genai_graph(weights, fused=False), [a], "dynamic")
    slots = slots_from_model(graph)
    tensors = adapter_tensors(a, slots)
    prefixed = {"base_model.model." + k: v for k, v in tensors.items()}
    writer = ort.AdapterFormat()  # written as Olive's convert-adapters would, outside lora-ref's checks
    writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in prefixed.items()})
    writer.export_adapter(str(tmp_path / "olive.onnx_adapter"))
    graph_path = tmp_path / "g.onnx"
    onnx.save(graph, str(graph_path))
    session = open_session(graph_path)
    loaded = session.load_adapter(tmp_path / "olive.onnx_adapter")
    assert sorted(loaded.tensors) == sorted(tensors)
    direct = session.run({"x": X}, None)
    via_file = session.run({"x": X}, loaded)
    fed = _run(graph, {"x": X, **tensors})
    assert np.array_equal(via_file[1], fed["qkv"]) and not np.array_equal(via_file[1], direct[1])


def test_convert_adapters_fits_fused_dynamic_graphs_and_refuses_what_does_not(tmp_path, capsys):
    from lora_ref import save_adapter
    from lora_ref.cli import main
    from lora_ref.export import export, read_onnx_adapter

    weights = _weights()
    a, b = adapter(SUBSETS[0], name="a"), adapter(SUBSETS[2], seed=2, name="b")
    report = export(genai_graph(weights), [a, b], "dynamic", tmp_path / "g.onnx", adapter_out=tmp_path / "exported")
    for item in (a, b):
        save_adapter(item, tmp_path / item.name)
    assert main(["convert-adapters", str(tmp_path / "a"), str(tmp_path / "b"), "--graph", str(tmp_path / "g.onnx"),
                 "-o", str(tmp_path / "converted"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["scheme"] == "peft" and sorted(printed["adapters"]) == ["a", "b"]
    for name in ("a", "b"):
        got = read_onnx_adapter(tmp_path / "converted" / f"{name}.onnx_adapter")
        want = read_onnx_adapter(report.adapter_files[name])
        assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in got)
    # a module the graph has no input for: refused, nothing written
    q = a.modules[f"{ATTN}.q_proj"]
    config = dataclasses.replace(a.config, target_modules=[*a.config.target_modules, "model.layers.1.self_attn.q_proj"])
    other = Adapter(config, {**a.modules, "model.layers.1.self_attn.q_proj": LoraModule("model.layers.1.self_attn.q_proj", q.A, q.B)},
                    name="c")
    save_adapter(other, tmp_path / "c")
    assert main(["convert-adapters", str(tmp_path / "c"), "--graph", str(tmp_path / "g.onnx"), "-o", str(tmp_path / "out")]) == 2
    assert "no LoRA input in the graph" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdapterNameError):
        adapter_tensors(other, slots_from_model(report.model), read_layouts(report.model, [f"{ATTN}.qkv_proj", f"{MLP}.gate_up_proj"])[0])


def test_fused_weight_that_cannot_be_split_and_missing_modules_are_reported():
    weights = _weights()
    wide = adapter({f"{ATTN}.q_proj": 2})
    wide.modules[f"{ATTN}.q_proj"] = LoraModule(f"{ATTN}.q_proj", wide.modules[f"{ATTN}.q_proj"].A,
                                                np.ones((Q + 2 * KV + 2, 2), np.float32))
    with pytest.raises(UnsupportedGraphError, match="cannot split the fused weight"):
        build_graph(genai_graph(weights), [wide], "merged")
    missing = adapter({f"{ATTN}.q_proj": 2})
    q = missing.modules[f"{ATTN}.q_proj"]
    missing.modules["model.layers.0.self_attn.x_proj"] = LoraModule("model.layers.0.self_attn.x_proj", q.A, q.B)
    with pytest.raises(GraphTargetNotFoundError, match="genai names: no model.layers.0.attn.x_proj.MatMul.weight"):
        build_graph(genai_graph(weights), [missing], "merged")


def test_provider_set_must_fit_the_installed_build():
    from lora_ref.export.runtime import build_mismatch, check_build

    assert check_build() is None  # this environment is consistent
    cpu_over_gpu = build_mismatch({"onnxruntime-gpu": "1.31.1", "onnxruntime": "1.32.0"}, ["CPUExecutionProvider"])
    assert "onnxruntime-gpu" in cpu_over_gpu and "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in cpu_over_gpu
    overwritten = build_mismatch({"onnxruntime-gpu": "1.31.1"}, ["CPUExecutionProvider"])
    assert "pip install --force-reinstall --no-deps onnxruntime-gpu" in overwritten
    assert build_mismatch({"onnxruntime-gpu": "1.31.1"}, ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    assert build_mismatch({"onnxruntime": "1.32.0"}, ["CPUExecutionProvider"]) is None


def test_batched_refuses_graphs_that_flatten_batch_and_sequence():
    """GPT-2's Conv1D: MatMul on Reshape(x, [-1, in]) rows; a per-row adapter cannot be placed (batched), others can."""
    from lora_ref.export import ExportConfigError

    rng = np.random.default_rng(0)
    W = (rng.standard_normal((D, 8)) / np.sqrt(D)).astype(np.float32)  # [in, out], as Conv1D stores it
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["rows"]), helper.make_node("MatMul", ["rows", "fc.weight"], ["y2"]),
             helper.make_node("Reshape", ["y2", "back"], ["y"], allowzero=0)]
    inits = [numpy_helper.from_array(np.array([-1, D], np.int64), "flat"), numpy_helper.from_array(W, "fc.weight"),
             numpy_helper.from_array(np.array([2, 3, 8], np.int64), "back")]
    graph = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fc = Adapter(LoraConfig(r=2, lora_alpha=4.0, target_modules=["fc"]),
                 {"fc": LoraModule("fc", rng.standard_normal((2, D)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32))})
    with pytest.raises(ExportConfigError, match="batch×sequence flattened"):
        build_graph(model, [fc], "batched")
    build_graph(model, [fc], "dynamic")  # a per-session adapter is fine


def test_requantize_writes_int4_merged_weights_and_reports_the_error():
    from lora_ref.export import ExportConfigError

    weights = _weights(3)
    model = genai_graph(weights, int4=True)
    a = adapter(SUBSETS[0], seed=4)
    notes: dict[str, str] = {}
    merged, sites = build_graph(model, [a], "merged", requantize=True, notes=notes)
    assert all(n.op_type != "Gemm" for n in merged.graph.node)  # no LoRA branch: the weights themselves changed
    before, after = _nbits_weights(model), _nbits_weights(merged)
    scales = {t.name: numpy_helper.to_array(t) for t in merged.graph.initializer if t.name.endswith("_scales")}
    qkv = np.abs(scales["model.layers.0.attn.qkv_proj.MatMul.weight_scales"]).astype(np.float64)  # [N, blocks]
    step = np.repeat(qkv, BLOCK, axis=1)
    errors, effects = [], []
    row = 0
    for m in (f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj"):
        lora = a.modules[m]
        delta = a.scale_for(m) * lora.B.astype(np.float64) @ lora.A.astype(np.float64)
        target = before[m].astype(np.float64) + delta
        error = np.abs(after[m] - target)
        assert np.all(error <= step[row:row + MODULES[m]] * (1 + 1e-6))  # within one quantization step
        errors.append(error.max())
        effects.append(np.abs(delta).max())
        row += MODULES[m]
    note = notes[f"{ATTN}.q_proj"]
    assert note.startswith("requantized merged weight")
    reported = float(note.split("max error ")[1].split()[0])
    assert reported == pytest.approx(max(errors), rel=1e-2)
    assert after[f"{MLP}.gate_proj"].tobytes() == before[f"{MLP}.gate_proj"].tobytes()  # untouched site
    with pytest.raises(ExportConfigError, match="merged graphs only"):
        build_graph(model, [a], "dynamic", requantize=True)


def _shared_module_graph(W: np.ndarray, second: np.ndarray) -> onnx.ModelProto:
    """ALBERT-style: module ``enc.layer.ffn`` called twice; the exporter folded one weight copy per call."""
    from lora_ref.export.locate import NAME_SCOPES_KEY

    nodes = []
    for i, (inp, out, weight) in enumerate((("x", "h1", "val_1"), ("r1", "h2", "val_2"))):
        node = helper.make_node("MatMul", [inp, weight], [out], name=f"matmul_{i}")
        node.metadata_props.add(key=NAME_SCOPES_KEY, value=repr(["", "enc", "enc.layer.ffn", f"linear_{i}"]))
        nodes.append(node)
        if i == 0:
            nodes.append(helper.make_node("Relu", ["h1"], ["r1"]))
    inits = [numpy_helper.from_array(np.ascontiguousarray(W.T), "val_1"), numpy_helper.from_array(np.ascontiguousarray(second.T), "val_2")]
    graph = helper.make_graph(nodes, "albert", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, D])],
                              [helper.make_tensor_value_info("h2", TensorProto.FLOAT, [2, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_module_used_at_several_places_gets_one_adapter_at_every_site():
    from lora_ref.checkpoint import target_delta
    from lora_ref.merge import merge

    rng = np.random.default_rng(7)
    W = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    module = "enc.layer.ffn"
    lora = LoraModule(module, (rng.standard_normal((3, D)) / np.sqrt(D)).astype(np.float32), rng.standard_normal((D, 3)).astype(np.float32))
    a = Adapter(LoraConfig(r=3, lora_alpha=6.0, target_modules=[module]), {module: lora})
    model = _shared_module_graph(W, W.copy())
    merged, sites = build_graph(model, [a], "merged")
    assert [s.weight for s in sites[module]] == ["val_1", "val_2"]
    expected = merge(W, target_delta(a, (module, "weight"), base=W)).weight  # the core's merge, as for one site
    for t in merged.graph.initializer:
        assert np.array_equal(numpy_helper.to_array(t).T.view(np.uint32), expected.view(np.uint32))
    dynamic, _ = build_graph(model, [a], "dynamic")
    x = rng.standard_normal((2, D)).astype(np.float32)
    got = _run(dynamic, {"x": x, **adapter_tensors(a, slots_from_model(dynamic))})["h2"]
    W64 = W.astype(np.float64) + a.scale_for(module) * lora.B.astype(np.float64) @ lora.A.astype(np.float64)
    exact = np.maximum(x @ W64.T, 0) @ W64.T
    assert np.allclose(got, exact, rtol=1e-4, atol=1e-4)  # two float32 layers deep: far below the adapter's effect
    assert np.abs(exact - np.maximum(x @ W.T.astype(np.float64), 0) @ W.T).max() > 1e-2
    other = W.copy()
    other[0, 0] += 1
    with pytest.raises(GraphTargetNotFoundError, match="ambiguous"):
        build_graph(_shared_module_graph(W, other), [a], "merged")  # different values: not one module's copies


def test_cli_exports_a_genai_folder_and_refuses_writing_over_it(tmp_path, capsys):
    """`lora-ref export GENAI_DIR ...` through the path guard: the folder's graph, external data and
    config are inputs; an output folder elsewhere gets the graph and the adapter files; the input
    folder itself as output is refused (exit 2) with every input byte unchanged."""
    from lora_ref import save_adapter
    from lora_ref.cli import main

    folder = tmp_path / "genai"
    folder.mkdir()
    onnx.save(genai_graph(_weights()), str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    save_adapter(adapter(SUBSETS[0], name="a"), tmp_path / "a")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["export", str(folder), str(tmp_path / "a"), "--mode", "dynamic", "-o", str(tmp_path / "out")]) == 0
    assert {"model.onnx", "genai_config.json", "a.onnx_adapter"} <= {p.name for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert main(["export", str(folder), str(tmp_path / "a"), "--mode", "dynamic", "-o", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-ref: error: ") and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_dynamic_dora_refuses_fused_and_quantized_sites():
    """DoRA's in-graph norm needs the module's own float weight: a fused slice (float or int4 MatMulNBits) has none."""
    plain = adapter(SUBSETS[1])
    lora = next(iter(plain.modules.values()))
    dora = Adapter(dataclasses.replace(plain.config, use_dora=True),
                   {lora.name: dataclasses.replace(lora, magnitude=np.ones(lora.B.shape[0], np.float32))}, name="d")
    for graph in (genai_graph(_weights()), genai_graph(_weights(), int4=True)):
        with pytest.raises(UnsupportedGraphError, match="DoRA needs the float base weight"):
            build_graph(graph, [dora], "dynamic")
