"""Shared fixtures: which implementations run here, float64 oracle, random IPLR inputs.

Every property test is one body parametrised over `CHUNK_IMPLS` / `RECURRENT_IMPLS`: the xla
path and the Pallas kernels through the interpreter everywhere, the compiled kernels where a
GPU is present. GPU-only cases carry the `gpu` marker and show up as skipped (with the
reason) on CPU; heavy cases carry `slow` and run with `--runslow`.

The CPU backend is split into 8 simulated devices before jax is imported, so the multi-device
tests run on any machine; single-device tests use the first device and are unaffected.
"""

from __future__ import annotations

import os
import zlib

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

from iplr_jax.inputs import has_gpu  # noqa: E402

GPU = has_gpu()
CHUNK_IMPLS = ["xla", "interpret"] + (["pallas"] if GPU else [])
RECURRENT_IMPLS = ["xla", "interpret"] + (["pallas"] if GPU else [])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")
    parser.addoption(
        "--seed", type=int, default=0,
        help="base of the per-test seeds (each test draws from a seed derived from its id and this)",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))


@pytest.fixture
def rng(request):
    """A generator seeded from the test id: every parametrisation draws its own inputs, and a
    failure reproduces from its id alone (`--seed N` draws a fresh set for the whole run)."""
    base = request.config.getoption("--seed")
    seed = zlib.crc32(f"{base}:{request.node.nodeid}".encode())
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)
