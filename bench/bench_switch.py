"""The seed's claim (issue 13): switching adapters vs one forward pass of the same model.

A random HF Llama built from a config (no download; default hidden 1024, 8 layers, 16 heads,
4 KV heads (GQA), intermediate 2816, vocab 32000), in float32 and bfloat16. Its targeted weights
are NumPy views of the torch parameters, so a :class:`lora_ref.ledger.MergeLedger` switch rewrites
the very weights torch runs. Two r=16 adapters (random A and B) on the q_proj+v_proj targets or on
every Linear of the decoder layers; one switch is ``ledger.switch([(old, None)], [(new, None)])``:
exact mode (unmerge with the residual, merge, new residual, one pass per weight) and fast mode (each
timed from its own ledger's state: bringing the model from one mode's ledger to the other's is untimed).

The merge runs the numba kernels (lora_ref/kernels.py) where numba is installed, and the table has the
exact switch on the NumPy path (LORA_REF_KERNELS=numpy) beside it. Peers, in the same run and on the same threads (torch.get_num_threads(), the merge's MAX_THREADS;
OMP_WAIT_POLICY=PASSIVE unless set, so idle OpenMP workers do not spin):
  decode    one token at batch 1 after a 128-token prompt (KV cache), torch.inference_mode
  prefill   a 128-token prompt at batch 1, no cache
Ratios are medians of per-round ratios (each round times every contender once; lower = switch
faster). Usage:

    .venv/bin/python bench/bench_switch.py [--hidden 1024] [--layers 8] [--repeats 5]

Prints a markdown table, writes bench/results/switch.json and regenerates bench/README.md
(bench/readme.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# torch's OpenMP workers otherwise spin for a while after each forward pass, taking the cores
# from the switch that follows it in a round (and the switch's threads from the next forward)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import kernel_path, markdown_table, on_path, time_median, write_results  # noqa: E402
import readme  # noqa: E402

from lora_ref.adapter import Adapter, LoraModule  # noqa: E402
from lora_ref.config import LoraConfig  # noqa: E402
from lora_ref.dtypes import bfloat16, round_to  # noqa: E402
from lora_ref.ledger import MergeLedger  # noqa: E402

TARGETS = {"q/v": ("q_proj", "v_proj"), "every Linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def build_model(args: argparse.Namespace, dtype_name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    return model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name])


def numpy_view(param) -> np.ndarray:
    """The parameter's storage as a NumPy array (no copy: writes reach the torch model)."""
    import torch

    if param.dtype == torch.bfloat16:
        return param.detach().view(torch.int16).numpy().view(bfloat16)
    return param.detach().numpy()


def make_adapter(model, suffixes: tuple[str, ...], rank: int, seed: int, dtype: np.dtype, name: str) -> Adapter:
    rng = np.random.default_rng(seed)
    modules = {}
    for path, module in model.named_modules():
        if path.split(".")[-1] in suffixes and hasattr(module, "weight"):
            out_f, in_f = module.weight.shape
            modules[path] = LoraModule(path, round_to(rng.uniform(-1, 1, (rank, in_f)) * in_f**-0.5, dtype),
                                       round_to(rng.normal(0, 0.02, (out_f, rank)), dtype))
    return Adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(suffixes)), modules, name=name)


