"""The ``lora-ref demo``: a small model, a PEFT-format adapter, merge, exact and fast unmerge, a report."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .adapter import Adapter, LoraModule, load_adapter, save_adapter
from .checkpoint import merge_checkpoint, unmerge_checkpoint
from .config import LoraConfig
from .dtypes import STORAGE_DTYPES, bits_of, float64, round_to, ulp_distance
from .linear import forward
from .safetensors_io import load_file, save_file

LAYERS = {"mlp.up_proj": (512, 256), "mlp.down_proj": (256, 512), "attn.q_proj": (256, 256)}


def build_demo_model(dtype: np.dtype, seed: int = 0) -> tuple[dict[str, np.ndarray], Adapter]:
    """Random base weights (Linear layers, torch layout) and a PEFT-layout adapter with non-zero B."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    modules: dict[str, LoraModule] = {}
    r = 8
    for name, (out_f, in_f) in LAYERS.items():
        weights[f"{name}.weight"] = round_to(rng.normal(0, in_f**-0.5, (out_f, in_f)), dtype)
        weights[f"{name}.bias"] = round_to(rng.normal(0, 0.02, out_f), dtype)
        modules[name] = LoraModule(
            name=name,
            A=round_to(rng.uniform(-1, 1, (r, in_f)) * in_f**-0.5, dtype),
            B=round_to(rng.normal(0, 0.05, (out_f, r)), dtype),
        )
    config = LoraConfig(r=r, lora_alpha=16, target_modules=["up_proj", "down_proj", "q_proj"])
    return weights, Adapter(config=config, modules=modules)


def run_demo(workdir: Path | None = None) -> list[dict]:
    """Run the round trip for every storage dtype; return one report row per dtype."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        for name, dtype in STORAGE_DTYPES.items():
            weights, adapter = build_demo_model(dtype)
            base, adapter_dir = root / f"base-{name}.safetensors", root / f"adapter-{name}"
            save_file(base, weights)
            save_adapter(adapter, adapter_dir)
            adapter = load_adapter(adapter_dir)  # everything below goes through the PEFT files
            merged, residual = root / f"merged-{name}.safetensors", root / f"residual-{name}.safetensors"
            report = merge_checkpoint(base, adapter, merged, residual_path=residual)
            exact, fast = root / f"exact-{name}.safetensors", root / f"fast-{name}.safetensors"
            unmerge_checkpoint(merged, adapter, exact, residual_path=residual)
            unmerge_checkpoint(merged, adapter, fast)
            restored_fast, merged_w = load_file(fast), load_file(merged)
            targeted = [f"{m}.weight" for m in adapter.modules]
            changed = sum(int((bits_of(restored_fast[k]) != bits_of(weights[k])).sum()) for k in targeted)
            elements = sum(weights[k].size for k in targeted)
            max_ulps = max(int(ulp_distance(restored_fast[k], weights[k]).max()) for k in targeted)
            x = round_to(np.random.default_rng(1).normal(size=(4, 256)), dtype)
            module = adapter.modules["attn.q_proj"]
            y_lora = forward(x, weights["attn.q_proj.weight"], module.A, module.B, adapter.scale_for("attn.q_proj"),
                             out_dtype=float64)
            y_merged = x.astype(float64) @ merged_w["attn.q_proj.weight"].astype(float64).T
            rows.append({
                "dtype": name,
                "elements": elements,
                "residual_elements": sum(report.residual_counts.values()),
                "residual_bytes": report.residual_bytes,
                "exact_identical": exact.read_bytes() == base.read_bytes(),
                "fast_changed_elements": changed,
                "fast_max_ulps": max_ulps,
                "merged_vs_lora_forward_max_abs": float(np.abs(y_lora - y_merged).max()),
            })
    return rows


def print_demo(rows: list[dict]) -> None:
    weights = sum(o * i for o, i in LAYERS.values())
    print(f"lora-ref demo: {len(LAYERS)} Linear layers ({weights:,} weights), PEFT adapter r=8 alpha=16, "
          "merge -> unmerge through safetensors files")
    print(f"{'dtype':<9} {'residual':>18} {'residual bytes':>15} {'exact restore':>14} {'fast: changed':>16} {'fast: max ulp':>14} {'merged vs LoRA fwd':>19}")
    for row in rows:
        share = row["residual_elements"] / row["elements"]
        weight_bytes = row["elements"] * np.dtype(STORAGE_DTYPES[row["dtype"]]).itemsize
        print(f"{row['dtype']:<9} {row['residual_elements']:>7} ({share:6.3%}) "
              f"{row['residual_bytes'] / weight_bytes:>14.2%} "
              f"{'bit-identical' if row['exact_identical'] else 'DIFFERS':>14} "
              f"{row['fast_changed_elements']:>7} ({row['fast_changed_elements'] / row['elements']:6.3%}) "
              f"{row['fast_max_ulps']:>14} {row['merged_vs_lora_forward_max_abs']:>19.3g}")
    print("exact mode: merge also writes a residual; unmerge with it restores the base byte for byte.")
