#!/usr/bin/env bash
# The jax-lorax conformance peer tests (pytest marker `lorax`) in their own venv, .venv-lorax.
# jax-lorax 0.3.1 and its qax need jax < 0.5, while the main venv's `peers` extra pins jax 0.10.2 (for Keras 3),
# so this venv gets the `lorax` extra (jax-lorax, qax, jax 0.4) and never `peers`. Peers are required: a missing
# one fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-lorax
.venv-lorax/bin/python -m pip install -q --upgrade pip
.venv-lorax/bin/python -m pip install -q -e ".[lorax,test]"
LORA_REF_REQUIRE_PEERS=1 .venv-lorax/bin/python -m pytest -q -m lorax tests/test_conformance_peers.py "$@"
