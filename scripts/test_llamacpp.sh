#!/usr/bin/env bash
# Optional peer: llama.cpp itself, through llama-cpp-python (built from source: ~6+ minutes on 2 cores).
# Installs it into .venv (set up by scripts/test.sh first) and runs the logits round trip
# PEFT -> lora-ref to-gguf -> llama.cpp (tests/test_llamacpp.py, marker `llamacpp`), and ggml itself through
# the conformance suite under --compute ggml (tests/test_conformance_ggml_peer.py).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/test.sh --co -q >/dev/null
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TOOLS=OFF}" \
    .venv/bin/python -m pip install -q "llama-cpp-python>=0.3"
LORA_REF_LLAMACPP=1 .venv/bin/python -m pytest -q -m llamacpp tests/test_llamacpp.py tests/test_conformance_ggml_peer.py "$@"
