"""Write conformance/RESULTS.md: every implementation we run through the suite, in the two-tier form,
with every deviation and the peer's source line behind it.

    python -m lora_ref.conformance.results_doc [--out PATH]

Written to the default path, it also renders README.md's results-at-a-glance table from it
(:func:`glance`), so the two cannot disagree.

Each implementation runs once (profile float32; every case is judged in both tiers), in-process, or
through the bridge (persistent, a per-case timeout) for peers whose native code can hang (mlx) or that
live in their own venv (jax-lorax: ``.venv-lorax`` from ``scripts/test_lorax.sh``, or the interpreter
named by ``LORA_REF_LORAX_PYTHON``). A peer module may define ``DEVIATIONS`` (id -> (what it does, its source line)) and ``deviation(case,
inputs, result) -> id | None``; every result outside the float32 tier (and every skip and error)
is listed under its deviation, and anything no deviation explains is listed as UNEXPLAINED.
Peers that are not installed are reported as such, not skipped silently.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from ..atomic import write_text_atomic
from ..docsplice import splice
from .casefile import case_dir, default_suite, load_case
from .runner import InProcessDriver, SubprocessDriver, SuiteResult, run_suite

ROOT = Path(__file__).resolve().parents[2]
#: name -> (factory, layout, peer module with DEVIATIONS/deviation or None, version packages,
#:          None to run in-process, else the Python that runs it behind the bridge: "" = this one)
IMPLEMENTATIONS = {
    "lora_ref reference": ("lora_ref.conformance.reference_impl:factory", "canonical", None, ("lora_ref",)),
    "PEFT on torch (CPU)": ("lora_ref.conformance.peers.peft:factory", "peft", "lora_ref.conformance.peers.peft", ("peft", "torch")),
    "ONNX Runtime (CPU EP), our dynamic/batched graphs": ("lora_ref.conformance.peers.onnxruntime:factory", "peft",
                                                         "lora_ref.conformance.peers.onnxruntime", ("onnxruntime",)),
    "loralib (microsoft/LoRA) on torch": ("lora_ref.conformance.peers.loralib:factory", "peft", "lora_ref.conformance.peers.loralib",
                                          ("loralib", "torch")),
    "diffusers' own LoRA layers on torch": ("lora_ref.conformance.peers.diffusers:factory", "peft", "lora_ref.conformance.peers.diffusers",
                                            ("diffusers", "torch")),
    "Keras 3 enable_lora on JAX (CPU)": ("lora_ref.conformance.peers.keras:factory", "keras", "lora_ref.conformance.peers.keras",
                                         ("keras", "jax")),
    "mlx-lm LoRA/DoRA layers on mlx (CPU), through the bridge": ("lora_ref.conformance.peers.mlx:factory", "mlx",
                                                                 "lora_ref.conformance.peers.mlx", ("mlx-lm", "mlx"), ""),
    "jax-lorax on JAX 0.4 (CPU), its own venv through the bridge": ("lora_ref.conformance.peers.jax_lorax:factory", "keras",
                                                                    "lora_ref.conformance.peers.jax_lorax",
                                                                    ("jax-lorax", "qax", "jax"),
                                                                    os.environ.get("LORA_REF_LORAX_PYTHON", str(ROOT / ".venv-lorax" / "bin" / "python"))),
}
OUT = ROOT / "conformance" / "RESULTS.md"
README = ROOT / "README.md"
#: README's results-at-a-glance table lies between these markers; it is rendered from RESULTS.md.
GLANCE_BEGIN, GLANCE_END = "<!-- results:glance -->", "<!-- /results:glance -->"
#: Per-case timeout behind the bridge (seconds): a hang ends its case, the server is restarted.
BRIDGE_TIMEOUT = 60.0


def _version(package: str) -> str:
    """The imported module's ``__version__`` (onnxruntime ships as onnxruntime-gpu: the module knows its version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        module = importlib.import_module(package)
    except ImportError:
        return "not installed"
    try:
        return str(getattr(module, "__version__", None) or version(package))
    except PackageNotFoundError:
        return "?"


def _bridged_versions(python: str, packages: tuple[str, ...]) -> str:
    """The distributions' versions as the bridged interpreter sees them."""
    script = ("import importlib.metadata as m, sys\n"
              "for p in sys.argv[1:]:\n"
              "    try: print(p, m.version(p))\n"
              "    except m.PackageNotFoundError: print(p, 'not installed')\n")
    done = subprocess.run([python, "-c", script, *packages], capture_output=True, text=True, timeout=120, check=True)
    return ", ".join(done.stdout.split("\n")[:-1])


def run_one(spec: str, layout: str, suite: Path, python: str | None = None) -> SuiteResult:
    """One run of ``spec``: in-process (``python`` None) or behind the bridge in ``python`` ("" = this interpreter);
    ImportError where the peer or its interpreter is missing."""
    if python is None:
        module_name, _, attribute = spec.partition(":")
        impl = getattr(importlib.import_module(module_name), attribute)()
        return run_suite(suite, InProcessDriver(impl, name=spec), layout=layout, profile="float32", timeout=0)
    python = python or sys.executable
    module = spec.partition(":")[0]
    if not Path(python).exists() or subprocess.run([python, "-c", f"import {module}; {module}.factory()"],
                                                   capture_output=True, timeout=300).returncode != 0:
        raise ImportError(f"{spec} does not load in {python}")
    driver = SubprocessDriver([python, "-m", "lora_ref.conformance.bridge", spec], persistent=True)
    return run_suite(suite, driver, layout=layout, profile="float32", timeout=BRIDGE_TIMEOUT)


