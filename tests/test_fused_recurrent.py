"""`fused_recurrent` against the float64 recurrence: outputs, final state and all six gradients.

Every case runs for each implementation in `RECURRENT_IMPLS` (the xla scan, the Pallas kernels
through the interpreter, and the compiled kernels where a GPU is present).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RECURRENT_IMPLS
from helpers import GRAD_NAMES, grads, make_inputs, reference, rel_err, tol

import iplr_jax
from iplr_jax.triton.config import FusedRecurrentConfig, fused_recurrent_config


def _op(impl, *, cu=None, scale=None, jit=False, remat=False, config=None):
    """fused_recurrent with the call signature of `helpers.reference`; cu_seqlens traced under jit."""

    def fn(q, k, v, a, b, initial_state=None, output_final_state=False):
        def inner(q, k, v, a, b, h0, cu):
            return iplr_jax.fused_recurrent(
                q, k, v, a, b, scale=scale, initial_state=h0, output_final_state=output_final_state,
                cu_seqlens=cu, implementation=impl, config=config,
            )

        if remat:
            inner = jax.checkpoint(inner)
        if jit:
            inner = jax.jit(inner)
        return inner(q, k, v, a, b, initial_state, cu)

    return fn


def _check(fn, inputs, h0, dtype, *, cu=None, scale=None):
    eps = tol(dtype)
    ref = lambda *x, **kw: reference(*x, cu_seqlens=cu, scale=scale, **kw)
    o, ht = fn(*inputs, initial_state=h0, output_final_state=True)
    ro, rht = ref(*inputs, initial_state=h0, output_final_state=True)
    assert o.dtype == inputs[2].dtype and o.shape == ro.shape
    assert ht.dtype == jnp.float32 and ht.shape == rht.shape
    assert rel_err(o, ro) < eps, ("o", rel_err(o, ro))
    assert rel_err(ht, rht) < eps, ("final_state", rel_err(ht, rht))
    o2, none = fn(*inputs, initial_state=h0, output_final_state=False)
    assert none is None and rel_err(o2, ro) < eps
    for with_final in (True, False):
        got = grads(fn, inputs, h0, with_final=with_final)
        want = grads(ref, inputs, h0, with_final=with_final)
        for name, g, w, x in zip(GRAD_NAMES, got, want, (*inputs, h0), strict=True):
            if x is None:
                assert g is None
                continue
            assert g.dtype == x.dtype, (name, g.dtype, x.dtype)
            assert rel_err(g, w) < eps, (name, with_final, rel_err(g, w))


CASES = {
    # name: (B, T, H, K, V, dtype, initial state, scale)
    "batch": (2, 37, 2, 16, 32, jnp.float32, True, None),
    "decode": (3, 1, 2, 32, 32, jnp.float32, True, None),
    "k60_v20": (1, 13, 1, 60, 20, jnp.float32, True, 0.3),
    "bf16": (2, 24, 2, 32, 16, jnp.bfloat16, True, None),
    "no_state": (2, 19, 1, 16, 16, jnp.float32, False, None),
    "k200_v130": (1, 9, 1, 200, 130, jnp.float32, True, None),  # Kp = Vp = 256
}


@pytest.mark.parametrize("impl", RECURRENT_IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(impl, case, rng):
    B, T, H, K, V, dtype, with_h0, scale = CASES[case]
    inputs, h0 = make_inputs(rng, B, T, H, K, V, dtype=dtype, h0=with_h0, delta=case == "batch")
    _check(_op(impl, scale=scale), inputs, h0, dtype, scale=scale)


@pytest.mark.parametrize("impl", RECURRENT_IMPLS)
def test_packed_traced_cu_seqlens(impl, rng):
    lens = [7, 0, 12, 1, 5]  # uneven, with an empty sequence (its final state is its h0)
    cu = jnp.asarray(np.cumsum([0, *lens]), jnp.int32)
    inputs, h0 = make_inputs(rng, 1, sum(lens), 2, 16, 16, N=len(lens))
    _check(_op(impl, cu=cu, jit=True), inputs, h0, jnp.float32, cu=cu)
    # the empty sequence's state passes through untouched
    _, ht = _op(impl, cu=cu, jit=True)(*inputs, initial_state=h0, output_final_state=True)
    np.testing.assert_array_equal(np.asarray(ht[1]), np.asarray(h0[1]))


@pytest.mark.parametrize("impl", RECURRENT_IMPLS)
def test_checkpoint(impl, rng):
    inputs, h0 = make_inputs(rng, 1, 11, 2, 16, 16)
    _check(_op(impl, jit=True, remat=True), inputs, h0, jnp.float32)


@pytest.mark.parametrize("impl", RECURRENT_IMPLS)
def test_vmap(impl, rng):
    X = 2
    per = [make_inputs(rng, 2, 9, 1, 16, 16) for _ in range(X)]
    inputs = tuple(jnp.stack([p[0][i] for p in per]) for i in range(5))
    h0 = jnp.stack([p[1] for p in per])

    def run(f):
        def loss(q, k, v, a, b, h0):
            o, ht = jax.vmap(lambda *x: f(*x[:5], initial_state=x[5], output_final_state=True))(
                q, k, v, a, b, h0
            )
            acc = jnp.promote_types(o.dtype, jnp.float32)
            w = jnp.cos(jnp.arange(o.size, dtype=acc)).reshape(o.shape)
            return jnp.sum(o * w) + jnp.sum(jnp.sin(ht.astype(acc))), (o, ht)

        return jax.grad(loss, argnums=range(6), has_aux=True)(*inputs, h0)

    (g, (o, ht)), (rg, (ro, rht)) = run(_op(impl, jit=True)), run(reference)
    eps = tol(jnp.float32)
    assert rel_err(o, ro) < eps and rel_err(ht, rht) < eps
    for name, x, y in zip(GRAD_NAMES, g, rg, strict=True):
        assert rel_err(x, y) < eps, (name, rel_err(x, y))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(2, 512, 4, 128, 128), (64, 1, 16, 128, 128)], ids=["B2T512H4", "decode_B64H16"]
)
def test_pallas_compiled_medium(shape, rng):
    """The compiled Triton kernels at realistic head sizes (bf16 inputs)."""
    inputs, h0 = make_inputs(rng, *shape, dtype=jnp.bfloat16)
    _check(_op("pallas", jit=True), inputs, h0, jnp.bfloat16)


@pytest.mark.parametrize("impl", [i for i in RECURRENT_IMPLS if i != "xla"])
def test_v_blocks(impl, rng):
    """Several V-blocks per head (forward slabs, backward partials summed over blocks)."""
    config = FusedRecurrentConfig(fwd_block_v=16, fwd_warps=1, bwd_block_v=16, bwd_warps=1)
    inputs, h0 = make_inputs(rng, 2, 10, 1, 20, 40)  # Vp = 64: four V-blocks
    _check(_op(impl, config=config), inputs, h0, jnp.float32)


@pytest.mark.parametrize("Kp", [16, 64, 128, 256])
@pytest.mark.parametrize("Vp", [16, 64, 128, 1024])
@pytest.mark.parametrize("pairs", [1, 64, 128, 4096])
def test_backward_blocks_bounded(Kp, Vp, pairs):
    """The backward's V-blocks: a power of two dividing Vp that fits the registers, split below
    the widest only while programs are few, since each block adds float32 partials of size
    [L, H, Kp] for four gradients."""
    cfg = fused_recurrent_config(None, pairs=pairs, Kp=Kp, Vp=Vp)
    bv, warps = cfg.bwd_block_v, cfg.bwd_warps
    widest = min(Vp, 8192 // Kp)
    assert Vp % bv == 0 and bv & (bv - 1) == 0 and Kp * bv <= 8192 and 1 <= warps <= 8
    if bv < widest:  # halved: the programs at twice the block were fewer than 512
        assert pairs * (Vp // (2 * bv)) < 512
        assert bv >= (16 if Kp <= 64 else 32)


@pytest.mark.parametrize("impl", RECURRENT_IMPLS)
def test_traced_scale(impl, rng):
    inputs, h0 = make_inputs(rng, 1, 6, 1, 16, 16)
    f = jax.jit(lambda s, *x: iplr_jax.fused_recurrent(
        *x, scale=s, initial_state=h0, output_final_state=True, implementation=impl))
    o, ht = f(jnp.float32(0.7), *inputs)
    ro, rht = reference(*inputs, scale=0.7, initial_state=h0, output_final_state=True)
    assert rel_err(o, ro) < tol(jnp.float32) and rel_err(ht, rht) < tol(jnp.float32)
