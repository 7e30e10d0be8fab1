"""The Pallas paths lowered for a CUDA GPU, on any machine (`jax.export`, platforms=["cuda"]).

Without a GPU the compiled kernels cannot run, and the `pallas` cases of the other tests are
skipped. Lowering still runs here: every kernel must trace and lower through the Triton
backend (each primitive it uses has a Triton lowering, its BlockSpecs fit the padded shapes)
for the head sizes, dtypes and options the contract allows, and the expected kernels must be
the ones called. It does not compile the Triton IR, so register and shared-memory limits show
only on the GPU (`-k "pallas or gpu"` there).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

import iplr_jax
import iplr_jax.inputs as inputs_module

TRITON_CALL = "__gpu$xla.gpu.triton"
WY, STATE, OUT = "iplr_wy_fwd", "iplr_chunk_state_fwd", "iplr_chunk_output_fwd"
SWEEP, INTRA = "iplr_chunk_bwd_sweep", "iplr_chunk_bwd_intra"
SUMMARY, SUMMARY_BWD = "iplr_chunk_summary_fwd", "iplr_chunk_bwd_summary"
FUSED = ["iplr_fused_fwd"]
FUSED_BWD = ["iplr_fused_fwd", "iplr_fused_bwd_dS", "iplr_fused_bwd_dq"]


@pytest.fixture(autouse=True)
def pretend_gpu(monkeypatch):
    # implementation="pallas" refuses to run without a GPU; lowering for CUDA needs none
    monkeypatch.setattr(inputs_module, "has_gpu", lambda: True)


@pytest.fixture(autouse=True)
def _plain_path(unguarded):
    """Every test here lowers the plain kernels' path (conftest.unguarded)."""


def triton_kernels(fn, *args) -> list[str]:
    """Names of the Triton kernels in `fn` lowered for CUDA, in call order."""
    lowered = export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*args)
    text = lowered.mlir_module()
    calls = text.count(f"@{TRITON_CALL}(")
    names = re.findall(r'name = "(iplr_\w+)"', text)
    assert len(names) == calls, (names, calls)
    return names


def specs(B, T, H, K, V, dtype, N=None):
    s = jax.ShapeDtypeStruct
    qk = s((B, T, H, K), dtype)
    return [qk, qk, s((B, T, H, V), dtype), qk, qk], s((N or B, H, K, V), jnp.float32)


def loss_grads(op, **kw):
    """All six gradients of a loss on o and the final state, as a function of the inputs."""

    def loss(q, k, v, a, b, h0, *extra):
        o, ht = op(q, k, v, a, b, initial_state=h0, output_final_state=True, **kw, **dict(extra))
        return o.astype(jnp.float32).sum() + ht.sum()

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))


# (K, V, dtype, chunk kernels of the backward): Kp = 256 runs its backward in jnp (chunk_bwd)
HEADS = [
    (64, 64, jnp.bfloat16, [SWEEP, INTRA]),
    (128, 128, jnp.bfloat16, [SWEEP, INTRA]),
    (100, 60, jnp.float32, [SWEEP, INTRA]),
    (16, 200, jnp.float16, [SWEEP, INTRA]),
    (200, 130, jnp.float32, []),
]


@pytest.mark.parametrize("K, V, dtype, bwd", HEADS)
def test_chunk_lowers(K, V, dtype, bwd):
    x, h0 = specs(2, 100, 2, K, V, dtype)
    fwd = lambda *a: iplr_jax.chunk(*a, implementation="pallas")[0]
    names = triton_kernels(fwd, *x)
    assert names[:2] == [WY, STATE] and set(names[2:]) <= {OUT}, names
    step = loss_grads(iplr_jax.chunk, implementation="pallas")
    assert triton_kernels(step, *x, h0) == [WY, STATE] + bwd


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("K, V", [(64, 64), (200, 130)])
def test_chunk_output_variants_lower(fuse, K, V):
    x, _ = specs(2, 100, 2, K, V, jnp.bfloat16)
    config = iplr_jax.ChunkConfig(fuse_output=fuse)
    names = triton_kernels(lambda *a: iplr_jax.chunk(*a, implementation="pallas", config=config)[0], *x)
    assert names == [WY, STATE] + ([] if fuse else [OUT])


@pytest.mark.parametrize("C", [16, 32, 64])
def test_chunk_packed_traced_lowers(C):
    x, h0 = specs(1, 300, 2, 32, 48, jnp.bfloat16, N=3)
    cu = jax.ShapeDtypeStruct((4,), jnp.int32)  # traced offsets

    def step(q, k, v, a, b, h0, cu):
        kw = dict(cu_seqlens=cu, chunk_size=C, implementation="pallas")
        return loss_grads(iplr_jax.chunk, **kw)(q, k, v, a, b, h0)

    # the forward with residuals is one partitioned op (iplr_jax/sharding.py), so an output
    # kernel that no gradient reads may stay in the lowered module (a loss reading o needs it)
    names = triton_kernels(step, *x, h0, cu)
    assert [n for n in names if n != OUT] == [WY, STATE, SWEEP, INTRA], names


@pytest.mark.parametrize("packed", [False, True])
def test_chunk_segments_lower(packed):
    """The summary sweeps (identity columns) lower for CUDA: segments inside one sequence
    (`ChunkConfig(segment_chunks=...)`), forward and backward, rows or traced packed offsets."""
    x, h0 = specs(1 if packed else 2, 300, 2, 64, 32, jnp.bfloat16, N=3 if packed else None)
    cu = jax.ShapeDtypeStruct((4,), jnp.int32)
    config = iplr_jax.ChunkConfig(segment_chunks=2)

    def step(q, k, v, a, b, h0, cu):
        kw = dict(cu_seqlens=cu if packed else None, implementation="pallas", config=config)
        return loss_grads(iplr_jax.chunk, **kw)(q, k, v, a, b, h0)

    names = [n for n in triton_kernels(step, *x, h0, cu) if n != OUT]
    assert names == [WY, SUMMARY, STATE, SUMMARY_BWD, SWEEP, INTRA], names


@pytest.mark.parametrize("K, V, dtype", [(k, v, d) for k, v, d, _ in HEADS])
def test_fused_recurrent_lowers(K, V, dtype):
    x, h0 = specs(2, 50, 2, K, V, dtype)
    fwd = lambda *a: iplr_jax.fused_recurrent(*a, implementation="pallas")[0]
    assert triton_kernels(fwd, *x) == FUSED
    step = loss_grads(iplr_jax.fused_recurrent, implementation="pallas")
    assert triton_kernels(step, *x, h0) == FUSED_BWD


def test_decode_step_lowers():
    x, h0 = specs(8, 1, 4, 128, 128, jnp.bfloat16)
    step = lambda *a: iplr_jax.fused_recurrent(
        *a[:5], initial_state=a[5], output_final_state=True, implementation="pallas"
    )
    assert triton_kernels(step, *x, h0) == FUSED


@pytest.mark.parametrize("op, kernels", [("chunk", [WY, STATE, OUT]), ("fused_recurrent", FUSED)])
def test_traced_scale_lowers(op, kernels):
    x, _ = specs(1, 64, 2, 64, 64, jnp.bfloat16)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    fn = getattr(iplr_jax, op)
    assert triton_kernels(lambda *a: fn(*a[:5], scale=a[5], implementation="pallas")[0], *x, s) == kernels
