"""Conversion benchmark (issue 13, item 4): lora_ref.dtypes.round_to from float64, per dtype and block size.

round_to is correctly rounded: float32 and float16 by NumPy's casts, bfloat16 through float32
with round-to-odd (SPEC 1). The merge's path for float16/bfloat16 (SPEC 3.2) is
lora_ref.dtypes.round_to_grid (RN_t in float64 arithmetic, in place) then store_exact (bit moves
of the exact values), into preallocated arrays; ml_dtypes' float64 -> bfloat16 cast (which rounds
twice) is shown for speed only. Peer: NumPy's float64 -> float32 cast of the same block (the
memory-speed floor); ratios per element. Measured at two array sizes: 32 Ki elements (256 KiB of
float64, the merge's thread block, lora_ref.merge.THREAD_BLOCK_BYTES) and 1 Mi elements (8 MiB),
where every temporary of round_to is a fresh mmap allocation and its page faults dominate. Usage:

    .venv/bin/python bench/bench_dtypes.py [--repeats 30]

Writes bench/results/dtypes.json and regenerates bench/README.md (bench/readme.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402
import readme  # noqa: E402

import ml_dtypes  # noqa: E402

from lora_ref.dtypes import STORAGE_DTYPES, bfloat16, float16, round_to, round_to_grid, store_exact  # noqa: E402


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    rows = []
    for size in (1 << 15, 1 << 20):
        x = np.random.default_rng(0).normal(size=size)
        floor = best_of(lambda: x.astype(np.float32), args.repeats)

        def add(label: str, seconds: float) -> None:
            rows.append({"elements": size, "dtype": label, "ns_per_element": seconds / size * 1e9,
                         "vs_float32_cast": seconds / floor})

        for name, dtype in STORAGE_DTYPES.items():
            add(name, best_of(lambda: round_to(x, dtype), args.repeats))
        work, scratch = np.empty_like(x), np.empty_like(x)
        for name, dtype in (("float16", float16), ("bfloat16", bfloat16)):
            out = np.empty(size, dtype)

            def grid_and_store() -> None:
                np.copyto(work, x)
                round_to_grid(work, dtype, scratch)
                store_exact(work, out, scratch)

            add(f"{name}: merge path (round_to_grid + store_exact, preallocated)", best_of(grid_and_store, args.repeats))
        add("bfloat16: ml_dtypes cast (rounds twice; speed only)", best_of(lambda: x.astype(ml_dtypes.bfloat16), args.repeats))
    table = markdown_table(["elements", "dtype", "round_to ns / element", "round_to / NumPy float32 cast"],
                           [[r["elements"], r["dtype"], f"{r['ns_per_element']:.2f}", f"{r['vs_float32_cast']:.1f}x"] for r in rows])
    print(table)
    command = "python bench/bench_dtypes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results("dtypes", {"command": command, "repeats": args.repeats, "rows": rows, "table": table})
    print(f"wrote {readme.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
