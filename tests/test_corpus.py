"""Every malformed input of the generated corpus is refused with its documented error class.

For each case (tests/corpus/make_corpus.py) the operation that would consume it (merge or exact
unmerge of a checkpoint, ONNX export, loading an ``.onnx_adapter`` against a dynamic graph,
loading a conformance case or an adapter tree) is run through the library and, where a command reads that input,
through the CLI. Asserted: the exact error class (not a subclass, not a built-in), CLI exit code
2 with a one-line message, no file in the output folder afterwards (no merged file, no residual,
no leftover ``.partial``), the inputs unchanged, and no pickle payload executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from corpus.make_corpus import (CASES, FIXTURES, HAVE_ONNX, PICKLE_MARKER, SCENARIOS, build_corpus, inputs_for,
                                marker_pickle, scenario_work)
from lora_ref import errors
from lora_ref import tree
from lora_ref.conformance import casefile
from lora_ref.adapter import load_adapter
from lora_ref.checkpoint import merge_checkpoint, unmerge_checkpoint
from lora_ref.atomic import transaction
from lora_ref.cli import EXIT_USER_ERROR, MAX_MESSAGE, build_parser, main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    build_corpus(root)
    return root


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _error_class(name: str) -> type:
    from lora_ref import atomic

    modules = [errors, casefile, tree, atomic]
    if HAVE_ONNX:
        from lora_ref.export import errors as export_errors

        modules.append(export_errors)
    return next(getattr(m, name) for m in modules if hasattr(m, name))


def _run_library(inputs: dict[str, Path], operation: str, out: Path) -> None:
    if operation == "load_tree":
        tree.AdapterTree.load(inputs["tree"])
    elif operation == "load_case":
        case = casefile.load_case(inputs["case"])
        case.load_inputs()
        case.load_expected()
    elif operation == "load_onnx_adapter":
        from lora_ref.export.adapter_files import load_onnx_adapter
        from lora_ref.export.graphio import load_model
        from lora_ref.export.slots import slots_from_model

        load_onnx_adapter(inputs["onnx_adapter"], slots_from_model(load_model(inputs["graph"])))
    elif operation == "export":
        from lora_ref.export import export

        export(inputs["model"], [load_adapter(inputs["adapter"])], "merged", out / "merged.onnx")
    elif operation == "merge":
        merge_checkpoint(inputs["base"], load_adapter(inputs["adapter"]), out / "merged.safetensors",
                         residual_path=out / "residual.safetensors")
    else:
        unmerge_checkpoint(inputs["merged"], load_adapter(inputs["adapter"]), out / "base.safetensors",
                           residual_path=inputs["residual"])


def _cli_args(inputs: dict[str, Path], operation: str, out: Path) -> list[str]:
    if operation == "export":
        return ["export", str(inputs["model"]), str(inputs["adapter"]), "--mode", "merged", "-o", str(out / "merged.onnx")]
    if operation == "merge":
        return ["merge", str(inputs["base"]), str(inputs["adapter"]), "-o", str(out / "merged.safetensors"),
                "--residual", str(out / "residual.safetensors")]
    return ["unmerge", str(inputs["merged"]), str(inputs["adapter"]), "-o", str(out / "base.safetensors"),
            "--residual", str(inputs["residual"])]


def _params(cases):
    return [pytest.param(c, id=c.name) for c in cases]


#: Operations a CLI command performs on its input (no command reads .onnx_adapter, case.json or a tree alone).
CLI_OPERATIONS = ("merge", "unmerge", "export")


def test_corpus_size_and_coverage() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    documented = {"FileFormatError", "UnsafeFileError", "ConfigError", "ShapeError", "DTypeError",
                  "NonFiniteError", "TargetNotFoundError", "ResidualMismatchError"}
    assert documented <= {c.error for c in CASES}
    for c in CASES:
        assert issubclass(_error_class(c.error), errors.LoraRefError)


@pytest.mark.parametrize("operation", ["merge", "unmerge"])
def test_fixtures_are_valid(corpus: Path, tmp_path: Path, operation: str) -> None:
    """Control: the same operation on the unbroken fixture succeeds and writes its outputs."""
    fx = corpus / FIXTURES
    inputs = {"base": fx / "base.safetensors", "merged": fx / "merged.safetensors",
              "adapter": fx / "adapter", "residual": fx / "residual.safetensors"}
    _run_library(inputs, operation, tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == (["merged.safetensors", "residual.safetensors"] if operation == "merge" else ["base.safetensors"])
    if operation == "unmerge":  # exact unmerge of the fixture restores the base byte for byte
        assert (tmp_path / "base.safetensors").read_bytes() == (fx / "base.safetensors").read_bytes()


def test_marker_pickle_is_live(tmp_path: Path) -> None:
    """Control: unpickling the corpus' pickle payload really creates its marker file."""
    marker = tmp_path / "marker"
    blob = tmp_path / "payload.bin"
    blob.write_bytes(marker_pickle(marker))
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads(open({str(blob)!r}, 'rb').read())"],
                   check=True, timeout=60)
    assert marker.exists()