def classify(result: SuiteResult, peer_module: str | None, suite: Path) -> dict[str, list]:
    """deviation id (or UNEXPLAINED) -> the results it explains (results outside the float32 tier, skips, errors)."""
    deviation = getattr(importlib.import_module(peer_module), "deviation", None) if peer_module else None
    groups: dict[str, list] = defaultdict(list)
    for r in result.results:
        if r.status == "pass" and r.verdict == "float32":
            continue
        found = None
        if deviation is not None:
            case = load_case(case_dir(suite, r.case_id))
            found = deviation(case, case.load_inputs(), r)
        groups[found or "UNEXPLAINED"].append(r)
    return groups


def _tier_line(name: str, versions: str, result: SuiteResult) -> str:
    counts = result.counts()
    judged = [r for r in result.results if r.verdict is not None]
    storage, semantic = result.tier_cases("storage"), result.tier_cases("semantic")
    refused = sum(1 for r in result.results if r.refusal and r.status == "pass")
    return (f"| {name} | {versions} | {len(judged) - len(storage) - len(semantic)} | {len(storage)} | {len(semantic)} | "
            f"{counts['error'] + counts['timeout']} | {counts['skip']} | {refused} | **{result.conformance()}** |")


def render(suite: Path) -> str:
    lines = ["# Conformance results (generated by `python -m lora_ref.conformance.results_doc`; do not edit)", "",
             "Every implementation runs the whole frozen suite once; each case is judged against the float32-compute bound "
             "and the storage-compute bound (SPEC C.5). *float32*: within the float32 bound; *storage only*: outside it "
             "but within the storage bound (precision: intermediates rounded to fp16/bf16); *semantic*: outside both "
             "(a different function); refusals count as passes when the implementation refuses.", "",
             "| implementation | versions | float32 | storage only | semantic | errors | skipped | refused as expected | class |",
             "|---|---|---|---|---|---|---|---|---|"]
    details = []
    for name, (spec, layout, peer, packages, *bridged) in IMPLEMENTATIONS.items():
        python = bridged[0] if bridged else None
        try:
            result = run_one(spec, layout, suite, python)
        except ImportError as exc:
            lines.append(f"| {name} | not installed ({exc}) | - | - | - | - | - | - | - |")
            continue
        if python is not None:
            versions = _bridged_versions(python or sys.executable, packages)
        else:  # after the run: a peer may configure its import (Keras's backend)
            versions = ", ".join(f"{p} {_version(p)}" for p in packages)
        lines.append(_tier_line(name, versions, result))
        groups = classify(result, peer, suite)
        if not groups:
            continue
        table = getattr(importlib.import_module(peer), "DEVIATIONS", {}) if peer else {}
        details += ["", f"## {name} (layout `{layout}`)", "", "| deviation | what | source line | cases |", "|---|---|---|---|"]
        for key in sorted(set(groups) | set(table)):
            what, source = table.get(key, ("not explained by any documented deviation: a bug to report", "-"))
            ids = [r.case_id for r in groups.get(key, [])]
            shown = ", ".join(f"`{i}`" for i in ids[:6]) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")
            details.append(f"| {key} | {what} | {source} | {len(ids)}: {shown or 'none in this run (intermittent; see its test)'} |")
    return "\n".join(lines + details) + "\n"


def glance(results_md: str) -> str:
    """README's results at a glance from RESULTS.md's summary table: the suite's size (the reference's
    judged cases) and one row per implementation, versions in the name, without the refusal count."""
    rows = [line for line in results_md.splitlines() if line.startswith("| ") and not line.startswith("| implementation")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in rows[: len(IMPLEMENTATIONS)]]
    if len(rows) != len(IMPLEMENTATIONS) or any(len(row) != 9 for row in rows):
        raise ValueError("RESULTS.md has no summary table of every implementation: rerun python -m lora_ref.conformance.results_doc")
    cases = sum(int(cell) for cell in rows[0][2:6])
    out = [f"Cases per verdict on the suite's {cases} cases (generated from conformance/RESULTS.md):", "",
           "| implementation | float32 | storage only | semantic | errors | skipped | class |",
           "|---|---|---|---|---|---|---|"]
    for name, versions, f32, storage, semantic, errors, skipped, _refused, klass in rows:
        out.append(f"| {name} ({versions}) | {f32} | {storage} | {semantic} | {errors} | {skipped} | {klass.strip('*')} |")
    return "\n".join(out)


def with_glance(readme: str, results_md: str) -> str:
    """``readme`` with the block between the glance markers replaced by :func:`glance` of ``results_md``."""
    return splice(readme, GLANCE_BEGIN, GLANCE_END, f"\n{glance(results_md)}\n", document="README.md")


def write_glance(results_md: str, readme: Path = README) -> None:
    """Rewrite ``readme`` (atomically) with :func:`with_glance`."""
    write_text_atomic(readme, with_glance(readme.read_text(encoding="utf-8"), results_md))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_ref.conformance.results_doc")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--suite", default=str(default_suite()))
    args = parser.parse_args(argv)
    text = render(Path(args.suite))
    write_text_atomic(args.out, text)
    if Path(args.out).resolve() == OUT:
        write_glance(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
