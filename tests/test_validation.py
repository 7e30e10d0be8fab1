"""Bad inputs fail early with a ValueError naming the argument, the shape it got and the one it needs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iplr_jax

OPS = {
    "chunk": functools.partial(iplr_jax.chunk, implementation="xla"),
    "fused_recurrent": functools.partial(iplr_jax.fused_recurrent, implementation="xla"),
    "naive": iplr_jax.naive,
}


def _inputs(B=2, T=8, H=2, K=4, V=3):
    z = lambda *s: jnp.ones(s, jnp.float32)
    return z(B, T, H, K), z(B, T, H, K), z(B, T, H, V), z(B, T, H, K), z(B, T, H, K)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "which, bad, match",
    [
        (0, jnp.ones((2, 8, 2)), r"q must have shape \[B, T, H, K\], got shape \(2, 8, 2\)"),
        (1, jnp.ones((2, 8, 2, 5)), r"k must have the shape of q.*\(2, 8, 2, 4\).*\(2, 8, 2, 5\)"),
        (2, jnp.ones((2, 7, 2, 3)), r"v must have shape \[B, T, H, V\].*\(2, 7, 2, 3\)"),
        (3, jnp.ones((2, 8, 3, 4)), r"a must have the shape of q"),
        (4, jnp.ones((1, 8, 2, 4)), r"b must have the shape of q"),
        (0, jnp.ones((2, 8, 2, 4), jnp.int32), r"q must be a floating-point array"),
    ],
)
def test_bad_shapes(op, which, bad, match):
    args = list(_inputs())
    args[which] = bad
    with pytest.raises(ValueError, match=match):
        OPS[op](*args)


@pytest.mark.parametrize("op", OPS)
def test_bad_initial_state(op):
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\] = \(2, 2, 4, 3\)"):
        OPS[op](*_inputs(), initial_state=jnp.zeros((2, 2, 3, 4)))
    # packed: N comes from cu_seqlens, not from B
    q, k, v, a, b = _inputs(B=1)
    cu = jnp.array([0, 3, 8], jnp.int32)
    with pytest.raises(ValueError, match=r"\(2, 2, 4, 3\) \(N = len\(cu_seqlens\) - 1\), got \(1, 2, 4, 3\)"):
        OPS[op](q, k, v, a, b, cu_seqlens=cu, initial_state=jnp.zeros((1, 2, 4, 3)))


@pytest.mark.parametrize("op", OPS)
def test_not_arrays_and_integer_state(op):
    args = list(_inputs())
    args[2] = np.ones((2, 8, 2, 3)).tolist()
    with pytest.raises(TypeError, match="v must be an array .* got list"):
        OPS[op](*args)
    with pytest.raises(ValueError, match="initial_state must be a floating-point array, got dtype int32"):
        OPS[op](*_inputs(), initial_state=jnp.zeros((2, 2, 4, 3), jnp.int32))


def test_sequence_axis_outside_shard_map():
    with pytest.raises(ValueError, match="sequence_axis 'sp' is no mesh axis of an enclosing jax.shard_map"):
        OPS["chunk"](*_inputs(), sequence_axis="sp")


@pytest.mark.parametrize("op", OPS)
def test_bad_cu_seqlens(op):
    msg = r"packed into a batch of 1: q must have shape \[1, T, H, K\], got \(2"
    with pytest.raises(ValueError, match=msg):
        OPS[op](*_inputs(), cu_seqlens=jnp.array([0, 4, 8], jnp.int32))
    one = _inputs(B=1)
    with pytest.raises(ValueError, match=r"non-decreasing offsets from 0 to T=8, got \[0, 5, 3, 8\]"):
        OPS[op](*one, cu_seqlens=np.array([0, 5, 3, 8], np.int32))
    with pytest.raises(ValueError, match=r"non-decreasing offsets from 0 to T=8, got \[0, 4\]"):
        OPS[op](*one, cu_seqlens=np.array([0, 4], np.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens must be integer offsets"):
        OPS[op](*one, cu_seqlens=np.array([0.0, 8.0]))
    with pytest.raises(ValueError, match=r"cu_seqlens must have shape \[N \+ 1\]"):
        OPS[op](*one, cu_seqlens=np.array([[0, 8]], np.int32))


@pytest.mark.parametrize("op", OPS)
def test_cu_seqlens_as_list(op):
    """Offsets typed as a Python list behave like the int32 array (and are validated)."""
    rng = np.random.default_rng()
    q, k, v, a, b = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) / 4 for x in _inputs(B=1))
    o1, h1 = OPS[op](q, k, v, a, b, cu_seqlens=[0, 3, 8], output_final_state=True)
    o2, h2 = OPS[op](q, k, v, a, b, cu_seqlens=jnp.array([0, 3, 8], jnp.int32), output_final_state=True)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
    np.testing.assert_array_equal(np.asarray(h1), np.asarray(h2))
    with pytest.raises(ValueError, match=r"non-decreasing offsets from 0 to T=8, got \[0, 9, 8\]"):
        OPS[op](q, k, v, a, b, cu_seqlens=[0, 9, 8])


def test_bad_chunk_size():
    for c in (8, 48, 128):
        msg = rf"chunk_size must be one of \(16, 32, 64\), got {c}"
        with pytest.raises(ValueError, match=msg):
            iplr_jax.chunk(*_inputs(), chunk_size=c, implementation="xla")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("scale", ["auto", True, jnp.ones(2), jnp.int32(2)])
def test_bad_scale(op, scale):
    with pytest.raises(ValueError, match=r"scale must be"):
        OPS[op](*_inputs(), scale=scale)


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_bad_config(op):
    other = iplr_jax.FusedRecurrentConfig() if op == "chunk" else iplr_jax.ChunkConfig()
    with pytest.raises(ValueError, match=r"config must be an iplr_jax\."):
        getattr(iplr_jax, op)(*_inputs(), config=other)


@pytest.mark.parametrize(
    "config, match",
    [
        (iplr_jax.ChunkConfig(state_block_v=24), r"state_block_v must be a power of two .* 16, got 24"),
        (iplr_jax.ChunkConfig(output_block_v=32), r"output_block_v must be .* padded value size 16, got 32"),
        (iplr_jax.ChunkConfig(wy_warps=3), r"ChunkConfig.wy_warps must be 1, 2, 4, 8 or 16, got 3"),
        (iplr_jax.ChunkConfig(f32_dots="float32"), r"f32_dots must be 'tf32' or 'highest', got 'float32'"),
        (iplr_jax.ChunkConfig(fuse_output="yes"), r"fuse_output must be True, False or None, got 'yes'"),
        (iplr_jax.ChunkConfig(segment_chunks=2.5), r"segment_chunks must be an int >= 0, got 2.5"),
        (iplr_jax.ChunkConfig(wy_precision="tf32x3"), r"'tf32x3' needs compiled kernels"),
        (iplr_jax.FusedRecurrentConfig(fwd_block_v=8), r"FusedRecurrentConfig.fwd_block_v must be a power"),
        (iplr_jax.FusedRecurrentConfig(prefetch=-1), r"FusedRecurrentConfig.prefetch must be an int >= 0"),
    ],
)
def test_bad_config_fields(config, match):
    """A config field the kernels cannot run (a V-block that does not tile the padded V gave
    NaN) fails at the call, naming the field."""
    op = iplr_jax.chunk if isinstance(config, iplr_jax.ChunkConfig) else iplr_jax.fused_recurrent
    with pytest.raises(ValueError, match=match):
        op(*_inputs(), config=config, implementation="interpret")


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_bad_implementation(op):
    fn = getattr(iplr_jax, op)
    with pytest.raises(ValueError, match=r"implementation must be one of"):
        fn(*_inputs(), implementation="triton")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r'implementation="pallas" needs a GPU'):
            fn(*_inputs(), implementation="pallas")


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_kernel_head_size_limit(op):
    q, k, v, a, b = _inputs(K=300)
    with pytest.raises(ValueError, match=r"support K <= 256, got K=300"):
        getattr(iplr_jax, op)(q, k, v, a, b, implementation="interpret")


def test_validation_before_tracing_under_jit():
    # shapes are static under jit, so the same ValueError surfaces, not a tracing error
    f = jax.jit(lambda q, k, v, a, b: iplr_jax.chunk(q, k, v, a, b, implementation="xla"))
    args = list(_inputs())
    args[2] = jnp.ones((2, 8, 3, 3))
    with pytest.raises(ValueError, match=r"v must have shape"):
        f(*args)


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_default_implementation_keeps_float64(monkeypatch, op):
    """On a GPU `implementation=None` picks the kernels, which compute in float32; float64
    inputs go to the xla path, which stays in float64 (checked here with a pretended GPU: the
    kernels cannot run on a CPU, so picking them would fail)."""
    import iplr_jax.inputs as inputs_module

    monkeypatch.setattr(inputs_module, "has_gpu", lambda: True)
    ones = inputs_module.Inputs(*(jnp.ones(2, jnp.float32),) * 5)
    assert inputs_module.resolve_implementation(None, ones) == "pallas"
    rng = np.random.default_rng()
    q, k, v, a, b = (jnp.asarray(rng.standard_normal(x.shape) / 4, jnp.float64) for x in _inputs())
    o, ht = getattr(iplr_jax, op)(q, k, v, a, b, output_final_state=True)
    ro, rht = iplr_jax.naive(q, k, v, a, b, output_final_state=True)
    assert o.dtype == jnp.float64
    assert float(jnp.max(jnp.abs(o - ro))) < 1e-12 * float(jnp.max(jnp.abs(ro)))
    assert float(jnp.max(jnp.abs(ht - rht))) < 1e-12 * float(jnp.max(jnp.abs(rht)))


IMPLS = {"chunk": ["xla", "interpret"], "fused_recurrent": ["xla", "interpret"], "naive": [None]}


@pytest.mark.parametrize("op, impl", [(op, i) for op, impls in IMPLS.items() for i in impls])
@pytest.mark.parametrize("cu", [[0, 10, 30], [0, 30, 10, 40], [3, 20, 40], [0, 20, 45]])
def test_malformed_traced_cu_seqlens_poison(rng, op, impl, cu):
    """Offsets traced under jit cannot be checked before tracing: every op and implementation
    then returns NaN for every output and final state (never plausible numbers), and under
    checkify the same condition is an error naming the argument."""
    from jax.experimental import checkify

    fn = getattr(iplr_jax, op)
    kw = {} if impl is None else dict(implementation=impl)
    q, k, v, a, b = (jnp.asarray(rng.standard_normal((1, 40, 2, 16)) / 4, jnp.float32) for _ in range(5))
    N = len(cu) - 1
    h0 = jnp.asarray(rng.standard_normal((N, 2, 16, 16)), jnp.float32)

    def run(cu):
        return fn(q, k, v, a, b, initial_state=h0, output_final_state=True, cu_seqlens=cu, **kw)

    o, ht = jax.jit(run)(jnp.asarray(cu, jnp.int32))
    assert np.all(np.isnan(np.asarray(o))) and np.all(np.isnan(np.asarray(ht)))
    err, _ = checkify.checkify(jax.jit(run))(jnp.asarray(cu, jnp.int32))
    msg = r"cu_seqlens must be non-decreasing offsets from 0 to T=40"
    with pytest.raises(checkify.JaxRuntimeError, match=msg):
        err.throw()
    good = jnp.asarray([0, 10, 40] + [40] * (N - 2), jnp.int32)
    o, ht = jax.jit(run)(good)
    assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(ht)))
    err, _ = checkify.checkify(jax.jit(run))(good)
    err.throw()  # no error for well-formed offsets
