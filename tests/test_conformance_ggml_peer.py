"""Optional peer: ggml itself (llama-cpp-python's libggml-base / libggml-cpu through ctypes), marker ``llamacpp``.

Skipped unless LORA_REF_GGML_LIB names the directory holding the libraries (llama-cpp-python's
``llama_cpp/lib``) or LORA_REF_LLAMACPP=1 (scripts/test_llamacpp.sh, which installs
llama-cpp-python): llama-cpp-python builds from source, so CI does not require it.

llama.cpp must pass or fail for the right reasons: with the exact scale (the canonical layout, what
``lora-ref to-gguf`` makes llama.cpp read) it passes the ``ggml`` profile, its 16-bit Linear
forwards sit in the storage tier (ggml rounds A x to fp16/bf16: precision) and the float32
profile rejects exactly those; with llama.cpp's own scale rule (the peft layout: alpha / r, rsLoRA
unknown) every rsLoRA case with r > 1 is a semantic failure and nothing else fails.
"""

from __future__ import annotations

import math
import os

import pytest

from lora_ref.cli.conformance_cmd import DEFAULT_SUITE
from lora_ref.conformance.casefile import case_dir, load_case
from lora_ref.conformance.runner import InProcessDriver, run_suite

pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(not os.environ.get("LORA_REF_GGML_LIB") and os.environ.get("LORA_REF_LLAMACPP") != "1",
                                 reason="ggml peer: set LORA_REF_GGML_LIB to llama-cpp-python's llama_cpp/lib "
                                        "(or run scripts/test_llamacpp.sh)")]

OPS = ("linear.forward", "embedding.forward", "linear.merge", "embedding.merge")


@pytest.fixture(scope="module")
def ggml():
    from lora_ref.conformance.peers.ggml import factory

    return factory()


def _run(impl, layout, profile):
    return run_suite(DEFAULT_SUITE, InProcessDriver(impl), layout=layout, profile=profile, timeout=0)


def test_ggml_with_the_exact_scale_passes_the_ggml_profile_at_storage_precision(ggml):
    result = _run(ggml, "canonical", "ggml")
    bad = [(r.case_id, r.status, r.detail) for r in result.results if r.status in ("fail", "error", "timeout")]
    assert not bad, bad
    judged = [r for r in result.results if r.status == "pass"]
    assert {r.operation for r in judged} == set(OPS) and any(r.refusal for r in judged)
    assert all(r.operation not in OPS or "llama.cpp has no" in r.detail for r in result.results if r.status == "skip")
    storage_only = {r.case_id for r in result.results if r.verdict == "storage"}
    assert storage_only and all(r.operation == "linear.forward" and r.dtype != "float32"
                                for r in result.results if r.case_id in storage_only)
    assert result.conformance() == "conformant at storage precision"
    # the profile decides: under float32 exactly the storage-tier cases fail, and nothing else
    strict = _run(ggml, "canonical", "float32")
    assert {r.case_id for r in strict.results if r.status == "fail"} == storage_only


def test_ggml_with_llamas_scale_rule_fails_rslora_semantically_and_nothing_else(ggml):
    result = _run(ggml, "peft", "ggml")
    judged = [r for r in result.results if r.status in ("pass", "fail") and not r.refusal]
    wrong_scale = set()
    for r in judged:
        params = load_case(case_dir(DEFAULT_SUITE, r.case_id)).params
        alpha, rank = params["lora_alpha"], params["r"]
        llama = alpha / rank if alpha != 0 else 1.0
        peft = alpha / math.sqrt(rank) if params.get("use_rslora") else alpha / rank
        if not math.isclose(llama, peft, rel_tol=1e-6):
            wrong_scale.add(r.case_id)
    assert wrong_scale, "no case tells llama.cpp's scale from PEFT's"
    assert {r.case_id for r in judged if r.status == "fail"} == wrong_scale
    assert all(r.verdict == "semantic" for r in judged if r.case_id in wrong_scale)
    assert result.conformance() == "nonconformant"
