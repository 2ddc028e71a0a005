"""Run an implementation through the suite: in-process or subprocess drivers, per-case checks.

Protocols (SPEC C.4):

* in-process: an object with ``run(op, params, inputs) -> outputs`` (dicts of NumPy arrays);
  ``NotImplementedError`` means unsupported (the case is skipped); raising
  :class:`lora_ref.conformance.Refusal`, a ``LoraRefError``, ``ValueError`` or ``IndexError``
  is a refusal (:data:`REFUSALS`).
* subprocess: ``COMMAND run <case_dir> <out_dir>`` reads ``<case_dir>/case.json`` and
  ``inputs.safetensors`` (already in the chosen layout) and writes ``<out_dir>/outputs.safetensors``;
  exit 0 = done, 3 = refused, 77 = unsupported, anything else = error. Persistent mode starts
  ``COMMAND serve`` once and sends one line per case, ``run <case_dir> <out_dir>``, answered by
  one line: ``ok``, ``refused <why>``, ``unsupported <why>`` or ``error <why>``.

A case whose expected outcome is a refusal passes only when the implementation refuses; any
other case that is refused is an ``error``. Every other failure of one case (malformed case
directory, an exception, a crash, no output, a wrong output name, dtype or shape) becomes that
case's ``error`` with the reason, a hang past the per-case timeout its ``timeout``; the run
continues with the next case.

Two verdicts per case (SPEC C.5): every output is checked against the float32-compute bound
and against the storage-compute bound (c = t), whatever profile was chosen; the chosen profile
decides pass/fail, the tiers say whether a failure is precision (within the storage bound) or
semantics (outside both).
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..dtypes import STORAGE_DTYPES, dtype_name, resolve_dtype
from ..errors import ConfigError, FileFormatError, LoraRefError
from ..safetensors_io import load_file, save_file
from . import Refusal
from .bounds import OutputCheck, check_bitwise, check_bounded, tolerance
from .casefile import CASE_JSON, INPUTS, OUTPUTS, Case, CaseFormatError, case_dir, load_case, read_manifest, write_json
from .layouts import Layout, get_layout

EXIT_UNSUPPORTED = 77
#: Subprocess protocol: the implementation refused the case's inputs (a typed refusal).
EXIT_REFUSED = 3
#: What the in-process protocol counts as a refusal (see :class:`lora_ref.conformance.Refusal`).
REFUSALS: tuple[type[BaseException], ...] = (Refusal, LoraRefError, ValueError, IndexError)
@dataclass(frozen=True)
class ComputeProfile:
    """What a ``--compute`` profile allows (SPEC C.3): the compute dtype c for a case stored in t,
    and, per operation, j = how many intermediate results on a term's path may be rounded to t
    besides the final rounding (operations not named: j = 0)."""

    compute: Callable[[str], str]
    summary: str
    roundings: Mapping[str, int] = field(default_factory=dict)

    def roundings_for(self, operation: str) -> int:
        return self.roundings.get(operation, 0)


#: Compute profiles: the SPEC minimum (float32), float64, the case's own storage dtype, and ggml (float32
#: accumulation, llama.cpp's rank-r intermediate A x rounded to lora_b's type t: SPEC G.5; embedding lookups
#: (ggml_get_rows) are exact and llama-export-lora merges in float32, so those keep j = 0). Adding a profile is one
#: entry here (the CLI's --compute choices and help and the bounds follow); a tier in TIERS must name one of these.
COMPUTE_PROFILES: dict[str, ComputeProfile] = {
    "float32": ComputeProfile(lambda storage: "float32", "SPEC minimum"),
    "float64": ComputeProfile(lambda storage: "float64", "float64 compute"),
    "storage": ComputeProfile(lambda storage: storage, "compute in the case dtype"),
    "ggml": ComputeProfile(lambda storage: "float32", "llama.cpp/ggml CPU: float32 accumulation, A x rounded to lora_b's type",
                           {"linear.forward": 1}),
}
#: The two tiers every case is judged in, whatever the profile (SPEC C.5).
TIERS = ("float32", "storage")


class Unsupported(Exception):
    """The implementation does not support this case (reported as skipped)."""


class CaseError(Exception):
    """The implementation or the case failed in a way that is not a numeric mismatch."""


class CaseTimeout(CaseError):
    """The implementation did not answer within the per-case timeout."""


class Refused(Exception):
    """The implementation refused the case (in-process: one of :data:`REFUSALS`; subprocess: exit 3)."""


class Driver(Protocol):
    name: str

    def execute(self, case: Case, params: dict[str, Any], inputs: dict[str, np.ndarray], timeout: float) -> Mapping[str, np.ndarray]: ...

    def close(self) -> None: ...


class InProcessDriver:
    """Calls ``impl.run`` directly; with a timeout, in a watchdog-guarded worker thread.

    A case that runs past ``timeout`` is marked ``timeout`` and the run moves on. Python cannot
    kill a thread: the hung call keeps running in the background (a daemon thread, so it does not
    keep the process alive), and may still hold the implementation's locks or the GIL inside
    native code. For implementations with native code, prefer the bridge
    (``--cmd "python -m lora_ref.conformance.bridge MODULE:FACTORY" --persistent``), whose
    process is killed on a timeout.
    """

    def __init__(self, impl: Any, name: str = "") -> None:
        if not callable(getattr(impl, "run", None)):
            raise ConfigError(f"implementation {impl!r} has no run(op, params, inputs) method")
        self.impl = impl
        self.name = name or type(impl).__name__

    def _call(self, case: Case, params: dict[str, Any], inputs: dict[str, np.ndarray], timeout: float) -> Any:
        if timeout <= 0:
            return self.impl.run(case.operation, params, inputs)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["outputs"] = self.impl.run(case.operation, params, inputs)
            except BaseException as exc:  # handed to the caller's thread below
                box["exc"] = exc

        worker = threading.Thread(target=work, name=f"conformance {case.case_id}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise CaseTimeout(f"timed out after {timeout:g} s (the call keeps running in a background thread, which "
                              "Python cannot kill; run native code through the bridge, whose process is killed)")
        if "exc" in box:
            raise box["exc"]
        return box["outputs"]

    def execute(self, case: Case, params: dict[str, Any], inputs: dict[str, np.ndarray], timeout: float) -> Mapping[str, np.ndarray]:
        try:
            outputs = self._call(case, params, inputs, timeout)
        except NotImplementedError as exc:
            raise Unsupported(str(exc) or "not implemented") from None
        except CaseError:
            raise
        except REFUSALS as exc:
            raise Refused(f"{type(exc).__name__}: {exc}") from None
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
        if shutil.which(self.command[0]) is None:  # one line now, not one ERROR per case
            raise ConfigError(f"--cmd: {self.command[0]!r} is not an executable program (not found on PATH, "
                              "or the file is not executable); give the implementation's command")
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
            raise CaseTimeout(f"timed out after {timeout:g} s (process killed)") from None
        if process.returncode == EXIT_UNSUPPORTED:
            raise Unsupported(_tail(stderr) or "exit 77")
        if process.returncode == EXIT_REFUSED:
            raise Refused(f"exit status {EXIT_REFUSED}: {_tail(stderr) or '(no stderr)'}")
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
            raise CaseTimeout(f"timed out after {timeout:g} s (server killed; restarted for the next case)")
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
        if reply.startswith("refused"):
            raise Refused(reply[len("refused"):].strip() or "refused")
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


#: Statuses of a case (``timeout`` and ``error`` both mean the implementation gave no judgeable answer).
STATUSES = ("pass", "fail", "skip", "error", "timeout")


@dataclass
class CaseResult:
    """The outcome of one case under the chosen profile: status is one of :data:`STATUSES`.

    ``tiers`` holds the same outputs judged in both tiers (:data:`TIERS`): tier -> (ok, err/bound).
    It is empty where nothing was judged (skip, error, timeout; a refusal case has ratio 0).
    """

    case_id: str
    operation: str
    dtype: str
    status: str
    seconds: float = 0.0
    ratio: float | None = None  # max over outputs of max |ŷ − y| / tol
    ulps: int | None = None  # max over outputs of the ulp distance from round_t(y)
    detail: str = ""
    outputs: list[OutputCheck] = field(default_factory=list)
    tiers: dict[str, tuple[bool, float]] = field(default_factory=dict)
    refusal: bool = False  # the expected outcome was a refusal

    @property
    def verdict(self) -> str | None:
        """``float32`` (within the float32-compute bound), ``storage`` (only within the storage-compute
        bound: precision), ``semantic`` (outside both), or None when nothing was judged."""
        if not self.tiers:
            return None
        if self.tiers["float32"][0]:
            return "float32"
        return "storage" if self.tiers["storage"][0] else "semantic"


@dataclass
class SuiteResult:
    """All case results of one run, with what ran and how."""

    suite_version: str
    implementation: str
    layout: str
    compute: str
    results: list[CaseResult]

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.results) for status in STATUSES}

    @property
    def ok(self) -> bool:
        """Nothing failed, errored or timed out under the chosen profile (exit status 0)."""
        counts = self.counts()
        return counts["fail"] == 0 and counts["error"] == 0 and counts["timeout"] == 0

    def tier_cases(self, verdict: str) -> list[str]:
        """Ids of the cases with this verdict (``float32``, ``storage`` or ``semantic``)."""
        return [r.case_id for r in self.results if r.verdict == verdict]

    def conformance(self) -> str:
        """The two-tier summary class of the implementation (SPEC C.5):

        ``conformant`` every judged case within the float32 bound; ``conformant at storage
        precision`` every judged case within the storage bound, some only there; ``nonconformant``
        a semantic failure (outside both bounds), an error or a timeout.
        """
        counts = self.counts()
        if self.tier_cases("semantic") or counts["error"] or counts["timeout"]:
            return "nonconformant"
        return "conformant at storage precision" if self.tier_cases("storage") else "conformant"


def compute_profile(profile: str) -> ComputeProfile:
    """The named compute profile; ConfigError naming the choices for an unknown one."""
    if profile not in COMPUTE_PROFILES:
        raise ConfigError(f"unknown compute profile {profile!r}; choose one of {sorted(COMPUTE_PROFILES)}")
    return COMPUTE_PROFILES[profile]


def compute_dtype_for(profile: str, storage: str) -> np.dtype:
    """The compute dtype a profile means for a case stored in ``storage``."""
    return resolve_dtype(compute_profile(profile).compute(storage))


def check_outputs(case: Case, expected: Mapping[str, np.ndarray], outputs: Mapping[str, Any], profile: str) -> list[OutputCheck]:
    """Check every declared output; CaseError for a missing output or a wrong dtype or shape."""
    storage = STORAGE_DTYPES[case.dtype]
    compute = compute_dtype_for(profile, case.dtype)
    roundings = compute_profile(profile).roundings_for(case.operation)
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
        elif spec["check"] == "equals":  # bitwise the implementation's own output spec["output"] (e.g. a state revisited)
            other = outputs.get(spec["output"])
            if not isinstance(other, np.ndarray) or other.dtype != storage or other.shape != actual.shape:
                raise CaseError(f"output {name!r} must equal output {spec['output']!r}, which is missing or of another dtype or shape")
            checks.append(check_bitwise(name, actual, other))
        else:
            tol = tolerance(expected[name], expected[f"{name}.magnitude"], spec["K"], storage, compute, roundings)
            if "slack" in spec:  # an absolute per-element addition (e.g. a merge chain's intermediate roundings to t)
                tol = tol + expected[spec["slack"]]
            checks.append(check_bounded(name, actual, expected[name], tol, storage))
    for name, spec in case.outputs.items():
        if spec["check"] == "product":
            # factors as matrices [rows, Π rest] (a conv's B [O, k, 1, ...] and A [k, C, *kernel] included)
            left, right = (np.asarray(outputs[f]).astype(np.float64) for f in spec["factors"])
            left, right = left.reshape(left.shape[0], -1), right.reshape(right.shape[0], -1)
            if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
                raise CaseError(f"factors {spec['factors']} of {name!r} have shapes {left.shape} and {right.shape}")
            tol = tolerance(expected[name], expected[f"{name}.magnitude"], spec["K"], np.dtype(np.float64), compute)
            check = check_bounded(name, left @ right, expected[name], tol + expected[f"{name}.slack"], np.dtype(np.float64))
            checks.append(dataclasses.replace(check, ulps=0))  # ulps of t do not apply to a float64 product
    return checks


def _judge(case: Case, expected: Mapping[str, np.ndarray], outputs: Mapping[str, Any],
           profile: str) -> tuple[list[OutputCheck], dict[str, tuple[bool, float]]]:
    """The chosen profile's checks, and both tiers' (ok, max err/bound)."""
    by_profile = {p: check_outputs(case, expected, outputs, p) for p in dict.fromkeys((profile, *TIERS))}
    tiers = {tier: (all(c.ok for c in by_profile[tier]), max((c.ratio for c in by_profile[tier]), default=0.0)) for tier in TIERS}
    return by_profile[profile], tiers


def run_case(path: Path, case_id: str, driver: Driver, layout: Layout, profile: str, timeout: float,
             operation: str = "?", dtype: str = "?") -> CaseResult:
    """Run and check one case; never raises for a problem of this case or implementation.

    ``operation`` and ``dtype`` (from the manifest) label the result until case.json is read.
    """
    start = time.perf_counter()
    refusal: str | None = None

    def result(status: str, detail: str = "", **values: Any) -> CaseResult:
        return CaseResult(case_id, operation, dtype, status, time.perf_counter() - start, detail=detail,
                          refusal=refusal is not None, **values)

    try:
        case = load_case(path)
        operation, dtype, refusal = case.operation, case.dtype, case.refusal
        if case.case_id != case_id:
            raise CaseFormatError(f"{path / CASE_JSON}: id {case.case_id!r} does not match the manifest's {case_id!r}")
        inputs, expected = case.load_inputs(), case.load_expected()
        params, impl_inputs = layout.to_impl(case.operation, case.params, inputs)
        try:
            outputs = driver.execute(case, params, impl_inputs, timeout)
        except Refused as exc:
            if refusal is not None:
                return result("pass", f"refused as expected ({refusal}): {exc}", ratio=0.0, ulps=0,
                              tiers={tier: (True, 0.0) for tier in TIERS})
            raise CaseError(f"refused a case that has a result: {exc}") from None
        if refusal is not None:
            return result("fail", f"returned outputs {sorted(outputs)} where a refusal was expected ({refusal}): "
                                  "the implementation wraps, clamps or broadcasts bad input", ratio=float("inf"),
                          tiers={tier: (False, float("inf")) for tier in TIERS})
        outputs = layout.from_impl(case.operation, case.params, outputs)
        checks, tiers = _judge(case, expected, outputs, profile)
    except Unsupported as exc:
        return result("skip", str(exc))
    except CaseTimeout as exc:
        return result("timeout", str(exc))
    except (CaseError, CaseFormatError) as exc:
        return result("error", str(exc))
    except Exception as exc:  # e.g. a layout adapter fed outputs it cannot map: still this case's error
        return result("error", f"unexpected {type(exc).__name__}: {exc}")
    failed = [c for c in checks if not c.ok]
    return result("fail" if failed else "pass", "; ".join(c.detail for c in failed),
                  ratio=max((c.ratio for c in checks), default=0.0), ulps=max((c.ulps for c in checks), default=0),
                  outputs=checks, tiers=tiers)


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


#: Called after each case: (position from 1, number of cases, its result).
Progress = Callable[[int, int, CaseResult], None]


def run_suite(suite: str | Path, driver: Driver, *, layout: str = "canonical", profile: str = "float32",
              selection: Selection = Selection(), timeout: float = 60.0, progress: Progress | None = None) -> SuiteResult:
    """Run every selected case of ``suite`` through ``driver``; the driver is closed at the end."""
    compute_dtype_for(profile, "float32")  # validate the profile before running anything
    chosen = get_layout(layout)
    version, cases = select_cases(suite, selection)
    results = []
    try:
        for position, (case_id, operation, dtype) in enumerate(cases, 1):
            results.append(run_case(case_dir(suite, case_id), case_id, driver, chosen, profile, timeout, operation, dtype))
            if progress is not None:
                progress(position, len(cases), results[-1])
    finally:
        driver.close()
    return SuiteResult(version, driver.name, layout, profile, results)
