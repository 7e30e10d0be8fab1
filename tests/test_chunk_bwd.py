"""Backward of the chunked form: the jnp backward (`_chunk_bwd_reference`) against float64
autodiff of the recurrence, the Pallas backward kernels (interpreted) against that jnp backward
on the same residuals, and end-to-end gradients of `iplr_jax.chunk`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CHUNK_IMPLS
from helpers import assert_grads, grads, make_inputs, prepare_aligned, reference, rel_err, tol, up

import iplr_jax
from iplr_jax import layout as lay
from iplr_jax.reference.chunk import chunk_bwd_aligned
from iplr_jax.triton.chunk import Residuals
from iplr_jax.triton.chunk_bwd import chunk_bwd
from iplr_jax.triton.config import ChunkConfig, chunk_config
from iplr_jax.triton.wy_fast import wy_fwd

bwd_reference = jax.jit(chunk_bwd_aligned, static_argnames=("scale", "chunk_size"))


def cotangents(rng, dims, layout):
    do = jnp.asarray(rng.standard_normal((dims.B, dims.T, dims.H, dims.V)))
    dht = jnp.asarray(rng.standard_normal((dims.N, dims.H, dims.K, dims.V)))
    Kp, Vp = lay.next_pow2(dims.K), lay.next_pow2(dims.V)
    return do, dht, lay.pad_last(lay.to_chunks(do, layout), Vp), lay.pad_state(dht, Kp, Vp)


def unalign(g, dims, layout):
    back = lambda x, d: lay.from_chunks(x, layout)[..., :d]
    *g, dh0 = g
    return (*(back(x, dims.V if i == 2 else dims.K) for i, x in enumerate(g)), dh0[:, :, : dims.K, : dims.V])


CASES = [
    # B, T, H, K, V, cu_seqlens, chunk_size, h0
    (2, 37, 2, 16, 16, None, 16, True),
    (1, 50, 1, 20, 12, None, 16, False),
    (1, 53, 2, 16, 32, [0, 17, 17, 40, 53], 16, True),  # uneven, one empty
    (1, 70, 1, 60, 20, [0, 30, 70], 32, True),
    (1, 80, 1, 16, 16, [0, 5, 80], 64, True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("delta", [False, True])
def test_reference_backward_matches_autodiff(rng, case, delta):
    """(a) the jnp backward from the residuals equals float64 autodiff of `naive`."""
    B, T, H, K, V, cu, C, has_h0 = case
    inputs, h0 = make_inputs(rng, B, T, H, K, V, dtype=jnp.float64, delta=delta,
                             N=None if cu is None else len(cu) - 1, h0=has_h0)
    h0 = None if h0 is None else h0.astype(jnp.float64)
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    dims, layout, al, (o, ht, h, v_new), scale = prepare_aligned(inputs, h0, cu, C)
    do, dht, doa, dhta = cotangents(rng, dims, layout)

    # the aligned forward reproduces the recurrence (checks the residuals)
    o_ref, ht_ref = reference(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(lay.from_chunks(o, layout)[..., :V], o_ref) < 1e-12
    assert rel_err(ht[:, :, :K, :V], ht_ref) < 1e-12

    al64 = al.map(lambda _, y: y.astype(jnp.float64))
    g = bwd_reference(al64, h, v_new, layout.cu_chunks, doa, dhta, scale=scale, chunk_size=C)
    mine = unalign(g, dims, layout)

    h0v = jnp.zeros((dims.N, H, K, V), jnp.float64) if h0 is None else h0
    f = lambda q, k, v, a, b, s: iplr_jax.naive(
        q, k, v, a, b, initial_state=s, output_final_state=True, cu_seqlens=cu
    )
    ref = jax.jit(lambda xs, ct: jax.vjp(f, *xs)[1](ct))((*inputs, h0v), (do, dht))
    assert_grads(mine, ref, 1e-10)


KERNEL_CASES = [
    (2, 37, 2, 16, 16, None, 16),
    (1, 53, 2, 16, 32, [0, 17, 17, 40, 53], 16),  # uneven, one empty, padding chunks
    (1, 70, 1, 60, 20, [0, 30, 70], 32),
    (1, 80, 1, 32, 16, [0, 5, 80], 64),
]


@pytest.mark.usefixtures("on_cpu")
@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_match_reference_backward(rng, case, dtype):
    """(b) the interpreted Pallas backward equals the jnp backward on the same residuals."""
    _kernels_vs_reference(rng, case, dtype)


@pytest.mark.usefixtures("on_cpu")
def test_kernels_partial_v_blocks(rng):
    """Several V-blocks in the intra kernel: float32 partial K-side gradients summed by XLA."""
    _kernels_vs_reference(rng, KERNEL_CASES[1], jnp.float32, bwd_intra_block_v=16)
    _kernels_vs_reference(rng, KERNEL_CASES[1], jnp.bfloat16, bwd_intra_block_v=16)


@pytest.mark.usefixtures("on_cpu")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_kp256(rng, dtype):
    """Kp = 256 on the kernels (interpreted): the GPU runs it in jnp for lack of shared memory,
    so only this test keeps the kernels' Kp = 256 path (V-block partials, 4 blocks) correct."""
    _kernels_vs_reference(rng, (1, 70, 1, 200, 130, [0, 30, 70], 64), dtype, bwd_kernels=True)


