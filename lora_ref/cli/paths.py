"""The one path guard of the commands that write files: no output may replace anything read.

Before any work, a command lists every path it reads (inputs, adapter files, residuals, shards,
the external-data files an input ONNX graph references) and every path it will write (outputs,
residuals, external-data files, output folders); :meth:`PathGuard.check` then refuses, with an
:class:`OverwriteRefusedError` (exit 2), any written path that is one of the read paths or
another written path. Two paths are the same file when they have the same device and inode
(symbolic and hard links included) or, for a file not yet written, the same resolved location
(its parent's symbolic links resolved). A command writing into a folder lists the files it will
write there (and the folder, for the checks below). Temporaries cannot collide: they are created with fresh names (``O_EXCL``), but a
stale temporary that a write would clean up (:func:`lora_ref.atomic.stale_partials`) must not be
an input either. Finally every written path gets the checks :func:`lora_ref.atomic.check_output`
can make before the work (a directory where a file goes, a parent that is a file, no write
permission), so those failures come first, not after minutes of merging.

An output file that already exists is refused too (the one rule of every writing command), unless
the command was given ``--overwrite`` (:func:`add_overwrite_option`; ``PathGuard(overwrite=True)``):
then it is replaced atomically. A folder output may exist; the files written into it are checked
one by one. ``--force`` is not this: on merge/unmerge it overrides the merge record (docs/integrity.md).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import check_output, stale_partials
from ..errors import OverwriteRefusedError

PathLike = str | os.PathLike[str]


def _where(path: Path) -> tuple[tuple[int, int] | None, str]:
    """(device, inode) if the path exists (links followed), and its resolved location."""
    try:
        st = os.stat(path)
        inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        inode = None
    return inode, os.path.realpath(path)


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: same device and inode if both exist, else the same resolved path."""
    (inode_a, real_a), (inode_b, real_b) = _where(Path(a)), _where(Path(b))
    return (inode_a is not None and inode_a == inode_b) or real_a == real_b


@dataclass
class PathGuard:
    """Collects (label, path) of what a command reads and writes; :meth:`check` refuses collisions."""

    hint: str = "write elsewhere"
    overwrite: bool = False
    reads: list[tuple[str, Path]] = field(default_factory=list)
    writes: list[tuple[str, Path, bool]] = field(default_factory=list)

    def read(self, label: str, path: PathLike | None) -> PathGuard:
        if path is not None:
            self.reads.append((label, Path(path)))
        return self

    def read_adapter(self, directory: PathLike) -> PathGuard:
        """An adapter directory and the files in it that a load reads."""
        from ..adapter import WEIGHTS_NAME
        from ..config import CONFIG_NAME

        self.read(f"adapter {directory}", directory)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            self.read(f"adapter file {name}", Path(directory) / name)
        return self

    def read_checkpoint(self, label: str, path: PathLike | None) -> PathGuard:
        """A checkpoint (one .safetensors file, a sharded index or a model directory) and every weight file it names."""
        if path is not None:
            from ..hf_model import weight_files

            self.read(label, path)
            for file in weight_files(path):
                self.read(f"{label} file {file.name}", file)
        return self

    def write(self, label: str, path: PathLike | None, *, folder: bool = False) -> PathGuard:
        if path is not None:
            self.writes.append((label, Path(path), folder))
        return self

    def check(self) -> None:
        """Raise OverwriteRefusedError (or WriteFailedError for an unwritable target) before any work."""
        reads = [(label, path, _where(path)) for label, path in self.reads]
        for i, (out_label, out, folder) in enumerate(self.writes):
            out_inode, out_real = _where(out)
            for in_label, source, (in_inode, in_real) in reads:
                if (out_inode is not None and out_inode == in_inode) or out_real == in_real:
                    shown = "" if str(source) == str(out) else f" ({source})"
                    raise OverwriteRefusedError(f"{out}: the {out_label} would overwrite the {in_label}{shown}; {self.hint}")
            for other_label, other, _ in self.writes[i + 1:]:
                if same_file(out, other):
                    raise OverwriteRefusedError(f"{out}: the {out_label} and the {other_label} are the same file")
            if not folder:
                stale = {os.path.realpath(p) for p in stale_partials(out)}
                clash = [source for _, source, (_, real) in reads if real in stale]
                if clash:
                    raise OverwriteRefusedError(f"{clash[0]}: an input is named like a stale lora-ref temporary of "
                                                f"{out} (it would be cleaned up); rename it")
                if not self.overwrite and os.path.lexists(out) and not os.path.isdir(out):
                    raise OverwriteRefusedError(f"{out}: the {out_label} already exists; pass --overwrite to replace it, "
                                                "or write elsewhere")
        for _, out, folder in self.writes:
            check_output(out, folder=folder)


def refuse_overwrites(
    outputs: dict[str, PathLike | None],
    inputs: dict[str, PathLike | None],
    *,
    hint: str = "write elsewhere",
    overwrite: bool = False,
) -> None:
    """Raise OverwriteRefusedError if an output (label -> path) would replace an input, another output,
    or (unless ``overwrite``) a file that already exists."""
    guard = PathGuard(hint=hint, overwrite=overwrite)
    for label, path in inputs.items():
        guard.read(label, path)
    for label, path in outputs.items():
        guard.write(label, path)
    guard.check()


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace output files that already exist (refused otherwise, by :meth:`PathGuard.check`)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that already exist (atomically); without it an existing output is refused")