def bench_dtype(args: argparse.Namespace, dtype_name: str) -> list[dict]:
    import torch

    model = build_model(args, dtype_name)
    params = dict(model.named_parameters())
    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    with torch.inference_mode():
        cache = model(prompt, use_cache=True).past_key_values
    token = torch.randint(0, args.vocab, (1, 1))

    def decode():
        with torch.inference_mode():
            # a copy of the cache's state is not needed: DynamicCache grows by one token per call,
            # and one extra token of context changes the step's cost by under 1%
            model(token, past_key_values=cache, use_cache=True)

    def prefill():
        with torch.inference_mode():
            model(prompt, use_cache=False)

    rows = []
    for label, suffixes in TARGETS.items():
        if label not in args.targets:
            continue
        dtype = bfloat16 if dtype_name == "bfloat16" else np.dtype(np.float32)
        adapters = [make_adapter(model, suffixes, args.rank, seed, dtype, f"a{seed}") for seed in (1, 2)]
        keys = [f"{m}.weight" for m in adapters[0].modules]
        weights = {key: numpy_view(params[key]) for key in keys}
        elements = sum(w.size for w in weights.values())
        ledgers = {"exact": MergeLedger(weights, exact=True), "fast": MergeLedger(weights, exact=False)}
        state = {"exact": 0, "fast": None}

        def prepare(mode: str):
            """Bring the model to ``mode``'s ledger (untimed: a round alternates modes)."""
            ledger = ledgers[mode]
            if mode == "fast" and state["fast"] is None:
                ledgers["exact"].unmerge(adapters[state["exact"]])
                ledger.merge(adapters[0])
                state["fast"], state["exact"] = 0, None
            if mode == "exact" and state["exact"] is None:
                ledgers["fast"].unmerge(adapters[state["fast"]])  # fast drift is irrelevant to timing
                ledger.merge(adapters[0])
                state["exact"], state["fast"] = 0, None

        def switch(mode: str):
            prepare(mode)
            ledger = ledgers[mode]
            current = state[mode]
            ledger.switch([(adapters[current], None)], [(adapters[1 - current], None)])
            state[mode] = 1 - current

        ledgers["exact"].merge(adapters[0])
        # (timed call, untimed setup before it)
        contenders = {"decode": (decode, None), "prefill": (prefill, None),
                      "exact_switch": (lambda: switch("exact"), lambda: prepare("exact")),
                      "fast_switch": (lambda: switch("fast"), lambda: prepare("fast"))}
        if kernel_path() != "numpy":
            contenders["exact_switch_numpy"] = (on_path("numpy", lambda: switch("exact")), lambda: prepare("exact"))
        samples: dict[str, list[float]] = {key: [] for key in contenders}
        for fn, setup in contenders.values():  # warm-up
            time_median(fn, repeats=1, warmup=0, setup=setup)
        for _ in range(args.repeats):
            for key, (fn, setup) in contenders.items():
                samples[key].append(time_median(fn, repeats=1, warmup=0, setup=setup))
        row = {"dtype": dtype_name, "targets": label, "elements": int(elements), "rounds": args.repeats, "kernels": kernel_path(),
               **{f"{key}_s": float(np.median(v)) for key, v in samples.items()}}
        for num in ("exact_switch", "fast_switch"):
            for den in ("decode", "prefill"):
                row[f"{num}/{den}"] = float(np.median(np.array(samples[num]) / np.array(samples[den])))
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
        if state["exact"] is None:  # leave the model as built (exact unmerge)
            ledgers["fast"].unmerge(adapters[state["fast"]])
        else:
            ledgers["exact"].unmerge(adapters[state["exact"]])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each times every contender once)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    args = parser.parse_args(argv)
    import torch

    merge_module = importlib.import_module("lora_ref.merge")  # the attribute lora_ref.merge is the function
    rows = [row for name in args.dtypes for row in bench_dtype(args, name)]
    header = ["dtype", "targets", "weights switched", "decode step", "128-token prefill", "exact switch", "fast switch",
              "exact / decode", "exact / prefill", "fast / decode", "fast / prefill"]
    numpy_column = all("exact_switch_numpy_s" in r for r in rows)
    header += ["exact switch (NumPy path)"] if numpy_column else []
    table = markdown_table(header, [
        [r["dtype"], r["targets"], f"{r['elements'] / 1e6:.1f} M", f"{r['decode_s'] * 1e3:.1f} ms",
         f"{r['prefill_s'] * 1e3:.0f} ms", f"{r['exact_switch_s'] * 1e3:.0f} ms", f"{r['fast_switch_s'] * 1e3:.0f} ms",
         f"{r['exact_switch/decode']:.2f}x", f"{r['exact_switch/prefill']:.2f}x",
         f"{r['fast_switch/decode']:.2f}x", f"{r['fast_switch/prefill']:.2f}x"]
        + ([f"{r['exact_switch_numpy_s'] * 1e3:.0f} ms"] if numpy_column else []) for r in rows])
    command = "python bench/bench_switch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    model = (f"random Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
             f"intermediate {args.intermediate}, vocab {args.vocab}; r={args.rank}; torch threads {torch.get_num_threads()}, "
             f"merge threads {merge_module.MAX_THREADS}, {kernel_path()} path")
    print(model)
    print(table)
    path = write_results("switch", {"command": command, "model": model, "rows": rows, "table": table})
    print(f"wrote {path}")
    print(f"wrote {readme.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
