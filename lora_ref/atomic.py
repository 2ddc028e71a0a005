"""Failure-safe writes: one write primitive, atomic files and folders, all-or-nothing commands.

Every byte lora-ref writes goes through :func:`write_at` (``os.pwrite`` in a loop), never through
a memory map: a full disk is then an ``ENOSPC`` from a system call, not a SIGBUS on a page fault.
Any ``OSError`` of a write (ENOSPC, EIO, EROFS, EACCES, EISDIR, ENOTDIR, EEXIST, ...) becomes a
:class:`WriteFailedError` naming the path, after the temporaries are removed.

- :func:`atomic_path` yields a temporary beside the target and renames it onto the target only
  when the block completes: a reader never sees a half-written file, and a failure leaves the
  previous file (if any) intact.
- :func:`staged_folder` does the same for a folder of files (a sharded checkpoint).
- :func:`transaction` (the CLI wraps every command in one) makes a command all-or-nothing across
  files: each target replaced inside it keeps a hard-linked backup of its previous version until
  the command succeeds; on failure every target is put back as it was, and the folders the
  command created are removed again.

Temporaries are named ``.<target name>.lora-ref-<pid>.<random>.partial``. One left behind by a
killed run (its pid no longer alive) is recognised and removed the next time that target is
written (:func:`clean_stale_partials`). :func:`check_output` makes the checks that can be made
before any heavy work: the target is not a directory, its parent is a directory (or can be made),
and the nearest existing folder is writable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LoraRefError

#: Largest single ``os.pwrite`` (bytes): bounded so that a write fault is seen at a known point.
WRITE_CHUNK = 8 * 2**20
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.lora-ref-(?P<pid>\d+)\.[^.]+\.partial$")


class WriteFailedError(LoraRefError, OSError):
    """The operating system refused a write (disk full, read-only, no permission, a file in the way)."""


def write_failed(path: str | os.PathLike[str], exc: OSError) -> WriteFailedError:
    """One line naming ``path`` and the OS reason (errno name and text)."""
    code = errno.errorcode.get(exc.errno or 0, "OSError")
    reason = exc.strerror or str(exc)
    error = WriteFailedError(f"{path}: cannot write ({code}: {reason}); nothing was changed there")
    error.errno = exc.errno
    return error


def write_at(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd``: the one primitive every lora-ref write uses.

    ``os.pwrite`` may write less than asked (signals, quotas); the loop finishes the job, in
    chunks of at most :data:`WRITE_CHUNK` bytes. Positional, so threads may write disjoint ranges.
    """
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        written = os.pwrite(fd, view[done:done + WRITE_CHUNK], offset + done)
        if written <= 0:
            raise OSError(errno.EIO, "the write made no progress")
        done += written


#: A gathering OutputFile collects sequential writes smaller than this ...
GATHER_SMALL = 1 << 16
#: ... and writes them once this many bytes are pending (or at a positional write, flush, close).
GATHER_BYTES = 1 << 20


class OutputFile:
    """A file opened for writing by fd; sequential ``write`` and positional ``write_at``.

    With ``gather``, consecutive small sequential writes are collected in memory and written
    together (one ``pwrite`` for thousands of tiny tensors): before any positional write, on
    :meth:`flush` and on :meth:`close`; :meth:`discard` drops them (a failed output). Bytes read
    back from the file (a mapping) are only there after :meth:`flush`.
    """

    def __init__(self, path: Path, *, gather: bool = False) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        self.offset = 0
        self._gather = gather
        self._pending = bytearray()
        self._pending_at = 0

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if self._pending and self.offset != self._pending_at + len(self._pending):
            self.flush()  # the offset moved (a reserved range): not contiguous with what is pending
        if not self._gather or len(view) >= GATHER_SMALL:
            self.write_at(view, self.offset)
        else:
            if not self._pending:
                self._pending_at = self.offset
            self._pending += view
            if len(self._pending) >= GATHER_BYTES:
                self.flush()
        self.offset += len(view)

    def flush(self) -> None:
        """Write the gathered bytes (nothing if none)."""
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            self._write(pending, self._pending_at)

    def discard(self) -> None:
        """Close without writing what is gathered (the output is being abandoned)."""
        self._pending = bytearray()
        self.close()

    def write_at(self, data: memoryview | bytes, offset: int) -> None:
        self.flush()
        self._write(data, offset)

    def _write(self, data: memoryview | bytes, offset: int) -> None:
        try:
            write_at(self.fd, data, offset)
        except OSError as exc:
            raise write_failed(self.path, exc) from None

    def extend_to(self, size: int) -> None:
        """Make the file ``size`` bytes long (a hole reads as zeros; no data is written)."""
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise write_failed(self.path, exc) from None

    def close(self) -> None:
        """Write what is gathered, then close (closed even if that write fails)."""
        try:
            self.flush()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


