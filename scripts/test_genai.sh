#!/usr/bin/env bash
# The onnxruntime-genai tests (pytest marker `genai`) in their own venv, .venv-genai.
# onnxruntime-genai depends on the CPU `onnxruntime`, whose files overwrite onnxruntime-gpu's when both are in
# one venv (the CUDA provider disappears silently), so this venv gets the `genai` extra (onnx + onnxruntime +
# onnxruntime-genai) and never the `export` extra. Peers are required: a missing one fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-genai
.venv-genai/bin/python -m pip install -q --upgrade pip
.venv-genai/bin/python -m pip install -q -e ".[genai,test,peers]"
LORA_REF_REQUIRE_PEERS=1 .venv-genai/bin/python -m pytest -q -m genai "$@"
