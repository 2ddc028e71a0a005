"""A local ``tritonserver`` for tests and benchmarks: the binary bundled in the ``nvidia-pytriton`` wheel.

That wheel ships the python backend only, so :func:`python_stand_in` copies a repository
written by :func:`lora_ref.export.triton.write_repository` with each model switched from the
ONNX Runtime backend (``platform: "onnxruntime_onnx"``) to the python backend hosting ONNX
Runtime (:mod:`lora_ref.export.triton_python_model`); layout, graph, inputs, outputs,
batching and parameters stay as written. :class:`LocalServer` starts the binary on free
loopback ports with what its python-backend stub needs (seen with pytriton 0.7.0):

* ``LD_LIBRARY_PATH`` = this interpreter's own lib folder (else the stub may load the system
  libpython against another interpreter's standard library) + the wheel's bundled libraries;
* ``sys.path`` handed to the model through the config (the stub ignores PYTHONPATH);
* readiness polled per model: the server's ready endpoint answers before models have loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from lora_ref.atomic import staged_folder, write_text_atomic
from lora_ref.errors import LoraRefError

from .triton import CONFIG, versions

STAND_IN = Path(__file__).resolve().parent / "triton_python_model.py"


class TritonUnavailableError(LoraRefError):
    """The nvidia-pytriton wheel (its tritonserver binary) is not installed, or the server did not come up."""


def pytriton_root() -> Path:
    """The folder of the wheel's ``tritonserver`` install (bin/, backends/, python_backend_stubs/)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise TritonUnavailableError("the tritonserver binary comes with nvidia-pytriton: pip install 'lora-ref[triton]'")
    root = Path(spec.origin).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonUnavailableError(f"{root}: no bin/tritonserver in this nvidia-pytriton install")
    return root


def python_stand_in(repo: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Mirror ``repo`` into ``out`` with every model on the python backend (module docstring); returns ``out``.

    Incremental and atomic like the writer: version folders missing from ``out`` are staged and
    renamed into place, folders gone from ``repo`` are removed, then each config is replaced,
    so a server polling ``out`` sees the same version flow as one polling ``repo``.
    """
    source, target = Path(repo), Path(out)
    paths = json.dumps(sorted({p for p in sys.path if p and Path(p).is_dir()}))
    for config in sorted(source.glob(f"*/{CONFIG}")):
        text = config.read_text("utf-8")
        if 'platform: "onnxruntime_onnx"' not in text:
            raise TritonUnavailableError(f"{config}: not an ONNX Runtime model written by lora-ref")
        model_dir = target / config.parent.name
        model_dir.mkdir(parents=True, exist_ok=True)
        wanted = versions(config.parent)
        for version in wanted:
            if not (model_dir / str(version)).is_dir():
                with staged_folder(model_dir / str(version)) as staging:
                    shutil.copytree(config.parent / str(version), staging, dirs_exist_ok=True)
                    shutil.copyfile(STAND_IN, staging / "model.py")
        text = text.replace('platform: "onnxruntime_onnx"', 'backend: "python"')
        text += f"parameters {{ key: \"lora_ref.sys_path\" value: {{ string_value: {json.dumps(paths)} }} }}\n"
        write_text_atomic(model_dir / CONFIG, text)
        for version in versions(model_dir):
            if version not in wanted:
                shutil.rmtree(model_dir / str(version))
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``tritonserver`` on loopback serving ``repo`` (a context manager); ``grpc_url`` / ``http_url`` / ``metrics_url``."""

    def __init__(self, repo: str | os.PathLike[str], *, poll_seconds: int | None = None, log: str | os.PathLike[str] | None = None):
        self.repo = Path(repo)
        self.root = pytriton_root()
        self.ports = {k: _free_port() for k in ("http", "grpc", "metrics")}
        self.grpc_url = f"127.0.0.1:{self.ports['grpc']}"
        self.http_url = f"http://127.0.0.1:{self.ports['http']}"
        self.metrics_url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        self.poll_seconds = poll_seconds
        self.log = Path(log) if log else None
        self.process: subprocess.Popen | None = None
        self._backends: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "LocalServer":
        libs = [sysconfig.get_config_var("LIBDIR"), str(self.root.parent.parent / "nvidia_pytriton.libs")]
        env = dict(os.environ, LD_LIBRARY_PATH=":".join([*libs, os.environ.get("LD_LIBRARY_PATH", "")]))
        stub = self.root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonUnavailableError(f"nvidia-pytriton has no python-backend stub for Python {sys.version_info[:2]}")
        # the python backend looks for the stub of this interpreter's version in its own folder:
        # a private backend folder links the wheel's files and that stub (the wheel is not modified)
        self._backends = tempfile.TemporaryDirectory(prefix="lora-ref-triton-backends-")
        backend_dir = Path(self._backends.name)
        (backend_dir / "python").mkdir()
        for item in (self.root / "backends" / "python").iterdir():
            if item.is_file():
                (backend_dir / "python" / item.name).symlink_to(item)
        (backend_dir / "python" / stub.name).symlink_to(stub)
        command = [str(self.root / "bin" / "tritonserver"), f"--model-repository={self.repo}", f"--backend-directory={backend_dir}",
                   f"--http-port={self.ports['http']}", f"--grpc-port={self.ports['grpc']}", f"--metrics-port={self.ports['metrics']}",
                   "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--allow-metrics=true", "--log-verbose=0"]
        if self.poll_seconds is not None:
            command += ["--model-control-mode=poll", f"--repository-poll-secs={self.poll_seconds}"]
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, models: list[str], timeout: float = 60.0, version: int | None = None) -> None:
        """Poll each model's ready endpoint (not the server's, which answers before models load)."""
        deadline = time.monotonic() + timeout
        pending = list(models)
        while pending:
            if self.process is not None and self.process.poll() is not None:
                raise TritonUnavailableError(f"tritonserver exited with {self.process.returncode}{self._tail()}")
            name = pending[0]
            path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
            try:
                with urllib.request.urlopen(self.http_url + path, timeout=2) as answer:
                    if answer.status == 200:
                        pending.pop(0)
                        continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TritonUnavailableError(f"model {name} not ready after {timeout:.0f} s{self._tail()}")
            time.sleep(0.2)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as answer:
            return answer.read().decode("utf-8")

    def _tail(self) -> str:
        if self.log and self.log.is_file():
            return "; server log ends:\n" + "\n".join(self.log.read_text("utf-8", "replace").splitlines()[-15:])
        return ""

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._backends is not None:
            self._backends.cleanup()
