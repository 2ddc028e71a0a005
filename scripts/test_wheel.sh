#!/usr/bin/env bash
# Build the wheel, install it (and only its own dependencies) into a fresh venv outside the
# repository, and run the installed tool from an empty folder: the demo, and the whole shipped
# conformance suite against the reference (so the suite is really inside the wheel).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
"$work/venv/bin/python" -m pip install -q "$work"/dist/lora_ref-*.whl
cd "$work"
mkdir empty && cd empty
"$work/venv/bin/lora-ref" --version
"$work/venv/bin/lora-ref" demo > /dev/null
"$work/venv/bin/lora-ref" conformance run --impl lora_ref.conformance.reference_impl:factory --quiet | tail -1
"$work/venv/bin/python" -c "import sys, lora_ref; assert '$repo' not in lora_ref.__file__, lora_ref.__file__; print('installed from the wheel:', lora_ref.__file__)"
