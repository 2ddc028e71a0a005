"""Merge + unmerge round trips of conv, embedding and DoRA layers: lora-ref exact vs fast vs PEFT.

For each layer, one row: median wall-clock time of a merge followed by an unmerge (the weight
comes back) in lora-ref's fast mode, in exact mode (merge also records the residual, unmerge
applies it), and in PEFT 0.21 (``merge_adapter`` + ``unmerge_adapter`` on the same tensors,
torch CPU, one thread like NumPy here, same run), the ratios against PEFT, the residual's size,
and how far each round trip lands from the original weight: the fraction of elements changed
and the largest error in units of the SPEC fast-mode bound (lora-ref's fast mode must stay
≤ 1; exact mode restores every bit, which is asserted).

    .venv/bin/python bench/bench_layers.py [--quick]

Writes bench/results/layers.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, time_median, write_results  # noqa: E402
import readme  # noqa: E402

from lora_ref.deltas import delta_for  # noqa: E402
from lora_ref.dora import DoraDelta  # noqa: E402
from lora_ref.dora import fast_roundtrip_bound as dora_bound  # noqa: E402
from lora_ref.dtypes import bits_of, dtype_name  # noqa: E402
from lora_ref.merge import fast_roundtrip_bound, merge, unmerge  # noqa: E402
from lora_ref.adapter import modules_from_state_dict, Adapter  # noqa: E402
from lora_ref.config import LoraConfig  # noqa: E402


def layer_cases(quick: bool):
    """(label, torch module factory, PEFT kind) at sizes typical of vision / language models."""
    import torch.nn as nn

    scale = 2 if quick else 1
    return [
        ("Conv2d 256→256 3x3", lambda: nn.Conv2d(256 // scale, 256 // scale, 3)),
        ("Conv2d 512→512 1x1", lambda: nn.Conv2d(512 // scale, 512 // scale, 1)),
        ("Conv1d 512→512 k=3", lambda: nn.Conv1d(512 // scale, 512 // scale, 3)),
        ("Linear 2048x2048", lambda: nn.Linear(2048 // scale, 2048 // scale)),
        ("Embedding 16000x512", lambda: nn.Embedding(16000 // scale, 512 // scale)),
    ]


def run_case(label: str, factory, use_dora: bool, dtype, repeats: int) -> dict:
    import torch
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = factory()

    model = get_peft_model(Net(), PeftConfig(r=16, lora_alpha=32, target_modules=["layer"], use_dora=use_dora,
                                             init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * (0.05 if "magnitude" not in name else 0.1) + (1.0 if "magnitude" in name else 0.0))
    model.to(dtype)
    layer = model.base_model.model.layer
    base = layer.base_layer.weight
    original = base.detach().clone()

    state = {k: v.detach().float().numpy() for k, v in get_peft_model_state_dict(model).items()}
    modules, _ = modules_from_state_dict(state)
    adapter = Adapter(LoraConfig(r=16, lora_alpha=32, target_modules=["layer"], use_dora=use_dora), modules)
    W = original.float().numpy() if dtype != torch.bfloat16 else None
    if dtype == torch.bfloat16:
        import ml_dtypes

        W = original.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    elif dtype == torch.float16:
        W = original.numpy()

    def ours(exact: bool):
        source = delta_for(adapter, "layer", base=W)
        result = merge(W, source, exact=exact)
        back = unmerge(result.weight, delta_for(adapter, "layer", norm=getattr(source, "norm", None)), residual=result.residual)
        return result, back

    def peft_round_trip():
        model.merge_adapter()
        model.unmerge_adapter()

    def reset():
        with torch.no_grad():
            base.copy_(original)

    t_fast = time_median(lambda: ours(False), repeats=repeats)
    t_exact = time_median(lambda: ours(True), repeats=repeats)
    t_peft = time_median(lambda: (peft_round_trip(), reset()), repeats=repeats)
    result, back_exact = ours(True)
    _, back_fast = ours(False)
    peft_round_trip()
    back_peft = base.detach().clone()
    reset()
    if dtype == torch.bfloat16:
        import ml_dtypes

        back_peft_np = back_peft.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        back_peft_np = back_peft.numpy()
    assert np.array_equal(bits_of(back_exact), bits_of(W)), "exact round trip must be bit for bit"
    source = delta_for(adapter, "layer", base=W)
    bound = dora_bound(W, source) if isinstance(source, DoraDelta) else fast_roundtrip_bound(W, source.block(slice(None)))
    W64 = W.astype(np.float64)

    def in_bounds(back):
        return float(np.max(np.abs(back.astype(np.float64) - W64) / bound))

    return {
        "layer": label,
        "dora": use_dora,
        "dtype": dtype_name(W.dtype),
        "elements": int(W.size),
        "fast_s": t_fast,
        "exact_s": t_exact,
        "peft_s": t_peft,
        "fast_over_peft": t_fast / t_peft,
        "exact_over_peft": t_exact / t_peft,
        "residual_fraction": result.residual.count / W.size,
        "fast_changed_fraction": float(np.mean(bits_of(back_fast) != bits_of(W))),
        "fast_max_error_in_bounds": in_bounds(back_fast),
        "peft_changed_fraction": float(np.mean(bits_of(back_peft_np) != bits_of(W))),
        "peft_max_error_in_bounds": in_bounds(back_peft_np),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half-size layers, 3 repeats")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the reference is single-threaded NumPy; compare like with like
    repeats = 3 if args.quick else 5
    rows = []
    for label, factory in layer_cases(args.quick):
        for use_dora in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                rows.append(run_case(label, factory, use_dora, dtype, repeats))
                print(rows[-1], file=sys.stderr)
    header = ["layer", "DoRA", "dtype", "fast / PEFT time", "exact / PEFT time", "residual",
              "fast: changed, max err/bound", "PEFT: changed, max err/bound"]
    table = markdown_table(header, [
        [r["layer"], "yes" if r["dora"] else "no", r["dtype"], f"{r['fast_over_peft']:.2f}", f"{r['exact_over_peft']:.2f}",
         f"{r['residual_fraction']:.1%}", f"{r['fast_changed_fraction']:.1%}, {r['fast_max_error_in_bounds']:.2f}",
         f"{r['peft_changed_fraction']:.1%}, {r['peft_max_error_in_bounds']:.2f}"]
        for r in rows
    ])
    print(table)
    write_results("layers", {"command": "python bench/bench_layers.py" + (" --quick" if args.quick else ""),
                             "torch_threads": 1, "rows": rows, "table": table})
    print(f"wrote {readme.write()}")


if __name__ == "__main__":
    main()
