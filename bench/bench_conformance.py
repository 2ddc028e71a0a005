"""Conformance benchmark (issue 6): wall time of the full frozen suite through each protocol.

Rows (all in one run; ratios against the in-process reference measured in the same run):
  reference, in-process         lora_ref.conformance.reference_impl through --impl
  reference, subprocess         the same behind lora_ref.conformance.bridge, one Python process per case
  reference, persistent         the same bridge started once (``serve``), one request per case
  C program, subprocess         examples/c_impl/lora_impl.c, one process per case (built with cc here)
  C program, persistent         the same, started once
  PEFT 0.21.2 / torch, in-process   lora_ref.conformance.peers.peft
  ONNX Runtime, in-process      lora_ref.conformance.peers.onnxruntime (exported graphs)
Each time covers the whole run: loading and checking every case, the implementation, the
report. Peers that are not installed are left out. Every protocol runs once per round, for
--repeats rounds after a warm-up round; times are medians, ratios medians of per-round ratios
(robust to load on a shared machine). Usage:

    .venv/bin/python bench/bench_conformance.py [--repeats 3]

Prints a markdown table and writes bench/results/conformance.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
import readme  # noqa: E402

from lora_ref.cli.conformance_cmd import DEFAULT_SUITE  # noqa: E402
from lora_ref.conformance.casefile import read_manifest  # noqa: E402
from lora_ref.conformance.runner import InProcessDriver, SubprocessDriver, run_suite  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = [sys.executable, "-m", "lora_ref.conformance.bridge", "lora_ref.conformance.reference_impl:factory"]


def build_c(directory: Path) -> list[str] | None:
    compiler = shutil.which("cc")
    if compiler is None:
        return None
    binary = directory / "lora_impl"
    subprocess.run([compiler, "-O2", "-std=c99", "-o", str(binary), str(ROOT / "examples" / "c_impl" / "lora_impl.c"), "-lm"], check=True)
    return [str(binary)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n_cases = len(read_manifest(DEFAULT_SUITE)[1])

    def reference():
        return InProcessDriver(__import__("lora_ref.conformance.reference_impl", fromlist=["factory"]).factory())

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        c_cmd = build_c(Path(tmp))
        runs = [
            ("reference, in-process", reference, "canonical"),
            ("reference, subprocess (process per case)", lambda: SubprocessDriver(BRIDGE), "canonical"),
            ("reference, persistent subprocess", lambda: SubprocessDriver(BRIDGE, persistent=True), "canonical"),
        ]
        if c_cmd:
            runs += [("C program, subprocess (process per case)", lambda: SubprocessDriver(c_cmd), "canonical"),
                     ("C program, persistent subprocess", lambda: SubprocessDriver(c_cmd, persistent=True), "canonical")]
        if importlib.util.find_spec("peft") and importlib.util.find_spec("torch"):
            from lora_ref.conformance.peers.peft import factory as peft_factory

            runs.append(("PEFT on torch, in-process", lambda: InProcessDriver(peft_factory()), "peft"))
        if importlib.util.find_spec("onnxruntime"):
            from lora_ref.conformance.peers.onnxruntime import factory as ort_factory

            runs.append(("ONNX Runtime (exported graphs), in-process", lambda: InProcessDriver(ort_factory()), "peft"))
        # rounds: every protocol once per round after one warm-up round, so a load spike on this
        # shared machine hits one round of every row, not one row (ratios: median of per-round ratios)
        samples = {name: [] for name, _, _ in runs}
        counts = {}
        for round_index in range(args.repeats + 1):
            for name, make, layout in runs:
                start = time.perf_counter()
                counts[name] = run_suite(DEFAULT_SUITE, make(), layout=layout, timeout=120).counts()
                if round_index:  # round 0 is the warm-up
                    samples[name].append(time.perf_counter() - start)
        base = samples[runs[0][0]]
        for name, _, _ in runs:
            ran = counts[name]["pass"] + counts[name]["fail"] + counts[name]["error"]
            seconds = statistics.median(samples[name])
            ratio = statistics.median(t / b for t, b in zip(samples[name], base))
            rows.append({"protocol": name, "seconds": seconds, "ratio": ratio, "cases_run": ran,
                         "skipped": counts[name]["skip"], "ms_per_case_run": 1000 * seconds / max(ran, 1)})
    results = {"command": "python bench/bench_conformance.py " + " ".join(sys.argv[1:]), "cases": n_cases,
               "repeats": args.repeats, "rows": rows}
    print(readme.conformance_table(results))
    path = write_results("conformance", results)
    print(f"\nwrote {path}")
    print(f"wrote {readme.write()}")


if __name__ == "__main__":
    main()
