"""Coverage-guided fuzzing of lora-ref's loaders with atheris (optional; not a dependency).

    pip install atheris
    python tests/corpus/make_corpus.py                     # seeds: tests/corpus/generated/
    python fuzz/fuzz_loaders.py safetensors -atheris_runs=200000 tests/corpus/generated/_fixtures
    python fuzz/fuzz_loaders.py TARGET -max_total_time=600

TARGET is one of: safetensors, adapter_config, residual, case_json, onnx_adapter. Each input is
written to a file and given to the loader; a LoraRefError is the correct refusal of a bad file,
any other exception is reported by atheris as a crash (with the input saved as crash-<sha1>).
The hypothesis harness in tests/test_fuzz.py runs the same properties in CI.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from lora_ref.checkpoint import load_residuals
    from lora_ref.conformance.casefile import load_case
    from lora_ref.config import CONFIG_NAME, LoraConfig
    from lora_ref.errors import LoraRefError
    from lora_ref.export.adapter_files import load_onnx_adapter
    from lora_ref.export.graphio import load_model
    from lora_ref.export.slots import slots_from_model
    from lora_ref.safetensors_io import SafetensorsFile

WORK = Path(tempfile.mkdtemp(prefix="lora-ref-fuzz-"))
SEEDS = Path(__file__).resolve().parents[1] / "tests" / "corpus" / "generated" / "_fixtures"


def _safetensors(path: Path) -> None:
    with SafetensorsFile(path) as handle:
        for name in handle.keys():
            handle.get(name).tobytes()


def _adapter_config(path: Path) -> None:
    config = LoraConfig.load(path.parent)
    config.targets("model.layers.0.self_attn.q_proj")
    config.scale_for("model.layers.0.self_attn.q_proj")


def _case_json(path: Path) -> None:
    case = load_case(path.parent)
    case.load_inputs()
    case.load_expected()


def _onnx_adapter(path: Path) -> None:
    load_onnx_adapter(path, slots_from_model(load_model(SEEDS / "dynamic.onnx")))


#: target -> (file name the input is written to, loader)
TARGETS = {
    "safetensors": ("input.safetensors", _safetensors),
    "adapter_config": (CONFIG_NAME, _adapter_config),
    "residual": ("residual.safetensors", load_residuals),
    "case_json": ("case.json", _case_json),
    "onnx_adapter": ("input.onnx_adapter", _onnx_adapter),
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [seed dirs]")
    file_name, loader = TARGETS[sys.argv.pop(1)]
    directory = WORK / "input"
    directory.mkdir(exist_ok=True)
    if file_name == "case.json":  # the case's tensor files come from the fixture case
        shutil.copytree(SEEDS / "case", directory, dirs_exist_ok=True)
    path = directory / file_name

    def one_input(data: bytes) -> None:
        path.write_bytes(data)
        try:
            loader(path)
        except LoraRefError:
            pass

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
