"""Finding targets in user graphs (names, metadata, values) and every refusal: typed error, no file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import require_peer

require_peer("onnxruntime")

from lora_ref.adapter import save_adapter  # noqa: E402
from lora_ref.cli import main as cli_main  # noqa: E402
from lora_ref.errors import LoraRefError, ShapeError  # noqa: E402
from lora_ref.export import (  # noqa: E402
    AdapterCache,
    AdapterIndexError,
    ExportConfigError,
    GraphTargetNotFoundError,
    IRVersionError,
    build_graph,
    export,
    locate_targets,
    models,
    open_session,
)
from lora_ref.safetensors_io import save_file  # noqa: E402

MLP = models.mlp(in_features=6, hidden=10, out_features=4, seed=2)
BLOCK = models.transformer_block(d_model=8, heads=2, d_ff=16, seed=2)


def _anonymous(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer renamed ``c<k>`` and all node metadata dropped."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    rename = {t.name: f"c{k}" for k, t in enumerate(out.graph.initializer)}
    for tensor in out.graph.initializer:
        tensor.name = rename[tensor.name]
    for node in out.graph.node:
        del node.metadata_props[:]
        for pos, name in enumerate(node.input):
            node.input[pos] = rename.get(name, name)
    return out


def test_found_by_names_and_by_name_scopes():
    mlp_sites = locate_targets(MLP.onnx, ["fc1", "fc2"])
    assert {s[0].found_by for s in mlp_sites.values()} == {"initializer name"}
    assert {s[0].layout for s in mlp_sites.values()} == {"out_in"}  # Gemm transB=1
    sites = locate_targets(BLOCK.onnx, BLOCK.linear_modules)
    assert sites["attn.q_proj"][0].found_by == "initializer name" and sites["attn.q_proj"][0].layout == "out_in"
    assert sites["mlp.up_proj"][0].found_by == "name scopes" and sites["mlp.up_proj"][0].layout == "in_out"
    # A prefix added by a wrapper module (torch exports "m.mlp.up_proj") still matches.
    assert locate_targets(BLOCK.onnx, ["up_proj"])["up_proj"][0].weight == "w_up"


@pytest.mark.parametrize("model", [MLP, BLOCK], ids=lambda m: m.name)
def test_found_by_value_in_both_layouts(model):
    anonymous = _anonymous(model.onnx)
    sites = locate_targets(anonymous, model.linear_modules, base_weights=model.weights)
    assert {s[0].found_by for s in sites.values()} == {"value match"}
    layouts = {m: s[0].layout for m, s in sites.items()}
    if model is BLOCK:
        assert layouts["attn.q_proj"] == "out_in" and layouts["mlp.up_proj"] == "in_out"
    # and the merged graph built from the anonymous one equals the one built from names
    adapter = models.random_adapter(model, 3, seed=4)
    x = np.random.default_rng(0).standard_normal((2, 6) if model is MLP else (2, 3, 8)).astype(np.float32)
    named, _ = build_graph(model.onnx, [adapter], "merged")
    found, _ = build_graph(anonymous, [adapter], "merged", base_weights=model.weights)
    np.testing.assert_array_equal(open_session(found).run({"x": x})[0], open_session(named).run({"x": x})[0])


def test_missing_target_lists_every_strategy(tmp_path):
    adapter = models.random_adapter(MLP, 2)
    anonymous = _anonymous(MLP.onnx)
    with pytest.raises(GraphTargetNotFoundError) as info:
        export(anonymous, [adapter], "dynamic", tmp_path / "out.onnx")
    message = str(info.value)
    assert "2 adapted module(s)" in message and "fc1:" in message and "fc2:" in message
    assert "name scopes" in message and "initializer names" in message and "values: not tried" in message
    wrong_base = {k: v + 1 for k, v in MLP.weights.items()}
    with pytest.raises(GraphTargetNotFoundError, match="no initializer equals base tensor"):
        export(anonymous, [adapter], "dynamic", tmp_path / "out.onnx", base_weights=wrong_base)
    assert list(tmp_path.iterdir()) == []


def test_tied_weight_is_copied_not_changed_for_other_readers():
    """A weight the targeted Linear shares with another reader keeps its base value for that reader."""
    graph = onnx.ModelProto.FromString(MLP.onnx.SerializeToString())
    graph.graph.node.append(helper.make_node("Identity", ["fc1.weight"], ["fc1_weight_copy"]))
    graph.graph.output.append(helper.make_tensor_value_info("fc1_weight_copy", onnx.TensorProto.FLOAT, [10, 6]))
    merged, _ = build_graph(graph, [models.random_adapter(MLP, 2)], "merged")
    x = np.ones((1, 6), np.float32)
    _, tied = open_session(merged).run({"x": x})
    np.testing.assert_array_equal(tied, MLP.weights["fc1.weight"])


def test_shape_mismatch_is_refused_without_output(tmp_path):
    adapter = models.random_adapter(BLOCK, 2)  # d_model 8: does not fit a d_model 16 block
    other = models.transformer_block(d_model=16, heads=2, d_ff=16)
    for mode in ("merged", "dynamic", "batched"):
        with pytest.raises(ShapeError, match="do not fit the graph weight"):
            export(other.onnx, [adapter], mode, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_options_are_typed(tmp_path):
    adapter = models.random_adapter(MLP, 8)
    with pytest.raises(ExportConfigError, match="exceeds --max-rank"):
        export(MLP.onnx, [adapter], "dynamic", tmp_path / "o.onnx", max_rank=4)
    with pytest.raises(ExportConfigError, match="dynamic graphs only"):
        export(MLP.onnx, [adapter], "merged", tmp_path / "o.onnx", adapter_out=tmp_path / "a")
    adapter.config.use_dora = True
    for mode in ("merged", "dynamic", "batched"):  # use_dora without magnitudes: not DoRA, not plain LoRA either
        with pytest.raises(ExportConfigError, match="use_dora but the module has no lora_magnitude_vector"):
            export(MLP.onnx, [adapter], mode, tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []


def test_index_outside_bank_is_refused():
    graph, _ = build_graph(MLP.onnx, [models.random_adapter(MLP, 2), models.random_adapter(MLP, 3, seed=1)], "batched")
    session = open_session(graph)
    x = np.ones((3, 6), np.float32)
    for bad in ([0, 2, 1], [-2, 0, 0], [[0, 1, 0]], [0.0, 1.0, 0.5]):
        with pytest.raises(AdapterIndexError):
            session.run_batched({"x": x}, bad)
    session.run_batched({"x": x}, [1, -1, 0])


def test_batched_embedding_ids_outside_the_vocabulary_are_refused():
    """An id outside [0, V) would read another adapter's rows of the bank table [N·V, r]; run_batched refuses it."""
    from lora_ref.export import TokenIdError, UncheckedIdsWarning

    embed = models.embedding_model(vocab=11, dim=4, out_features=3, seed=5)
    adapters = [models.random_adapter(embed, 2, seed=s, modules=["embed"], name=f"a{s}") for s in (6, 7)]
    graph, _ = build_graph(embed.onnx, adapters, "batched")
    session = open_session(graph)
    ids = np.array([[0, 3, 10], [1, 2, 4]], np.int64)
    session.run_batched({"ids": ids}, [0, 1])
    for bad in (11, -1, 2**40):
        fed = ids.copy()
        fed[0, 1] = bad
        with pytest.raises(TokenIdError, match=f"ids holds token ids \\[{bad}\\] outside \\[0, 11\\)"):
            session.run_batched({"ids": fed}, [0, 1])
    # the hazard is real: ONNX's Gather wraps -1 to V-1 for the base table, but in the bank table [N·V, r]
    # row 1·V - 1 is adapter 0's last row: unchecked, a row using adapter 1 with id -1 depends on adapter 0
    bank = onnx.numpy_helper.to_array(next(t for t in graph.graph.initializer if t.name == "embed.lora_A.bank"))
    emptied = bank.copy()
    emptied[0] = 0.0  # adapter 0 without LoRA

    def unchecked(token: int, a_bank: np.ndarray) -> np.ndarray:
        feeds = {"ids": np.array([[token]], np.int64), "adapter_index": np.array([1], np.int64), "embed.lora_A.bank": a_bank}
        return session.session.run(None, feeds)[0]

    np.testing.assert_array_equal(unchecked(10, bank), unchecked(10, emptied))  # a valid id: only adapter 1 counts
    assert not np.array_equal(unchecked(-1, bank), unchecked(-1, emptied))
    # ids the graph computes (here ids + 0) cannot be checked before a run: the session says so
    computed = onnx.ModelProto.FromString(embed.onnx.SerializeToString())
    computed.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), "zero_shift"))
    for node in computed.graph.node:
        node.input[:] = ["ids_shifted" if name == "ids" else name for name in node.input]
    computed.graph.node.insert(0, helper.make_node("Add", ["ids", "zero_shift"], ["ids_shifted"]))
    graph, _ = build_graph(computed, adapters, "batched")
    with pytest.warns(UncheckedIdsWarning, match="ids_shifted"):
        assert open_session(graph).token_ids == {}


