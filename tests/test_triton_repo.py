"""Triton model repositories written by lora_ref.export.triton, without a server (default CI).

The server end to end and the protobuf parse of every config are in tests/test_triton.py
(LORA_REF_TRITON=1, scripts/test_triton.sh). Here: the layout and its versions, the adapter
maps, the padding probe on a per-token graph (safe) and on one that mixes positions (not),
the in-graph adapter_index check (an invalid value fails the ONNX Runtime run instead of
wrapping or running the base model), and the CLI option.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import require_peer

require_peer("onnxruntime")

from lora_ref.adapter import save_adapter  # noqa: E402
from lora_ref.cli import main as cli_main  # noqa: E402
from lora_ref.export import ExportConfigError, build_graph, models, open_session  # noqa: E402
from lora_ref.export.batched import INDEX_GUARD  # noqa: E402
from lora_ref.export.triton import (  # noqa: E402
    ADAPTERS_FILE,
    CONFIG,
    TritonOptions,
    graph_specs,
    padding_mode,
    read_maps,
    write_repository,
)

EMBED = models.embedding_model(vocab=13, dim=6, out_features=5, seed=3)
ADAPTERS = [models.random_adapter(EMBED, r, seed=10 + r, name=f"a{r}") for r in (1, 2, 3)]


def _mixing(model: models.SmallModel) -> onnx.ModelProto:
    """``model`` with y' = y + mean over the sequence of y: every position sees every other (no mask, no causality)."""
    out = onnx.ModelProto.FromString(model.onnx.SerializeToString())
    out.graph.node.append(helper.make_node("ReduceMean", ["y", "mix_axes"], ["y_mean"], keepdims=1))
    out.graph.node.append(helper.make_node("Add", ["y", "y_mean"], ["y_mixed"]))
    out.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "mix_axes"))
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info("y_mixed", TensorProto.FLOAT, ["batch", "seq", 5]))
    return out


def test_padding_probe_accepts_per_token_graphs_and_refuses_mixing_ones():
    per_token, _ = build_graph(EMBED.onnx, ADAPTERS, "batched")
    mixing, _ = build_graph(_mixing(EMBED), ADAPTERS, "batched")
    assert padding_mode(per_token, "ids") == "right"
    assert padding_mode(mixing, "ids") == "none"


def test_repository_layout_versions_and_maps(tmp_path):
    graph, _ = build_graph(EMBED.onnx, ADAPTERS, "batched")
    first = write_repository(graph, tmp_path, [a.name for a in ADAPTERS], name="embed")
    assert first == tmp_path / "embed" / "1"
    assert sorted(p.name for p in first.iterdir()) == [ADAPTERS_FILE, "model.onnx"]
    record = json.loads((first / ADAPTERS_FILE).read_text())
    assert record["adapters"] == {"a1": 0, "a2": 1, "a3": 2} and record["padding"] == "right" and record["ids_input"] == "ids"
    # a new version without a2: the old version's map stays in the config until that version is removed
    fewer, _ = build_graph(EMBED.onnx, [ADAPTERS[0], ADAPTERS[2]], "batched")
    second = write_repository(fewer, tmp_path, ["a1", "a3"], name="embed")
    assert second.name == "2"
    assert read_maps(tmp_path / "embed") == {1: {"a1": 0, "a2": 1, "a3": 2}, 2: {"a1": 0, "a3": 1}}
    text = (tmp_path / "embed" / CONFIG).read_text()
    assert '\\"2\\": {\\"a1\\": 0, \\"a3\\": 1}' in text and '\\"1\\"' in text
    write_repository(fewer, tmp_path, ["a1", "a3"], name="embed", keep_versions=1)
    assert sorted(p.name for p in (tmp_path / "embed").iterdir()) == ["3", CONFIG]  # no staging folder left behind
    assert '\\"1\\"' not in (tmp_path / "embed" / CONFIG).read_text()
    # the graph in the repository runs and is the graph written
    session = open_session(tmp_path / "embed" / "3" / "model.onnx")
    ids = np.array([[1, 2, 3]], np.int64)
    np.testing.assert_array_equal(session.run_batched({"ids": ids}, [1])[0], open_session(fewer).run_batched({"ids": ids}, [1])[0])


def test_config_declares_request_inputs_with_a_scalar_adapter_index(tmp_path):
    graph, _ = build_graph(EMBED.onnx, ADAPTERS, "batched")
    inputs, outputs = graph_specs(graph)
    assert [(s.name, s.data_type, s.dims) for s in inputs] == [("ids", "TYPE_INT64", (-1,)), ("adapter_index", "TYPE_INT64", ())]
    assert [(s.name, s.dims) for s in outputs] == [("y", (-1, 5))]  # banks are initializers: not request inputs
    write_repository(graph, tmp_path, ["a", "b", "c"], options=TritonOptions(accelerator="tensorrt", precision="FP16"))
    text = (tmp_path / "lora" / CONFIG).read_text()
    assert 'input { name: "adapter_index" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } }' in text
    assert "kind: KIND_GPU" in text and 'name: "tensorrt"' in text and 'value: "FP16"' in text


