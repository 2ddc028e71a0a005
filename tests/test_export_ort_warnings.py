"""ONNX Runtime's "Initializer X appears in graph inputs" warning on the graphs lora-ref writes (issue 15 part 3).

ORT prints it, at its default log level, once per initializer that is also a graph input (an
overridable initializer). The dynamic graph's LoRA inputs are exactly that on purpose: their
rank-0 defaults let the graph run with no adapter, and feeding them (or ORT's own
``RunOptions.add_active_adapter``, or genai's ``set_active_adapter``) switches adapters; this is
the pattern of ORT's own LoRA examples. So the checks are: a plain ``InferenceSession`` at the
default log level warns for the LoRA inputs only (one line each, never a base weight, even when
the base graph was written at IR 3, where every initializer had to be listed as an input);
merged and batched graphs print nothing; and lora-ref's runtime (:func:`open_session`) prints
nothing. Each session is created in a fresh interpreter, its stderr captured at the fd level
(ORT writes from C++, past Python's sys.stderr).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from lora_ref.export import export, models

MLP = models.mlp(in_features=6, hidden=10, out_features=4, seed=2)
WARNING = re.compile(r"Initializer (\S+) appears in graph inputs")


def _stderr_of_session(path: Path, how: str) -> str:
    code = {"plain": "import onnxruntime as ort; ort.InferenceSession(PATH, providers=['CPUExecutionProvider'])",
            "lora-ref": "from lora_ref.export import open_session; open_session(PATH)"}[how]
    done = subprocess.run([sys.executable, "-c", code.replace("PATH", repr(str(path)))], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def _legacy_ir3(model: onnx.ModelProto, opset: int = 13) -> onnx.ModelProto:
    """The same graph as an IR 3 exporter lists it: every initializer among the graph inputs (batched needs opset 13)."""
    old = onnx.ModelProto.FromString(model.SerializeToString())
    old.ir_version = 3
    del old.opset_import[:]
    old.opset_import.append(onnx.helper.make_opsetid("", opset))
    for tensor in old.graph.initializer:
        old.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return old


@pytest.mark.parametrize("legacy", [False, True], ids=["ir9", "ir3-initializers-as-inputs"])
@pytest.mark.parametrize("mode", ["dynamic", "batched", "merged"])
def test_only_lora_inputs_warn_and_lora_ref_runtime_is_silent(tmp_path: Path, mode: str, legacy: bool) -> None:
    base = _legacy_ir3(MLP.onnx) if legacy else MLP.onnx
    if legacy:  # ORT accepts the IR 3 listing silently, but the same graph at IR >= 4 warns for every base weight
        bumped = onnx.ModelProto.FromString(base.SerializeToString())
        bumped.ir_version = 4
        (tmp_path / "bumped.onnx").write_bytes(bumped.SerializeToString())
        assert sorted(WARNING.findall(_stderr_of_session(tmp_path / "bumped.onnx", "plain"))) == sorted(MLP.weights)
    adapters = [models.random_adapter(MLP, 2, seed=1), models.random_adapter(MLP, 3, seed=2)]
    export(base, adapters[:1] if mode != "batched" else adapters, mode, tmp_path / "g.onnx")
    graph = onnx.load(str(tmp_path / "g.onnx"))
    overridable = sorted({i.name for i in graph.graph.input} & {t.name for t in graph.graph.initializer})
    suffix = {"dynamic": "weight", "batched": "bank", "merged": None}[mode]
    assert overridable == ([] if suffix is None else  # the LoRA inputs (rank-0 defaults) or banks, nothing else
                           sorted(f"{m}.lora_{f}.{suffix}" for m in MLP.linear_modules for f in "AB"))
    assert graph.ir_version >= 4
    assert sorted(WARNING.findall(_stderr_of_session(tmp_path / "g.onnx", "plain"))) == overridable
    assert _stderr_of_session(tmp_path / "g.onnx", "lora-ref") == ""


def test_dynamic_graph_of_an_opset_below_11_is_refused_before_writing(tmp_path: Path) -> None:
    from lora_ref.export.errors import ExportConfigError

    with pytest.raises(ExportConfigError, match="opset >= 11"):
        export(_legacy_ir3(MLP.onnx, opset=8), [models.random_adapter(MLP, 2)], "dynamic", tmp_path / "dyn.onnx")
    assert list(tmp_path.iterdir()) == []
