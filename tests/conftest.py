"""Shared fixtures: which implementations run here, float64 oracle, random IPLR inputs.

Every property test is one body parametrised over `chunk_impls` / `recurrent_impls`: the xla
path and the Pallas kernels through the interpreter everywhere, the compiled kernels where a
GPU is present. GPU-only cases carry the `gpu` marker and show up as skipped (with the
reason) on CPU; heavy cases carry `slow` and run with `--runslow`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

from iplr_jax._common import has_gpu  # noqa: E402

GPU = has_gpu()
CHUNK_IMPLS = ["xla", "interpret"] + (["pallas"] if GPU else [])
RECURRENT_IMPLS = ["xla", "interpret"] + (["pallas"] if GPU else [])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))


@pytest.fixture
def rng(request):
    # fresh inputs every run, but reproducible from the printed seed when a test fails
    seed = np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)