def _kernels_vs_reference(rng, case, dtype, **fields):
    B, T, H, K, V, cu, C = case
    inputs, h0 = make_inputs(rng, B, T, H, K, V, dtype=dtype, N=None if cu is None else len(cu) - 1)
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    dims, layout, al, (o, ht, h, v_new), scale = prepare_aligned(inputs, h0, cu, C, acc=jnp.float32)
    _, _, doa, dhta = cotangents(rng, dims, layout)
    doa = doa.astype(dtype)
    dhta = dhta.astype(jnp.float32)
    Kp, Vp = al.q.shape[-1], al.v.shape[-1]
    cfg = chunk_config(
        ChunkConfig(**fields), N=dims.N, H=H, Kp=Kp, Vp=Vp, num_chunks=layout.num_chunks,
        dtype=dtype, interpret=True,
    )
    w, _, x = wy_fwd(al.a, al.b, al.k, al.v, chunk_size=C, config=cfg, out_dtype=dtype, with_x=True,
                     interpret=True)
    res = Residuals(h.astype(dtype), v_new.astype(jnp.float32), x, w)
    dx, dh0 = jax.jit(functools.partial(chunk_bwd, scale=scale, chunk_size=C, config=cfg, interpret=True))(
        al, res, layout.cu_chunks, doa, dhta
    )
    mine = (*dx.arrays(), dh0)
    ref = bwd_reference(al, h.astype(dtype), v_new.astype(jnp.float32), layout.cu_chunks, doa, dhta,
                        scale=scale, chunk_size=C)
    names = ("dq", "dk", "dv", "da", "db", "dh0")
    for name, x, r, like in zip(names, mine, ref, (*al.arrays(), dhta), strict=True):
        assert x.shape == r.shape and x.dtype == like.dtype, (name, x.shape, x.dtype)
        assert np.all(np.isfinite(np.asarray(x, np.float32))), name  # padding chunks too
        assert rel_err(x, r) < (1e-4 if dtype == jnp.float32 else 1e-2), name


# -- (c) end to end: gradients of iplr_jax.chunk against float64 autodiff of naive ------------
#
# Each case is parametrized by implementation, so that a GPU run selecting `-k pallas` runs
# them (a loop over implementations inside the test once hid a GPU-only failure that way).

E2E_CASES = [
    # B, T, H, K, V, cu_seqlens, chunk_size, dtype, with a final-state cotangent
    (2, 37, 2, 16, 16, None, 16, jnp.float32, True),  # odd T
    (2, 37, 2, 16, 16, None, 16, jnp.float32, False),
    (1, 45, 1, 24, 8, None, 16, jnp.float32, True),  # K != V, not powers of two
    (1, 40, 1, 60, 20, None, 32, jnp.float32, False),
    (1, 53, 2, 16, 32, [0, 17, 17, 40, 53], 16, jnp.float32, True),  # packed, uneven, one empty
    (1, 53, 2, 16, 32, [0, 17, 17, 40, 53], 16, jnp.float32, False),
    (2, 33, 2, 32, 16, None, 16, jnp.bfloat16, True),
    (1, 70, 1, 200, 130, [0, 30, 70], 64, jnp.float32, True),  # Kp = Vp = 256, V-block partials
]


def _chunk64(impl, C):
    """`chunk` with float64 outputs: the loss in `helpers.grads` is then summed in float64 on
    both sides, as for the float64 reference."""

    def fn(*args, **kw):
        o, ht = iplr_jax.chunk(*args, chunk_size=C, implementation=impl, **kw)
        return o.astype(jnp.float64), None if ht is None else ht.astype(jnp.float64)

    return fn


