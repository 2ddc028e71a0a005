"""Guards shared by the commands that write files: never overwrite one of the command's inputs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import OverwriteRefusedError


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: same inode if both exist, else the same resolved path."""
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return Path(a).resolve() == Path(b).resolve()


def refuse_overwrites(
    outputs: Mapping[str, str | os.PathLike[str] | None],
    inputs: Mapping[str, str | os.PathLike[str] | None],
    *,
    hint: str = "write elsewhere",
) -> None:
    """Raise OverwriteRefusedError if an output (label -> path) would replace an input or another output."""
    named_inputs = {label: path for label, path in inputs.items() if path is not None}
    named_outputs = [(label, path) for label, path in outputs.items() if path is not None]
    for out_label, out in named_outputs:
        for in_label, source in named_inputs.items():
            if same_file(out, source):
                raise OverwriteRefusedError(f"{out}: the {out_label} would overwrite the {in_label}; {hint}")
    for i, (label_a, a) in enumerate(named_outputs):
        for label_b, b in named_outputs[i + 1:]:
            if same_file(a, b):
                raise OverwriteRefusedError(f"{a}: the {label_a} and the {label_b} are the same file")
