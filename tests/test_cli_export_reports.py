"""``lora-ref export --json`` and ``lora-ref convert-adapters --json`` reports, and their progress on stderr (issue 15 part 3).

Oracles: what was written, read back with onnx and with ONNX Runtime's own adapter reader
(``onnxruntime.AdapterFormat``), and the PEFT adapter files themselves (read with the safetensors
package): the report's module names, file paths, tensor counts and shapes must agree with them.
With ``--json -`` stdout must parse as exactly one JSON object.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

from lora_ref import save_adapter
from lora_ref.export import models

MLP = models.mlp(in_features=6, hidden=10, out_features=4, seed=2)
EXPORT_FIELDS = {"command", "mode", "model", "output", "adapters", "dtype", "found_by", "notes", "adapter_files"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ref", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture()
def world(tmp_path: Path) -> Path:
    (tmp_path / "mlp.onnx").write_bytes(MLP.onnx.SerializeToString())
    for i, r in enumerate((2, 4)):
        save_adapter(models.random_adapter(MLP, r, seed=i), tmp_path / f"ad{i}")
    return tmp_path


def _factors(adapter: Path) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """module -> (A shape, B shape) from the PEFT file."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").split(".lora_A")[0]: (tensors[k].shape, tensors[k.replace("lora_A", "lora_B")].shape)
            for k in tensors if ".lora_A" in k}


def _report(done: subprocess.CompletedProcess, where: str | Path) -> dict:
    assert done.returncode == 0, done.stderr
    if where == "-":
        return json.loads(done.stdout)  # stdout is the JSON object and nothing else
    assert done.stdout.strip() and not done.stdout.lstrip().startswith("{")  # the human summary stays on stdout
    return json.loads(Path(where).read_text())


@pytest.mark.parametrize("where", ["-", "report.json"])
@pytest.mark.parametrize("mode", ["merged", "dynamic", "batched"])
def test_export_json_names_what_was_written(world: Path, mode: str, where: str) -> None:
    target = "-" if where == "-" else str(world / where)
    adapters = [str(world / "ad0"), str(world / "ad1")] if mode != "merged" else [str(world / "ad0")]
    extra = ["--adapter-out", str(world / "files")] if mode == "dynamic" else []
    report = _report(cli("export", str(world / "mlp.onnx"), *adapters, "--mode", mode, "-o", str(world / "g.onnx"),
                         *extra, "--json", target), target)
    assert set(report) == EXPORT_FIELDS
    assert report["command"] == "export" and report["mode"] == mode and report["dtype"] == "float32"
    assert report["model"] == str(world / "mlp.onnx") and Path(report["output"]) == world / "g.onnx"
    assert report["adapters"] == [Path(a).name for a in adapters]
    assert set(report["found_by"]) == set(_factors(world / "ad0")) and set(report["found_by"].values()) == {"initializer name"}
    graph = onnx.load(str(world / "g.onnx"))
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    if mode == "dynamic":  # one A/B input pair per reported module, with the adapter's in/out widths
        assert sorted(report["adapter_files"]) == report["adapters"]
        for module, (a_shape, b_shape) in _factors(world / "ad0").items():
            assert inputs[f"{module}.lora_A.weight"][0] == a_shape[1] and inputs[f"{module}.lora_B.weight"][1] == b_shape[0]
        for name, file in report["adapter_files"].items():
            reader = ort.AdapterFormat.read_adapter(file)  # kept alive: the values' arrays point into its memory
            params = reader.get_parameters()
            factors = _factors(world / name)
            assert sorted(params) == sorted(f"{m}.lora_{f}.weight" for m in factors for f in "AB")
            for m, (a_shape, b_shape) in factors.items():  # A_g = A^T, B_g = s·B^T
                assert tuple(params[f"{m}.lora_A.weight"].numpy().shape) == a_shape[::-1]
                assert tuple(params[f"{m}.lora_B.weight"].numpy().shape) == b_shape[::-1]
    else:
        assert report["adapter_files"] == {}
        assert ("adapter_index" in inputs) == (mode == "batched")


@pytest.mark.parametrize("where", ["-", "report.json"])
def test_convert_adapters_json_names_what_was_written(world: Path, where: str) -> None:
    assert cli("export", str(world / "mlp.onnx"), str(world / "ad0"), "--mode", "dynamic", "-o", str(world / "g.onnx")).returncode == 0
    target = "-" if where == "-" else str(world / where)
    report = _report(cli("convert-adapters", str(world / "ad0"), str(world / "ad1"), "--graph", str(world / "g.onnx"),
                         "-o", str(world / "out"), "--json", target), target)
    assert set(report) == {"graph", "scheme", "adapters"} and report["graph"] == str(world / "g.onnx")
    assert report["scheme"] == "peft" and sorted(report["adapters"]) == ["ad0", "ad1"]
    for name, entry in report["adapters"].items():
        assert set(entry) == {"file", "scheme", "tensors", "modules"} and entry["scheme"] == report["scheme"]
        assert Path(entry["file"]) == world / "out" / f"{name}.onnx_adapter"
        factors = _factors(world / name)
        assert entry["modules"] == sorted(factors)
        reader = ort.AdapterFormat.read_adapter(entry["file"])  # kept alive: the values' arrays point into its memory
        params = reader.get_parameters()
        assert entry["tensors"] == len(params) == 2 * len(factors)
        for m, (a_shape, b_shape) in factors.items():
            assert tuple(params[f"{m}.lora_A.weight"].numpy().shape) == a_shape[::-1]
            assert tuple(params[f"{m}.lora_B.weight"].numpy().shape) == b_shape[::-1]


LINE = re.compile(r"^  (?P<label>[\w -]+?) (?P<k>\d+)/(?P<n>\d+) \((?P<pct>\d+)%\)(?: [\d.]+ (?:B|KiB|MiB|GiB)/[\d.]+ (?:B|KiB|MiB|GiB))?"
                  r"(?: ETA \d+:\d\d:\d\d)? (?P<name>\S+)$")


@pytest.mark.parametrize("command", ["export", "convert-adapters"])
def test_progress_off_a_tty_is_plain_lines_and_the_summary_its_own_line(world: Path, command: str, capsys,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr is not a terminal here: one plain line per item once the interval has passed (0 s here), no \\r."""
    from lora_ref.cli import main, progress

    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    if command == "convert-adapters":
        assert main(["export", str(world / "mlp.onnx"), str(world / "ad0"), "--mode", "dynamic", "-o", str(world / "g.onnx"),
                     "--quiet"]) == 0
        args = ["convert-adapters", str(world / "ad0"), str(world / "ad1"), "--graph", str(world / "g.onnx"), "-o", str(world / "out")]
        label, items = "convert-adapters", ["ad0", "ad1"]
    else:
        args = ["export", str(world / "mlp.onnx"), str(world / "ad0"), "--mode", "merged", "-o", str(world / "m.onnx")]
        label, items = "export merged", MLP.linear_modules
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err
    lines = [LINE.match(line) for line in err.splitlines()]
    assert all(lines) and [m["name"] for m in lines] == items, err
    assert [(m["label"], int(m["k"]), int(m["n"])) for m in lines] == [(label, k + 1, len(items)) for k in range(len(items))]
    assert int(lines[0]["pct"]) == 0 and (command == "export" or " B/" in err)  # convert-adapters counts the adapters' bytes
    assert out.count("\n") == len(out.splitlines()) and not out.startswith(" ")  # the summary: lines of its own on stdout
    assert main([*args[:-1], str(world / "again"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")  # --quiet: no progress, no summary
