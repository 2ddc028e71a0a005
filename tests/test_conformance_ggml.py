"""The ``ggml`` compute profile (SPEC C.3, from G.5): llama.cpp passes or fails for the right reasons.

ggml_mul_mat(W, x) rounds x to W's type and accumulates in float32, so llama.cpp's LoRA term
s·B(A x) rounds the rank-r intermediate A x to lora_b's type t. In the suite x is stored in t
already (rounding it to W's type is the identity), so a ggml-style implementation is ``Alt`` of
the mutation tests with the ``low_precision_lora_path`` rounding: float32 compute, A x rounded to
t before B. The profile must accept it (and the two tiers still report where it is only within
the storage bound), reject a rounding ggml does not do (a delta cast to the weight type before
the merge's add: llama-export-lora merges in float32), and reject llama.cpp's real semantic bug
class (rsLoRA's alpha/√r read as alpha/r).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from lora_ref.cli import main
from lora_ref.conformance.bounds import tolerance
from lora_ref.conformance.reference_impl import ReferenceImplementation
from lora_ref.conformance.runner import COMPUTE_PROFILES, InProcessDriver, Selection, run_suite
from lora_ref.cli.conformance_cmd import DEFAULT_SUITE
from lora_ref.dtypes import bfloat16
from test_conformance_mutations import Alt

#: The operations llama.cpp performs with an adapter: forward (Linear, the token embedding) and merge.
GGML_OPS = Selection(operations=("linear.forward", "embedding.forward", "linear.merge", "embedding.merge"))


def _run(impl, layout="canonical", profile="ggml", selection=GGML_OPS):
    return run_suite(DEFAULT_SUITE, InProcessDriver(impl), layout=layout, profile=profile, selection=selection, timeout=0)


def test_ggml_bound_is_the_g5_formula_in_exact_arithmetic():
    """tol = ((1 + u_t)(1 + γ_K(u_32)) − 1) M + K η_32 + η_t + ½ ulp_t(|y| + E), evaluated in rationals."""
    K, M, y = 20, Fraction(3), Fraction(1, 3)
    for t, u_t, eta_t, p in ((np.dtype(np.float16), Fraction(1, 2**11), Fraction(1, 2**24), 11),
                             (np.dtype(bfloat16), Fraction(1, 2**8), Fraction(1, 2**133), 8)):
        u = Fraction(1, 2**24)
        E = (1 + u_t) * (1 + K * u / (1 - K * u)) - 1
        E = E * M + K * Fraction(1, 2**149) + eta_t
        # |y| + E lies in [2^-2, 2^-1): ulp_t there is 2^(-2 - p + 1)
        assert Fraction(1, 4) <= abs(y) + E < Fraction(1, 2)
        exact = E + Fraction(1, 2) * Fraction(1, 2 ** (p + 1))
        got = tolerance(np.array([float(y)]), np.array([float(M)]), K, t, np.dtype(np.float32), roundings=1)[0]
        assert abs(Fraction(got) - exact) <= exact * 2**-50, (t, float(exact), got)
        # strictly wider than the float32 profile's bound, strictly narrower than the storage profile's
        assert tolerance(np.array([float(y)]), np.array([float(M)]), K, t, np.dtype(np.float32))[0] < got
        assert got < tolerance(np.array([float(y)]), np.array([float(M)]), K, t, t)[0]
    # a float32 case: rounding a float32 intermediate to float32 is exact, so the bound is the float32 one
    f32 = np.dtype(np.float32)
    assert tolerance(np.array([0.5]), np.array([3.0]), K, f32, f32, roundings=1)[0] == tolerance(np.array([0.5]), np.array([3.0]), K, f32, f32)[0]


def test_profile_table_and_cli_choice():
    assert COMPUTE_PROFILES["ggml"].roundings_for("linear.forward") == 1
    assert COMPUTE_PROFILES["ggml"].roundings_for("embedding.forward") == 0  # ggml_get_rows copies rows exactly
    assert COMPUTE_PROFILES["ggml"].roundings_for("linear.merge") == 0  # llama-export-lora: float32, one final rounding
    assert main(["conformance", "run", "--impl", "lora_ref.conformance.reference_impl:factory", "--compute", "ggml",
                 "--op", "linear.forward", "--quiet", "--no-progress"]) == 0


def test_reference_passes_the_ggml_profile():
    result = _run(ReferenceImplementation(), selection=Selection())
    bad = [(r.case_id, r.status, r.detail) for r in result.results if r.status not in ("pass", "skip")]
    assert not bad, bad
    assert result.conformance() == "conformant"


def test_ggml_style_implementation_passes_ggml_and_the_tiers_say_where_it_is_storage_precision():
    result = _run(Alt(np.float32, bug="low_precision_lora_path"))
    bad = [(r.case_id, r.status, r.detail) for r in result.results if r.status != "pass"]
    assert not bad, bad
    storage_only = result.tier_cases("storage")
    # the profile matters: ggml's rounding of A x to fp16/bf16 is outside the float32 bound on some cases ...
    assert storage_only, "no case separates the ggml profile from the float32 one"
    by_id = {r.case_id: r for r in result.results}
    # ... only on 16-bit linear forwards; float32 cases, embeddings and merges stay in the float32 tier
    assert all(by_id[c].operation == "linear.forward" and by_id[c].dtype in ("float16", "bfloat16") for c in storage_only)
    assert all(r.verdict == "float32" for r in result.results if r.dtype == "float32" or r.operation != "linear.forward")
    assert result.conformance() == "conformant at storage precision" and not result.tier_cases("semantic")
    worst = max(r.ratio for r in result.results)
    assert worst <= 1.0
    print(f"ggml-style: {len(storage_only)} storage-tier cases of {len(result.results)}, worst err/bound {worst:.3f} under ggml")


def test_ggml_profile_rejects_a_rounding_ggml_does_not_do():
    """A delta cast to the weight's type before the add: inside the storage bound, outside ggml's (its merge is float32)."""
    result = _run(Alt(np.float32, bug="low_precision_merge"))
    failed = [r for r in result.results if r.status == "fail"]
    assert len(failed) >= 2 and all(r.verdict == "storage" for r in failed), [(r.case_id, r.verdict) for r in failed]


def test_ggml_profile_rejects_rslora_read_as_alpha_over_r():
    """llama.cpp's own bug class (issue 16): s = alpha / r for an rsLoRA adapter is a semantic failure under ggml."""
    result = _run(Alt(np.float32, bug="ignore_rslora"), "peft")
    guard = {r.case_id: r for r in result.results}["semantic/linear-forward-rslora-bfloat16"]
    assert guard.status == "fail" and guard.verdict == "semantic", guard.tiers
    assert not result.ok and result.conformance() == "nonconformant"
