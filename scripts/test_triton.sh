#!/usr/bin/env bash
# Triton Inference Server tests (tests/test_triton.py) on loopback, in their own venv (.venv-triton).
#
# Separate from scripts/test.sh because the pins conflict with the main venv: tritonclient 2.73
# wants ml-dtypes <= 0.5.4, and nvidia-pytriton wants numpy < 2 for its own Python API, which
# these tests do not use: they run the wheel's tritonserver binary only, so it is installed
# with --no-deps (numpy stays at what the rest of lora-ref resolves to).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-triton
.venv-triton/bin/python -m pip install -q --upgrade pip
.venv-triton/bin/python -m pip install -q -e ".[export,test,peers,triton]"
.venv-triton/bin/python -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
LORA_REF_TRITON=1 LORA_REF_REQUIRE_PEERS=1 .venv-triton/bin/python -m pytest -q tests/test_triton.py tests/test_triton_repo.py "$@"