def test_bad_repository_requests_are_refused_without_files(tmp_path):
    graph, _ = build_graph(EMBED.onnx, ADAPTERS, "batched")
    dynamic, _ = build_graph(EMBED.onnx, ADAPTERS[:1], "dynamic")
    with pytest.raises(ExportConfigError, match="distinct"):
        write_repository(graph, tmp_path, ["a", "a", "b"])
    with pytest.raises(ExportConfigError, match="batched graph"):
        write_repository(dynamic, tmp_path, ["a"])
    with pytest.raises(ExportConfigError, match="model name"):
        write_repository(graph, tmp_path, ["a", "b", "c"], name="../x")
    for bad in (TritonOptions(max_batch_size=0), TritonOptions(preferred_batch_sizes=(32,)), TritonOptions(accelerator="rocm")):
        with pytest.raises(ExportConfigError):
            write_repository(graph, tmp_path, ["a", "b", "c"], options=bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model", [EMBED, models.mlp(in_features=4, hidden=6, out_features=3, seed=1),
                                   models.conv_model(seed=2)], ids=lambda m: m.name)
def test_invalid_adapter_index_fails_the_run_in_the_graph(model):
    """Fed past the client check, an index outside [-1, N) makes ONNX Runtime refuse the run (never wrap, never base)."""
    adapters = [models.random_adapter(model, 2, seed=s) for s in (1, 2)]
    graph, _ = build_graph(model.onnx, adapters, "batched")
    session = open_session(graph)
    name = session.session.get_inputs()[0].name
    shape = [2 if not isinstance(d, int) else d for d in session.session.get_inputs()[0].shape]
    x = np.zeros(shape, np.int64) if name == "ids" else np.ones(shape, np.float32)
    good = session.session.run(None, {name: x, "adapter_index": np.array([-1, 1])})[0]
    np.testing.assert_array_equal(good, session.run_batched({name: x}, [-1, 1])[0])
    for bad in ([2, 0], [0, -2], [-3, 0], [0, 2**40]):
        with pytest.raises(Exception, match="out of (data )?bounds|must be within"):
            session.session.run(None, {name: x, "adapter_index": np.array(bad)})


def _zero_for_out_of_range_gather(graph: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` with the index prelude's range-checking Gather(Range(0, N), i) replaced by what ORT's CUDA
    Gather computes (gather_impl.cu): i where 0 <= i < N, else 0 (no refusal)."""
    graph = copy.deepcopy(graph)
    nodes = graph.graph.node
    position, gather = next((k, n) for k, n in enumerate(nodes) if n.op_type == "Gather" and n.input[0].startswith("lora_index_range"))
    span, index = gather.input
    count = next(n.input[1] for n in nodes if n.op_type == "Range" and n.output[0] == span)
    zero = next(n.input[0] for n in nodes if n.op_type == "Range" and n.output[0] == span)
    replacement = [
        helper.make_node("GreaterOrEqual", [index, zero], ["cuda_sim_ge"]),
        helper.make_node("Less", [index, count], ["cuda_sim_lt"]),
        helper.make_node("And", ["cuda_sim_ge", "cuda_sim_lt"], ["cuda_sim_ok"]),
        helper.make_node("Where", ["cuda_sim_ok", index, zero], list(gather.output)),
    ]
    del nodes[position]
    for offset, node in enumerate(replacement):
        nodes.insert(position + offset, node)
    return graph


def test_invalid_adapter_index_fails_where_gather_does_not_refuse():
    """On a provider whose Gather writes 0 for an out-of-range index (ORT's CUDA kernel, simulated on CPU),
    the index guard still fails the run, naming itself, instead of running adapter 0."""
    model = models.mlp(in_features=4, hidden=6, out_features=3, seed=1)
    adapters = [models.random_adapter(model, 2, seed=s) for s in (1, 2)]
    graph, _ = build_graph(model.onnx, adapters, "batched")
    session = open_session(_zero_for_out_of_range_gather(graph))
    name = session.session.get_inputs()[0].name
    x = np.ones((2, 4), np.float32)
    reference = open_session(graph)
    np.testing.assert_array_equal(session.session.run(None, {name: x, "adapter_index": np.array([-1, 1])})[0],
                                  reference.session.run(None, {name: x, "adapter_index": np.array([-1, 1])})[0])
    for bad in ([2, 0], [0, -2], [-3, 0], [0, 2**40]):
        with pytest.raises(Exception, match=INDEX_GUARD):
            session.session.run(None, {name: x, "adapter_index": np.array(bad)})


def test_cli_writes_the_next_version(tmp_path, capsys):
    model = tmp_path / "embed.onnx"
    onnx.save(EMBED.onnx, str(model))
    dirs = []
    for adapter in ADAPTERS[:2]:
        save_adapter(adapter, tmp_path / adapter.name)
        dirs.append(str(tmp_path / adapter.name))
    repo = tmp_path / "repo"
    for version in (1, 2):
        assert cli_main(["export", str(model), *dirs, "--mode", "batched", "--triton-repo", str(repo), "--name", "emb"]) == 0
        assert f"version {version}" in capsys.readouterr().out
    assert read_maps(repo / "emb") == {1: {"a1": 0, "a2": 1}, 2: {"a1": 0, "a2": 1}}
    assert cli_main(["export", str(model), *dirs, "--mode", "batched", "--triton-repo", str(repo), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert cli_main(["export", str(model), *dirs, "--mode", "dynamic", "--triton-repo", str(repo)]) == 2
    assert "--mode batched" in capsys.readouterr().err
    assert sorted(p.name for p in (repo / "emb").iterdir()) == ["1", "2", CONFIG]
