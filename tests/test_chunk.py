"""Forward of `iplr_jax.chunk` against the float64 recurrence, and the forward kernels alone.

Every case runs for each implementation in CHUNK_IMPLS ("xla", the Pallas kernels through the
interpreter, and the compiled kernels on a GPU). Gradients are tested in test_chunk_bwd.py.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CHUNK_IMPLS
from helpers import aligned_reference, make_inputs, reference, rel_err, tol

import iplr_jax
from iplr_jax.inputs import Inputs
from iplr_jax.triton.chunk import chunk_fwd
from iplr_jax.triton.config import ChunkConfig, chunk_config
from iplr_jax.triton.wy_fast import wy_fwd


def _config(N=1, H=2, Kp=32, Vp=32, num_chunks=8, dtype=jnp.float32, interpret=True, **fields):
    return chunk_config(
        ChunkConfig(**fields), N=N, H=H, Kp=Kp, Vp=Vp, num_chunks=num_chunks, dtype=dtype,
        interpret=interpret,
    )

CASES = {
    # name: (B, T, H, K, V, chunk_size, initial state, delta rule)
    "c16_odd_T_KneV": (2, 40, 2, 32, 16, 16, True, False),
    "c32_K60_V20": (1, 70, 2, 60, 20, 32, True, False),
    "c64_no_h0": (2, 80, 1, 16, 32, 64, False, False),
    "c64_K100": (1, 50, 1, 100, 16, 64, True, False),
    "c16_delta": (1, 33, 2, 16, 16, 16, True, True),
    "c64_K200_V130": (1, 70, 1, 200, 130, 64, True, False),  # Kp = Vp = 256
}


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(rng, impl, case):
    B, T, H, K, V, C, has_h0, delta = CASES[case]
    (q, k, v, a, b), h0 = make_inputs(rng, B, T, H, K, V, delta=delta, h0=has_h0)
    o, ht = iplr_jax.chunk(
        q, k, v, a, b, initial_state=h0, output_final_state=True, chunk_size=C, implementation=impl
    )
    ro, rht = reference(q, k, v, a, b, initial_state=h0, output_final_state=True)
    assert o.dtype == v.dtype and o.shape == v.shape
    assert ht.dtype == jnp.float32 and ht.shape == (B, H, K, V)
    assert rel_err(o, ro) < tol(jnp.float32)
    assert rel_err(ht, rht) < tol(jnp.float32)
    o2, none = iplr_jax.chunk(q, k, v, a, b, initial_state=h0, chunk_size=C, implementation=impl)
    assert none is None
    np.testing.assert_array_equal(np.asarray(o2), np.asarray(o))


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_forward_half_precision(rng, impl, dtype):
    (q, k, v, a, b), h0 = make_inputs(rng, 2, 45, 2, 32, 16, dtype=dtype)
    o, ht = iplr_jax.chunk(
        q, k, v, a, b, initial_state=h0, output_final_state=True, chunk_size=16, implementation=impl
    )
    ro, rht = reference(q, k, v, a, b, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype
    assert rel_err(o, ro) < tol(dtype)
    assert rel_err(ht, rht) < tol(dtype)


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
@pytest.mark.parametrize("C", [16, 64])
def test_packed_sequences_traced(rng, impl, C):
    """Uneven lengths with an empty sequence, cu_seqlens traced under jit; packed == alone."""
    lens = [21, 0, 40, 3]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T, H, K, V = int(cu[-1]), 2, 16, 24
    (q, k, v, a, b), h0 = make_inputs(rng, 1, T, H, K, V, N=len(lens))

    @functools.partial(jax.jit, static_argnames=())
    def run(q, k, v, a, b, h0, cu):
        return iplr_jax.chunk(
            q, k, v, a, b, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=C,
            implementation=impl,
        )

    o, ht = run(q, k, v, a, b, h0, jnp.asarray(cu))
    ro, rht = reference(q, k, v, a, b, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, ro) < tol(jnp.float32)
    assert rel_err(ht, rht) < tol(jnp.float32)
    np.testing.assert_array_equal(np.asarray(ht[1]), np.asarray(h0[1]))  # empty: keeps h0
    for n, (s, e) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        if s == e:
            continue
        one = [x[:, s:e] for x in (q, k, v, a, b)]
        o1, ht1 = iplr_jax.chunk(
            *one, initial_state=h0[n : n + 1], output_final_state=True, chunk_size=C,
            implementation=impl,
        )
        np.testing.assert_allclose(np.asarray(o[:, s:e]), np.asarray(o1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(ht[n]), np.asarray(ht1[0]), rtol=1e-4, atol=1e-4)


# -- the kernels on their own ------------------------------------------------------------------


def _unit_vectors(rng, shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.usefixtures("on_cpu")
@pytest.mark.parametrize("C", [16, 32, 64])
@pytest.mark.parametrize("delta", [False, True])
def test_wy_kernel(rng, C, delta):
    """W, U and X of the WY kernel against float64 numpy."""
    L, H, Kp, Vp = 2 * C, 2, 32, 128  # Vp = 128: two V-blocks inside the kernel
    beta = rng.uniform(0.05, 1.95, (1, L, H, 1))
    k = _unit_vectors(rng, (1, L, H, Kp))
    a = -beta * k if delta else _unit_vectors(rng, (1, L, H, Kp))
    b = k.copy() if delta else -beta * a
    v = rng.standard_normal((1, L, H, Vp))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    cfg = _config(Kp=Kp, Vp=Vp)
    w, u, x = wy_fwd(*map(f32, (a, b, k, v)), chunk_size=C, config=cfg, with_x=True, interpret=True)
    assert w.dtype == u.dtype == x.dtype == jnp.float32

    def split(x):  # [1, L, H, D] -> [NC, H, C, D]
        return np.asarray(x, np.float64)[0].reshape(L // C, C, H, -1).transpose(0, 2, 1, 3)

    A, B, K, Vc = map(split, (a, b, k, v))
    T = lambda m: m.swapaxes(-1, -2)
    X = np.linalg.inv(np.eye(C) - np.tril(A @ T(B), -1))
    W = X @ A
    U = X @ np.tril(A @ T(K), -1) @ Vc
    assert rel_err(np.asarray(x, np.float64), X) < 1e-5
    assert rel_err(split(w), W) < 1e-5
    assert rel_err(split(u), U) < 1e-5
    # without X the kernel writes W and U alike
    w2, u2 = wy_fwd(*map(f32, (a, b, k, v)), chunk_size=C, config=cfg, interpret=True)
    np.testing.assert_array_equal(np.asarray(w2), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(u2), np.asarray(u))


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunk_fwd_residuals(rng, fuse, dtype):
    """chunk_fwd's o, ht, h and v_new on an aligned layout with an empty sequence and padding
    chunks past cu_chunks[-1], for the separate and the fused output kernel."""
    C, H, Kp, Vp = 16, 2, 32, 32
    cu_chunks = np.array([0, 2, 2, 5], np.int32)
    NC, L = 6, 6 * C  # chunk 5 is padding
    valid = np.arange(L) < cu_chunks[-1] * C
    rows = valid[None, :, None, None]
    beta = rng.uniform(0.05, 1.95, (1, L, H, 1))
    a = _unit_vectors(rng, (1, L, H, Kp)) * rows
    k = _unit_vectors(rng, (1, L, H, Kp)) * rows
    q = rng.standard_normal((1, L, H, Kp)) * rows
    v = rng.standard_normal((1, L, H, Vp)) * rows
    b = -beta * a
    h0 = rng.standard_normal((3, H, Kp, Vp))
    cast = lambda x: jnp.asarray(x, dtype)
    xs = Inputs(*map(cast, (q, k, v, a, b)))
    scale = 0.3
    cfg = _config(N=3, H=H, Kp=Kp, Vp=Vp, num_chunks=NC, dtype=dtype, fuse_output=fuse)
    fwd = functools.partial(chunk_fwd, scale=scale, chunk_size=C, config=cfg, interpret=True)
    o, ht, (h, v_new, x, w) = jax.jit(fwd)(xs, jnp.asarray(h0, jnp.float32), jnp.asarray(cu_chunks))
    ro, rht, rh, rv = aligned_reference(
        xs.map(lambda _, y: y.astype(jnp.float64)), jnp.asarray(h0), jnp.asarray(cu_chunks),
        scale=scale, chunk_size=C,
    )
    t = tol(dtype)
    assert o.dtype == dtype and h.dtype == dtype and v_new.dtype == jnp.float32
    assert h.shape == (NC, H, Kp, Vp) and v_new.shape == (1, L, H, Vp)
    assert x.shape == (NC, H, C, C) and x.dtype == jnp.float32 and w.shape == (1, L, H, Kp)
    assert rel_err(o[:, valid], ro[:, valid]) < t
    assert rel_err(ht, rht) < t
    assert rel_err(h, rh) < t  # padding chunk: zero in both
    assert rel_err(v_new, rv) < t
    np.testing.assert_array_equal(np.asarray(ht[1]), np.asarray(h0[1], np.float32))
    assert not np.any(np.asarray(h[5], np.float32)) and not np.any(np.asarray(v_new[:, ~valid]))
    o2, ht2, res2 = fwd(xs, jnp.asarray(h0, jnp.float32), jnp.asarray(cu_chunks), residuals=False)
    assert res2 is None
    np.testing.assert_array_equal(np.asarray(o2[:, valid]), np.asarray(o[:, valid]))
    for out in (o, o2):  # fused, the sweep zero-fills the padding chunk's output
        assert not np.any(np.asarray(out[:, ~valid], np.float32))
    np.testing.assert_array_equal(np.asarray(ht2), np.asarray(ht))


@pytest.mark.gpu
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("fuse", [None, False, True])
def test_pallas_medium(rng, K, dtype, fuse):
    """The compiled kernels at a medium size (B2 T1024 H4 V=128), both output variants."""
    (q, k, v, a, b), h0 = make_inputs(rng, 2, 1024, 4, K, 128, dtype=dtype)
    o, ht = jax.jit(functools.partial(
        iplr_jax.chunk, output_final_state=True, implementation="pallas",
        config=ChunkConfig(fuse_output=fuse),
    ))(q, k, v, a, b, initial_state=h0)
    ro, rht = reference(q, k, v, a, b, initial_state=h0, output_final_state=True)
    assert rel_err(o, ro) < tol(dtype)
    assert rel_err(ht, rht) < tol(dtype)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype, K, V", [(jnp.float32, 20, 16), (jnp.bfloat16, 20, 100)])
def test_output_variants_public_path(rng, fuse, dtype, K, V):
    """`chunk` with the output fused into the sweep or not: packed, an empty sequence, K != V.
    bf16 with V = 100 takes the output kernel's 128-wide V-block and the 16-bit V2 product."""
    cu = np.array([0, 19, 19, 50], np.int32)
    (q, k, v, a, b), h0 = make_inputs(rng, 1, 50, 2, K, V, N=3, dtype=dtype)
    o, ht = jax.jit(functools.partial(
        iplr_jax.chunk, output_final_state=True, chunk_size=16, implementation="interpret",
        config=ChunkConfig(fuse_output=fuse),
    ))(q, k, v, a, b, initial_state=h0, cu_seqlens=jnp.asarray(cu))
    ro, rht = reference(q, k, v, a, b, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, ro) < tol(dtype)
    assert rel_err(ht, rht) < tol(dtype)


