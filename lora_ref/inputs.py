"""Inputs must be regular files (or directories where a directory is expected).

A FIFO given as an input would block a reader forever (or feed it an endless stream); a device
or socket is no checkpoint either. Every loader goes through :func:`open_regular` (which opens
with ``O_NONBLOCK``, so even a FIFO swapped in after a check cannot hang the open, and checks
the opened descriptor) or, where a library opens the path itself (onnx, onnxruntime),
:func:`require_regular_file` just before. Symbolic links are followed: the target must be regular.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import FileFormatError, NotRegularFileError


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _a(what: str) -> str:
    return f"{'an' if what[:1].lower() in 'aeiou' else 'a'} {what}"


def _check(path: Path, st: os.stat_result, what: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise FileFormatError(f"{path}: is a directory, expected {_a(what)}")
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(f"{path}: is {_kind(st.st_mode)}, expected {_a(what)} (a regular file); "
                                  "refusing to read it")


def require_regular_file(path: str | os.PathLike[str], what: str = "file") -> os.stat_result:
    """Raise unless ``path`` is (links followed) a regular file; return its stat."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file (expected {_a(what)})") from None
    except (OSError, ValueError) as exc:  # no permission, a loop of links, a NUL in the name
        raise FileFormatError(f"{path}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    _check(path, st, what)
    return st


def require_directory(path: str | os.PathLike[str], what: str = "directory") -> None:
    """Raise unless ``path`` is (links followed) a directory: "<path>: not a <what> (<why>)"."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileFormatError(f"{path}: not {_a(what)} (no such folder)") from None
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: not {_a(what)} ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISDIR(st.st_mode):
        error = FileFormatError if stat.S_ISREG(st.st_mode) else NotRegularFileError
        kind = "a file" if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)
        raise error(f"{path}: not {_a(what)} (it is {kind})")


def open_regular(path: str | os.PathLike[str], what: str = "file") -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (checked on the open descriptor)."""
    path = Path(path)
    require_regular_file(path, what)  # the clear message for the common case, before any open
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file (expected {_a(what)})") from None
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        _check(path, os.fstat(fd), what)  # swapped for something else since the check
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
