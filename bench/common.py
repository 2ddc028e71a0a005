"""Tiny timing helpers shared by the benchmarks in bench/.

Benchmarks report ratios against a peer measured in the same run, never absolute timings
asserted anywhere. ``time_median`` runs ``fn`` a few times to warm caches and allocators,
then returns the median wall-clock time of ``repeats`` further runs (the median is robust
to a stray slow run on a shared machine).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_median(
    fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, setup: Callable[[], object] | None = None
) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    ``setup``, if given, runs untimed before every call (e.g. undo an in-place merge).
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def kernel_path() -> str:
    """Which evaluation lora-ref's correctly rounded merge runs here: "numba" (lora_ref/kernels.py) or "numpy"."""
    import importlib

    return "numpy" if importlib.import_module("lora_ref.merge").kernels_module() is None else "numba"


def on_path(choice: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with LORA_REF_KERNELS=choice ("numpy": the reference path, for a column beside the kernels')."""
    def run() -> object:
        saved = os.environ.get("LORA_REF_KERNELS")
        os.environ["LORA_REF_KERNELS"] = choice
        try:
            return fn()
        finally:
            if saved is None:
                del os.environ["LORA_REF_KERNELS"]
            else:
                os.environ["LORA_REF_KERNELS"] = saved
    return run


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: enough to tell two result files apart."""
    import numpy as np

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (cells formatted with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus machine info) to bench/results/<name>.json atomically; return the path."""
    from lora_ref.atomic import write_text_atomic

    path = RESULTS_DIR / f"{name}.json"
    write_text_atomic(path, json.dumps({"machine": machine_info(), **payload}, indent=2, sort_keys=True) + "\n")
    return path