def test_block_plan_bounded():
    """The forward's blocks divide V and keep the output kernel's [Kp, BV] tile within what was
    measured (at most 128 wide, Kp * BV <= 16384), for every padded size the kernels take."""
    for Kp, Vp, N, NC in itertools.product((16, 32, 64, 128, 256), (16, 32, 64, 128, 256), (1, 8), (4, 512)):
        cfg = _config(N=N, H=4, Kp=Kp, Vp=Vp, num_chunks=NC, interpret=False)
        for bv in (cfg.state_block_v, cfg.output_block_v, cfg.bwd_sweep_block_v, cfg.bwd_intra_block_v):
            assert Vp % bv == 0 and 16 <= bv <= 128, (Kp, Vp, cfg)
        assert Kp * cfg.output_block_v <= 16384, (Kp, Vp, cfg)
        assert cfg.bwd_kernels == (Kp <= 128)


def test_config_rule_and_override():
    """The WY kernel's 3 x tf32 block products only where they were measured correct on the
    H100 (16-bit inputs, Kp <= 128, compiled); float32 inputs at Kp = 128 gave a 15% output
    error there. A field given in the config overrides its rule and nothing else."""
    for dtype, Kp in ((jnp.bfloat16, 128), (jnp.float16, 64)):
        assert _config(Kp=Kp, dtype=dtype, interpret=False).wy_precision == "tf32x3"
    for dtype, Kp, interpret in ((jnp.float32, 64, False), (jnp.float32, 128, False),
                                 (jnp.bfloat16, 256, False), (jnp.bfloat16, 128, True)):
        assert _config(Kp=Kp, dtype=dtype, interpret=interpret).wy_precision == "highest"
    base = _config(N=8, H=16, Kp=64, Vp=64, num_chunks=256, dtype=jnp.bfloat16, interpret=False)
    assert base.fuse_output  # S1: the sweep fills the SMs, short sequences, Kp = 64
    over = _config(N=8, H=16, Kp=64, Vp=64, num_chunks=256, dtype=jnp.bfloat16, interpret=False,
                   fuse_output=False, wy_warps=4)
    assert not over.fuse_output and over.wy_warps == 4
    assert dataclasses.replace(over, fuse_output=True, wy_warps=base.wy_warps) == base
    hash(base)  # a static argument


