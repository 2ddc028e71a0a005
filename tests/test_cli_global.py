"""The CLI's global options (lora_ref/cli/__init__.py): --version, --verbose/--quiet anywhere, help on every option."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

import pytest

from lora_ref.cli import build_parser, split_global_flags

REFERENCE = "lora_ref.conformance.reference_impl:factory"


def lora_ref_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ref", *args], capture_output=True, text=True, timeout=120)


def test_version_is_the_installed_distribution() -> None:
    done = lora_ref_cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"lora-ref {importlib.metadata.version('lora-ref')}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_subcommand_prints_the_traceback(where: str, tmp_path) -> None:
    command = ["inspect", str(tmp_path / "missing")]
    done = lora_ref_cli(*(["--verbose", *command] if where == "before" else [*command, "--verbose"]))
    assert done.returncode == 2
    assert "Traceback" in done.stderr and done.stderr.strip().splitlines()[-1].startswith("lora-ref: error: ")


def test_quiet_means_the_same_before_and_after() -> None:
    command = ["conformance", "run", "--impl", REFERENCE, "--op", "linear.forward"]
    before, after, loud = lora_ref_cli("--quiet", *command), lora_ref_cli(*command, "--quiet"), lora_ref_cli(*command)
    assert before.returncode == after.returncode == loud.returncode == 0
    assert before.stdout.splitlines()[-1] == after.stdout.splitlines()[-1]  # the summary (timing columns vary)
    assert len(before.stdout.splitlines()) == len(after.stdout.splitlines()) < len(loud.stdout.splitlines())


def test_flags_after_a_double_dash_are_not_taken() -> None:
    assert split_global_flags(["merge", "--quiet", "--", "--verbose"]) == (["merge", "--", "--verbose"], {"quiet"})


def _parsers(parser: argparse.ArgumentParser, path: str = "lora-ref"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_option_has_help_text() -> None:
    missing = [f"{path} {action.option_strings or action.dest}" for path, parser in _parsers(build_parser())
               for action in parser._actions
               if not isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)) and not action.help]
    assert not missing, f"options without help text: {missing}"


def test_a_closed_output_pipe_is_not_an_internal_error(tmp_path) -> None:
    """``lora-ref conformance list | head -1``: the reader leaves early; exit 2, one line, no traceback.

    The reader here closes its end before anything is written, so the first write fails (a real
    ``head`` may leave after the output already fits in the pipe's buffer, which proves nothing).
    """
    script = f"{sys.executable} -m lora_ref conformance list | (exec 0<&-; sleep 1); echo ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2", done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1 and "pipe" in done.stderr


def test_a_missing_optional_package_names_the_extra(tmp_path) -> None:
    """Hide onnx from the interpreter: `export` says which pip extra installs it (exit 2), not 'internal error'."""
    hider = tmp_path / "sitecustomize.py"
    hider.write_text("import sys\nsys.modules['onnx'] = None\n")  # makes `import onnx` raise ModuleNotFoundError
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "lora_ref", "export", "m.onnx", "a", "--mode", "merged", "-o", "o.onnx"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "pip install 'lora-ref[export]'" in done.stderr and "Traceback" not in done.stderr


def test_every_leaf_subcommand_help_ends_with_an_example() -> None:
    """Each command's --help ends with a runnable-looking example line (the argparse epilog)."""
    leaves = [(path, parser) for path, parser in _parsers(build_parser())
              if path != "lora-ref" and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)]
    assert len(leaves) >= 12
    for path, parser in leaves:
        help_text = parser.format_help().rstrip()
        assert parser.epilog and "example" in parser.epilog, path
        assert help_text.endswith(parser.epilog.rstrip()), path
        assert any(f"{line.strip()} ".startswith(f"{path} ") for line in parser.epilog.splitlines()), path
