"""Run an implementation through the suite: in-process or subprocess drivers, per-case checks.

Protocols (SPEC C.4):

* in-process: an object with ``run(op, params, inputs) -> outputs`` (dicts of NumPy arrays);
  ``NotImplementedError`` means unsupported (the case is skipped).
* subprocess: ``COMMAND run <case_dir> <out_dir>`` reads ``<case_dir>/case.json`` and
  ``inputs.safetensors`` (already in the chosen layout) and writes ``<out_dir>/outputs.safetensors``;
  exit 0 = done, 77 = unsupported, anything else = error. Persistent mode starts
  ``COMMAND serve`` once and sends one line per case, ``run <case_dir> <out_dir>``, answered by
  one line: ``ok``, ``unsupported`` or ``error <reason>``.

Every failure of one case (malformed case directory, an exception, a crash, a hang past the
per-case timeout, no output, a wrong output name, dtype or shape) becomes that case's
``error`` with the reason; the run continues with the next case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..dtypes import STORAGE_DTYPES, dtype_name, resolve_dtype
from ..errors import ConfigError, FileFormatError
from ..safetensors_io import load_file, save_file
from .bounds import OutputCheck, check_bitwise, check_bounded, tolerance
from .casefile import CASE_JSON, INPUTS, OUTPUTS, Case, CaseFormatError, case_dir, load_case, read_manifest, write_json
from .layouts import Layout, get_layout

EXIT_UNSUPPORTED = 77
#: Compute-dtype profiles: the SPEC minimum (float32), float64, or the case's own storage dtype.
COMPUTE_PROFILES = ("float32", "float64", "storage")


class Unsupported(Exception):
    """The implementation does not support this case (reported as skipped)."""


class CaseError(Exception):
    """The implementation or the case failed in a way that is not a numeric mismatch."""


class Driver(Protocol):
    name: str

    def execute(self, case: Case, params: dict[str, Any], inputs: dict[str, np.ndarray], timeout: float) -> Mapping[str, np.ndarray]: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise CaseError after ``seconds`` (main thread only: SIGALRM cannot stop native code)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise CaseError(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class InProcessDriver:
    """Calls ``impl.run`` directly."""

    def __init__(self, impl: Any, name: str = "") -> None:
        if not callable(getattr(impl, "run", None)):
            raise ConfigError(f"implementation {impl!r} has no run(op, params, inputs) method")
        self.impl = impl
        self.name = name or type(impl).__name__

    def execute(self, case: Case, params: dict[str, Any], inputs: dict[str, np.ndarray], timeout: float) -> Mapping[str, np.ndarray]:
        try:
            with _alarm(timeout):
                outputs = self.impl.run(case.operation, params, inputs)
        except NotImplementedError as exc:
            raise Unsupported(str(exc) or "not implemented") from None
        except CaseError:
            raise
        except Exception as exc:  # the implementation's own failure: report it for this case only
            raise CaseError(f"raised {type(exc).__name__}: {exc}") from None
        if not isinstance(outputs, Mapping):
            raise CaseError(f"run() returned {type(outputs).__name__}, expected a dict of arrays")
        return outputs

    def close(self) -> None:
        pass


def _tail(text: str | bytes, limit: int = 300) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.strip().split())
    return text if len(text) <= limit else "..." + text[-limit:]


class SubprocessDriver:
    """Runs ``COMMAND run <case_dir> <out_dir>`` per case, or one ``COMMAND serve`` (persistent)."""

    def __init__(self, command: str | Sequence[str], *, persistent: bool = False) -> None:
        self.command = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.command:
            raise ConfigError("--cmd is empty")
        self.persistent = persistent
        self.name = " ".join(self.command) + (" (persistent)" if persistent else "")
        # scratch case directories: in RAM (/dev/shm) where there is one, so the per-case fsync of
        # the atomic writes costs nothing (it dominated the persistent protocol on a disk)
        shm = Path("/dev/shm")
        scratch = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self._work = Path(tempfile.mkdtemp(prefix="lora-ref-conformance-", dir=scratch))
        self._server: subprocess.Popen | None = None
        self._stderr = None  # the persistent server's stderr file
        self._counter = 0

    def _prepare(self, case: Case, params: dict[str, Any], inputs: dict[str, np.ndarray]) -> tuple[Path, Path]:
        self._counter += 1
        directory = self._work / f"case{self._counter:05d}"
        out_dir = directory / "out"
        out_dir.mkdir(parents=True)
        save_file(directory / INPUTS, inputs)
        write_json(directory / CASE_JSON, {
            "id": case.case_id, "operation": case.operation, "dtype": case.dtype, "params": params,
            "inputs": {name: {"dtype": dtype_name(a.dtype), "shape": list(a.shape)} for name, a in inputs.items()},
            "outputs": {name: {"dtype": spec["dtype"]} for name, spec in case.outputs.items() if spec["check"] != "product"},
        })
        return directory, out_dir

    def execute(self, case: Case, params: dict[str, Any], inputs: dict[str, np.ndarray], timeout: float) -> Mapping[str, np.ndarray]:
        directory, out_dir = self._prepare(case, params, inputs)
        try:
            if self.persistent:
                self._serve_one(directory, out_dir, timeout)
            else:
                self._run_one(directory, out_dir, timeout)
            path = out_dir / OUTPUTS
            if not path.exists():
                raise CaseError(f"wrote no {OUTPUTS}")
            try:
                return load_file(path)
            except FileFormatError as exc:
                raise CaseError(f"malformed outputs: {exc}") from None
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _run_one(self, directory: Path, out_dir: Path, timeout: float) -> None:
        try:
            process = subprocess.Popen([*self.command, "run", str(directory), str(out_dir)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise CaseError(f"cannot start {self.command[0]!r}: {exc}") from None
        try:
            _, stderr = process.communicate(timeout=timeout if timeout > 0 else None)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise CaseError(f"timed out after {timeout:g} s (process killed)") from None
        if process.returncode == EXIT_UNSUPPORTED:
            raise Unsupported(_tail(stderr) or "exit 77")
        if process.returncode != 0:
            raise CaseError(f"exit status {process.returncode}: {_tail(stderr) or '(no stderr)'}")

    def _start_server(self) -> subprocess.Popen:
        if self._server is None or self._server.poll() is not None:
            self._close_stderr()
            self._stderr = open(self._work / "serve.stderr", "w+b")  # noqa: SIM115 - lives as long as the server
            try:
                self._server = subprocess.Popen([*self.command, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=self._stderr, start_new_session=True)
            except OSError as exc:
                raise CaseError(f"cannot start {self.command[0]!r}: {exc}") from None
        return self._server

    def _serve_one(self, directory: Path, out_dir: Path, timeout: float) -> None:
        server = self._start_server()
        try:
            server.stdin.write(f"run {directory} {out_dir}\n".encode())
            server.stdin.flush()
        except (BrokenPipeError, OSError):
            self._stop_server()
            raise CaseError("the persistent server exited before the request") from None
        line = self._read_line(server, timeout)
        if line is None:
            self._stop_server()
            raise CaseError(f"timed out after {timeout:g} s (server killed; restarted for the next case)")
        if line == b"":
            code = server.wait()
            self._stderr.seek(0)
            reason = _tail(self._stderr.read())
            self._server = None
            raise CaseError(f"the persistent server exited (status {code}): {reason or '(no stderr)'}")
        reply = line.decode("utf-8", "replace").strip()
        if reply == "ok":
            return
        if reply.startswith("unsupported"):
            raise Unsupported(reply[len("unsupported"):].strip() or "unsupported")
        raise CaseError(reply[len("error"):].strip() if reply.startswith("error") else f"unexpected reply {reply!r}")

    @staticmethod
    def _read_line(server: subprocess.Popen, timeout: float) -> bytes | None:
        """One line from the server's stdout, b"" at end of file, None on timeout."""
        fd = server.stdout.fileno()
        deadline = time.monotonic() + timeout if timeout > 0 else None
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while not buffer.endswith(b"\n"):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                if not selector.select(remaining):
                    return None
                chunk = os.read(fd, 4096)
                if not chunk:
                    return buffer if buffer else b""
                buffer += chunk
        return buffer

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _stop_server(self) -> None:
        if self._server is not None:
            _kill_group(self._server)
            self._server = None

    def close(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.stdin.close()
            try:
                self._server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _kill_group(self._server)
            self._server = None
        self._close_stderr()
        shutil.rmtree(self._work, ignore_errors=True)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=5)