def test_low_precision_state_rule():
    """16-bit state operands where the sweep's programs do not fill the GPU (S3: 64 programs),
    float32 ones where they do (S2: 256); the field overrides the rule."""
    s3 = dict(N=1, H=8, Kp=128, Vp=128, num_chunks=512, dtype=jnp.bfloat16, interpret=False)
    s2 = dict(N=4, H=16, Kp=128, Vp=128, num_chunks=256, dtype=jnp.bfloat16, interpret=False)
    assert _config(**s3).low_precision_state and not _config(**s2).low_precision_state
    assert not _config(**s3, low_precision_state=False).low_precision_state


@pytest.mark.parametrize("low", [False, True])
def test_low_precision_state_both_ways(rng, low):
    """bf16 inputs through the interpreted kernels with the state sweep's products at 16-bit or
    float32 operands, against the float64 recurrence (output, final state, six gradients)."""
    (q, k, v, a, b), h0 = make_inputs(rng, 1, 100, 2, 32, 16, dtype=jnp.bfloat16)
    cfg = ChunkConfig(low_precision_state=low)

    def run(q, k, v, a, b, h0):
        return iplr_jax.chunk(q, k, v, a, b, initial_state=h0, output_final_state=True,
                              implementation="interpret", config=cfg)

    def loss(f, *x):
        o, ht = f(*x)
        return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.size).reshape(o.shape))) + jnp.sum(ht)

    up = lambda x: x.astype(jnp.float64)  # noqa: E731
    ref = lambda *x: reference(*x[:5], initial_state=x[5], output_final_state=True)  # noqa: E731
    (o, ht), (ro, rht) = run(q, k, v, a, b, h0), ref(*map(up, (q, k, v, a, b, h0)))
    assert rel_err(o, ro) < tol(jnp.bfloat16) and rel_err(ht, rht) < tol(jnp.bfloat16)
    got = jax.grad(lambda *x: loss(run, *x), argnums=range(6))(q, k, v, a, b, h0)
    want = jax.grad(lambda *x: loss(ref, *x), argnums=range(6))(*map(up, (q, k, v, a, b, h0)))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < tol(jnp.bfloat16)


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_traced_scale(rng, impl):
    """A scale traced under jit reaches the kernels (folded into q) with the same result."""
    (q, k, v, a, b), h0 = make_inputs(rng, 1, 40, 2, 16, 24)
    ref, _ = reference(q, k, v, a, b, scale=0.3, initial_state=h0)
    f = jax.jit(lambda s: iplr_jax.chunk(q, k, v, a, b, scale=s, initial_state=h0, implementation=impl)[0])
    assert rel_err(f(jnp.float32(0.3)), ref) < tol(jnp.float32)


