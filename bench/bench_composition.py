"""Composition benchmarks (issue 4), each a ratio against a peer measured in the same run.

    .venv/bin/python bench/bench_composition.py [--quick]

1. Mixed-batch forward over 16 adapters (one grouped call, and the zero-padded stacked bank)
   against 16 separate per-adapter passes (``lora_ref.linear.forward`` on each adapter's rows).
2. Tree switch (exact mode) against merging the target path from scratch on a pristine copy
   of the base, by switch length (2 = sibling leaves, 8 = leaves in different root subtrees).
3. One training step (forward + backward + AdamW, two adapters in one mixed batch) of the
   NumPy reference TinyTransformer against the same model, routing and optimizer in torch on CPU.

Runs single-threaded (BLAS and torch). Writes bench/results/composition.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread on both sides:
    os.environ.setdefault(_var, "1")  # stable ratios on a shared machine (torch.set_num_threads(1) below)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "examples")]

from common import markdown_table, time_median, write_results  # noqa: E402
import readme  # noqa: E402

from lora_ref.linear import forward  # noqa: E402
from lora_ref.mixed_batch import LoraFactors, StackedBank, mixed_forward  # noqa: E402
from lora_ref.models import TinyTransformer  # noqa: E402
from lora_ref.optim import AdamW  # noqa: E402
from lora_ref.train import init_adapter, teacher_task  # noqa: E402
from lora_ref.tree import TreeSwitcher, merge_path  # noqa: E402


def paired(ours, peer, *, repeats: int = 15, warmup: int = 2) -> tuple[float, float, float]:
    """Median times of ``ours`` and ``peer`` and the median of per-pair ratios peer/ours, timed
    alternately so a load change on a shared machine hits both sides of each pair alike."""
    for _ in range(warmup):
        ours(), peer()
    t_ours, t_peer, ratios = [], [], []
    for _ in range(repeats):
        a = time_median(ours, repeats=1, warmup=0)
        b = time_median(peer, repeats=1, warmup=0)
        t_ours.append(a), t_peer.append(b), ratios.append(b / a)
    return float(np.median(t_ours)), float(np.median(t_peer)), float(np.median(ratios))


def bench_mixed_batch(d: int) -> dict:
    rng = np.random.default_rng(0)
    n_adapters, rows_per, seq, r = 16, 4, 16, 16
    W = rng.normal(size=(d, d)).astype(np.float32)
    factors = [LoraFactors(rng.normal(size=(r, d)).astype(np.float32), rng.normal(size=(d, r)).astype(np.float32), 2.0)
               for _ in range(n_adapters)]
    index = np.repeat(np.arange(n_adapters), rows_per)
    rng.shuffle(index)
    x = rng.normal(size=(index.size, seq, d)).astype(np.float32)
    groups = [np.flatnonzero(index == i) for i in range(n_adapters)]
    bank = StackedBank.from_factors(factors, d, d)

    def separate():
        for i, rows in enumerate(groups):
            forward(x[rows], W, factors[i].A, factors[i].B, factors[i].scale)

    t_mixed, t_sep, over_mixed = paired(lambda: mixed_forward(x, W, factors, index), separate)
    t_bank, _, over_bank = paired(lambda: bank.forward(x, W, index), separate)
    return {"adapters": n_adapters, "rows": int(index.size), "seq": seq, "d": d, "r": r,
            "separate_s": t_sep, "mixed_s": t_mixed, "bank_s": t_bank,
            "separate_over_mixed": over_mixed, "separate_over_bank": over_bank}


def bench_tree(quick: bool) -> dict:
    from adapter_tree import build  # examples/adapter_tree.py: the same tree the example prints

    base, tree = build(64 if quick else 256)
    names = list(tree.nodes)
    leaves = [n for n in names if len(tree.path(n)) == 4]
    pairs = {2: (leaves[0], leaves[1]), 4: (leaves[0], leaves[2]), 8: (leaves[0], leaves[-1])}
    result = {"nodes": len(names), "depth": tree.depth(), "weights": len(base), "dim": int(next(iter(base.values())).shape[0])}
    for steps, (a, b) in pairs.items():
        switcher = TreeSwitcher(tree, {k: v.copy() for k, v in base.items()}, exact=True)
        switcher.switch(a)
        state = {"at": a}

        def flip():
            state["at"] = b if state["at"] == a else a
            report = switcher.switch(state["at"])
            assert report.steps == steps

        t, t_scratch, ratio = paired(flip, lambda: merge_path(tree, base, leaves[-1]), repeats=10)
        result[f"switch_{steps}_steps_s"] = t
        result["scratch_s"] = t_scratch
        result[f"scratch_over_switch_{steps}"] = ratio
    return result


def torch_step_factory(torch, model: TinyTransformer, adapters, x, y, index, lr):
    """The same model in torch: frozen base, per-adapter LoRA parameters, rows routed by masks, AdamW."""
    W = {k: torch.tensor(v) for k, v in model.weights.items()}
    params = [{m: (torch.tensor(a.modules[m].A, requires_grad=True), torch.tensor(a.modules[m].B, requires_grad=True),
                   a.scale_for(m)) for m in model.targets} for a in adapters]
    opts = [torch.optim.AdamW([t for m in p.values() for t in m[:2]], lr=lr, weight_decay=0.01) for p in params]
    xt, yt = torch.tensor(x), torch.tensor(y)
    masks = [torch.tensor(index == k, dtype=torch.float64)[:, None, None] for k in range(len(adapters))]
    H = model.n_heads

    def linear(name, h):
        out = h @ W[f"{name}.weight"].T + W[f"{name}.bias"]
        for p, mask in zip(params, masks):
            A, B, s = p[name]
            out = out + mask * (s * ((h @ A.T) @ B.T))
        return out

    def heads(t):
        b, T, d = t.shape
        return t.reshape(b, T, H, d // H).transpose(1, 2)

    def step():
        for o in opts:
            o.zero_grad()
        q, k, v = (heads(linear(f"attn.{p}_proj", xt)) for p in "qkv")
        T = xt.shape[1]
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
        a = torch.softmax(scores, -1) @ v
        h = xt + linear("attn.o_proj", a.transpose(1, 2).reshape(xt.shape))
        out = h + linear("mlp.down_proj", torch.tanh(linear("mlp.up_proj", h)))
        loss = sum(((out - yt) ** 2 * mask).sum() / (mask.sum() * out[0].numel()) for mask in masks)
        loss.backward()
        for o in opts:
            o.step()

    return step


def bench_training(quick: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    d, T, batch = (32, 16, 16) if quick else (64, 32, 32)
    model = TinyTransformer(d_model=d, n_heads=4, d_ff=4 * d, seed=0)
    rng = np.random.default_rng(0)
    teachers = [init_adapter(model, 4, 8.0, seed=10 + k, init_B="normal") for k in range(2)]
    tasks = [teacher_task(model, t, rng.normal(size=(batch, T, d))) for t in teachers]
    x = np.concatenate([t.inputs for t in tasks])
    y = np.concatenate([t.targets for t in tasks])
    index = np.repeat([0, 1], batch)
    students = [init_adapter(model, 8, 16.0, seed=k, name=f"s{k}") for k in range(2)]
    optimizers = [AdamW(lr=1e-3) for _ in students]

    def ref_step():
        pred, tape = model.forward(x, students, index)
        residual = pred - y
        dy = 2.0 * residual / (batch * residual[0].size)
        _, grads = model.backward(tape, dy)
        for a, o, g in zip(students, optimizers, grads):
            o.step(a, g)

    torch_step = torch_step_factory(torch, model, students, x, y, index, 1e-3)
    t_ref, t_torch, torch_over_ref = paired(ref_step, torch_step, repeats=21, warmup=3)
    return {"d_model": d, "seq": T, "rows": int(2 * batch), "adapters": 2, "r": 8, "torch_threads": 1,
            "reference_step_s": t_ref, "torch_step_s": t_torch, "reference_over_torch": 1.0 / torch_over_ref}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    args = parser.parse_args(argv)
    mixed = [bench_mixed_batch(d) for d in ((128, 256) if args.quick else (256, 1024))]
    tree, training = bench_tree(args.quick), bench_training(args.quick)
    rows = [
        [f"mixed-batch forward, {m['adapters']} adapters, {m['rows']}x{m['seq']} rows, d={m['d']}, r={m['r']}",
         "16 separate per-adapter passes", f"{m['separate_over_mixed']:.2f}x (grouped), {m['separate_over_bank']:.2f}x (stacked bank)"]
        for m in mixed
    ]
    for steps in (2, 4, 8):
        rows.append([f"tree switch, {steps} steps (exact), {tree['weights']} bf16 weights {tree['dim']}x{tree['dim']}",
                     "merge target path from scratch (fast, on a base copy)", f"{tree[f'scratch_over_switch_{steps}']:.2f}x"])
    rows.append([f"training step, TinyTransformer d={training['d_model']} T={training['seq']}, 2 adapters in one batch",
                 "torch CPU (1 thread), same model and AdamW", f"reference takes {training['reference_over_torch']:.2f}x torch's time"])
    table = markdown_table(["measurement", "peer", "ratio (peer time / ours unless stated)"], rows)
    print(table)
    command = "python bench/bench_composition.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_results("composition", {"command": command, "quick": args.quick, "mixed_batch": mixed, "tree": tree,
                                         "training": training,
                                         "table": table})
    print(f"\nwrote {path}")
    print(f"wrote {readme.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