@pytest.mark.parametrize("impl", CHUNK_IMPLS)  # in the test id, so `-k pallas` selects it
@pytest.mark.parametrize("case", E2E_CASES)
def test_chunk_gradients(rng, case, impl):
    B, T, H, K, V, cu, C, dtype, with_final = case
    inputs, h0 = make_inputs(rng, B, T, H, K, V, dtype=dtype, N=None if cu is None else len(cu) - 1)
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    # cu_seqlens is an argument of the jitted gradient, so the kernels see traced offsets
    def run(fn, cu_, *xs):
        return grads(functools.partial(fn, cu_seqlens=cu_), xs[:5], xs[5], with_final=with_final)

    ref = jax.jit(functools.partial(run, iplr_jax.naive))(cu, *(up(x) for x in (*inputs, h0)))
    g = jax.jit(functools.partial(run, _chunk64(impl, C)))(cu, *inputs, h0)
    assert_grads(g, ref, tol(dtype), impl)


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_chunk_gradients_transforms(rng, impl):
    """jax.grad inside jit, under jax.checkpoint, and with vmap over an outer axis."""
    B, T, H, K, V, C = 1, 29, 2, 16, 16, 16
    inputs, h0 = make_inputs(rng, B, T, H, K, V)
    inputs2, h02 = make_inputs(rng, B, T, H, K, V)
    ref = jax.jit(lambda *xs: grads(iplr_jax.naive, xs[:5], xs[5]))(*(up(x) for x in (*inputs, h0)))

    def loss_of(f):
        def loss(q, k, v, a, b, s):
            o, ht = f(q, k, v, a, b, initial_state=s, output_final_state=True)
            w = jnp.cos(jnp.arange(o.size, dtype=o.dtype).reshape(o.shape))
            return jnp.sum(o * w) + jnp.sum(jnp.sin(ht))

        return loss

    argn = tuple(range(6))
    ref_v = [jax.jit(jax.grad(loss_of(iplr_jax.naive), argnums=argn))(*(up(x) for x in (*ins, s)))
             for ins, s in ((inputs, h0), (inputs2, h02))]
    fn = _chunk64(impl, C)
    g_jit = jax.jit(lambda *xs, fn=fn: grads(fn, xs[:5], xs[5]))(*inputs, h0)
    assert_grads(g_jit, ref, tol(jnp.float32), (impl, "jit"))

    remat = jax.checkpoint(
        lambda q, k, v, a, b, s, fn=fn: fn(q, k, v, a, b, initial_state=s, output_final_state=True)
    )
    # eager (no jit) gradient through the rematerialised op
    g_remat = grads(lambda q, k, v, a, b, initial_state, output_final_state, remat=remat:
                    remat(q, k, v, a, b, initial_state), inputs, h0)
    assert_grads(g_remat, ref, tol(jnp.float32), (impl, "checkpoint"))

    # vmap over an outer axis holding two independent problems
    gv = jax.jit(jax.vmap(jax.grad(loss_of(fn), argnums=argn)))(
        *(jnp.stack([x, y]) for x, y in zip((*inputs, h0), (*inputs2, h02), strict=True))
    )
    for i in range(2):
        assert_grads([x[i] for x in gv], ref_v[i], tol(jnp.float32), (impl, "vmap", i))


@pytest.mark.gpu
def test_chunk_gradients_pallas_medium(rng):
    """Compiled kernels at a medium size: B2 T1024 H4 K=V=128, bf16."""
    B, T, H, K, V = 2, 1024, 4, 128, 128
    inputs, h0 = make_inputs(rng, B, T, H, K, V, dtype=jnp.bfloat16)
    ref = jax.jit(lambda *xs: grads(iplr_jax.naive, xs[:5], xs[5]))(*(up(x) for x in (*inputs, h0)))
    g = jax.jit(lambda *xs: grads(_chunk64("pallas", 64), xs[:5], xs[5]))(*inputs, h0)
    assert_grads(g, ref, tol(jnp.bfloat16), "pallas")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("size", ["S1", "S2"])
def test_chunk_gradients_pallas_bench_sizes(rng, size):
    """Issue-5 sizes on the compiled kernels, bf16, against the float64 chunked form (the xla
    path, a second oracle whose autodiff keeps one state per chunk, not per token)."""
    from iplr_jax.bench import SIZES

    d = SIZES[size]
    inputs, h0 = make_inputs(rng, d["B"], d["T"], d["H"], d["K"], d["V"], dtype=jnp.bfloat16)
    ref = jax.jit(lambda *xs: grads(_chunk64("xla", 64), xs[:5], xs[5]))(*(up(x) for x in (*inputs, h0)))
    g = jax.jit(lambda *xs: grads(_chunk64("pallas", 64), xs[:5], xs[5]))(*inputs, h0)
    assert_grads(g, ref, tol(jnp.bfloat16), ("pallas", size))


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_second_order_derivatives(rng, op):
    """Hessian-vector products: the xla path's (autodiff) against the float64 recurrence's; the
    kernels' backward has none and says which implementation does."""
    (q, k, v, a, b), h0 = make_inputs(rng, 1, 20, 2, 16, 8)
    d = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def hvp(fn, *xs):
        def loss(q):
            o, ht = fn(q, *xs[1:5], initial_state=xs[5], output_final_state=True)
            return jnp.sum(jnp.sin(o)) + jnp.sum(ht * ht)

        return jax.jvp(jax.grad(loss), (xs[0],), (d.astype(xs[0].dtype),))[1]

    call = functools.partial(getattr(iplr_jax, op), implementation="xla")
    want = hvp(reference, *map(up, (q, k, v, a, b, h0)))
    assert rel_err(hvp(call, q, k, v, a, b, h0), want) < 1e-4
    kernels = functools.partial(getattr(iplr_jax, op), implementation="interpret")
    with pytest.raises(NotImplementedError, match="implementation='xla'"):
        hvp(kernels, q, k, v, a, b, h0)
