"""The composition examples run end to end (small settings) and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_ref.adapter import load_adapter

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("model,extra", [("mlp", ()), ("transformer", ()), ("embed-conv", ("--dropout", "0.1")),
                                         ("embed-conv", ("--dora",))])
def test_train_two_adapters(tmp_path, model, extra):
    out = run("train_two_adapters.py", "--model", model, "--steps", "60", "--out", str(tmp_path), *extra)
    for k in range(2):
        first, last = map(float, re.search(rf"task {k}: loss (\S+) -> (\S+) ", out).groups())
        assert last < first
        assert load_adapter(tmp_path / f"task{k}").config.r == 4
    assert out.count("reloaded bit-identical: True") == 2


def test_adapter_tree(tmp_path):
    out = run("adapter_tree.py", "--switches", "40", "--dim", "16", "--out", str(tmp_path))
    assert "depth 4" in out
    assert "bit-identical to merge-from-scratch after every switch: 40/40" in out
    assert (tmp_path / "tree" / "tree.json").exists()
