"""``lora-ref inspect ADAPTER_DIR [--json] [--base BASE.safetensors]``."""

from __future__ import annotations

import argparse

from ..adapter import load_adapter
from ..checkpoint import base_key
from ..dtypes import dtype_name
from ..errors import TargetNotFoundError
from ..hf_model import CheckpointTensors
from . import printable
from .paths import PathGuard, add_overwrite_option
from .report import add_json_option, emit_report, guard_report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", epilog="example:\n  lora-ref inspect my_adapter/ --base base.safetensors --json -", help="per-module rank, alpha, scale, shapes and sizes of an adapter")
    p.add_argument("adapter", help="PEFT adapter directory")
    p.add_argument("--base", help="base checkpoint (.safetensors, a sharded index or a model directory): report the adapter's "
                                 "size relative to the targeted weights")
    add_json_option(p, "the adapter (per-module rank, alpha, scale, shapes, sizes)")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def describe(adapter_dir: str, base: str | None = None) -> dict:
    """The inspect report as a dict (what ``--json`` prints)."""
    adapter = load_adapter(adapter_dir)
    config = adapter.config
    rows = []
    for name, module in sorted(adapter.modules.items()):
        arrays = module.arrays()
        rows.append({
            "module": name,
            "kind": module.kind,
            "r": module.rank,
            "alpha": config.alpha_for(name),
            "scale": adapter.scale_for(name),
            "shapes": {k: list(v.shape) for k, v in arrays.items()},
            "dtype": dtype_name(module.A.dtype),
            "parameters": int(sum(a.size for a in arrays.values())),
            "bytes": int(sum(a.nbytes for a in arrays.values())),
        })
    carried = [{"key": c.key, "target": c.target, "kind": c.kind, "module": c.module, "shape": list(c.values.shape),
                "dtype": dtype_name(c.values.dtype), **({"rows": list(c.rows)} if c.rows is not None else {})}
               for c in sorted(adapter.carried_tensors().values(), key=lambda c: c.target)]
    report = {
        "adapter": str(adapter_dir),
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": config.fan_in_fan_out,
        "use_dora": config.use_dora,
        "modules": rows,
        "carried": carried,  # tensors besides LoRA factors (lora_ref.carried): replacements, or frozen copies checked
        "total_parameters": sum(row["parameters"] for row in rows),  # adapter.parameter_count(), from the rows
        "total_bytes": sum(row["bytes"] for row in rows),  # adapter.nbytes()
    }
    if base is not None:
        with CheckpointTensors(base) as handle:  # a file, a sharded index or a model directory
            missing = [base_key(m) for m in adapter.modules if base_key(m) not in handle]
            if missing:
                raise TargetNotFoundError(f"{base}: lacks {', '.join(missing[:5])}")
            base_bytes = sum(handle.info(base_key(m)).nbytes for m in adapter.modules)
        report["targeted_base_bytes"] = base_bytes
        report["size_ratio"] = report["total_bytes"] / base_bytes if base_bytes else None
    return report


def run(args: argparse.Namespace) -> int:
    guard_report(PathGuard(hint="write the report elsewhere", overwrite=args.overwrite).read_adapter(args.adapter).read_checkpoint("base", args.base), args).check()
    report = describe(args.adapter, args.base)
    lines = [f"{'module':<48} {'kind':<9} {'r':>4} {'alpha':>8} {'scale':>9} {'params':>10} {'bytes':>10}  shapes"]
    for row in report["modules"]:
        shapes = " ".join(f"{k}{tuple(v)}" for k, v in row["shapes"].items())
        lines.append(f"{printable(row['module']):<48} {row['kind']:<9} {row['r']:>4} {row['alpha']:>8g} {row['scale']:>9.4g} "
                     f"{row['parameters']:>10} {row['bytes']:>10}  {shapes}")
    for row in report["carried"]:
        rows = f" rows {row['rows'][:8]}{' ...' if len(row['rows']) > 8 else ''}" if "rows" in row else ""
        verb = "must equal" if row["kind"] == "base_layer" else "replaces"  # a frozen copy is checked, not applied
        lines.append(f"{printable(row['target']):<48} {row['kind']:<17} {verb} {tuple(row['shape'])} {row['dtype']}{rows}")
    lines.append(f"total: {len(report['modules'])} modules, {report['total_parameters']} parameters, {report['total_bytes']} bytes")
    if "size_ratio" in report:
        lines.append(f"targeted base weights: {report['targeted_base_bytes']} bytes; adapter/base = {report['size_ratio']:.4%}")
    emit_report(args, report, lines)
    return 0
