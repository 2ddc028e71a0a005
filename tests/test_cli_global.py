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
    assert before.stdout == after.stdout
    assert len(before.stdout) < len(loud.stdout)


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
