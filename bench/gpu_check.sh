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
#
# Also (issue 12), each row CUDA/TensorRT vs CPU like the above:
# * DoRA graphs: merged, dynamic (the norm computed in the graph) and batched (gain banks);
# * quantized bases: the block's Linear weights quantized by ONNX Runtime to MatMulNBits (int4,
#   QOperator) and to int4 QDQ (DequantizeLinear -> MatMul), dynamic graphs with the LoRA beside them;
# * onnxruntime-genai on CUDA, only when `import onnxruntime_genai` works there (carry the
#   onnxruntime-genai-cuda wheel like onnxruntime-gpu's, with --no-deps into the same --target) and
#   GENAI_DIR names a lora-ref dynamic genai folder (model.onnx + *.onnx_adapter, small: make one
#   here with `lora-ref export GENAI_FP32_DIR ADAPTER... --mode dynamic -o DIR` from the tiny Llama of
#   tests/genai_world.py): greedy tokens on CUDA vs CPU with no adapter and each adapter, switching
#   A -> B -> none -> A in one model; otherwise the JSON records why it was skipped.
# * Triton on GPU is not covered: lora_ref.export.triton_python_model runs ORT's CPU provider and
#   the pytriton wheel has no ORT backend (KIND_GPU needs one); the JSON records it as skipped.
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


def open_row(graph, provider, row):
    """A session on ``provider``'s chain; records where it runs and the fallback warnings in ``row``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = open_session(graph, chains[provider], provider_options=provider_options)
    row["runs_on"] = session.describe()
    row["fallback_warnings"] = [str(w.message) for w in caught]
    return session


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
            session = open_row(graph, provider, row)
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

# ---- issue 12: DoRA graphs and quantized bases, CPU vs CUDA/TensorRT (one adapter each, compared with CPU)
dora = models.random_adapter(block, 8, seed=5, name="dora", use_dora=True)
extra = {}
try:
    extra["dora_merged"] = (build_graph(block.onnx, [dora], "merged")[0], None)
    extra["dora_dynamic"] = (build_graph(block.onnx, [dora], "dynamic")[0], dora)
    extra["dora_batched"] = (build_graph(block.onnx, [dora, adapters[1]], "batched")[0], "batched")
    for label, qdq in (("nbits_dynamic", False), ("qdq_int4_dynamic", True)):
        extra[label] = (build_graph(models.ort_int4(block.onnx, qdq=qdq), adapters, "dynamic")[0], adapters[1])
except Exception as exc:  # noqa: BLE001 - report it, keep the other checks
    results.append({"graph": "issue12 build", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
extra_reference = {}
for provider in ("cpu", "cuda", "tensorrt"):
    for kind, (graph, adapter) in extra.items():
        row = {"provider": provider, "graph": kind}
        try:
            session = open_row(graph, provider, row)
            if adapter == "batched":
                y = session.run_batched({"x": x}, np.array([0, 1, -1, 0], np.int64))[0]
            elif adapter is None:
                y = session.run({"x": x})[0]
            else:
                cache = AdapterCache(session)
                cache.add(adapter.name, adapter)
                cache.activate(adapter.name)
                y = cache.run({"x": x})[0]
            if provider == "cpu":
                extra_reference[kind] = y
            else:
                ref = extra_reference[kind]
                row["max_rel_diff_vs_cpu"] = float(np.abs(y - ref).max() / np.abs(ref).max())
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        results.append(row)
        print(json.dumps(row))

# ---- issue 12: onnxruntime-genai on CUDA vs CPU (skipped with the reason when it cannot run here)
genai_row = {"provider": "cuda", "graph": "genai"}
try:
    import onnxruntime_genai as og

    folder = os.environ.get("GENAI_DIR")
    if not folder:
        raise RuntimeError("GENAI_DIR not set (a lora-ref dynamic genai folder)")
    files = sorted(p for p in os.listdir(folder) if p.endswith(".onnx_adapter"))

    def tokens(provider):
        config = og.Config(folder)
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
        model = og.Model(config)
        loaded = og.Adapters(model)
        for name in files:
            loaded.load(os.path.join(folder, name), name)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=16, do_sample=False)
        out = {}
        generator = og.Generator(model, params)
        for step, name in enumerate([*files[:2], None, *files[:1]]):  # A -> B -> none -> A in one model
            if step:
                generator = og.Generator(model, params)
            if name is not None:
                generator.set_active_adapter(loaded, name)
            generator.append_tokens([[1, 5, 9, 3]])
            while not generator.is_done():
                generator.generate_next_token()
            out[f"{step}:{name}"] = list(map(int, generator.get_sequence(0)))
        return out

    cpu, cuda = tokens("cpu"), tokens("cuda")
    genai_row.update({"runs_on": "cuda (og.Config.append_provider)", "adapters": files, "tokens_equal_cpu": cpu == cuda,
                      "tokens": {"cpu": cpu, "cuda": cuda}})
except Exception as exc:  # noqa: BLE001 - not installed / no folder / a failure: recorded
    genai_row["skipped_or_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
results.append(genai_row)
print(json.dumps(genai_row))
results.append({"provider": "cuda", "graph": "triton", "skipped_or_error": "not covered: the python backend runs ORT's CPU "
                "provider and the pytriton wheel has no ORT backend (KIND_GPU)"})

print()
print("| provider | graph | runs on | max rel diff vs CPU | run ms | switch ms |")
print("|---|---|---|---|---|---|")
for row in results:
    print(f"| {row.get('provider', '')} | {row['graph']} | {row.get('runs_on', row.get('error', row.get('skipped_or_error', '')))} | "
          f"{row.get('max_rel_diff_vs_cpu', 0):.2e} | {row.get('run_ms', float('nan')):.3f} | {row.get('switch_ms', float('nan')):.4f} |")
path = os.environ["LORA_REF_GPU_JSON"]
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path, "w") as handle:
    json.dump({"onnxruntime": ort.__version__, "results": results}, handle, indent=2)
print("wrote", path)
PYEOF
