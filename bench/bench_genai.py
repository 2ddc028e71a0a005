"""onnxruntime-genai benchmark (issue 12, CPU): greedy decoding tokens/s of lora-ref's dynamic-adapter
model against the merged model and against genai's own adapter graph, and the adapter switch time.

Model: a random Llama from a config (d=512, 8 heads of 64, 4 KV heads, d_ff=1408, 4 layers,
vocab 3001), built by genai's model builder (fp32, CPU, q/k/v fused); one PEFT adapter, r=16,
on q/k/v/o/gate/up/down. Compared, all generating the same number of tokens from the same prompt:

* dynamic: lora-ref ``export --mode dynamic`` of genai's model, the adapter active through
  ``og.Adapters`` / ``set_active_adapter`` (fused q/k/v: one stacked branch);
* merged: lora-ref ``export --mode merged`` (the base graph with other weights);
* genai-own: genai's builder with ``adapter_path`` (the LoRA baked in as constant MatMuls,
  q/k/v unfused, as genai does for LoRA).

Timing: the models decode in turn, one generation each per round; a ratio is the median over
rounds of time(a)/time(b) (a round shares the machine's load). Every session runs one intra-op
thread. Switch time: ``set_active_adapter`` between two loaded adapters on a new generator,
median. Needs the .venv-genai of scripts/test_genai.sh.

Usage: python bench/bench_genai.py [--quick]
"""

from __future__ import annotations

import argparse
import json
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

CONFIG = dict(vocab_size=3001, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _one_thread(folder: Path) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 1
    path.write_text(json.dumps(config, indent=2))


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

    def generate(self) -> float:
        start = time.perf_counter()
        generator = self.generator()
        if self.adapter is not None:
            generator.set_active_adapter(self.adapters, self.adapter)
        generator.append_tokens(self.prompt)
        while not generator.is_done():
            generator.generate_next_token()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds (a smoke run)")
    args = parser.parse_args()
    rounds, new = (3, 16) if args.quick else (9, 64)
    prompt = [(7 * i) % CONFIG["vocab_size"] for i in range(1, 33)]
    from lora_ref.cli import main as cli

    with tempfile.TemporaryDirectory(prefix="bench-genai-") as tmp:
        root = Path(tmp)
        hf = build_hf(root / "hf", CONFIG)
        build_adapter(hf, root / "a", TARGETS, 16, seed=1)
        build_adapter(hf, root / "b", TARGETS, 16, seed=2)
        build_genai(hf, root / "base")
        build_genai(hf, root / "own", "fp32", f"adapter_path={root / 'a'}")
        for mode in ("merged", "dynamic"):
            adapters = [str(root / "a")] + ([str(root / "b")] if mode == "dynamic" else [])
            assert cli(["export", str(root / "base"), *adapters, "--mode", mode, "-o", str(root / mode)]) == 0
        for folder in ("base", "own", "merged", "dynamic"):
            _one_thread(root / folder)
        runners = {"dynamic": Runner(root / "dynamic", prompt, new, "a"), "merged": Runner(root / "merged", prompt, new),
                   "genai-own": Runner(root / "own", prompt, new), "base": Runner(root / "base", prompt, new)}
        for runner in runners.values():
            runner.generate()  # warm-up
        times = {name: [] for name in runners}
        for _ in range(rounds):
            for name, runner in runners.items():
                times[name].append(runner.generate())
        ratio = {other: statistics.median(d / o for d, o in zip(times["dynamic"], times[other])) for other in ("merged", "genai-own", "base")}
        switches = []
        dynamic = runners["dynamic"]
        for i in range(max(rounds * 4, 20)):
            generator = dynamic.generator()
            start = time.perf_counter()
            generator.set_active_adapter(dynamic.adapters, "ab"[i % 2])
            switches.append(time.perf_counter() - start)
        per_token = {name: statistics.median(t) / new for name, t in times.items()}
    switch_ms = statistics.median(switches) * 1e3
    results = {"command": "python bench/bench_genai.py " + " ".join(sys.argv[1:]),
               "tokens_per_s": {k: 1 / v for k, v in per_token.items()}, "dynamic_time_ratio": ratio,
               "switch_ms": switch_ms, "rounds": rounds, "new_tokens": new, "prompt_tokens": len(prompt),
               "config": CONFIG, "r": 16}
    print(readme.genai_table(results))
    print(f"\nadapter switch (set_active_adapter on a new generator): {switch_ms:.3f} ms median; "
          f"one token: {per_token['dynamic'] * 1e3:.2f} ms")
    print("goal: dynamic <= 1.10x the merged model's time at r=16")
    write_results("genai", results)
    print(f"wrote {readme.write()}")


if __name__ == "__main__":
    main()
