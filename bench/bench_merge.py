"""Merge benchmark (issue 2): a d x d weight with a rank-r LoRA delta, per storage dtype.

Measured in one run, reported as ratios:
  copy         np.copyto of the same array: the memory-bandwidth floor of any merge
  PEFT merge   peft.tuners.lora.Linear.merge() on torch CPU (B @ A in float32, W += delta)
  fast merge   lora_ref.merge (correctly rounded W + s·B·A: float64 BLAS product, error bound,
               exact integers for undecided elements; SPEC 3.2), into a preallocated output
  exact merge  the same plus the residual that makes unmerge bit-exact, without the merged
               weight's BLAKE2b checksum (what MergeLedger does in memory)
  exact merge + digest   the same plus that checksum (what a residual file needs)
  fixed-order merge      the fixed-order/1 evaluation (files of the 0.x release), fast mode
  ... (NumPy path)       fast and exact merge with LORA_REF_KERNELS=numpy, where the numba kernels
                         (lora_ref/kernels.py, the ``fast`` extra) run the others: the same bits
and the residual's size (elements, % of W, bytes). Times are medians of --repeats runs after a
warm-up, in rounds that time every contender once each (bench/common.time_median). Usage:

    .venv/bin/python bench/bench_merge.py [--size 4096] [--rank 16] [--repeats 5]

Prints a markdown table and writes bench/results/merge.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import kernel_path, markdown_table, on_path, time_median, write_results  # noqa: E402
import readme  # noqa: E402

from lora_ref.dtypes import STORAGE_DTYPES, round_to  # noqa: E402
from lora_ref.linear import LinearDelta  # noqa: E402
from lora_ref.merge import FIXED_ORDER, merge, unmerge  # noqa: E402


def merge_threads() -> int:
    import importlib

    return importlib.import_module("lora_ref.merge").MAX_THREADS  # the attribute lora_ref.merge is the function


def peft_layer(W: np.ndarray, A: np.ndarray, B: np.ndarray, alpha: int, dtype_name: str):
    """A PEFT LoRA Linear over nn.Linear holding W (torch dtype like W), with lora_A/B set to A/B."""
    import peft
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    holder = torch.nn.ModuleDict({"proj": torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=torch_dtype)})
    model = peft.get_peft_model(holder, peft.LoraConfig(r=A.shape[0], lora_alpha=alpha, target_modules=["proj"]))
    layer = model.base_model.model["proj"]
    as_torch = lambda a: torch.from_numpy(a.astype(np.float32)).to(torch_dtype)  # noqa: E731 (exact: a is in dtype)
    with torch.no_grad():
        layer.get_base_layer().weight.data = as_torch(W)
        layer.lora_A["default"].weight.data = as_torch(A)
        layer.lora_B["default"].weight.data = as_torch(B)
    return layer


def bench_dtype(name: str, size: int, rank: int, alpha: int, repeats: int, with_peft: bool) -> dict:
    dtype = STORAGE_DTYPES[name]
    rng = np.random.default_rng(0)
    W = round_to(rng.normal(0, size**-0.5, (size, size)), dtype)
    A = round_to(rng.uniform(-1, 1, (rank, size)) * size**-0.5, dtype)
    B = round_to(rng.normal(0, 0.02, (size, rank)), dtype)
    delta = LinearDelta(A, B, alpha / rank, module="bench")
    out = np.empty_like(W)
    exact = merge(W, delta, exact=True)
    layer = peft_layer(W, A, B, alpha, name) if with_peft else None

    def reset_peft() -> None:
        if layer.merged:
            layer.unmerge()

    contenders = {
        "copy": (lambda: np.copyto(out, W), None),
        "fast_merge": (lambda: merge(W, delta, out=out), None),
        "exact_merge": (lambda: merge(W, delta, exact=True, out=out, digest=False), None),
        "exact_merge_digest": (lambda: merge(W, delta, exact=True, out=out), None),
        "fixed_order_merge": (lambda: merge(W, delta, out=out, semantics=FIXED_ORDER), None),
        "exact_unmerge": (lambda: unmerge(exact.weight, delta, residual=exact.residual, out=out), None),
    }
    path = kernel_path()
    if path != "numpy":
        contenders["fast_merge_numpy"] = (on_path("numpy", contenders["fast_merge"][0]), None)
        contenders["exact_merge_numpy"] = (on_path("numpy", contenders["exact_merge"][0]), None)
    if with_peft:
        contenders["peft_merge"] = (layer.merge, reset_peft)
    # Rounds: every contender once per round, in turn, so load changes on a shared machine hit
    # all of them alike; times are medians over rounds, ratios medians of per-round ratios.
    samples: dict[str, list[float]] = {key: [] for key in contenders}
    for key, (fn, setup) in contenders.items():  # warm-up
        time_median(fn, repeats=1, warmup=0, setup=setup)
    for _ in range(repeats):
        for key, (fn, setup) in contenders.items():
            samples[key].append(time_median(fn, repeats=1, warmup=0, setup=setup))
    row = {
        "dtype": name, "size": size, "rank": rank, "rounds": repeats, "kernels": path,
        **{f"{key}_s": float(np.median(values)) for key, values in samples.items()},
        "residual_elements": exact.residual.count, "residual_share": exact.residual.count / W.size,
        "residual_bytes": exact.residual.nbytes, "weight_bytes": W.nbytes,
    }
    pairs = [("fast_merge", "copy"), ("exact_merge", "copy"), ("exact_merge", "fast_merge")]
    if path != "numpy":
        pairs += [("fast_merge", "fast_merge_numpy"), ("exact_merge", "exact_merge_numpy")]
    if with_peft:
        import torch

        pairs += [("fast_merge", "peft_merge"), ("exact_merge", "peft_merge"), ("exact_merge_digest", "peft_merge"),
                  ("fixed_order_merge", "peft_merge")]
        row["torch_threads"] = torch.get_num_threads()
    for num, den in pairs:
        row[f"{num}/{den}"] = float(np.median(np.array(samples[num]) / np.array(samples[den])))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="rounds (each times every contender once)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT/torch peer")
    args = parser.parse_args(argv)
    with_peft = not args.no_peft
    if with_peft:
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            print("peft/torch not installed: measuring without the peer (--no-peft)", file=sys.stderr)
            with_peft = False
    rows = [bench_dtype(name, args.size, args.rank, args.alpha, args.repeats, with_peft) for name in STORAGE_DTYPES]

    header = ["dtype", "copy", "PEFT merge", "fast merge", "exact merge", "fast / copy", "exact / copy"]
    if with_peft:
        header += ["fast / PEFT", "exact / PEFT", "exact + digest / PEFT", "fixed-order fast / PEFT"]
    numpy_column = "exact_merge_numpy_s" in rows[0]
    if numpy_column:
        header += ["fast, exact (NumPy path)"]
    header += ["exact / fast", "residual elements (% of W)", "residual size (% of W's bytes)"]
    table = []
    for row in rows:
        cells = [row["dtype"], f"{row['copy_s'] * 1e3:.1f} ms",
                 f"{row['peft_merge_s'] * 1e3:.1f} ms" if with_peft else "-",
                 f"{row['fast_merge_s'] * 1e3:.1f} ms", f"{row['exact_merge_s'] * 1e3:.1f} ms",
                 f"{row['fast_merge/copy']:.1f}x", f"{row['exact_merge/copy']:.1f}x"]
        if with_peft:
            cells += [f"{row['fast_merge/peft_merge']:.2f}x", f"{row['exact_merge/peft_merge']:.2f}x",
                      f"{row['exact_merge_digest/peft_merge']:.2f}x", f"{row['fixed_order_merge/peft_merge']:.2f}x"]
        if numpy_column:
            cells += [f"{row['fast_merge_numpy_s'] * 1e3:.0f}, {row['exact_merge_numpy_s'] * 1e3:.0f} ms"]
        cells += [f"{row['exact_merge/fast_merge']:.2f}x",
                  f"{row['residual_elements']} ({row['residual_share']:.2%})",
                  f"{row['residual_bytes'] / 2**20:.1f} MiB ({row['residual_bytes'] / row['weight_bytes']:.1%})"]
        table.append(cells)
    text = markdown_table(header, table)
    print(f"Merge of a {args.size}x{args.size} weight, r={args.rank}, alpha={args.alpha}, {rows[0]['kernels']} path: medians of "
          f"{args.repeats} rounds; a ratio is the median of per-round ratios (lower = ours faster)")
    print(text)
    command = "python bench/bench_merge.py " + " ".join(argv or sys.argv[1:])
    path = write_results("merge", {"command": command, "alpha": args.alpha, "merge_threads": merge_threads(),
                                   "kernels": rows[0]["kernels"], "rows": rows, "table": text})
    print(f"wrote {path}")
    print(f"wrote {readme.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
