"""Shared test configuration: hypothesis profiles and the peer-test gate.

LORA_REF_HYPOTHESIS_PROFILE=ci (default, fast) or deep (many examples).
LORA_REF_REQUIRE_PEERS=1 turns a missing peer (torch, peft, onnxruntime) into a failure.
"""

from __future__ import annotations

import importlib
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LORA_REF_HYPOTHESIS_PROFILE", "ci"))


def require_peer(module: str):
    """Import a peer package, or skip the test (fail when LORA_REF_REQUIRE_PEERS=1)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("LORA_REF_REQUIRE_PEERS") == "1":
            pytest.fail(f"peer {module!r} is required (LORA_REF_REQUIRE_PEERS=1) but cannot be imported: {exc}")
        pytest.skip(f"peer {module!r} not installed")


@pytest.fixture(scope="module")
def torch():
    """torch for the PEFT peer tests: PEFT importable too, the pinned version, a fixed seed."""
    torch = require_peer("torch")
    require_peer("peft")
    assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
    torch.manual_seed(0)
    return torch


@pytest.fixture(scope="module", params=["numpy", "numba"])
def kernel_path(request: pytest.FixtureRequest):
    """Run a module's tests on both evaluations of the correctly rounded merge (LORA_REF_KERNELS): the
    NumPy reference and the numba kernels (skipped without numba, failed under LORA_REF_REQUIRE_PEERS=1)."""
    if request.param == "numba":
        require_peer("numba")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_REF_KERNELS", request.param)
        yield request.param
