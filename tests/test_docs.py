"""Every code block in every document runs as printed (a user copies them; they must not rot).

Each document's ```python and ```bash blocks run top to bottom in one fresh working directory:
python blocks share one namespace (a later block may use an earlier block's names); a block
fenced as ```python file=NAME is a file the reader saves, so it is written to NAME; bash blocks
run under ``bash -euo pipefail`` with this interpreter's ``bin/`` first on PATH, and
``REPO`` naming the repository root. A block is exempt only when the line just above it is
``<!-- doc-test: skip REASON -->`` (for what cannot run here: a GPU, a long fuzz campaign);
the reason is required. Other fences (```text, output samples) are not code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(
    [REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "conformance").glob("*.md")]
)
FENCE = re.compile(r"^```(\w*)(?: file=(\S+))?\n(.*?)^```\s*$", re.S | re.M)
SKIP = re.compile(r"<!-- doc-test: skip (\S.*?) -->\s*$")


@dataclass(frozen=True)
class Block:
    language: str
    file: str | None
    code: str
    line: int
    skip_reason: str | None


def code_blocks(document: Path) -> list[Block]:
    text = document.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        language = match.group(1)
        if language not in ("python", "bash"):
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append(Block(language, match.group(2), match.group(3), text.count("\n", 0, match.start()) + 1, skip.group(1) if skip else None))
    return blocks


def run_document(document: Path, workdir: Path) -> int:
    """Run the document's blocks in order in ``workdir``; return how many ran."""
    namespace: dict[str, object] = {"__name__": "doc"}
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", REPO=str(REPO))
    ran = 0
    for block in code_blocks(document):
        if block.skip_reason:
            continue
        where = f"{document.relative_to(REPO)}:{block.line}"
        if block.file:
            (workdir / block.file).write_text(block.code, encoding="utf-8")
        elif block.language == "python":
            exec(compile(block.code, where, "exec"), namespace)
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=workdir, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{where} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        ran += 1
    return ran


def test_every_document_is_found() -> None:
    names = {d.relative_to(REPO).as_posix() for d in DOCUMENTS}
    assert {"README.md", "bench/README.md", "conformance/SPEC.md"} <= names


def test_skips_give_a_reason() -> None:
    text = "<!-- doc-test: skip  -->\n```python\nraise SystemExit\n```\n"
    assert not SKIP.search(text.splitlines()[0])


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.relative_to(REPO).as_posix())
def test_document_blocks_run(document: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # a block may write a module and import it, as a user would
    run_document(document, tmp_path)


def test_the_package_docstring_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lora_ref/__init__``'s map of the public API: every example runs and prints what it shows."""
    import doctest

    import lora_ref

    monkeypatch.chdir(tmp_path)
    failures, tried = doctest.testmod(lora_ref, verbose=False, report=True)
    assert tried > 10 and failures == 0


def test_the_package_map_names_every_public_entry() -> None:
    """Each name in ``lora_ref.__all__`` is importable, and each is used in the map's examples."""
    import lora_ref

    missing = [name for name in lora_ref.__all__ if not hasattr(lora_ref, name)]
    assert not missing
    unused = [name for name in lora_ref.__all__ if name not in lora_ref.__doc__ and name[0].islower()]
    assert not unused, f"public functions without an example in lora_ref/__init__: {unused}"


def test_readme_results_at_a_glance_is_rendered_from_results_md() -> None:
    """README's conformance table is RESULTS.md's summary (re-rendered here), and RESULTS.md is of
    the frozen suite as it is: the reference's judged cases are every case in the manifest."""
    from lora_ref.conformance.casefile import default_suite, read_manifest
    from lora_ref.conformance.results_doc import OUT, README, glance, with_glance

    readme, results = README.read_text(encoding="utf-8"), OUT.read_text(encoding="utf-8")
    assert with_glance(readme, results) == readme, "rerun python -m lora_ref.conformance.results_doc"
    cases = len(read_manifest(default_suite())[1])
    assert f"on the suite's {cases} cases" in glance(results), "RESULTS.md is of another suite: rerun results_doc"
    guide = (README.parent / "docs" / "conformance.md").read_text(encoding="utf-8")
    assert f"holds {cases} frozen cases" in guide, "docs/conformance.md states another suite size"
