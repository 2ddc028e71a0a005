"""Matching benchmark (issue 10): N modules against an N-entry target list, and hostile regexes.

Measured in one run, reported as ratios against PEFT 0.21.2's own matching on the same names:
  list targets    LoraConfig.targets over N module names with an N-entry target_modules list
                  (set lookup of each name's '.'-suffixes) vs PEFT's check_target_module_exists
                  (a scan of the list per name: O(N) each), timed on a sample of names and
                  extrapolated linearly to all N (running it on all would take minutes)
  rank_pattern    LoraConfig.rank_for with an N-key rank_pattern of literal keys vs PEFT's
                  get_pattern_key (one re.match per key per name), sampled the same way
  regex target    a target regex over N names (bounded NFA) vs re.fullmatch
  hostile regex   '(a|aa)*c' against 'a' * L + 'b': ours vs re for the L where re still finishes
  inspect, merge  end to end through the CLI on an adapter with N rank-1 modules on [2, 2]
                  weights, target_modules listing all N names: inspect, fast merge, exact merge
                  (with the residual) (wall-clock, one run each)

Usage: .venv/bin/python bench/bench_matching.py [--modules 100000] [--sample 200]
Prints a markdown table and writes bench/results/matching.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_median, write_results  # noqa: E402
import readme  # noqa: E402

from lora_ref.adapter import Adapter, LoraModule, save_adapter  # noqa: E402
from lora_ref.cli import main  # noqa: E402
from lora_ref.config import LoraConfig  # noqa: E402
from lora_ref.safetensors_io import save_file  # noqa: E402


def module_names(n: int) -> list[str]:
    return [f"model.layers.{i // 8}.block.proj_{i % 8}" for i in range(n)]


def _per_name(fn, names: list[str]) -> float:
    """Median seconds per name of ``fn(name)`` over ``names``."""
    return time_median(lambda: [fn(name) for name in names], repeats=3) / len(names)


def bench_lookups(n: int, sample: int) -> list[dict]:
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    names = module_names(n)
    rng = np.random.default_rng(0)
    picked = [names[i] for i in rng.choice(n, size=min(sample, n), replace=False)]
    rows = []

    targets = [name.split(".", 1)[1] for name in names]  # suffixes: every name matched by endswith
    ours = LoraConfig(target_modules=targets)
    ours.targets(names[0])  # build the lookup once, as a load does
    peft_config = SimpleNamespace(target_modules=targets, exclude_modules=None, modules_to_save=None,
                                  target_parameters=None, layers_to_transform=None, layers_pattern=None)
    start = time.perf_counter()
    assert all(ours.targets(name) for name in names)
    ours_all = time.perf_counter() - start
    peft_each = _per_name(lambda name: check_target_module_exists(peft_config, name), picked[: max(1, sample // 10)])
    rows.append({"case": f"list targets ({n} names x {n} entries)", "lora_ref_s": ours_all,
                 "peft_s": peft_each * n, "peft_measured_on": max(1, sample // 10)})

    keys = {re.escape(name.split(".", 2)[2]) + "": 1 + i % 7 for i, name in enumerate(names)}
    ours = LoraConfig(r=8, rank_pattern=keys)
    ours.rank_for(names[0])
    start = time.perf_counter()
    for name in names:
        ours.rank_for(name)
    ours_all = time.perf_counter() - start
    key_list = list(keys)
    peft_each = _per_name(lambda name: get_pattern_key(key_list, name), picked[: max(1, sample // 20)])
    rows.append({"case": f"rank_pattern ({n} names x {n} literal keys)", "lora_ref_s": ours_all,
                 "peft_s": peft_each * n, "peft_measured_on": max(1, sample // 20)})

    pattern = r"model\.layers\.\d+\.block\.proj_[0-7]"
    ours = LoraConfig(target_modules=pattern)
    compiled = re.compile(pattern)
    ours_all = time_median(lambda: [ours.targets(name) for name in names], repeats=1, warmup=0)
    re_all = time_median(lambda: [compiled.fullmatch(name) for name in names], repeats=3)
    rows.append({"case": f"regex target ({n} names)", "lora_ref_s": ours_all, "peft_s": re_all, "peft_measured_on": n})

    for length in (16, 20, 24):
        evil = "a" * length + "b"
        ours = LoraConfig(target_modules="(a|aa)*c")
        ours_s = time_median(lambda: ours.targets(evil), repeats=3)
        re_s = time_median(lambda: re.fullmatch("(a|aa)*c", evil), repeats=1, warmup=0)
        rows.append({"case": f"hostile '(a|aa)*c', name of {length + 1} chars", "lora_ref_s": ours_s, "peft_s": re_s,
                     "peft_measured_on": 1})
    return rows


def bench_cli(n: int) -> list[dict]:
    """inspect and merge through the CLI on an adapter of n rank-1 modules (target list of n names)."""
    names = module_names(n)
    rng = np.random.default_rng(1)
    A = rng.standard_normal((n, 1, 2)).astype(np.float32)
    B = rng.standard_normal((n, 2, 1)).astype(np.float32)
    modules = {name: LoraModule(name, A[i], B[i]) for i, name in enumerate(names)}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        save_adapter(Adapter(LoraConfig(r=1, lora_alpha=1, target_modules=list(names)), modules), work / "adapter")
        save_file(work / "base.safetensors", {f"{name}.weight": np.ones((2, 2), np.float32) for name in names})
        for label, argv in (("inspect", ["inspect", str(work / "adapter")]),
                            ("merge", ["merge", str(work / "base.safetensors"), str(work / "adapter"),
                                       "-o", str(work / "merged.safetensors")]),
                            ("merge --residual", ["merge", str(work / "base.safetensors"), str(work / "adapter"),
                                                  "-o", str(work / "exact.safetensors"),
                                                  "--residual", str(work / "residual.safetensors")])):
            start, cpu = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(argv) == 0
            rows.append({"case": f"lora-ref {label}: {n} modules, {n}-entry target list",
                         "lora_ref_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
                         "peft_s": None, "peft_measured_on": None})
    return rows


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modules", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=200)
    args = parser.parse_args()
    rows = bench_lookups(args.modules, args.sample) + bench_cli(args.modules)
    results = {"command": "python bench/bench_matching.py " + " ".join(sys.argv[1:]), "modules": args.modules,
               "rows": rows}
    print(readme.matching_table(results))
    print(f"-> {write_results('matching', results)}")
    print(f"-> {readme.write()}")


if __name__ == "__main__":
    main_cli()