def test_precision_choice(rng, monkeypatch):
    """float32 accuracy on request: `precision="highest"` (or `jax.default_matmul_precision`)
    makes every float32-operand product of the compiled kernels three tf32 passes (tf32
    otherwise on a GPU) and, for float32 inputs, the backward the jnp equations at HIGHEST; the
    default kernels are unchanged; the result still matches the float64 recurrence."""
    import iplr_jax.inputs as inputs_module

    def rule(**kw):
        return _config(N=1, H=1, Kp=64, Vp=64, num_chunks=4, dtype=jnp.float32, interpret=False, **kw)

    assert rule().f32_dots == "tf32"
    with jax.default_matmul_precision("highest"):
        assert rule().f32_dots == "highest"
    assert rule(f32_dots="highest").f32_dots == "highest"
    assert rule().bwd_kernels and not rule(f32_dots="highest").bwd_kernels

    monkeypatch.setattr(inputs_module, "has_gpu", lambda: True)  # trace the compiled path
    x = [jax.ShapeDtypeStruct((1, 64, 1, 32), jnp.float32)] * 5

    def highest_dots(precision):
        def step(*x):
            loss = lambda *x: iplr_jax.chunk(*x, implementation="pallas", precision=precision)[0].sum()
            return jax.grad(loss, argnums=tuple(range(5)))(*x)

        text = str(jax.make_jaxpr(step)(*x))
        return text.count("HIGHEST") + text.count("TF32_TF32_F32_X3")

    assert highest_dots("highest") > highest_dots(None) == highest_dots("default")
    monkeypatch.undo()
    (q, k, v, a, b), h0 = make_inputs(rng, 1, 40, 2, 32, 16)
    o, ht = iplr_jax.chunk(q, k, v, a, b, initial_state=h0, output_final_state=True, chunk_size=16,
                           implementation="interpret", precision="highest")
    ro, rht = reference(q, k, v, a, b, initial_state=h0, output_final_state=True)
    assert rel_err(o, ro) < 1e-5 and rel_err(ht, rht) < 1e-5
    with pytest.raises(ValueError, match="precision must be one of"):
        iplr_jax.chunk(q, k, v, a, b, precision="fast")