@dataclass
class CaseResult:
    """The outcome of one case: status is pass, fail, skip or error."""

    case_id: str
    operation: str
    dtype: str
    status: str
    seconds: float = 0.0
    ratio: float | None = None  # max over outputs of max |ŷ − y| / tol
    ulps: int | None = None  # max over outputs of the ulp distance from round_t(y)
    detail: str = ""
    outputs: list[OutputCheck] = field(default_factory=list)


@dataclass
class SuiteResult:
    """All case results of one run, with what ran and how."""

    suite_version: str
    implementation: str
    layout: str
    compute: str
    results: list[CaseResult]

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.results) for status in ("pass", "fail", "skip", "error")}

    @property
    def ok(self) -> bool:
        counts = self.counts()
        return counts["fail"] == 0 and counts["error"] == 0


def compute_dtype_for(profile: str, storage: str) -> np.dtype:
    """The compute dtype a profile means for a case stored in ``storage``."""
    if profile not in COMPUTE_PROFILES:
        raise ConfigError(f"unknown compute profile {profile!r}; choose one of {COMPUTE_PROFILES}")
    return resolve_dtype(storage if profile == "storage" else profile)


def check_outputs(case: Case, expected: Mapping[str, np.ndarray], outputs: Mapping[str, Any], profile: str) -> list[OutputCheck]:
    """Check every declared output; CaseError for a missing output or a wrong dtype or shape."""
    storage = STORAGE_DTYPES[case.dtype]
    compute = compute_dtype_for(profile, case.dtype)
    checks = []
    for name, spec in case.outputs.items():
        if spec["check"] == "product":
            continue  # formed below from its factors, once they are checked
        if name not in outputs:
            raise CaseError(f"no output {name!r} (returned {sorted(outputs)})")
        actual = outputs[name]
        if not isinstance(actual, np.ndarray):
            raise CaseError(f"output {name!r} is a {type(actual).__name__}, not a numpy array")
        if actual.dtype != storage:
            raise CaseError(f"output {name!r} has dtype {dtype_name(actual.dtype)}, expected {case.dtype}")
        if list(actual.shape) != list(spec["shape"]):
            raise CaseError(f"output {name!r} has shape {list(actual.shape)}, expected {spec['shape']}")
        if spec["check"] == "bitwise":
            checks.append(check_bitwise(name, actual, expected[name]))
        elif spec["check"] == "factor":  # judged through the product it enters
            checks.append(OutputCheck(name, True, 0.0, 0))
        else:
            tol = tolerance(expected[name], expected[f"{name}.magnitude"], spec["K"], storage, compute)
            checks.append(check_bounded(name, actual, expected[name], tol, storage))
    for name, spec in case.outputs.items():
        if spec["check"] == "product":
            left, right = (np.asarray(outputs[f]).astype(np.float64) for f in spec["factors"])
            if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
                raise CaseError(f"factors {spec['factors']} of {name!r} have shapes {left.shape} and {right.shape}")
            tol = tolerance(expected[name], expected[f"{name}.magnitude"], spec["K"], np.dtype(np.float64), compute)
            check = check_bounded(name, left @ right, expected[name], tol + expected[f"{name}.slack"], np.dtype(np.float64))
            checks.append(dataclasses.replace(check, ulps=0))  # ulps of t do not apply to a float64 product
    return checks