# -- checks before the work -------------------------------------------------------------------------
def check_output(target: str | os.PathLike[str], *, folder: bool = False) -> None:
    """Raise WriteFailedError now if ``target`` cannot be written (made before any heavy work).

    A file target must not be a directory; a folder target must not be a file. The parent chain
    must consist of directories up to the nearest existing one, which must be writable (as root
    ``os.access`` says yes: a read-only filesystem is then reported by the write itself).
    """
    target = Path(target)
    if target.is_dir() and not folder:
        raise write_failed(target, OSError(errno.EISDIR, "is a directory, expected a file name"))
    if folder and target.exists() and not target.is_dir():
        raise write_failed(target, OSError(errno.ENOTDIR, "is a file, expected a folder"))
    parent = target.parent
    while not parent.exists():
        if parent.is_symlink():
            raise write_failed(target, OSError(errno.ENOENT, f"{parent} is a dangling symbolic link"))
        parent = parent.parent
    if not parent.is_dir():
        raise write_failed(target, OSError(errno.ENOTDIR, f"{parent} is not a directory"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise write_failed(target, OSError(errno.EACCES, f"folder {parent} is not writable"))


# -- temporaries ------------------------------------------------------------------------------------
def partial_prefix(name: str) -> str:
    """The mkstemp prefix of a temporary for target ``name`` (marks it with this process' id)."""
    return f".{name}.lora-ref-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def stale_partials(target: str | os.PathLike[str]) -> list[Path]:
    """Temporaries of ``target`` (or of its scratch files) left by lora-ref runs that are not alive.

    Recognised by name (``.<name>[.<tag>].lora-ref-<pid>.<random>.partial`` beside the target)
    and by the recorded process id no longer running; anything else is never touched.
    """
    target = Path(target)
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            match = _PARTIAL.match(entry.name)
            if match and (match["name"] == target.name or match["name"].startswith(f"{target.name}.")) \
                    and not _pid_alive(int(match["pid"])):
                found.append(Path(entry.path))
    return found


def clean_stale_partials(target: str | os.PathLike[str]) -> list[Path]:
    """Remove :func:`stale_partials` of ``target``; return what was removed."""
    removed = []
    for path in stale_partials(target):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def make_parents(target: Path) -> None:
    """Create the missing folders above ``target``, recorded so a failed command removes them."""
    missing = []
    parent = target.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError as exc:  # made meanwhile by someone else: fine if it is a folder
            if folder.is_dir():
                continue
            raise write_failed(target, exc) from None
        except OSError as exc:
            raise write_failed(target, exc) from None
        _record(("folder", folder, None))


@contextlib.contextmanager
def scratch_path(beside: Path, tag: str) -> Iterator[Path]:
    """A temporary file path next to ``beside`` (same filesystem), removed on exit."""
    try:
        fd, name = tempfile.mkstemp(prefix=partial_prefix(f"{beside.name}.{tag}"), suffix=".partial", dir=beside.parent)
    except OSError as exc:
        raise write_failed(beside.parent, exc) from None
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        _forget(Path(name))


@contextlib.contextmanager
def scratch_folder(beside: Path, tag: str) -> Iterator[Path]:
    """A temporary folder next to ``beside``, removed with its contents on exit."""
    make_parents(beside)
    try:
        name = tempfile.mkdtemp(prefix=partial_prefix(f"{beside.name}.{tag}"), suffix=".partial", dir=beside.parent)
    except OSError as exc:
        raise write_failed(beside.parent, exc) from None
    try:
        yield Path(name)
    finally:
        shutil.rmtree(name, ignore_errors=True)


# -- atomic files and folders -----------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on normal exit fsync it and rename it onto ``target``.

    On an exception the temporary file is removed and ``target`` is untouched; an OSError of the
    write becomes a WriteFailedError naming ``target``.
    """
    target = Path(target)
    check_output(target)
    clean_stale_partials(target)
    with transaction():  # a folder made for it goes again if the write fails
        make_parents(target)
        with _temporary_file(target) as tmp:
            yield tmp


@contextlib.contextmanager
def _temporary_file(target: Path) -> Iterator[Path]:
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=partial_prefix(target.name), suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise write_failed(target, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            handle = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
            os.chmod(tmp, _mode_for(target))  # mkstemp made it 0600
            _replace(tmp, target)
        except WriteFailedError:
            raise
        except OSError as exc:
            raise write_failed(target, exc) from None
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _forget(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, LoraRefError) and _is_write_errno(exc):
            raise write_failed(target, exc) from None
        raise


def _is_write_errno(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def _mode_for(target: Path) -> int:
    """The permission bits the file at ``target`` has, or a new file would get (0666 & ~umask)."""
    try:
        return os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder; on normal exit its files appear in ``target`` all together.

    A new ``target`` is the temporary folder renamed (one atomic step). An existing ``target``
    receives the files one rename each (the caller has checked none of their names is taken);
    a failure half-way takes the moved ones back out. On an exception nothing of it is left.
    """
    target = Path(target)
    check_output(target, folder=True)
    clean_stale_partials(target)
    with transaction(), scratch_folder(target, "staged") as staging:
        yield staging
        try:
            if not target.exists():
                os.chmod(staging, 0o777 & ~_umask())  # mkdtemp made it 0700; a new folder gets the usual mode
                os.rename(staging, target)
                _record(("tree", target, None))
                return
            moved: list[Path] = []
            try:
                for entry in sorted(staging.iterdir()):
                    destination = target / entry.name
                    if destination.exists():
                        raise OSError(errno.EEXIST, f"{destination} appeared while writing")
                    os.rename(entry, destination)
                    moved.append(destination)
            except OSError:
                for destination in moved:
                    with contextlib.suppress(OSError):
                        os.rename(destination, staging / destination.name)
                raise
            for destination in moved:
                _record(("file", destination, None))
        except OSError as exc:
            raise write_failed(target, exc) from None


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically, through :func:`write_at`."""
    with atomic_path(target) as tmp:
        out = OutputFile(tmp)
        try:
            out.write(data)
        finally:
            out.close()


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``target`` atomically."""
    write_bytes_atomic(target, text.encode("utf-8"))


# -- transactions -----------------------------------------------------------------------------------
#: The open transactions (innermost last); each is a list of undo records (kind, path, backup).
_TRANSACTIONS: list[list[tuple[str, Path, Path | None]]] = []


def _record(entry: tuple[str, Path, Path | None]) -> None:
    if _TRANSACTIONS:
        _TRANSACTIONS[-1].append(entry)


def _replace(tmp: Path, target: Path) -> None:
    """os.replace(tmp, target), keeping a hard-linked backup of the old target inside a transaction.

    Where hard links are impossible (some filesystems) the old file cannot be kept without a copy:
    the replacement is then recorded as one the transaction cannot undo (named if it must).
    """
    kind, backup = "file", None
    if _TRANSACTIONS and target.is_file():
        for _ in range(100):
            candidate = Path(tempfile.mktemp(prefix=partial_prefix(f"{target.name}.backup"), suffix=".partial",
                                             dir=target.parent))
            try:
                os.link(target, candidate)
            except FileExistsError:
                continue
            except OSError:
                kind = "kept"
            else:
                backup = candidate
            break
    try:
        os.replace(tmp, target)
    except OSError:
        if backup is not None:  # the old target stays where it is: its backup link is not needed
            with contextlib.suppress(OSError):
                backup.unlink()
        raise
    _record((kind, target, backup))


def commit(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename a finished temporary onto ``target`` (undone by a failing transaction)."""
    try:
        _replace(Path(tmp), Path(target))
    except OSError as exc:
        raise write_failed(target, exc) from None


def _forget(path: Path) -> None:
    """Drop undo records for a temporary ``path`` that its owner has just removed."""
    for log in _TRANSACTIONS:
        for entry in [e for e in log if e[1] == path]:
            if entry[2] is not None:
                with contextlib.suppress(OSError):
                    entry[2].unlink()
            log.remove(entry)


@contextlib.contextmanager
def transaction() -> Iterator[None]:
    """All or nothing: on an exception every file replaced inside is restored, new ones removed.

    Folders created inside (by :func:`make_parents` or :func:`staged_folder`) are removed too.
    On success the backups are deleted. A transaction opened inside another joins it. Undo is
    best effort against a second failure of the filesystem, which is then named in the error.
    """
    if _TRANSACTIONS:  # nested: part of the outer one
        yield
        return
    log: list[tuple[str, Path, Path | None]] = []
    _TRANSACTIONS.append(log)
    try:
        yield
    except BaseException as exc:
        _TRANSACTIONS.remove(log)
        failed = _undo(log)
        if failed and isinstance(exc, LoraRefError):
            raise type(exc)(f"{exc} (could not restore {', '.join(map(str, failed[:3]))})") from None
        raise
    _TRANSACTIONS.remove(log)
    for _, _, backup in log:
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()


def _undo(log: list[tuple[str, Path, Path | None]]) -> list[Path]:
    """Undo ``log`` newest first; return the paths that could not be put back."""
    failed = []
    for kind, path, backup in reversed(log):
        try:
            if kind == "tree":  # a staged folder renamed into place: all of it is ours
                shutil.rmtree(path)
            elif kind == "folder":  # a parent we made: removed once empty (someone else's files stay)
                with contextlib.suppress(OSError):
                    path.rmdir()
            elif kind == "kept":  # replaced without a backup: cannot be put back
                failed.append(path)
            elif backup is not None:
                os.replace(backup, path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        except OSError:
            failed.append(path)
    return failed


def copy_file_atomic(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> int:
    """Copy the bytes of the regular file ``source`` to ``target`` verbatim and atomically; the byte count.

    Read through :func:`lora_ref.inputs.open_regular` (a FIFO or device is refused, never
    opened for a blocking read) and written through :func:`write_at` in chunks of
    :data:`WRITE_CHUNK`, so memory stays at one chunk whatever the file's size.
    """
    from .inputs import open_regular

    copied = 0
    with open_regular(source, "file to copy") as reader, atomic_path(target) as tmp:
        out = OutputFile(tmp)
        try:
            while chunk := reader.read(WRITE_CHUNK):
                out.write(chunk)
                copied += len(chunk)
        finally:
            out.close()
    return copied
