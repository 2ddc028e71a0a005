"""Triton Inference Server: one batched graph with dynamic batching vs 16 merged models (issue 17).

16 clients, each with its own adapter (16 adapters, r = 16), send closed-loop requests of 1 or
16 tokens to a transformer block (d=256, 4 heads, d_ff=1024, LoRA on q/k/v/o/up/down) served by
the ``tritonserver`` of nvidia-pytriton on loopback:

* batched: one model, the batched graph (all 16 adapters in banks), dynamic batching
  (preferred batch 16, queue delay 2 ms): concurrent requests become one ONNX Runtime run;
* merged: 16 models, one merged graph per adapter, each client sending to its own (same
  batching options, but one client per model, so nothing to join).

Both run on the python backend hosting ONNX Runtime (lora_ref.export.triton_python_model, one
intra-op thread per instance): the wheel has no ONNX Runtime backend, so the per-request
python overhead is in both sides' figures. Reported: requests/s and p50/p95 latency per side,
and the throughput ratio batched / merged measured in the same run; written to
bench/results/triton.json.

Usage: python bench/bench_triton.py [--quick] [--seconds S]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402
import readme  # noqa: E402

from lora_ref.export import build_graph, models  # noqa: E402
from lora_ref.export.graphio import save_model  # noqa: E402
from lora_ref.export.triton import CONFIG, TritonOptions, graph_specs, model_config, write_repository  # noqa: E402
from lora_ref.export.triton_local import LocalServer, python_stand_in  # noqa: E402


def _write_plain(graph, repo: Path, name: str, options: TritonOptions) -> None:
    """A model folder for a graph without adapter_index (a merged graph), same options."""
    inputs, outputs = graph_specs(graph, batched=False)
    save_model(graph, repo / name / "1" / "model.onnx")
    (repo / name / CONFIG).write_text(model_config(name, inputs, outputs, {}, options, "none"))


def _load(server: LocalServer, jobs: list[tuple[str, dict[str, np.ndarray]]], seconds: float) -> dict:
    """Closed loop: one thread per job sends its request to its model until ``seconds`` pass; latencies in ms."""
    import tritonclient.grpc as grpcclient

    latencies: list[list[float]] = [[] for _ in jobs]
    barrier = threading.Barrier(len(jobs) + 1)
    stop = threading.Event()

    def client(k: int) -> None:
        model, tensors = jobs[k]
        connection = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = []
        for name, value in tensors.items():
            item = grpcclient.InferInput(name, list(value.shape), "INT64" if value.dtype == np.int64 else "FP32")
            item.set_data_from_numpy(value)
            inputs.append(item)
        connection.infer(model, inputs)  # warm
        barrier.wait()
        while not stop.is_set():
            start = time.perf_counter()
            connection.infer(model, inputs)
            latencies[k].append(1e3 * (time.perf_counter() - start))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    flat = np.concatenate([np.asarray(v) for v in latencies])
    return {"requests": int(flat.size), "requests_per_s": flat.size / wall, "p50_ms": float(np.percentile(flat, 50)),
            "p95_ms": float(np.percentile(flat, 95))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 2 s per measurement (smoke test)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds of load per measurement (default 10)")
    args = parser.parse_args(argv)
    d, heads, d_ff = (32, 2, 64) if args.quick else (256, 4, 1024)
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    n = 16
    block = models.transformer_block(d_model=d, heads=heads, d_ff=d_ff, seed=0)
    adapters = [models.random_adapter(block, 16, seed=100 + i, name=f"a{i}") for i in range(n)]
    options = TritonOptions(max_batch_size=n, preferred_batch_sizes=(n,), queue_delay_us=2000)
    results: dict = {"command": "python bench/bench_triton.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "model": {"kind": "transformer_block", "d_model": d, "heads": heads, "d_ff": d_ff, "adapters": n, "rank": 16},
                     "seconds_per_measurement": seconds, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        repo = Path(tmp) / "repo"
        write_repository(build_graph(block.onnx, adapters, "batched")[0], repo, [a.name for a in adapters], name="batched",
                         options=options)
        for i, adapter in enumerate(adapters):
            _write_plain(build_graph(block.onnx, [adapter], "merged")[0], repo, f"merged_{i}", options)
        served = python_stand_in(repo, Path(tmp) / "served")
        with LocalServer(served, log=Path(tmp) / "server.log") as server:
            server.wait_ready(["batched", *[f"merged_{i}" for i in range(n)]], timeout=300)
            for tokens in (1, 16):
                rng = np.random.default_rng(tokens)
                xs = [rng.standard_normal((1, tokens, d)).astype(np.float32) for _ in range(n)]
                batched = _load(server, [("batched", {"x": xs[i], "adapter_index": np.array([[i]], np.int64)}) for i in range(n)],
                                seconds)
                merged = _load(server, [(f"merged_{i}", {"x": xs[i]}) for i in range(n)], seconds)
                results["rows"].append({"tokens": tokens, "batched": batched, "merged": merged,
                                        "throughput_ratio": batched["requests_per_s"] / merged["requests_per_s"]})
    rows = []
    for row in results["rows"]:
        for side in ("batched", "merged"):
            r = row[side]
            rows.append([f"{row['tokens']} token(s), {side}", f"{r['requests_per_s']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}",
                         f"{row['throughput_ratio']:.2f}x" if side == "batched" else ""])
    table = markdown_table(["16 clients x 16 adapters (tritonserver, python backend + ORT, CPU)", "requests/s", "p50 ms",
                            "p95 ms", "batched / merged throughput"], rows)
    results["table"] = table
    if not args.quick:
        print(f"wrote {write_results('triton', results)}")
        print(f"wrote {readme.write()}")
    print(table)
    return results


if __name__ == "__main__":
    main()
