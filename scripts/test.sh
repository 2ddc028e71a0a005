#!/usr/bin/env bash
# Set everything up in .venv (core, exporter, test tools, peers, the numba kernels) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[export,test,peers,fast]"
.venv/bin/python -m pytest -q "$@"
