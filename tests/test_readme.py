"""The README's library quickstart runs as printed (a user copies it; it must not rot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "# runnable as it stands"


def runnable_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return [block for block in blocks if block.startswith(MARKER)]


def test_readme_has_a_runnable_quickstart() -> None:
    assert runnable_blocks(), f"no ```python block in README.md starts with {MARKER!r}"


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_runnable_block_executes(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the block writes its adapter directory into the working directory
    exec(compile(runnable_blocks()[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
    assert (tmp_path / "my_adapter" / "adapter_config.json").exists()
