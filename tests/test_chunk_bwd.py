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
from helpers import grads, make_inputs, reference, rel_err, tol

import iplr_jax
import iplr_jax.chunk_bwd as chunk_bwd_module
from iplr_jax._common import check_inputs, from_chunks, make_layout, next_pow2, pad_last, to_chunks
from iplr_jax.chunk import Residuals
from iplr_jax.chunk_bwd import _chunk_bwd_reference, chunk_bwd
from iplr_jax.wy_fast import wy_fwd

bwd_reference = jax.jit(_chunk_bwd_reference, static_argnames=("scale", "chunk_size"))

_HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size"))
def aligned_forward(q, k, v, a, b, h0, cu_chunks, *, scale, chunk_size):
    """The chunked forward on the aligned layout in jnp, with the residuals `chunk_fwd` returns:
    o [1, L, H, Vp], ht [N, H, Kp, Vp], h [NC, H, Kp, Vp] (state before each chunk), v_new."""
    C = chunk_size
    _, L, H, _ = q.shape
    NC, N = L // C, h0.shape[0]
    acc = h0.dtype
    split = lambda x: x[0].reshape(NC, C, H, -1).transpose(0, 2, 1, 3).astype(acc)
    Q, K, Vc, A, B = (split(x) for x in (q, k, v, a, b))
    mm = lambda x, y: jnp.einsum("...ij,...jk->...ik", x, y, precision=_HI)
    mmT = lambda x, y: jnp.einsum("...ij,...kj->...ik", x, y, precision=_HI)
    cu = jnp.asarray(cu_chunks, jnp.int32)
    c = jnp.arange(NC)
    seq = jnp.clip(jnp.searchsorted(cu[1:], c, side="right"), 0, N - 1)
    start = c == cu[seq]
    valid = c < cu[-1]

    def body(carry, xs):
        S, final = carry
        Q_c, K_c, V_c, A_c, B_c, seq_c, start_c, valid_c = xs
        S = jnp.where(start_c, h0[seq_c], S)
        # step by step inside the chunk: V2[t] = a_t^T S_{t-1}
        def step(S, x):
            k_t, v_t, a_t, b_t = x
            v2 = jnp.einsum("hk,hkv->hv", a_t, S, precision=_HI)
            S = S + k_t[..., None] * v_t[:, None] + b_t[..., None] * v2[:, None]
            return S, v2

        xs_t = tuple(x.swapaxes(0, 1) for x in (K_c, V_c, A_c, B_c))  # [C, H, D]
        S_next, v2 = jax.lax.scan(step, S, xs_t)
        v2 = v2.swapaxes(0, 1)  # [H, C, V]
        o = mm(Q_c, S[:, :, :]) + mm(jnp.tril(mmT(Q_c, K_c)), V_c) + mm(jnp.tril(mmT(Q_c, B_c)), v2)
        final = jnp.where(valid_c, final.at[seq_c].set(S_next), final)
        return (S_next, final), (o * scale, S, v2)

    (_, ht), (o, h, v2) = jax.lax.scan(
        body, (h0[0], h0), (Q, K, Vc, A, B, seq, start, valid)
    )
    merge = lambda x: x.transpose(0, 2, 1, 3).reshape(1, L, H, -1)
    return merge(o), ht, h, merge(v2)


def prepare(inputs, h0, cu_seqlens, chunk_size, acc=jnp.float64):
    """Lays inputs out as the Pallas wrapper does; returns aligned inputs and residuals."""
    q, k, v, a, b = inputs
    dims = check_inputs(q, k, v, a, b, initial_state=h0, cu_seqlens=cu_seqlens)
    layout = make_layout(dims, cu_seqlens, chunk_size)
    Kp, Vp = next_pow2(dims.K), next_pow2(dims.V)
    al = tuple(pad_last(to_chunks(x, layout), Kp) for x in (q, k, a, b))
    qa, ka, aa, ba = al
    va = pad_last(to_chunks(v, layout), Vp)
    h0 = jnp.zeros((dims.N, dims.H, dims.K, dims.V)) if h0 is None else h0
    h0p = jnp.pad(h0.astype(acc), ((0, 0), (0, 0), (0, Kp - dims.K), (0, Vp - dims.V)))
    scale = dims.K**-0.5
    o, ht, h, v_new = aligned_forward(
        *(x.astype(acc) for x in (qa, ka, va, aa, ba)), h0p, layout.cu_chunks, scale=scale,
        chunk_size=chunk_size,
    )
    return dims, layout, (qa, ka, va, aa, ba), (o, ht, h, v_new), scale


