#!/usr/bin/env bash
# GPU check for the ONNX exporter (issue 5): runs the merged, dynamic (symbolic and fixed-max
# rank) and batched graphs of the reference's transformer block on the TensorRT and CUDA
# execution providers and compares each with the CPU provider; also switches adapters through
# AdapterCache on the device (host-to-device copies into bound buffers) and times dynamic vs
# merged on each provider.
#
# Needs onnxruntime-gpu. On the project's GPU machine (DESIGN.md section 7) only the CPU build
# is installed: prepare the wheel here with ../shared/gpu/prepare-ort-gpu.sh, carry its parts
# one call at a time to /tmp/ortparts, and on the last call run
#   cp .ortgpu/part-* /tmp/ortparts/ && cat /tmp/ortparts/part-* > /tmp/$(cat .ortgpu/NAME) &&
#   python3 -m pip install -q --no-deps --target /tmp/site /tmp/$(cat .ortgpu/NAME) &&
#   ORT_SITE=/tmp/site bash bench/gpu_check.sh
# Output: a table on stdout and $OUT/gpu_check.json (or bench/results/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="${ORT_SITE:+$ORT_SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LORA_REF_GPU_JSON="${OUT:-bench/results}/gpu_check.json"
exec "$PY" - <<'PYEOF'
import importlib.util, json, os, sys, time, warnings

import numpy as np
import onnxruntime as ort

try:
    import lora_ref.export  # installed (editable or wheel)
except ImportError:  # a bare checkout: map export/ to lora_ref.export as setuptools' package-dir does
    spec = importlib.util.spec_from_file_location("lora_ref.export", "export/__init__.py", submodule_search_locations=["export"])
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_ref.export"] = module
    spec.loader.exec_module(module)

from lora_ref.export import AdapterCache, build_graph, models, open_session

if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # CUDA 13 / cuDNN 9 from pip packages
print("onnxruntime", ort.__version__, "providers:", ort.get_available_providers())

block = models.transformer_block(d_model=256, heads=8, d_ff=1024, seed=0)
adapters = [models.random_adapter(block, r, seed=r, name=f"r{r}") for r in (8, 16)]
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 64, 256)).astype(np.float32)
graphs = {
    "merged": build_graph(block.onnx, adapters[:1], "merged")[0],
    "dynamic": build_graph(block.onnx, adapters, "dynamic")[0],
    "dynamic_r16": build_graph(block.onnx, adapters, "dynamic", max_rank=16)[0],
    "batched": build_graph(block.onnx, adapters, "batched")[0],
}
index = np.array([0, 1, -1, 1], np.int64)
# strict float32 on CUDA (TF32 off), so differences to CPU stay at float32 rounding level
provider_options = {"cuda": {"use_tf32": "0"}}
chains = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}


def run(session, kind, name=None):
    if kind == "batched":
        return session.run_batched({"x": x}, index)[0]
    if kind.startswith("dynamic"):
        cache = AdapterCache(session)
        for adapter in adapters:
            cache.add(adapter.name, adapter)
        cache.activate(name)
        return cache.run({"x": x})[0]
    return session.run({"x": x})[0]


def timed(fn, n=20):
    fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


results, reference = [], {}
for provider in ("cpu", "cuda", "tensorrt"):
    for kind, graph in graphs.items():
        if provider == "tensorrt" and kind == "dynamic":
            continue  # symbolic rank: use the fixed-max-rank graph for TensorRT
        row = {"provider": provider, "graph": kind}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                session = open_session(graph, chains[provider], provider_options=provider_options)
            row["runs_on"] = session.describe()
            row["fallback_warnings"] = [str(w.message) for w in caught]
            names = ["r16"] if not kind.startswith("dynamic") else ["r8", "r16", None, "r8"]
            for name in names:
                y = run(session, kind, name)
                key = (kind, name)
                if provider == "cpu":
                    reference[key] = y
                else:
                    ref = reference[key]
                    row.setdefault("max_rel_diff_vs_cpu", 0.0)
                    row["max_rel_diff_vs_cpu"] = max(row["max_rel_diff_vs_cpu"], float(np.abs(y - ref).max() / np.abs(ref).max()))
            if kind.startswith("dynamic"):
                cache = AdapterCache(session)
                cache.add("r8", adapters[0])
                cache.add("r16", adapters[1])
                flip = {"k": 0}

                def switch():
                    flip["k"] ^= 1
                    cache.activate(["r8", "r16"][flip["k"]])

                row["switch_ms"] = 1e3 * timed(switch, 100)
                cache.activate("r16")
                row["run_ms"] = 1e3 * timed(lambda: cache.run({"x": x}))
            elif kind == "merged":
                row["run_ms"] = 1e3 * timed(lambda: session.run({"x": x}))
            else:
                row["run_ms"] = 1e3 * timed(lambda: session.run_batched({"x": x}, index))
        except Exception as exc:  # report and go on: one provider failing must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        results.append(row)
        print(json.dumps(row))

print()
print("| provider | graph | runs on | max rel diff vs CPU | run ms | switch ms |")
print("|---|---|---|---|---|---|")
for row in results:
    print(f"| {row['provider']} | {row['graph']} | {row.get('runs_on', row.get('error', ''))} | "
          f"{row.get('max_rel_diff_vs_cpu', 0):.2e} | {row.get('run_ms', float('nan')):.3f} | {row.get('switch_ms', float('nan')):.4f} |")
path = os.environ["LORA_REF_GPU_JSON"]
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path, "w") as handle:
    json.dump({"onnxruntime": ort.__version__, "results": results}, handle, indent=2)
print("wrote", path)
PYEOF