def test_ir_version_and_opset_the_runtime_cannot_read(tmp_path):
    from lora_ref.export import runtime_limits

    limits = runtime_limits()
    too_new_opset = onnx.ModelProto.FromString(MLP.onnx.SerializeToString())
    too_new_opset.opset_import[0].version = limits.opset + 1
    with pytest.raises(IRVersionError, match="opset"):
        export(too_new_opset, [models.random_adapter(MLP, 2)], "merged", tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []
    # onnx 1.23 stamps its own IR version (14): the exporter writes one the runtime reads ...
    stamped = onnx.ModelProto.FromString(MLP.onnx.SerializeToString())
    stamped.ir_version = onnx.IR_VERSION
    report = export(stamped, [models.random_adapter(MLP, 2)], "merged", tmp_path / "o.onnx")
    assert onnx.load(str(report.output)).ir_version <= limits.ir_version
    # ... and a file the runtime cannot read is a typed error, not ORT's bare failure.
    if onnx.IR_VERSION > limits.ir_version:
        (tmp_path / "new.onnx").write_bytes(stamped.SerializeToString())
        with pytest.raises(IRVersionError, match="IR version"):
            open_session(tmp_path / "new.onnx")


def _cli_fixture(tmp_path):
    model = tmp_path / "mlp.onnx"
    model.write_bytes(MLP.onnx.SerializeToString())
    dirs = []
    for i, r in enumerate((2, 4)):
        directory = tmp_path / f"adapter{i}"
        save_adapter(models.random_adapter(MLP, r, seed=i), directory)
        dirs.append(str(directory))
    return model, dirs


def test_cli_export_all_modes(tmp_path, capsys):
    model, dirs = _cli_fixture(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["export", str(model), dirs[0], "--mode", "merged", "-o", str(out / "m.onnx")]) == 0
    assert cli_main(["export", str(model), *dirs, "--mode", "dynamic", "-o", str(out / "d.onnx"),
                     "--adapter-out", str(out / "adapters"), "--max-rank", "4"]) == 0
    assert cli_main(["export", str(model), *dirs, "--mode", "batched", "-o", str(out / "b.onnx"), "--dtype", "float16"]) == 0
    printed = capsys.readouterr().out
    assert "adapter_index 1: adapter1" in printed and "2 by initializer name" in printed
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["adapter0.onnx_adapter", "adapter1.onnx_adapter"]
    session = open_session(out / "d.onnx")
    assert session.load_adapter(out / "adapters" / "adapter1.onnx_adapter").tensors


def test_cli_errors_exit_2_and_write_nothing(tmp_path, capsys):
    model, dirs = _cli_fixture(tmp_path)
    other = tmp_path / "block.onnx"
    other.write_bytes(BLOCK.onnx.SerializeToString())
    assert cli_main(["export", str(other), dirs[0], "--mode", "dynamic", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "not found in the graph" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_core_and_cli_do_not_import_onnx():
    code = ("import sys, lora_ref, lora_ref.cli; lora_ref.cli.build_parser(); "
            "bad = [m for m in ('onnx', 'onnxruntime', 'lora_ref.export') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_graph_the_checker_rejects_is_a_typed_error(tmp_path):
    from lora_ref.errors import FileFormatError

    broken = onnx.ModelProto.FromString(MLP.onnx.SerializeToString())
    broken.graph.node.append(helper.make_node("Relu", ["nowhere"], ["z"]))
    path = tmp_path / "broken.onnx"
    path.write_bytes(broken.SerializeToString())
    with pytest.raises(FileFormatError, match="not a valid ONNX graph"):
        export(path, [models.random_adapter(MLP, 2)], "merged", tmp_path / "o.onnx")
    with pytest.raises(FileFormatError, match="not a valid ONNX graph"):
        build_graph(broken, [models.random_adapter(MLP, 2)], "dynamic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]


def test_every_refusal_is_a_lora_ref_error():
    from lora_ref.export import errors

    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, Warning) and cls.__module__ == errors.__name__:
            assert issubclass(cls, LoraRefError), name


def test_base_weights_from_safetensors_file(tmp_path):
    path = tmp_path / "base.safetensors"
    save_file(path, MLP.weights)
    graph, sites = build_graph(_anonymous(MLP.onnx), [models.random_adapter(MLP, 2)], "dynamic", base_weights=path)
    assert {s[0].found_by for s in sites.values()} == {"value match"}


@pytest.mark.parametrize("layout", ["model dir", "sharded index", "sharded model dir"])
def test_base_weights_from_a_model_directory_or_sharded_checkpoint(tmp_path, layout):
    """A Hugging Face model directory or a sharded index finds the same sites by value as the flat file."""
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    if layout == "model dir":
        save_file(folder / "model.safetensors", MLP.weights)
        given = folder
    else:  # one tensor per shard
        names = sorted(MLP.weights)
        shard = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
        for name in names:
            save_file(folder / shard[name], {name: MLP.weights[name]})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard}))
        given = folder if layout == "sharded model dir" else folder / "model.safetensors.index.json"
    adapter = models.random_adapter(MLP, 2)
    graph, sites = build_graph(_anonymous(MLP.onnx), [adapter], "merged", base_weights=given)
    want, _ = build_graph(_anonymous(MLP.onnx), [adapter], "merged", base_weights=MLP.weights)
    assert {s[0].found_by for s in sites.values()} == {"value match"}
    assert graph.SerializeToString() == want.SerializeToString()


def test_non_finite_adapter_is_refused_in_every_mode(tmp_path):
    from lora_ref.errors import NonFiniteError

    adapter = models.random_adapter(MLP, 2)
    adapter.modules["fc2"].B[0, 0] = np.inf
    for mode in ("merged", "dynamic", "batched"):
        with pytest.raises(NonFiniteError, match="fc2"):
            export(MLP.onnx, [adapter], mode, tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []


def test_weight_shared_by_two_scoped_modules_gets_lora_only_in_its_own():
    """With name scopes, a module's LoRA goes only on that module's nodes, even if the weight is shared."""
    graph = onnx.ModelProto.FromString(BLOCK.onnx.SerializeToString())
    down = next(n for n in graph.graph.node if n.name == "mlp.down_proj.matmul")
    twin = onnx.NodeProto()
    twin.CopyFrom(down)
    twin.name, twin.output[0] = "other.matmul", "other_out"
    twin.metadata_props[0].value = repr(["", "other", "other", "linear"])
    graph.graph.node.append(twin)
    graph.graph.output.append(helper.make_tensor_value_info("other_out", onnx.TensorProto.FLOAT, ["batch", "seq", 8]))
    sites = locate_targets(graph, ["mlp.down_proj"])
    assert [graph.graph.node[s.node].name for s in sites["mlp.down_proj"]] == ["mlp.down_proj.matmul"]
    adapter = models.random_adapter(BLOCK, 2, modules=["mlp.down_proj"])
    x = np.random.default_rng(1).standard_normal((1, 3, 8)).astype(np.float32)
    base_y, base_other = open_session(graph).run({"x": x})
    cache = AdapterCache(open_session(build_graph(graph, [adapter], "dynamic")[0]))
    cache.add("a", adapter)
    cache.activate("a")
    y, other = cache.run({"x": x})
    assert not np.array_equal(y, base_y)
    np.testing.assert_array_equal(other, base_other)
    y, other = open_session(build_graph(graph, [adapter], "merged")[0]).run({"x": x})
    assert not np.array_equal(y, base_y)
    np.testing.assert_array_equal(other, base_other)
