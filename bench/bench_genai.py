"""onnxruntime-genai benchmark (issue 12, CPU): greedy decoding tokens/s of lora-ref's dynamic-adapter
model against the merged model and against genai's own adapter graph, and the adapter switch and load times.

Model: a random Llama from a config (default hidden 1024, 16 heads of 64, 8 KV heads, d_ff 2816,
4 layers, vocab 3001; ``--hidden 512``: 8 heads, 4 KV heads, d_ff 1408), built by genai's model
builder (fp32, CPU, q/k/v fused); one PEFT adapter, r=16, on q/k/v/o/gate/up/down. Compared, all
generating the same number of tokens from the same prompt:

* dynamic: lora-ref ``export --mode dynamic`` of genai's model, the adapter active through
  ``og.Adapters`` / ``set_active_adapter`` (fused q/k/v: one stacked branch);
* merged: lora-ref ``export --mode merged`` (the base graph with other weights);
* genai-own: genai's builder with ``adapter_path`` (the LoRA baked in as constant MatMuls,
  q/k/v unfused, as genai does for LoRA);
* base: the model without an adapter.

What the ratio can be: a decode step streams every base weight once, and the dynamic model also
the fed factors, so on a memory-bound CPU its floor is about 1 + ``lora_share`` (fed factor
elements / base MatMul weight elements; the fused q/k/v branch's block-diagonal B counts whole).
The share falls as 1/hidden (r(in + out) against in·out per site): 5.5% at hidden 512, 3.1% at
1024, under 1% for a 4096-wide model; the rest of the gap is the branch's small ops.

Timing: every session runs one intra-op thread, so a generation's CPU time is the decoding
thread's (``time.thread_time``; on a loaded machine it leaves out the time the thread waited
for a core, which wall time does not). Each model is loaded twice, in palindromic order
(a b c d d c b a) after a throwaway model: sessions created earlier in a process ran 5-13%
slower here for the same graph (likely memory placement), which a single load order would charge to
one model. A round runs every copy of every model once, the models in a rotated order; a
ratio is the median over rounds of time(dynamic) / time(other), each round's time summed over
the two copies. Switch: ``set_active_adapter`` between two loaded adapters on a new generator;
load: ``Adapters.load`` of one adapter file (then ``unload``); wall-clock medians. Needs the
.venv-genai of scripts/test_genai.sh.

Usage: python bench/bench_genai.py [--quick] [--hidden {512,1024}]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import write_results  # noqa: E402
import readme  # noqa: E402
from genai_world import build_adapter, build_genai, build_hf  # noqa: E402

CONFIGS = {
    1024: dict(vocab_size=3001, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
               num_key_value_heads=8, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False),
    512: dict(vocab_size=3001, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
MODELS = ("dynamic", "merged", "genai-own", "base")


def _one_thread(folder: Path) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 1
    path.write_text(json.dumps(config, indent=2))


def lora_share(dynamic: Path, merged: Path) -> float:
    """Elements of the fed factors (``dynamic``'s first adapter file) / elements of ``merged``'s MatMul weights."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(merged / "model.onnx"), load_external_data=False).graph
    sizes = {t.name: math.prod(t.dims) for t in graph.initializer}
    weights = sum(sizes[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in sizes)
    adapter = ort.AdapterFormat.read_adapter(str(sorted(dynamic.glob("*.onnx_adapter"))[0]))
    factors = sum(math.prod(v.shape()) for v in adapter.get_parameters().values())
    return factors / weights


class Runner:
    """One og.Model; ``generate()`` decodes ``new`` tokens greedily, with ``adapter`` active if given."""

    def __init__(self, folder: Path, prompt: list[int], new: int, adapter: str | None = None):
        import onnxruntime_genai as og

        self.og, self.prompt, self.new = og, prompt, new
        self.model = og.Model(str(folder))
        self.adapters = None
        self.adapter = adapter
        if adapter is not None:
            self.adapters = og.Adapters(self.model)
            for file in folder.glob("*.onnx_adapter"):
                self.adapters.load(str(file), file.stem)

    def generator(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(self.prompt) + self.new, do_sample=False)
        return self.og.Generator(self.model, params)

    def generate(self) -> tuple[float, float]:
        """(CPU seconds of this thread, wall seconds) of one generation, the generator's creation included."""
        cpu, wall = time.thread_time(), time.perf_counter()
        generator = self.generator()
        if self.adapter is not None:
            generator.set_active_adapter(self.adapters, self.adapter)
        generator.append_tokens(self.prompt)
        while not generator.is_done():
            generator.generate_next_token()
        return time.thread_time() - cpu, time.perf_counter() - wall


def _wall_ms(fn, repeats: int, setup=lambda: None) -> float:
    """Median wall-clock milliseconds of ``fn(i, setup())`` over ``repeats`` calls, ``setup`` untimed."""
    samples = []
    for i in range(repeats):
        prepared = setup()
        start = time.perf_counter()
        fn(i, prepared)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds (a smoke run)")
    parser.add_argument("--hidden", type=int, choices=sorted(CONFIGS), default=1024, help="the model's width")
    args = parser.parse_args()
    config = CONFIGS[args.hidden]
    rounds, new = (3, 16) if args.quick else (13, 64)
    prompt = [(7 * i) % config["vocab_size"] for i in range(1, 33)]
    from lora_ref.cli import main as cli

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-genai-") as tmp:
        root = Path(tmp)
        hf = build_hf(root / "hf", config)
        build_adapter(hf, root / "a", TARGETS, RANK, seed=1)
        build_adapter(hf, root / "b", TARGETS, RANK, seed=2)
        folders = {"base": build_genai(hf, root / "base"),
                   "genai-own": build_genai(hf, root / "own", "fp32", f"adapter_path={root / 'a'}")}
        for mode in ("merged", "dynamic"):
            adapters = [str(root / "a")] + ([str(root / "b")] if mode == "dynamic" else [])
            assert cli(["export", str(root / "base"), *adapters, "--mode", mode, "-o", str(root / mode)]) == 0
            folders[mode] = root / mode
        for folder in folders.values():
            _one_thread(folder)
        share = lora_share(folders["dynamic"], folders["merged"])

        def runner(name: str) -> Runner:
            return Runner(folders[name], prompt, new, "a" if name == "dynamic" else None)

        throwaway = runner("merged")  # the first session of the process: not timed (module docstring)
        runners: dict[str, list[Runner]] = {name: [] for name in MODELS}
        for name in (*MODELS, *reversed(MODELS)):
            runners[name].append(runner(name))
        for copies in runners.values():
            for copy in copies:
                copy.generate()  # warm-up
        cpu: dict[str, list[float]] = {name: [] for name in MODELS}
        wall: dict[str, list[float]] = {name: [] for name in MODELS}
        for i in range(rounds):
            for name in MODELS[i % len(MODELS):] + MODELS[:i % len(MODELS)]:
                times = [copy.generate() for copy in runners[name]]
                cpu[name].append(sum(c for c, _ in times))
                wall[name].append(sum(w for _, w in times))
        ratio = {other: statistics.median(d / o for d, o in zip(cpu["dynamic"], cpu[other])) for other in MODELS[1:]}
        generated = new * len(runners["dynamic"])
        tokens = {name: generated / statistics.median(t) for name, t in cpu.items()}
        wall_tokens = {name: generated / statistics.median(t) for name, t in wall.items()}
        dynamic = runners["dynamic"][0]
        switch_ms = _wall_ms(lambda i, generator: generator.set_active_adapter(dynamic.adapters, "ab"[i % 2]),
                             max(rounds * 4, 20), dynamic.generator)
        adapter_file = str(folders["dynamic"] / "a.onnx_adapter")

        def load(i: int, _) -> None:
            dynamic.adapters.load(adapter_file, f"load{i}")
            dynamic.adapters.unload(f"load{i}")

        load_ms = _wall_ms(load, 10)
        del throwaway
    results = {"command": "python bench/bench_genai.py " + " ".join(sys.argv[1:]),
               "tokens_per_s": tokens, "wall_tokens_per_s": wall_tokens, "dynamic_time_ratio": ratio,
               "clock": "CPU time", "copies": len(runners["dynamic"]), "lora_share": share,
               "switch_ms": switch_ms, "load_ms": load_ms, "rounds": rounds, "new_tokens": new,
               "prompt_tokens": len(prompt), "config": config, "r": RANK, "seconds": time.perf_counter() - started}
    print(readme.genai_table(results))
    print(f"\nfed LoRA factors / base weights: {share:.1%} (the memory-bound floor of the ratio: {1 + share:.3f}x)")
    print(f"adapter switch (set_active_adapter on a new generator): {switch_ms:.3f} ms median; "
          f"Adapters.load: {load_ms:.2f} ms; one token: {1e3 / tokens['dynamic']:.2f} ms")
    print(f"goal: dynamic <= 1.10x the merged model's time at r={RANK}; {results['seconds']:.0f} s")
    write_results("genai", results)
    print(f"wrote {readme.write()}")


if __name__ == "__main__":
    main()