def run_case(path: Path, case_id: str, driver: Driver, layout: Layout, profile: str, timeout: float,
             operation: str = "?", dtype: str = "?") -> CaseResult:
    """Run and check one case; never raises for a problem of this case or implementation.

    ``operation`` and ``dtype`` (from the manifest) label the result until case.json is read.
    """
    start = time.perf_counter()
    try:
        case = load_case(path)
        operation, dtype = case.operation, case.dtype
        if case.case_id != case_id:
            raise CaseFormatError(f"{path / CASE_JSON}: id {case.case_id!r} does not match the manifest's {case_id!r}")
        inputs, expected = case.load_inputs(), case.load_expected()
        params, impl_inputs = layout.to_impl(case.operation, case.params, inputs)
        outputs = driver.execute(case, params, impl_inputs, timeout)
        outputs = layout.from_impl(case.operation, case.params, outputs)
        checks = check_outputs(case, expected, outputs, profile)
    except Unsupported as exc:
        return CaseResult(case_id, operation, dtype, "skip", time.perf_counter() - start, detail=str(exc))
    except (CaseError, CaseFormatError) as exc:
        return CaseResult(case_id, operation, dtype, "error", time.perf_counter() - start, detail=str(exc))
    except Exception as exc:  # e.g. a layout adapter fed outputs it cannot map: still this case's error
        return CaseResult(case_id, operation, dtype, "error", time.perf_counter() - start,
                          detail=f"unexpected {type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    failed = [c for c in checks if not c.ok]
    return CaseResult(
        case_id, operation, dtype, "fail" if failed else "pass", seconds,
        ratio=max((c.ratio for c in checks), default=0.0), ulps=max((c.ulps for c in checks), default=0),
        detail="; ".join(c.detail for c in failed), outputs=checks,
    )


@dataclass(frozen=True)
class Selection:
    """Case filters: substrings of the id (all must match), groups, dtypes, operations (empty = all)."""

    keywords: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    operations: tuple[str, ...] = ()

    def matches(self, case_id: str, operation: str, dtype: str) -> bool:
        group = case_id.split("/", 1)[0]
        return (all(k in case_id for k in self.keywords) and (not self.groups or group in self.groups)
                and (not self.dtypes or dtype in self.dtypes) and (not self.operations or operation in self.operations))


def select_cases(suite: str | Path, selection: Selection = Selection()) -> tuple[str, list[tuple[str, str, str]]]:
    """(suite_version, [(case_id, operation, dtype)]) of the manifest entries the selection keeps."""
    version, entries = read_manifest(suite)
    return version, [(e.case_id, e.operation, e.dtype) for e in entries if selection.matches(e.case_id, e.operation, e.dtype)]


def run_suite(suite: str | Path, driver: Driver, *, layout: str = "canonical", profile: str = "float32",
              selection: Selection = Selection(), timeout: float = 60.0) -> SuiteResult:
    """Run every selected case of ``suite`` through ``driver``; the driver is closed at the end."""
    compute_dtype_for(profile, "float32")  # validate the profile before running anything
    chosen = get_layout(layout)
    version, cases = select_cases(suite, selection)
    try:
        results = [run_case(case_dir(suite, case_id), case_id, driver, chosen, profile, timeout, operation, dtype)
                   for case_id, operation, dtype in cases]
    finally:
        driver.close()
    return SuiteResult(version, driver.name, layout, profile, results)