@pytest.mark.parametrize("case", _params(CASES))
def test_refused_with_documented_error(corpus: Path, tmp_path: Path, case) -> None:
    inputs = inputs_for(corpus, case)
    before = _tree_digest(corpus)
    with pytest.raises(errors.LoraRefError) as caught:
        _run_library(inputs, case.operation, tmp_path)
    assert type(caught.value).__name__ == case.error, f"{case.name}: {caught.value!r}"
    assert str(caught.value).strip(), "the message must say what is wrong"
    assert list(tmp_path.iterdir()) == [], "no output (nor .partial) may exist after a refused input"
    assert _tree_digest(corpus) == before, "inputs must be left unchanged"
    assert not (corpus / case.name / PICKLE_MARKER).exists(), "a pickle payload was executed"


@pytest.mark.parametrize("case", _params([c for c in CASES if c.operation in CLI_OPERATIONS]))
def test_cli_exit_code_2_one_line(corpus: Path, tmp_path: Path, case, capsys: pytest.CaptureFixture) -> None:
    code = main(_cli_args(inputs_for(corpus, case), case.operation, tmp_path))
    captured = capsys.readouterr()
    assert code == EXIT_USER_ERROR
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-ref: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []
    assert not (corpus / case.name / PICKLE_MARKER).exists()


# -- hostile command lines (make_corpus.SCENARIOS) ---------------------------------------------------
def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones, links and FIFOs included) -> its kind and content digest.

    FIFOs and devices are never opened (that would block); symlinks are recorded by target.
    """
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                state[key] = f"link -> {os.readlink(path)}"
            elif stat.S_ISREG(st.st_mode):
                state[key] = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
            else:
                state[key] = f"kind {stat.S_IFMT(st.st_mode):o}"
    return state


@contextlib.contextmanager
def _hang_guard(seconds: int = 300):
    """Fail instead of hanging forever if a command blocks (a FIFO read, a runaway regex)."""
    def alarm(signum, frame):
        raise AssertionError(f"the command did not finish within {seconds} s: it hangs")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _scenario_params():
    return [pytest.param(s, id=s.name, marks=pytest.mark.skipif(s.needs_onnx and not HAVE_ONNX, reason="no onnx"))
            for s in SCENARIOS]


def test_scenario_coverage() -> None:
    """Every class of issue 10's second half has cases: guard, writes, sharded, matching, inputs, messages, manifests."""
    prefixes = {s.name.split("_")[0] for s in SCENARIOS}
    assert {"guard", "write", "sharded", "regex", "input", "message", "manifest"} <= prefixes
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS) >= 30
    for s in SCENARIOS:
        assert issubclass(_error_class(s.error), errors.LoraRefError)


@pytest.mark.parametrize("scenario", _scenario_params())
def test_hostile_command_refused(corpus: Path, tmp_path: Path, scenario, capsys: pytest.CaptureFixture) -> None:
    """The library raises the documented class; the CLI exits 2 with one safe line; nothing changes."""
    work = scenario_work(corpus / FIXTURES, tmp_path / "work")
    argv = scenario.build(work)
    before = _snapshot(tmp_path)
    args = build_parser().parse_args(argv)
    with _hang_guard(), pytest.raises(errors.LoraRefError) as caught, transaction():
        args.func(args)
    assert type(caught.value).__name__ == scenario.error, f"{scenario.name}: {type(caught.value).__name__}: {caught.value}"
    assert _snapshot(tmp_path) == before, "the refused command changed the work folder"
    capsys.readouterr()
    with _hang_guard():
        code = main(argv)
    captured = capsys.readouterr()
    assert code == EXIT_USER_ERROR, captured.err
    lines = captured.err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("lora-ref: error: "), captured.err[:500]
    assert "Traceback" not in captured.err
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", captured.err), "a control character reached the terminal"
    assert len(lines[0]) <= MAX_MESSAGE + 200, f"a {len(lines[0])}-character message"
    assert scenario.expect in lines[0], lines[0][:500]
    assert _snapshot(tmp_path) == before, "the refused command changed the work folder"
