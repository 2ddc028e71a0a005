"""QDQ bases (``DequantizeLinear`` -> ``MatMul``) as ONNX Runtime's own quantizers write them.

A two-layer MLP (fc1: D -> H, ReLU, fc2: H -> O) is quantized by onnxruntime.quantization:
``quantize_static`` (QDQ format; int8 / uint8 weights, per-tensor or per-channel, activations
fake-quantized too) and ``MatMulNBitsQuantizer`` with ``quant_format=QDQ`` (weight-only int4 /
uint4, blocks of 16 along K, symmetric or with zero points). For every format:

* dynamic and merged (default) graphs keep every base initializer byte for byte and put the float
  LoRA branch beside the quantized MatMul; each site's output is checked from its own input
  against the float64 reference on the dequantized base W = DequantizeLinear(q) (ORT's own
  DequantizeLinear, run alone, is the oracle for W), with the bound of SPEC E.5:
  |ŷ − y| ≤ γ_K · (|x||W|^T + |s|(|x||A^T|)|B^T|), K = in + Σr + 4;
* ``--requantize`` writes Q(W + Δ) in the input's format (integer type, grouping, zero points),
  each element within half a (new) step of W + Δ, and the export report gives the max error.

The same MLP and a torch MLP exported by the dynamo exporter, quantized by ``quantize_dynamic``
(MatMulInteger; int8 / uint8 weights, per tensor or per column; also as ORT fuses it into
DynamicQuantizeMatMul), are checked the same way (the bounds: the comment before those tests), the
second through the CLI against PEFT on the dequantized weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_peer

ort = require_peer("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lora_ref.adapter import Adapter, LoraModule  # noqa: E402
from lora_ref.config import LoraConfig  # noqa: E402
from lora_ref.export import adapter_tensors, build_graph, slots_from_model  # noqa: E402
from lora_ref.numerics import gamma  # noqa: E402

D, H, O = 32, 48, 24  # noqa: E741
U32 = 2.0**-24
RNG = np.random.default_rng(11)
W1 = (RNG.standard_normal((D, H)) / np.sqrt(D)).astype(np.float32)  # [in, out], as MatMul reads it
W2 = (RNG.standard_normal((H, O)) / np.sqrt(H)).astype(np.float32)
X = RNG.standard_normal((3, D)).astype(np.float32)
FORMATS = ["int8-tensor", "int8-channel", "uint8-tensor", "int4-sym", "uint4-asym"]


def _float_model() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "fc2.weight"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", O])],
                              [numpy_helper.from_array(W1, "fc1.weight"), numpy_helper.from_array(W2, "fc2.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


_CACHE: dict[str, onnx.ModelProto] = {}


def quantized_model(fmt: str, tmp_path_factory) -> onnx.ModelProto:
    """The MLP quantized by ONNX Runtime's quantizer in format ``fmt`` (cached per session)."""
    if fmt in _CACHE:
        return _CACHE[fmt]
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    folder = tmp_path_factory.mktemp(fmt)
    if fmt.startswith("int4") or fmt.startswith("uint4"):
        quantizer = MatMulNBitsQuantizer(_float_model(), block_size=16, is_symmetric=fmt == "int4-sym", quant_format=QuantFormat.QDQ)
        quantizer.process()
        model = quantizer.model.model
    else:
        class Reader(CalibrationDataReader):
            def __init__(self):
                rng = np.random.default_rng(0)
                self.feeds = iter([{"x": rng.standard_normal((4, D)).astype(np.float32)} for _ in range(4)])

            def get_next(self):
                return next(self.feeds, None)

        onnx.save(_float_model(), str(folder / "f.onnx"))
        weight = QuantType.QUInt8 if fmt.startswith("uint8") else QuantType.QInt8
        quantize_static(str(folder / "f.onnx"), str(folder / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=fmt.endswith("channel"), weight_type=weight, activation_type=QuantType.QUInt8)
        model = onnx.load(str(folder / "q.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    _CACHE[fmt] = model
    return model


@pytest.fixture(params=FORMATS)
def qdq(request, tmp_path_factory):
    return quantized_model(request.param, tmp_path_factory)


def lora_adapter(seed: int, name: str, ranks=(3, 2)) -> Adapter:
    """fc1 (rank ranks[0]) and fc2 (rank ranks[1]); B large enough that the adapter's effect is visible."""
    rng = np.random.default_rng(seed)
    modules = {"fc1": LoraModule("fc1", (rng.standard_normal((ranks[0], D)) / np.sqrt(D)).astype(np.float32),
                                 (rng.standard_normal((H, ranks[0])) * 0.2).astype(np.float32)),
               "fc2": LoraModule("fc2", (rng.standard_normal((ranks[1], H)) / np.sqrt(H)).astype(np.float32),
                                 (rng.standard_normal((O, ranks[1])) * 0.2).astype(np.float32))}
    config = LoraConfig(r=max(ranks), lora_alpha=4.0, target_modules=["fc1", "fc2"], rank_pattern={"fc1": ranks[0], "fc2": ranks[1]})
    return Adapter(config, modules, name=name)


def _session(model: onnx.ModelProto, outputs=(), literal: bool = False) -> ort.InferenceSession:
    """A CPU session with extra ``outputs``; ``literal``: graph optimizations off (each op as written, no QDQ fusion)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs if n not in known)
    options = ort.SessionOptions()
    if literal:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, feeds: dict, outputs=(), literal: bool = False) -> dict[str, np.ndarray]:
    session = _session(model, outputs, literal)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def dequantized(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Module -> W [out, in] as ORT's DequantizeLinear computes it: each weight's DQ node run alone (the oracle)."""
    weights = {}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or len(inits[node.input[0]].dims) != 2:
            continue
        alone = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
                                  [inits[n] for n in node.input if n])
        m = helper.make_model(alone, opset_imports=model.opset_import)
        m.ir_version = model.ir_version
        weights[node.input[0].split(".")[0]] = _run(m, {})[node.output[0]].T
    assert sorted(weights) == ["fc1", "fc2"]
    return weights


def _fake_quantized_output(model: onnx.ModelProto, y: str) -> str | None:
    """The DequantizeLinear output after y -> QuantizeLinear -> DequantizeLinear in ``model``, else None."""
    readers = lambda name: [n for n in model.graph.node if name in n.input]  # noqa: E731
    q = readers(y)
    if len(q) == 1 and q[0].op_type == "QuantizeLinear":
        dq = readers(q[0].output[0])
        if len(dq) == 1 and dq[0].op_type == "DequantizeLinear":
            return dq[0].output[0]
    return None


def check_sites(graph: onnx.ModelProto, model: onnx.ModelProto, sites, feeds, base: dict[str, np.ndarray], adapters,
                literal: bool, per_row: list | None = None) -> None:
    """Each site's output vs the float64 reference on the dequantized base, from its own input (module docstring).

    ``literal`` (no graph optimizations), weight-only QDQ: y = x·W^T + LoRA with W the dequantized
    weight, K = in + Σr + 4. Otherwise y = C + LoRA with C the base layer's own output (ORT fuses
    DQ → MatMul into MatMulNBits, whose default accuracy level rounds x to int8, so C is not x·W^T
    to float rounding; a fake-quantized output DQ(Q(y0)) gets the LoRA after it, SPEC E.6), with
    the bound γ_K·(|C| + |s||x||A^T||B^T|). ``per_row`` (a batched graph): the adapters of each
    row instead of ``adapters`` for all; K then counts the largest rank (zero padding adds zeros).
    """
    names = [n for module in ("fc1", "fc2") for n in (sites[module][0].x, sites[module][0].y)]
    final = {m: _fake_quantized_output(model, sites[m][0].y) or sites[m][0].y for m in ("fc1", "fc2")}
    based = [f"{final[m]}.base" for m in final]  # the base layer's output, renamed by the export
    out = _run(graph, feeds, [*names, *final.values(), *based], literal)
    for module in ("fc1", "fc2"):
        site = sites[module][0]
        x = out[site.x].astype(np.float64)
        W = base[module].astype(np.float64)
        lora_exact, M = np.zeros((x.shape[0], site.out_features)), np.zeros((x.shape[0], site.out_features))
        rows = per_row or [adapters] * x.shape[0]
        rank = 0
        for row, chosen in enumerate(rows):
            for a in chosen:
                lora, s = a.modules[module], a.scale_for(module)
                lora_exact[row] += s * (x[row] @ lora.A.T.astype(np.float64)) @ lora.B.T.astype(np.float64)
                M[row] += abs(s) * (np.abs(x[row]) @ np.abs(lora.A.T)) @ np.abs(lora.B.T)
            rank = max(rank, sum(a.modules[module].rank for a in chosen))
        K = site.in_features + rank + 4
        if final[module] == site.y and literal and site.integer is None:  # weight-only: the float reference on W
            exact, M = x @ W.T + lora_exact, M + np.abs(x) @ np.abs(W).T
        else:
            C = out[f"{final[module]}.base"].astype(np.float64)
            exact, M = C + lora_exact, M + np.abs(C)
        bound = gamma(K, U32) * M
        assert np.all(np.abs(out[final[module]] - exact) <= bound), module
        assert np.abs(lora_exact).max() > 100 * bound.max()  # the adapter's effect is far above the tolerance


def _base_bytes(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def test_dynamic_and_merged_keep_the_quantized_base_and_match_the_reference(qdq):
    a, b = lora_adapter(1, "a"), lora_adapter(2, "b", ranks=(1, 4))
    before = _base_bytes(qdq)
    base = dequantized(qdq)
    dynamic, sites = build_graph(qdq, [a, b], "dynamic")
    assert all(s[0].quantized and s[0].dequantize is not None for s in sites.values())
    notes: dict[str, str] = {}
    merged, _ = build_graph(qdq, [a, b], "merged", notes=notes)
    assert all("quantized base kept bit for bit" in notes[m] for m in ("fc1", "fc2"))
    for graph in (dynamic, merged):
        after = _base_bytes(graph)
        assert all(after[name] == blob for name, blob in before.items())
    slots = slots_from_model(dynamic)
    for literal in (True, False):
        check_sites(dynamic, qdq, sites, {"x": X, **adapter_tensors(a, slots)}, base, [a], literal)
        check_sites(merged, qdq, sites, {"x": X}, base, [a, b], literal)
    # rank-0 defaults: the base model's output bit for bit, op by op; statically quantized graphs also with
    # ORT's QDQ fusion on (the base node groups are untouched). Weight-only int4 is not compared optimized:
    # ORT chooses per node whether to fuse DQ -> MatMul into MatMulNBits (int8 activations), and
    # chose differently for the base graph's first layer (seen with onnxruntime 1.31).
    assert np.array_equal(_run(dynamic, {"x": X}, (), True)["y"], _run(qdq, {"x": X}, (), True)["y"])
    if _fake_quantized_output(qdq, sites["fc1"][0].y):
        assert np.array_equal(_run(dynamic, {"x": X})["y"], _run(qdq, {"x": X})["y"])


def test_batched_rows_get_their_adapters_beside_the_quantized_base(qdq):
    adapters = [lora_adapter(4, "a"), lora_adapter(5, "b", ranks=(1, 4))]
    graph, sites = build_graph(qdq, adapters, "batched")
    before = _base_bytes(qdq)
    after = _base_bytes(graph)
    assert all(after[name] == blob for name, blob in before.items())
    index = np.array([1, -1, 0], np.int64)
    per_row = [[adapters[i]] if i >= 0 else [] for i in index]
    base = dequantized(qdq)
    for literal in (True, False):
        check_sites(graph, qdq, sites, {"x": X, "adapter_index": index}, base, [], literal, per_row)
    plain = _run(qdq, {"x": X}, (), True)["y"]
    assert np.array_equal(_run(graph, {"x": X, "adapter_index": index}, (), True)["y"][1], plain[1])  # -1: the base


def test_requantize_keeps_the_format_and_reports_the_error(qdq):
    a = lora_adapter(3, "a")
    notes: dict[str, str] = {}
    merged, sites = build_graph(qdq, [a], "merged", requantize=True, notes=notes)
    assert not any(n.op_type == "Gemm" for n in merged.graph.node)  # no LoRA branch: the weights changed
    old, new = {t.name: t for t in qdq.graph.initializer}, {t.name: t for t in merged.graph.initializer}
    assert sorted(old) == sorted(new)
    for name, tensor in old.items():
        assert (new[name].data_type, list(new[name].dims)) == (tensor.data_type, list(tensor.dims)), name
    nodes = {n.name: n for n in qdq.graph.node}
    assert all(n.SerializeToString() == nodes[n.name].SerializeToString() for n in merged.graph.node)  # same graph, new values
    before, after = dequantized(qdq), dequantized(merged)
    for module in ("fc1", "fc2"):
        site = sites[module][0]
        dq = merged.graph.node[site.dequantize]
        lora = a.modules[module]
        delta = a.scale_for(module) * lora.B.astype(np.float64) @ lora.A.astype(np.float64)
        target = before[module].astype(np.float64) + delta
        scale = np.abs(numpy_helper.to_array(new[dq.input[1]]).astype(np.float64))
        axis = next((helper.get_attribute_value(x) for x in dq.attribute if x.name == "axis"), 1)
        block = next((helper.get_attribute_value(x) for x in dq.attribute if x.name == "block_size"), 0)
        stored = np.repeat(scale, block, axis=axis)[:D if module == "fc1" else H] if block else (
            scale.reshape((1, -1) if axis == 1 else (-1, 1)) if scale.size > 1 else scale)
        step = np.broadcast_to(stored, target.T.shape).T  # [out, in], as target
        error = np.abs(after[module] - target)
        # rint to the nearest level: half a step (the scale is rounded to float32 first, so a level may
        # sit 2^-23 relative off), then DequantizeLinear's rounding u·|W'|. ORT's int4 rule (negative
        # scales: the largest magnitude a -> level -8) clips -a to +7: one whole step there.
        levels = 1.0 if np.any(numpy_helper.to_array(old[dq.input[1]]) < 0) else 0.5
        assert np.all(error <= step * (levels + 2**-20) + U32 * np.abs(after[module])), module
        reported = float(notes[module].split("max error ")[1].split()[0])
        assert reported == pytest.approx(error.max(), rel=1e-2, abs=1e-7)
    out = _run(merged, {"x": X}, [sites["fc1"][0].y])
    assert np.isfinite(out["y"]).all()


@pytest.mark.parametrize("qdq_format", [False, True], ids=["MatMulNBits", "QDQ"])
def test_quantized_weights_of_a_dynamo_style_graph_are_found_by_name_scopes(qdq_format):
    """torch's dynamo exporter names weights val_N and records module paths as node metadata: ORT's int4 quantizer
    keeps the MatMul (QDQ) or replaces it by MatMulNBits (whose scope ort_int4 copies back); both are found."""
    from lora_ref.export import locate_targets
    from lora_ref.export.locate import NAME_SCOPES_KEY
    from lora_ref.export.models import ort_int4

    model = _float_model()
    for node, module, weight in zip([n for n in model.graph.node if n.op_type == "MatMul"], ("fc1", "fc2"), ("val_1", "val_2")):
        node.metadata_props.add(key=NAME_SCOPES_KEY, value=repr(["", module, "linear"]))
        old = node.input[1]
        node.input[1] = weight
        next(t for t in model.graph.initializer if t.name == old).name = weight
    quantized = ort_int4(model, qdq=qdq_format, block_size=16)
    sites = locate_targets(quantized, ["fc1", "fc2"])
    assert all(s[0].found_by == "name scopes" and s[0].quantized for s in sites.values())
    assert all((s[0].dequantize is not None) == qdq_format for s in sites.values())
    a = lora_adapter(8, "a")
    dynamic, _ = build_graph(quantized, [a], "dynamic")
    plain = _run(quantized, {"x": X}, (), True)["y"]
    out = _run(dynamic, {"x": X, **adapter_tensors(a, slots_from_model(dynamic))}, (), True)["y"]
    assert np.isfinite(out).all() and not np.array_equal(out, plain)


def test_requantize_refuses_a_qdq_weight_that_another_node_reads():
    """Requantizing q would change the other reader too: refused (typed), the default export still works."""
    from lora_ref.export import UnsupportedGraphError
    from lora_ref.export.models import ort_int4

    model = ort_int4(_float_model(), qdq=True, block_size=16)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("fc1"))
    twin = helper.make_node("DequantizeLinear", list(dq.input), ["fc1_twin"], axis=0, block_size=16)
    model.graph.node.append(twin)
    model.graph.output.append(helper.make_tensor_value_info("fc1_twin", TensorProto.FLOAT, None))
    a = lora_adapter(9, "a")
    with pytest.raises(UnsupportedGraphError, match="also read by other nodes"):
        build_graph(model, [a], "merged", requantize=True)
    merged, _ = build_graph(model, [a], "merged")
    assert _base_bytes(model).items() <= _base_bytes(merged).items()


# --- dynamically quantized bases (quantize_dynamic: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul) ---
#
# The activation is quantized to uint8 at run time, per tensor: x̂ = s_x·(clip(rint(x/s_x) + z_x, 0, 255) − z_x)
# with s_x = (max(0, max x) − min(0, min x)) / 255 and z_x = rint(−min(0, min x)/s_x), so |x − x̂| ≤ s_x/2 where
# nothing clips and ≤ s_x at the clipped ends (z_x's own rounding moves the grid by up to s_x/2). The base output
# C = fl(acc · fl(s_x·s_w)), acc = Σ (x_q − z_x)(q − z) exact in int32 and here in the float32 cast (|acc| ≤ in·255·255
# < 2^24), so |C − x̂·W^T| ≤ γ_2·|x̂||W|^T with W = (q − z)·s_w exactly. The export leaves C alone: each site is
# checked as ŷ = C + LoRA (check_sites, the float bound of E.5 with C for the base), which isolates the adapter's
# effect from the activation's quantization; the oracle test below checks C itself against x·W^T too.

DYNAMIC_FORMATS = ["int8-tensor", "int8-channel", "uint8-tensor", "uint8-channel", "fused", "fused-shared"]
_DYNAMIC_CACHE: dict[str, onnx.ModelProto] = {}


def _skip_model() -> onnx.ModelProto:
    """The MLP plus a skip MatMul from x (y = fc2(relu(fc1 x)) + x·W_skip): fc1 and the skip share x's quantization."""
    model = _float_model()
    model.graph.node[-1].output[0] = "y_mlp"
    W_skip = (np.random.default_rng(12).standard_normal((D, O)) / np.sqrt(D)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(W_skip, "skip.weight"))
    model.graph.node.extend([helper.make_node("MatMul", ["x", "skip.weight"], ["y_skip"], name="skip"),
                             helper.make_node("Add", ["y_mlp", "y_skip"], ["y"])])
    return model


def dynamic_quantized_model(fmt: str, tmp_path_factory) -> onnx.ModelProto:
    """The MLP quantized by ``quantize_dynamic``, cached per session. ``fused``: int8 per column, saved after ORT's
    own optimizer, which fuses each site into one DynamicQuantizeMatMul; ``fused-shared``: the same of the MLP
    with a skip MatMul sharing fc1's input, whose shared DynamicQuantizeLinear ORT keeps, fusing the rest of fc1
    (and the skip) into MatMulIntegerToFloat."""
    from lora_ref.export.models import ort_dynamic

    if fmt in _DYNAMIC_CACHE:
        return _DYNAMIC_CACHE[fmt]
    model = ort_dynamic(_skip_model() if fmt == "fused-shared" else _float_model(),
                        per_channel=fmt not in ("int8-tensor", "uint8-tensor"), signed=not fmt.startswith("uint8"))
    if fmt.startswith("fused"):
        path = tmp_path_factory.mktemp("fused") / "fused.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(path)
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(path))
        fc1 = ["DynamicQuantizeLinear", "MatMulIntegerToFloat"] if fmt == "fused-shared" else ["DynamicQuantizeMatMul"]
        assert [n.op_type for n in model.graph.node][:len(fc1) + 2] == [*fc1, "Relu", "DynamicQuantizeMatMul"]
    else:
        assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == 2
    _DYNAMIC_CACHE[fmt] = model
    return model


@pytest.fixture(params=DYNAMIC_FORMATS)
def dynamic_quantized(request, tmp_path_factory):
    return dynamic_quantized_model(request.param, tmp_path_factory)


def integer_dequantized(model: onnx.ModelProto, sites) -> dict[str, np.ndarray]:
    """Module -> W [out, in] = ORT's DequantizeLinear(q, s_w, z; axis 1) run alone on the site's initializers
    (float32: (q − z)·s_w rounded once, the oracle within u_32 of the exact product)."""
    inits = {t.name: t for t in model.graph.initializer}
    weights = {}
    for module, (site, *_) in sites.items():
        node = model.graph.node[site.integer]
        if node.op_type == "MatMulInteger":  # Mul(x_scale, w_scale) feeds the site's Mul: its initializer factor
            products = [n for n in model.graph.node if n.op_type == "Mul" and n.output[0] in model.graph.node[site.node].input]
            scale, zero = next(name for name in products[0].input if name in inits), node.input[3]
        else:  # ORT's operand order (com.microsoft)
            scale, zero = (node.input[2], node.input[3]) if node.op_type == "DynamicQuantizeMatMul" else (node.input[3], node.input[5])
        dq = helper.make_node("DequantizeLinear", [node.input[1], scale, zero], ["W"], axis=1)
        alone = helper.make_graph([dq], "dq", [], [helper.make_tensor_value_info("W", TensorProto.FLOAT, None)],
                                  [inits[node.input[1]], inits[scale], inits[zero]])
        m = helper.make_model(alone, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        weights[module] = _run(m, {})["W"].T
    return weights


def test_dynamic_quantization_sites_keep_the_base_and_add_the_lora_beside_it(dynamic_quantized):
    from lora_ref.export import locate_targets
    from lora_ref.export.quantized import dequantize

    model = dynamic_quantized
    sites = locate_targets(model, ["fc1", "fc2"])
    assert {m: (s[0].x, s[0].y[0], s[0].quantized, s[0].layout) for m, s in sites.items()} == {
        "fc1": ("x", "h", True, "in_out"), "fc2": ("r", "y", True, "in_out")}  # y, or y_mlp before the skip's Add
    base = integer_dequantized(model, sites)
    for module in ("fc1", "fc2"):  # the exporter's exact W against ORT's DequantizeLinear (rounded once to float32)
        W = dequantize(model.graph, sites[module][0])
        assert np.all(np.abs(W - base[module]) <= U32 * np.abs(W)), module
    a, b = lora_adapter(1, "a"), lora_adapter(2, "b", ranks=(1, 4))
    before = _base_bytes(model)
    notes: dict[str, str] = {}
    dynamic, _ = build_graph(model, [a, b], "dynamic")
    merged, _ = build_graph(model, [a, b], "merged", notes=notes)
    batched, _ = build_graph(model, [a, b], "batched")
    assert all("quantized base kept bit for bit" in notes[m] for m in ("fc1", "fc2"))
    for graph in (dynamic, merged, batched):
        after = _base_bytes(graph)
        assert all(after[name] == blob for name, blob in before.items())
    slots = slots_from_model(dynamic)
    index = np.array([1, -1, 0], np.int64)
    for literal in (True, False):  # op by op, and with ORT's fusions (MatMulIntegerToFloat / DynamicQuantizeMatMul)
        check_sites(dynamic, model, sites, {"x": X, **adapter_tensors(a, slots)}, base, [a], literal)
        check_sites(merged, model, sites, {"x": X}, base, [a, b], literal)
        check_sites(batched, model, sites, {"x": X, "adapter_index": index}, base, [], literal,
                    [[[a, b][i]] if i >= 0 else [] for i in index])
        # no adapter: the base graph's output bit for bit (rank-0 defaults; every row -1). Rows interact through
        # the activation's per-tensor scale, so a -1 row next to adapted rows is not the base row: not compared.
        plain = _run(model, {"x": X}, (), literal)["y"]
        assert np.array_equal(_run(dynamic, {"x": X}, (), literal)["y"], plain)
        assert np.array_equal(_run(batched, {"x": X, "adapter_index": np.full(3, -1, np.int64)}, (), literal)["y"], plain)


def test_requantize_writes_int8_merged_weights_in_the_same_scheme(dynamic_quantized):
    """Q(W + Δ) keeps the weight's type, per-tensor / per-column scales and zero points: each element within half a
    new step of W + Δ (the scale rounded to float32 first: a level may sit 2^-23 relative off); the report's max error."""
    model = dynamic_quantized
    a = lora_adapter(3, "a")
    notes: dict[str, str] = {}
    merged, sites = build_graph(model, [a], "merged", requantize=True, notes=notes)
    assert [n.op_type for n in merged.graph.node] == [n.op_type for n in model.graph.node]  # no LoRA branch
    old, new = {t.name: t for t in model.graph.initializer}, {t.name: t for t in merged.graph.initializer}
    assert {n: (t.data_type, list(t.dims)) for n, t in old.items()} == {n: (t.data_type, list(t.dims)) for n, t in new.items()}
    before, after = integer_dequantized(model, sites), integer_dequantized(merged, sites)
    for module in ("fc1", "fc2"):
        lora = a.modules[module]
        target = before[module].astype(np.float64) + a.scale_for(module) * lora.B.astype(np.float64) @ lora.A.astype(np.float64)
        node = merged.graph.node[sites[module][0].integer]
        scale = sites[module][0].integer_operands[0]
        step = np.abs(numpy_helper.to_array(new[scale]).astype(np.float64)).reshape(-1, 1)  # per out row
        error = np.abs(after[module] - target)
        # ± u_32|W| twice: the oracle's and the target's float32 DequantizeLinear roundings
        assert np.all(error <= step * (0.5 + 2**-20) + 2 * U32 * (np.abs(after[module]) + np.abs(target))), module
        reported = float(notes[module].split("max error ")[1].split()[0])
        assert reported == pytest.approx(error.max(), rel=1e-2, abs=1e-6)
        assert numpy_helper.to_array(new[node.input[1]]).dtype == numpy_helper.to_array(old[node.input[1]]).dtype
    assert np.isfinite(_run(merged, {"x": X})["y"]).all()


def test_dynamic_quantized_sites_refuse_what_they_cannot_serve():
    """float16 (DynamicQuantizeLinear reads float32 only) and DoRA (no float weight for the norm): typed errors naming
    the modules; a MatMulInteger outside quantize_dynamic's arrangement is no site, and the error says why."""
    from lora_ref.export import ExportConfigError, UnsupportedGraphError

    model = dynamic_quantized_model("int8-channel", None)
    a = lora_adapter(6, "a")
    with pytest.raises(ExportConfigError, match=r"float16.*'fc1'.*dynamically quantized"):
        build_graph(model, [a], "dynamic", dtype="float16")
    dora = Adapter(LoraConfig(r=3, lora_alpha=4.0, target_modules=["fc1"], use_dora=True),
                   {"fc1": LoraModule("fc1", a.modules["fc1"].A, a.modules["fc1"].B, magnitude=np.ones(H, np.float32))}, name="d")
    with pytest.raises(UnsupportedGraphError, match="fc1.*DoRA"):
        build_graph(model, [dora], "dynamic")
    odd = onnx.ModelProto.FromString(model.SerializeToString())
    cast = next(n for n in odd.graph.node if n.op_type == "Cast" and n.input[0].startswith("h"))
    odd.graph.output.append(helper.make_tensor_value_info(cast.output[0], TensorProto.FLOAT, None))  # a second reader
    with pytest.raises(UnsupportedGraphError, match=r"fc1: weight .fc1.weight_quantized.*cannot take a LoRA there: MatMulInteger .*cast output is not read by one Mul alone"):
        build_graph(odd, [a], "dynamic")
    shared = onnx.ModelProto.FromString(model.SerializeToString())  # a second, raw use of fc1's weight beside its site
    integer = next(n for n in shared.graph.node if n.op_type == "MatMulInteger" and n.input[1] == "fc1.weight_quantized")
    shared.graph.node.append(helper.make_node("MatMulInteger", list(integer.input), ["raw"], name="raw_use"))
    shared.graph.output.append(helper.make_tensor_value_info("raw", TensorProto.INT32, None))
    with pytest.raises(UnsupportedGraphError, match=r"fc1: .*MatMulInteger 'raw_use': its output is not read by one Cast"):
        build_graph(shared, [a], "merged")


@pytest.fixture(scope="module")
def dynamo_mlp(torch, tmp_path_factory):
    """A torch MLP with biases (fc1: D -> H, ReLU, fc2: H -> O) on x [2, 3, D], exported by torch's dynamo exporter
    (anonymous weights ``val_N``, modules in name scopes), and the module."""
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(D, H), torch.nn.Linear(H, O)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    module = MLP().eval()
    path = tmp_path_factory.mktemp("dynamo") / "mlp.onnx"
    torch.onnx.export(module, (torch.randn(2, 3, D),), str(path), dynamo=True)
    return onnx.load(str(path)), module


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_quantize_dynamic_of_a_dynamo_graph_matches_peft_on_the_dequantized_base(dynamo_mlp, torch, tmp_path, per_channel):
    """The CLI's merged, dynamic and batched graphs of a quantize_dynamic'd dynamo export against PEFT in float64 on the
    dequantized weights W (ORT's DequantizeLinear), each site from its own input x (bounds: the comment above):

    * the adapter's effect alone: |(ŷ − C) − L| ≤ γ_K·(|C| + |s||x||A^T||B^T|) − with ŷ − C taken as one value:
      |ŷ − (C + L)| ≤ the same, L = PEFT's LoRA term, C the site's base output in the same run, K = in + r + 4;
    * the whole site: |ŷ − y_PEFT| ≤ s_x·(1 + 2^-20)·|W|·1 + γ_{K+1}·((|x| + s_x)|W|^T + |s||x||A^T||B^T|) (the
      activation's quantization, then the float roundings; +1: the oracle's float32 W);
    * the base alone (SPEC E.7): |C − x·W^T| ≤ s_x·(1 + 2^-20)·|W|·1 + γ_3·(|x| + s_x)|W|^T (SPEC's γ_3 is γ_2
      here, |acc| < in·255² < 2^24, plus the oracle's float32 W);
    * the first site's C is the quantized graph's own output bit for bit (same input, base untouched);
    * ``--requantize`` through the CLI: the report names the requantized merged weight per module.
    """
    import copy
    import json

    import peft

    from lora_ref import load_adapter
    from lora_ref.cli import main
    from lora_ref.export import locate_targets
    from lora_ref.export.models import ort_dynamic

    graph, module = dynamo_mlp
    quantized = ort_dynamic(graph, per_channel=per_channel)
    sites = locate_targets(quantized, ["fc1", "fc2"])
    assert all(s[0].found_by == "name scopes" and s[0].integer is not None for s in sites.values())
    W = integer_dequantized(quantized, sites)
    torch.manual_seed(3)
    tuned = peft.get_peft_model(copy.deepcopy(module), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    for name, p in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    tuned.save_pretrained(str(tmp_path / "adapter"))
    oracle = tuned.double()
    for name in ("fc1", "fc2"):  # PEFT on the dequantized base, without the base bias (the site ends before it)
        layer = getattr(oracle.base_model.model, name)
        layer.base_layer.weight.data = torch.from_numpy(W[name].astype(np.float64))
        layer.base_layer.bias.data.zero_()
    (tmp_path / "q.onnx").write_bytes(quantized.SerializeToString())
    x = np.random.default_rng(4).standard_normal((2, 3, D)).astype(np.float32)
    plain = _run(quantized, {"x": x}, [sites["fc1"][0].y])
    adapter = load_adapter(tmp_path / "adapter")
    for mode in ("merged", "dynamic", "batched"):
        out_path, report = tmp_path / f"{mode}.onnx", tmp_path / f"{mode}.json"
        assert main(["export", str(tmp_path / "q.onnx"), str(tmp_path / "adapter"), "--mode", mode, "-o", str(out_path),
                     "--json", str(report)]) == 0
        notes = json.loads(report.read_text())["notes"]
        assert all("quantized base kept bit for bit" in notes[m] for m in ("fc1", "fc2")), notes
        exported = onnx.load(str(out_path))
        feeds = {"x": x}
        rows = np.ones((2, 1, 1))
        if mode == "dynamic":
            feeds.update(adapter_tensors(adapter, slots_from_model(exported)))
        elif mode == "batched":
            feeds["adapter_index"] = np.array([-1, 0], np.int64)
            rows = np.array([0.0, 1.0]).reshape(2, 1, 1)  # row 0: no adapter
        names = [n for m in ("fc1", "fc2") for n in (sites[m][0].x, sites[m][0].y, f"{sites[m][0].y}.base")]
        out = _run(exported, feeds, names)
        assert np.array_equal(out[f"{sites['fc1'][0].y}.base"], plain[sites["fc1"][0].y])
        for name in ("fc1", "fc2"):
            site, layer = sites[name][0], getattr(oracle.base_model.model, name)
            xs = torch.from_numpy(out[site.x].astype(np.float64))
            with torch.no_grad():
                base = layer.base_layer(xs).numpy()
                lora = (layer(xs).numpy() - base) * rows
            s = layer.scaling["default"]
            A, B = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
            xa = np.abs(out[site.x].astype(np.float64))
            lora_m = abs(s) * (xa @ np.abs(A).T) @ np.abs(B).T * rows
            y, C = out[site.y].astype(np.float64), out[f"{site.y}.base"].astype(np.float64)
            K = site.in_features + tuned.peft_config["default"].r + 4
            assert np.all(np.abs(y - (C + lora)) <= gamma(K, U32) * (np.abs(C) + lora_m)), (mode, name)
            assert np.abs(lora).max() > 100 * (gamma(K, U32) * (np.abs(C) + lora_m)).max()  # the effect is visible
            step = (max(0.0, out[site.x].max()) - min(0.0, out[site.x].min())) / 255  # s_x, DynamicQuantizeLinear's
            Wa = np.abs(W[name].astype(np.float64))
            bound = step * (1 + 2**-20) * Wa.sum(axis=1) + gamma(K + 1, U32) * ((xa + step) @ Wa.T + lora_m)
            assert np.all(np.abs(C - base) <= step * (1 + 2**-20) * Wa.sum(axis=1) + gamma(3, U32) * (xa + step) @ Wa.T)
            assert np.all(np.abs(y - (base + lora)) <= bound), (mode, name)
            assert np.abs(lora).max() > 2 * bound.max()  # the adapter's effect stands above the activation's rounding
    report = tmp_path / "requantized.json"
    assert main(["export", str(tmp_path / "q.onnx"), str(tmp_path / "adapter"), "--mode", "merged", "--requantize",
                 "-o", str(tmp_path / "requantized.onnx"), "--json", str(report)]) == 0
    notes = json.loads(report.read_text())["notes"]
    assert all(notes[m].startswith("requantized merged weight: max error") for m in ("fc1", "fc2")), notes