def cotangents(rng, dims, layout):
    do = jnp.asarray(rng.standard_normal((dims.B, dims.T, dims.H, dims.V)))
    dht = jnp.asarray(rng.standard_normal((dims.N, dims.H, dims.K, dims.V)))
    Kp, Vp = next_pow2(dims.K), next_pow2(dims.V)
    doa = pad_last(to_chunks(do, layout), Vp)
    dhta = jnp.pad(dht, ((0, 0), (0, 0), (0, Kp - dims.K), (0, Vp - dims.V)))
    return do, dht, doa, dhta


def unalign(g, dims, layout):
    dq, dk, dv, da, db, dh0 = g
    K, V = dims.K, dims.V
    back = lambda x, d: from_chunks(x, layout)[..., :d]
    return (back(dq, K), back(dk, K), back(dv, V), back(da, K), back(db, K), dh0[:, :, :K, :V])


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
    dims, layout, al, (o, ht, h, v_new), scale = prepare(inputs, h0, cu, C)
    do, dht, doa, dhta = cotangents(rng, dims, layout)

    # the aligned forward reproduces the recurrence (checks the residuals)
    o_ref, ht_ref = reference(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(from_chunks(o, layout)[..., :V], o_ref) < 1e-12
    assert rel_err(ht[:, :, :K, :V], ht_ref) < 1e-12

    g = bwd_reference(*al, h, v_new, layout.cu_chunks, doa, dhta, scale=scale, chunk_size=C)
    mine = unalign(g, dims, layout)

    h0v = jnp.zeros((dims.N, H, K, V), jnp.float64) if h0 is None else h0
    f = lambda q, k, v, a, b, s: iplr_jax.naive(
        q, k, v, a, b, initial_state=s, output_final_state=True, cu_seqlens=cu
    )
    ref = jax.jit(lambda xs, ct: jax.vjp(f, *xs)[1](ct))((*inputs, h0v), (do, dht))
    for name, x, r in zip(("dq", "dk", "dv", "da", "db", "dh0"), mine, ref, strict=True):
        assert rel_err(x, r) < 1e-10, name


@pytest.mark.parametrize("C", [16, 32, 64])
def test_wy_kernel_x(rng, C):
    """X = (I - strict(A B^T))^{-1} and W = X A from the block-inverse kernel."""
    H, K = 2, 32
    a = rng.standard_normal((1, 2 * C, H, K))
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    b = -rng.uniform(0.05, 1.95, (1, 2 * C, H, 1)) * a
    k = rng.standard_normal((1, 2 * C, H, K))
    a32, b32, k32 = (jnp.asarray(x, jnp.float32) for x in (a, b, k))
    w, _, x = wy_fwd(a32, b32, k32, k32, chunk_size=C, with_x=True, interpret=True)
    assert x.shape == (2, H, C, C) and x.dtype == jnp.float32
    A = a.reshape(2, C, H, K).transpose(0, 2, 1, 3)
    B = b.reshape(2, C, H, K).transpose(0, 2, 1, 3)
    Xr = np.linalg.inv(np.eye(C) - np.tril(A @ B.swapaxes(-1, -2), -1))
    assert rel_err(x, Xr) < 1e-5
    assert rel_err(w, (Xr @ A).transpose(0, 2, 1, 3).reshape(1, 2 * C, H, K)) < 1e-5


KERNEL_CASES = [
    (2, 37, 2, 16, 16, None, 16),
    (1, 53, 2, 16, 32, [0, 17, 17, 40, 53], 16),  # uneven, one empty, padding chunks
    (1, 70, 1, 60, 20, [0, 30, 70], 32),
    (1, 80, 1, 32, 16, [0, 5, 80], 64),
]


@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_match_reference_backward(rng, case, dtype):
    """(b) the interpreted Pallas backward equals the jnp backward on the same residuals."""
    _kernels_vs_reference(rng, case, dtype)


def test_kernels_partial_v_blocks(rng, monkeypatch):
    """Several V-blocks in the intra kernel: float32 partial K-side gradients summed by XLA."""
    monkeypatch.setattr(chunk_bwd_module, "_intra_block", lambda Kp, Vp: 16)
    _kernels_vs_reference(rng, KERNEL_CASES[1], jnp.float32)
    _kernels_vs_reference(rng, KERNEL_CASES[1], jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_kp256(rng, monkeypatch, dtype):
    """Kp = 256 on the kernels (interpreted): the GPU runs it in jnp for lack of shared memory,
    so only this test keeps the kernels' Kp = 256 path (V-block partials, 4 blocks) correct."""
    monkeypatch.setattr(chunk_bwd_module, "KERNEL_MAX_KP", 256)
    _kernels_vs_reference(rng, (1, 70, 1, 200, 130, [0, 30, 70], 64), dtype)


def _kernels_vs_reference(rng, case, dtype):
    B, T, H, K, V, cu, C = case
    inputs, h0 = make_inputs(rng, B, T, H, K, V, dtype=dtype, N=None if cu is None else len(cu) - 1)
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    dims, layout, al, (o, ht, h, v_new), scale = prepare(inputs, h0, cu, C, acc=jnp.float32)
    _, _, doa, dhta = cotangents(rng, dims, layout)
    doa = doa.astype(dtype)
    dhta = dhta.astype(jnp.float32)
    args = (*al, h, v_new.astype(jnp.float32), layout.cu_chunks, doa, dhta)
    q, k, v, a, b = al
    w, _, x = wy_fwd(a, b, k, v, chunk_size=C, out_dtype=dtype, with_x=True, interpret=True)
    res = Residuals(h, v_new.astype(jnp.float32), x, w)
    mine = jax.jit(functools.partial(chunk_bwd, scale=scale, chunk_size=C, interpret=True))(
        *al, res, layout.cu_chunks, doa, dhta
    )
    ref = bwd_reference(*args, scale=scale, chunk_size=C)
    names = ("dq", "dk", "dv", "da", "db", "dh0")
    for name, x, r, like in zip(names, mine, ref, (*al[:3], *al[3:], dhta), strict=True):
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


def _up(x):
    return None if x is None else jnp.asarray(x, jnp.float64)


def _assert_grads(g, ref, dtype, what):
    for name, x, r in zip(("dq", "dk", "dv", "da", "db", "dh0"), g, ref, strict=True):
        err = rel_err(x, r)
        assert err < tol(dtype), (what, name, err)


@pytest.mark.parametrize("impl", CHUNK_IMPLS)  # in the test id, so `-k pallas` selects it
@pytest.mark.parametrize("case", E2E_CASES)
def test_chunk_gradients(rng, case, impl):
    B, T, H, K, V, cu, C, dtype, with_final = case
    inputs, h0 = make_inputs(rng, B, T, H, K, V, dtype=dtype, N=None if cu is None else len(cu) - 1)
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    # cu_seqlens is an argument of the jitted gradient, so the kernels see traced offsets
    def run(fn, cu_, *xs):
        return grads(functools.partial(fn, cu_seqlens=cu_), xs[:5], xs[5], with_final=with_final)

    ref = jax.jit(functools.partial(run, iplr_jax.naive))(cu, *(_up(x) for x in (*inputs, h0)))
    g = jax.jit(functools.partial(run, _chunk64(impl, C)))(cu, *inputs, h0)
    _assert_grads(g, ref, dtype, impl)


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_chunk_gradients_transforms(rng, impl):
    """jax.grad inside jit, under jax.checkpoint, and with vmap over an outer axis."""
    B, T, H, K, V, C = 1, 29, 2, 16, 16, 16
    inputs, h0 = make_inputs(rng, B, T, H, K, V)
    inputs2, h02 = make_inputs(rng, B, T, H, K, V)
    ref = jax.jit(lambda *xs: grads(iplr_jax.naive, xs[:5], xs[5]))(*(_up(x) for x in (*inputs, h0)))

    def loss_of(f):
        def loss(q, k, v, a, b, s):
            o, ht = f(q, k, v, a, b, initial_state=s, output_final_state=True)
            w = jnp.cos(jnp.arange(o.size, dtype=o.dtype).reshape(o.shape))
            return jnp.sum(o * w) + jnp.sum(jnp.sin(ht))

        return loss

    argn = tuple(range(6))
    ref_v = [jax.jit(jax.grad(loss_of(iplr_jax.naive), argnums=argn))(*(_up(x) for x in (*ins, s)))
             for ins, s in ((inputs, h0), (inputs2, h02))]
    fn = _chunk64(impl, C)
    g_jit = jax.jit(lambda *xs, fn=fn: grads(fn, xs[:5], xs[5]))(*inputs, h0)
    _assert_grads(g_jit, ref, jnp.float32, (impl, "jit"))

    remat = jax.checkpoint(
        lambda q, k, v, a, b, s, fn=fn: fn(q, k, v, a, b, initial_state=s, output_final_state=True)
    )
    # eager (no jit) gradient through the rematerialised op
    g_remat = grads(lambda q, k, v, a, b, initial_state, output_final_state, remat=remat:
                    remat(q, k, v, a, b, initial_state), inputs, h0)
    _assert_grads(g_remat, ref, jnp.float32, (impl, "checkpoint"))

    # vmap over an outer axis holding two independent problems
    gv = jax.jit(jax.vmap(jax.grad(loss_of(fn), argnums=argn)))(
        *(jnp.stack([x, y]) for x, y in zip((*inputs, h0), (*inputs2, h02), strict=True))
    )
    for i in range(2):
        _assert_grads([x[i] for x in gv], ref_v[i], jnp.float32, (impl, "vmap", i))


@pytest.mark.gpu
def test_chunk_gradients_pallas_medium(rng):
    """Compiled kernels at a medium size: B2 T1024 H4 K=V=128, bf16."""
    B, T, H, K, V = 2, 1024, 4, 128, 128
    inputs, h0 = make_inputs(rng, B, T, H, K, V, dtype=jnp.bfloat16)
    ref = jax.jit(lambda *xs: grads(iplr_jax.naive, xs[:5], xs[5]))(*(_up(x) for x in (*inputs, h0)))
    g = jax.jit(lambda *xs: grads(_chunk64("pallas", 64), xs[:5], xs[5]))(*inputs, h0)
    _assert_grads(g, ref, jnp.bfloat16, "pallas")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("size", ["S1", "S2"])
def test_chunk_gradients_pallas_bench_sizes(rng, size):
    """Issue-5 sizes on the compiled kernels, bf16, against the float64 chunked form (the xla
    path, a second oracle whose autodiff keeps one state per chunk, not per token)."""
    from iplr_jax.bench import SIZES

    d = SIZES[size]
    inputs, h0 = make_inputs(rng, d["B"], d["T"], d["H"], d["K"], d["V"], dtype=jnp.bfloat16)
    ref = jax.jit(lambda *xs: grads(_chunk64("xla", 64), xs[:5], xs[5]))(*(_up(x) for x in (*inputs, h0)))
    g = jax.jit(lambda *xs: grads(_chunk64("pallas", 64), xs[:5], xs[5]))(*inputs, h0)
    _assert_grads(g, ref, jnp.bfloat16, ("pallas", size))
