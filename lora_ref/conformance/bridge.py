"""Put any in-process implementation behind the subprocess protocol (SPEC C.4).

    python -m lora_ref.conformance.bridge MODULE:FACTORY run <case_dir> <out_dir>
    python -m lora_ref.conformance.bridge MODULE:FACTORY serve      (persistent: one request per line)

Used to run the reference through the subprocess protocol in tests and benchmarks, and as a
worked example of the protocol for implementers, and the way to run a Python implementation
with native code (PyTorch, JAX, mlx, a C extension) so that a hang or a crash is contained: the
runner kills the bridge's process on a timeout, which it cannot do to a thread of its own:

    lora-ref conformance run --cmd "python -m lora_ref.conformance.bridge my_impl:factory" --persistent

Exit status: 0 done, 3 refused (the implementation raised one of the runner's REFUSALS:
Refusal, LoraRefError, ValueError, IndexError), 77 unsupported, 2 malformed case or arguments,
1 the implementation failed otherwise.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, LoraRefError
from ..safetensors_io import load_file, save_file
from .casefile import CASE_JSON, INPUTS, OUTPUTS
from .runner import EXIT_REFUSED, EXIT_UNSUPPORTED, REFUSALS


def load_factory(spec: str) -> Any:
    """Import ``module:attribute`` and call it (a factory) to get an implementation object."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"--impl must look like 'module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    try:
        factory = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return factory() if callable(factory) else factory


def read_case_dir(case_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(case.json, inputs) of a prepared case directory."""
    return json.loads((case_dir / CASE_JSON).read_text(encoding="utf-8")), load_file(case_dir / INPUTS)


def run_case_dir(impl: Any, case_dir: Path, out_dir: Path) -> None:
    """Read a prepared case directory, run it, write ``outputs.safetensors``."""
    case, inputs = read_case_dir(case_dir)
    outputs = impl.run(case["operation"], case["params"], inputs)
    save_file(out_dir / OUTPUTS, {name: np.asarray(array) for name, array in outputs.items()})


def _one(impl: Any, case_dir: str, out_dir: str) -> tuple[int, str]:
    """(exit status, reply line) for one request: reading the case, running it, writing the outputs."""
    try:
        case, inputs = read_case_dir(Path(case_dir))
    except (LoraRefError, OSError, ValueError, KeyError) as exc:
        return 2, f"error malformed case directory: {type(exc).__name__}: {exc}"
    try:
        outputs = impl.run(case["operation"], case["params"], inputs)
    except NotImplementedError as exc:
        return EXIT_UNSUPPORTED, f"unsupported {exc}"
    except REFUSALS as exc:
        return EXIT_REFUSED, f"refused {type(exc).__name__}: {exc}"
    except (OSError, KeyError) as exc:
        return 1, f"error {type(exc).__name__}: {exc}"
    try:
        save_file(Path(out_dir) / OUTPUTS, {name: np.asarray(array) for name, array in outputs.items()})
    except (LoraRefError, OSError, ValueError, TypeError, AttributeError) as exc:
        return 1, f"error cannot write the outputs: {type(exc).__name__}: {exc}"
    return 0, "ok"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[1] not in ("run", "serve") or (args[1] == "run" and len(args) != 4):
        print("usage: python -m lora_ref.conformance.bridge MODULE:FACTORY (run CASE_DIR OUT_DIR | serve)", file=sys.stderr)
        return 2
    try:
        impl = load_factory(args[0])
    except LoraRefError as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    if args[1] == "run":
        code, message = _one(impl, args[2], args[3])
        if code:
            print(message, file=sys.stderr)
        return code
    for line in sys.stdin:
        parts = line.split()
        if len(parts) != 3 or parts[0] != "run":
            print(f"error malformed request {line.strip()!r}", flush=True)
            continue
        try:
            _, message = _one(impl, parts[1], parts[2])
        except Exception:  # keep serving: report this request's failure on its line
            message = "error " + traceback.format_exc().strip().splitlines()[-1]
        print(message.replace("\n", " "), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
