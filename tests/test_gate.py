"""The DPLR gate `gk` (docs/gate.md): every op and implementation against the float64 recurrence,
outputs, final states and all seven gradients (q, k, v, a, b, gk, initial_state).

Gates are drawn from -softplus(N(0, 1)), from log(sigmoid) of large logits (many near 0, many
far below -10), as strong decays (-20 on half the entries), all-zero (which must equal IPLR to
rounding), and all -20 at chunk 64 (no inf / NaN anywhere).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CHUNK_IMPLS, GPU, RECURRENT_IMPLS
from helpers import make_inputs, rel_err, tol, up
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import iplr_jax
from iplr_jax.context_parallel import chunk_cp

NAMES = ("dq", "dk", "dv", "da", "db", "dgk", "dh0")
DV2_GATED = "iplr_chunk_bwd_dv2_gated"
# XLA's CPU backend at -O0 compiles these small programs about twice as fast (compile-bound tests)
FAST = {"xla_backend_optimization_level": 0}


def draw_gate(rng, shape, kind):
    if kind == "softplus":
        return -np.logaddexp(0.0, rng.standard_normal(shape))
    if kind == "logsigmoid":  # log(sigmoid(x)) = -softplus(-x), logits of scale 10
        return -np.logaddexp(0.0, -10.0 * rng.standard_normal(shape))
    if kind == "strong":
        soft = -np.logaddexp(0.0, rng.standard_normal(shape))
        return np.where(rng.random(shape) < 0.5, -20.0, soft)
    if kind == "all_strong":
        return np.full(shape, -20.0)
    if kind == "mixed":  # by 16-row blocks along T: -20 (pairwise), -3.7 (factored at the bound), softplus
        soft = -np.logaddexp(0.0, rng.standard_normal(shape))
        block = (np.arange(shape[1]) // 16 % 3).reshape(1, -1, *([1] * (len(shape) - 2)))
        return np.where(block == 0, -20.0, np.where(block == 1, -3.7, soft))
    if kind == "by_chunk":  # by 64-row chunks along T: softplus (factored whole), strong (blockwise)
        soft, strong = draw_gate(rng, shape, "softplus"), draw_gate(rng, shape, "strong")
        chunk = (np.arange(shape[1]) // 64 % 2).reshape(1, -1, *([1] * (len(shape) - 2)))
        return np.where(chunk == 0, soft, strong)
    if kind == "zero":
        return np.zeros(shape)
    if kind == "positive":  # a slight growth: outside the usual gk <= 0, exact on every path
        return rng.uniform(0.0, 0.05, shape)
    raise ValueError(kind)


def gated_inputs(rng, B, T, H, K, V, kind, *, dtype=jnp.float32, N=None, delta=False):
    inputs, h0 = make_inputs(rng, B, T, H, K, V, dtype=dtype, N=N, delta=delta)
    gk = jnp.asarray(draw_gate(rng, (B, T, H, K), kind), dtype)
    return (*inputs, gk), h0


def _op(name, impl, *, chunk_size=64, cu=None, jit=False, config=None):
    fn = getattr(iplr_jax, name)
    kw = dict(implementation=impl) if name != "naive" else {}
    if name == "chunk":
        kw["chunk_size"] = chunk_size
    if config is not None:
        kw["config"] = config

    def call(q, k, v, a, b, gk, h0, final=True):
        return fn(q, k, v, a, b, gk, initial_state=h0, output_final_state=final, cu_seqlens=cu, **kw)

    return jax.jit(call, static_argnames="final") if jit else call


def _ref(cu=None):
    def call(q, k, v, a, b, gk, h0, final=True):
        return iplr_jax.naive(
            *(up(x) for x in (q, k, v, a, b, gk)), initial_state=up(h0), output_final_state=final,
            cu_seqlens=cu,
        )

    return call


def grads7(call, inputs, h0, seed=0):
    """Gradients of a random linear functional of (o, final state) w.r.t. the seven inputs."""

    def loss(*xs):
        o, ht = call(*xs)
        acc = jnp.promote_types(o.dtype, jnp.float32)
        draw = lambda s, shp: jax.random.normal(jax.random.PRNGKey(s), shp, jnp.float32).astype(acc)  # noqa: E731
        out = jnp.sum(o.astype(acc) * draw(seed, o.shape))
        return out + jnp.sum(ht.astype(acc) * draw(seed + 1, ht.shape))

    return jax.grad(loss, argnums=tuple(range(7)))(*inputs, h0)


def check(call, inputs, h0, *, cu=None, eps=None, grads=True):
    eps = eps or tol(inputs[0].dtype)
    o, ht = jax.jit(call, compiler_options=FAST)(*inputs, h0)
    ro, rht = jax.jit(_ref(cu))(*inputs, h0)
    assert o.dtype == inputs[2].dtype and ht.dtype == jnp.float32
    assert rel_err(o, ro) < eps, ("o", rel_err(o, ro))
    assert rel_err(ht, rht) < eps, ("final_state", rel_err(ht, rht))
    if not grads:
        return
    got = jax.jit(lambda *xs: grads7(call, xs[:6], xs[6]), compiler_options=FAST)(*inputs, h0)
    want = jax.jit(lambda *xs: grads7(_ref(cu), xs[:6], xs[6]))(*inputs, h0)
    for name, g, w, x in zip(NAMES, got, want, (*inputs, h0), strict=True):
        assert g.dtype == x.dtype, (name, g.dtype, x.dtype)
        assert rel_err(g, w) < eps, (name, rel_err(g, w))


# -- the convention ------------------------------------------------------------------------------


def assert_grads_strong_gate(got, want):
    """Seven gradients against the float64 reference when every gate is -20: dgk within 1e-5
    of the other gradients' scale (its error is absolute there, docs/gate.md; 1e-3 with a GPU's
    tf32 dots), the rest as usual."""
    eps = 1e-3 if GPU else 1e-5
    for name, g, w in zip(NAMES, got, want, strict=True):
        if name == "dgk":
            scale = max(float(jnp.linalg.norm(up(x))) for x in got[:5])
            err = float(jnp.linalg.norm(up(g) - w)) / scale
            assert err < eps, (name, err)
        else:
            assert rel_err(g, w) < tol(jnp.float32), (name, rel_err(g, w))


def test_one_step_convention(rng):
    """fla's dplr_recurrence: S_1 = exp(gk) * S_0 + k v^T + b (a^T S_0), with a reading the
    UNdecayed S_0, and o = scale S_1^T q."""
    (q, k, v, a, b, gk), h0 = gated_inputs(rng, 1, 1, 1, 8, 4, "softplus", dtype=jnp.float64)
    h0 = up(h0)
    o, ht = iplr_jax.naive(q, k, v, a, b, gk, initial_state=h0, output_final_state=True)
    S0 = h0[0, 0]
    g, q1, k1, v1, a1, b1 = (x[0, 0, 0] for x in (gk, q, k, v, a, b))
    S1 = jnp.exp(g)[:, None] * S0 + jnp.outer(k1, v1) + jnp.outer(b1, a1 @ S0)
    np.testing.assert_allclose(ht[0, 0], S1, rtol=1e-13)
    np.testing.assert_allclose(o[0, 0, 0], 8**-0.5 * S1.T @ q1, rtol=1e-13)


# -- fused_recurrent -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", RECURRENT_IMPLS)
@pytest.mark.parametrize("kind", ["softplus", "logsigmoid", "strong", "zero"])
def test_fused_recurrent(impl, kind, rng):
    inputs, h0 = gated_inputs(rng, 2, 19, 2, 16, 24, kind)
    check(_op("fused_recurrent", impl), inputs, h0)


@pytest.mark.parametrize("impl", RECURRENT_IMPLS)
def test_fused_recurrent_k60(impl, rng):
    """K = 60 (padded to 64), K != V, odd T, delta-rule inputs."""
    inputs, h0 = gated_inputs(rng, 1, 13, 1, 60, 20, "softplus", delta=True)
    check(_op("fused_recurrent", impl), inputs, h0)


@pytest.mark.parametrize("impl", RECURRENT_IMPLS)
def test_fused_recurrent_packed(impl, rng):
    lens = [7, 0, 12, 1, 5]  # uneven, one empty
    cu = jnp.asarray(np.cumsum([0, *lens]), jnp.int32)
    inputs, h0 = gated_inputs(rng, 1, sum(lens), 2, 16, 16, "logsigmoid", N=len(lens))
    check(_op("fused_recurrent", impl, cu=cu, jit=True), inputs, h0, cu=cu)


@pytest.mark.parametrize("impl", RECURRENT_IMPLS)
def test_fused_recurrent_bf16(impl, rng):
    inputs, h0 = gated_inputs(rng, 2, 24, 2, 32, 16, "softplus", dtype=jnp.bfloat16)
    check(_op("fused_recurrent", impl), inputs, h0)


def test_fused_recurrent_all_strong(rng):
    """gk = -20 everywhere: outputs, states and six gradients to float32 rounding. dgk is tiny
    (it carries the factor e^-20) and the kernels get it from a cumulative sum of O(1) terms
    (docs/gate.md), so its error is absolute, at float32 rounding of the other gradients."""
    inputs, h0 = gated_inputs(rng, 1, 23, 1, 16, 16, "all_strong")
    call = _op("fused_recurrent", "interpret")
    check(call, inputs, h0, grads=False)
    got, want = grads7(call, inputs, h0), grads7(_ref(), inputs, h0)
    assert_grads_strong_gate(got, want)


# -- chunk ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
@pytest.mark.parametrize("kind", ["softplus", "logsigmoid", "strong", "zero"])
def test_chunk(impl, kind, rng):
    """T = 100 at chunk 64: two chunks, the second partly padding; all four 16-row sub-blocks."""
    inputs, h0 = gated_inputs(rng, 2, 100, 2, 16, 24, kind)
    check(_op("chunk", impl), inputs, h0)


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_all_strong_finite(impl, chunk_size, rng):
    """gk = -20 per step at every chunk size: float32, no inf or NaN, every gradient accurate
    (on the kernels, whose backward forms dgk from the identity, dgk to the other gradients'
    rounding in absolute terms: it carries e^-20, docs/gate.md)."""
    inputs, h0 = gated_inputs(rng, 1, 70, 1, 16, 16, "all_strong")
    call = _op("chunk", impl, chunk_size=chunk_size)
    if impl == "xla":
        check(call, inputs, h0)
        return
    check(call, inputs, h0, grads=False)
    got = jax.jit(lambda *xs: grads7(call, xs[:6], xs[6]))(*inputs, h0)
    assert_grads_strong_gate(got, grads7(_ref(), inputs, h0))


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_chunk_k60(impl, rng):
    """K = 60 (padded to 64 in the kernels), K != V, odd T, chunk 32, delta-rule inputs."""
    inputs, h0 = gated_inputs(rng, 1, 77, 1, 60, 20, "logsigmoid", delta=True)
    check(_op("chunk", impl, chunk_size=32), inputs, h0)


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_chunk_packed(impl, rng):
    lens = [40, 0, 70, 1, 9]
    cu = jnp.asarray(np.cumsum([0, *lens]), jnp.int32)
    inputs, h0 = gated_inputs(rng, 1, sum(lens), 2, 16, 16, "strong", N=len(lens))
    check(_op("chunk", impl, cu=cu, jit=True), inputs, h0, cu=cu)


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_chunk_bf16(impl, rng):
    inputs, h0 = gated_inputs(rng, 1, 80, 2, 32, 16, "softplus", dtype=jnp.bfloat16)
    check(_op("chunk", impl), inputs, h0)


@pytest.mark.usefixtures("on_cpu")  # float32 to rounding: no tf32 dots
@pytest.mark.parametrize("chunk_factored", [False, True])
@pytest.mark.parametrize("kind", ["softplus", "strong", "all_strong", "split"])
@pytest.mark.parametrize("C", [16, 64])
def test_wy_kernel_gated(C, kind, chunk_factored, rng):
    """The gated WY kernel's X, W, U and the sweep's decayed operands K e^{G_C - G},
    B e^{G_C - G}, e^{G_C} against float64 numpy with the decays formed pairwise (docs/gate.md);
    with `gate_chunk_factored` each chunk within the bound of its middle row takes one product
    per block pair (softplus: every chunk; strong gates: none; split: the first of two), in one
    launch beside the blockwise mode's, each (chunk, head) by its `chunk_flags`."""
    from test_chunk import _config

    from iplr_jax.triton import gate_factors
    from iplr_jax.triton.wy_fast import wy_fwd

    L, H, Kp, Vp = 2 * C, 2, 32, 32
    (_, k, v, a, b), _ = make_inputs(rng, 1, L, H, Kp, Vp, dtype=jnp.float64)
    if kind == "split":  # a softplus chunk, then a strong one
        g = np.concatenate([draw_gate(rng, (1, C, H, Kp), kd) for kd in ("softplus", "strong")], axis=1)
    else:
        g = draw_gate(rng, (1, L, H, Kp), kind)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    flags = np.asarray(gate_factors.chunk_flags(f32(g), C)).reshape(L // C, H)
    w, u, x, kd, bd, gc = wy_fwd(
        *map(f32, (a, b, k, v)), chunk_size=C, with_x=True, interpret=True, gk=f32(g),
        config=_config(Kp=Kp, Vp=Vp, gate_chunk_factored=chunk_factored),
    )
    split = lambda y: np.asarray(y, np.float64)[0].reshape(L // C, C, H, -1).transpose(0, 2, 1, 3)  # noqa: E731
    A, B, K, Vc, g = map(split, (f32(a), f32(b), f32(k), f32(v), f32(g)))
    G = np.cumsum(g, axis=-2)
    Gx = G - g
    # the chunks the factored products take: every exponent within 60 of the middle row's G
    Gm = G[..., C // 2 - 1 : C // 2, :]
    spread = np.maximum(np.abs(G - Gm), np.abs(Gx - Gm)).max(axis=(2, 3))  # [NC, H]
    expected = {"softplus": [True] * 2, "split": [True, False]}.get(kind, [False] * 2)
    assert list(spread.max(1) <= 60) == expected
    # the flags, from sums of |gk| over the halves, are exact for these one-signed gates
    np.testing.assert_array_equal(flags, spread <= 60)
    lower = np.tri(C, k=-1, dtype=bool)[:, :, None]
    E = np.exp(np.where(lower, Gx[..., :, None, :] - G[..., None, :, :], -np.inf))  # [.., t, s, K]
    gram = lambda x, y: np.einsum("...tk,...sk,...tsk->...ts", x, y, E)  # noqa: E731
    X = np.linalg.inv(np.eye(C) - gram(A, B))
    tail = np.exp(G[..., -1:, :] - G)
    assert rel_err(x, X) < 1e-5
    assert rel_err(split(w), X @ (A * np.exp(Gx))) < 1e-5
    assert rel_err(split(u), X @ gram(A, K) @ Vc) < 1e-5
    assert rel_err(split(kd), K * tail) < 1e-5 and rel_err(split(bd), B * tail) < 1e-5
    assert rel_err(gc, np.exp(G[..., -1, :])) < 1e-5


KERNEL_IMPLS = [i for i in CHUNK_IMPLS if i != "xla"]
BWD_KERNELS = iplr_jax.ChunkConfig(bwd_kernels=True)
E2E_BWD = {
    # name: (B, T, H, K, V, gate, chunk_size, dtype, cu_seqlens)
    "softplus": (2, 100, 2, 16, 24, "softplus", 64, jnp.float32, None),  # odd T, K != V
    "logsigmoid_c32_k60": (1, 77, 1, 60, 20, "logsigmoid", 32, jnp.float32, None),
    "strong_packed_c16": (1, 120, 2, 16, 16, "strong", 16, jnp.float32, [0, 40, 40, 110, 111, 120]),
    "zero": (1, 50, 1, 16, 16, "zero", 32, jnp.float32, None),
    "positive": (1, 50, 1, 16, 16, "positive", 32, jnp.float32, None),
    # the gated WY as the IPLR kernel on decayed operands (`gate_chunk_factored`)
    "chunk_factored_bf16": (1, 100, 2, 32, 16, "softplus", 64, jnp.bfloat16, None, True),
    "chunk_factored_packed": (1, 120, 2, 16, 16, "softplus", 32, jnp.bfloat16, [0, 40, 40, 110, 120], True),
    "chunk_factored_by_chunk": (1, 200, 2, 32, 16, "by_chunk", 64, jnp.float32, None, True),
    # diagonal blocks factored and pairwise in the same chunks (`gate.factorable`)
    "mixed": (1, 150, 2, 32, 16, "mixed", 64, jnp.float32, None),
    "bf16": (1, 80, 2, 32, 16, "softplus", 64, jnp.bfloat16, None),
    "k200_v130": (1, 70, 1, 200, 130, "strong", 64, jnp.float32, None),  # Kp = Vp = 256, V-blocks
    "k32_v200": (1, 90, 2, 32, 200, "softplus", 64, jnp.bfloat16, None),  # two V-blocks, factored
}


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("case", list(E2E_BWD))
def test_chunk_backward_kernels(case, impl, rng):
    """`chunk` with the gated backward kernels (`ChunkConfig(bwd_kernels=True)`): outputs, final
    states and all seven gradients against the float64 recurrence."""
    B, T, H, K, V, kind, C, dtype, cu, *chunk_factored = E2E_BWD[case]
    N = None if cu is None else len(cu) - 1
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    inputs, h0 = gated_inputs(rng, B, T, H, K, V, kind, dtype=dtype, N=N)
    config = dataclasses.replace(BWD_KERNELS, gate_chunk_factored=bool(chunk_factored))
    check(_op("chunk", impl, chunk_size=C, cu=cu, config=config), inputs, h0, cu=cu)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_chunk_backward_kernels_all_strong(impl, rng):
    """gk = -20 everywhere through the gated backward kernels: six gradients to float32
    rounding; dgk (tiny: it carries e^-20) from the identity has an absolute error at the
    rounding of the others, as for the fused kernels (docs/gate.md)."""
    inputs, h0 = gated_inputs(rng, 1, 70, 1, 16, 16, "all_strong")
    call = _op("chunk", impl, config=BWD_KERNELS)
    check(call, inputs, h0, grads=False)
    got = jax.jit(lambda *xs: grads7(call, xs[:6], xs[6]))(*inputs, h0)
    want = grads7(_ref(), inputs, h0)
    assert_grads_strong_gate(got, want)


BWD_CASES = [
    # B, T, H, K, V, cu_seqlens, chunk_size, gate
    (2, 37, 2, 16, 12, None, 16, "softplus"),
    (1, 53, 2, 16, 32, [0, 17, 17, 40, 53], 16, "strong"),  # uneven, one empty
    (1, 70, 1, 20, 12, [0, 30, 70], 32, "logsigmoid"),
    (1, 90, 1, 16, 16, [0, 5, 90], 64, "strong"),
]


@pytest.mark.parametrize("case", BWD_CASES)
def test_gated_backward_equations(case, rng):
    """The gated backward equations on the aligned layout (`chunk_bwd_aligned` with the gate,
    docs/gate.md "Backward"; dgk from the identity) equal float64 autodiff of the recurrence."""
    from helpers import prepare_aligned
    from test_chunk_bwd import bwd_reference, cotangents, unalign

    from iplr_jax import layout as lay

    B, T, H, K, V, cu, C, kind = case
    N = None if cu is None else len(cu) - 1
    inputs, h0 = gated_inputs(rng, B, T, H, K, V, kind, dtype=jnp.float64, N=N)
    h0 = up(h0)
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    dims, layout, al, (o, ht, h, v_new), scale = prepare_aligned(inputs, h0, cu, C)
    ro, rht = iplr_jax.naive(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(lay.from_chunks(o, layout)[..., :V], ro) < 1e-12  # the gated residuals
    assert rel_err(ht[:, :, :K, :V], rht) < 1e-12
    do, dht, doa, dhta = cotangents(rng, dims, layout)
    g = bwd_reference(al, h, v_new, layout.cu_chunks, doa, dhta, scale=scale, chunk_size=C)
    mine = unalign(g, dims, layout)
    f = lambda *xs: iplr_jax.naive(*xs[:6], initial_state=xs[6], output_final_state=True, cu_seqlens=cu)  # noqa: E731
    want = jax.jit(lambda xs, ct: jax.vjp(f, *xs)[1](ct))((*inputs, h0), (do, dht))
    for name, x, y in zip(NAMES, mine, want, strict=True):
        assert rel_err(x, y) < 1e-10, (name, rel_err(x, y))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", BWD_CASES)
def test_gated_backward_kernels(case, dtype, rng):
    """The gated backward kernels (interpreted, `ChunkConfig(bwd_kernels=True)`) against the
    gated backward equations in jnp on the same residuals (from the gated WY kernel)."""
    _gated_kernels_vs_equations(case, dtype, rng)


def test_gated_backward_kernels_v_blocks(rng):
    """Several V-blocks in the intra kernel: float32 partials of the K-side gradients and dG_C."""
    _gated_kernels_vs_equations(BWD_CASES[1], jnp.float32, rng, bwd_intra_block_v=16)


def _gated_kernels_vs_equations(case, dtype, rng, **fields):
    from helpers import prepare_aligned
    from test_chunk_bwd import bwd_reference, cotangents

    from iplr_jax.triton.chunk import Residuals
    from iplr_jax.triton.chunk_bwd import chunk_bwd
    from iplr_jax.triton.config import ChunkConfig, chunk_config
    from iplr_jax.triton.wy_fast import wy_fwd

    B, T, H, K, V, cu, C, kind = case
    N = None if cu is None else len(cu) - 1
    inputs, h0 = gated_inputs(rng, B, T, H, K, V, kind, dtype=dtype, N=N)
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    dims, layout, al, (o, ht, h, v_new), scale = prepare_aligned(inputs, h0, cu, C, acc=jnp.float32)
    _, _, doa, dhta = cotangents(rng, dims, layout)
    doa, dhta = doa.astype(dtype), dhta.astype(jnp.float32)
    Kp, Vp = al.q.shape[-1], al.v.shape[-1]
    cfg = chunk_config(
        ChunkConfig(bwd_kernels=True, **fields), N=dims.N, H=H, Kp=Kp, Vp=Vp,
        num_chunks=layout.num_chunks, dtype=dtype, interpret=True, gated=True,
    )
    w, _, x, *_ = wy_fwd(al.a, al.b, al.k, al.v, chunk_size=C, config=cfg, out_dtype=dtype,
                         with_x=True, interpret=True, gk=al.gk)
    res = Residuals(h.astype(dtype), v_new.astype(jnp.float32), x, w)
    dx, dh0 = jax.jit(functools.partial(chunk_bwd, scale=scale, chunk_size=C, config=cfg, interpret=True))(
        al, res, layout.cu_chunks, doa, dhta
    )
    ref = bwd_reference(al, h.astype(dtype), v_new.astype(jnp.float32), layout.cu_chunks, doa, dhta,
                        scale=scale, chunk_size=C)
    for name, g, r, like in zip(NAMES, (*dx.arrays(), dh0), ref, (*al.arrays(), dhta), strict=True):
        assert g.shape == r.shape and g.dtype == like.dtype, (name, g.shape, g.dtype)
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name  # padding chunks too
        assert rel_err(g, r) < (1e-4 if dtype == jnp.float32 else 1e-2), (name, rel_err(g, r))


# -- zero gate = IPLR, None compiles as before ---------------------------------------------------


@pytest.mark.parametrize(
    "name,impl", [("naive", None), ("chunk", "xla"), ("chunk", "interpret"),
                  ("fused_recurrent", "xla"), ("fused_recurrent", "interpret")]
)
def test_zero_gate_is_iplr(name, impl, rng):
    inputs, h0 = gated_inputs(rng, 1, 37, 1, 16, 16, "zero")
    gated = _op(name, impl)
    fn = getattr(iplr_jax, name)
    kw = {} if impl is None else dict(implementation=impl)
    o, ht = gated(*inputs, h0)
    o0, ht0 = fn(*inputs[:5], initial_state=h0, output_final_state=True, **kw)
    assert rel_err(o, o0) < 1e-6 and rel_err(ht, ht0) < 1e-6


def test_gate_validation():
    x = [jnp.ones((1, 4, 1, 8), jnp.float32)] * 5
    with pytest.raises(ValueError, match="gk must have the shape of q"):
        iplr_jax.chunk(*x, jnp.zeros((1, 4, 1, 4)), implementation="xla")
    with pytest.raises(ValueError, match="gk must be a floating-point array"):
        iplr_jax.fused_recurrent(*x, jnp.zeros((1, 4, 1, 8), jnp.int32), implementation="xla")
    with pytest.raises(ValueError, match="gk must have shape"):
        iplr_jax.naive(*x, jnp.zeros((4, 1, 8)))


# -- several devices -----------------------------------------------------------------------------


def _mesh(n, name):
    if len(jax.devices("cpu")) < n:
        pytest.skip(f"needs {n} devices")
    return Mesh(np.array(jax.devices("cpu")[:n]), (name,))


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_fused_recurrent_shard_map(impl, rng):
    """Heads sharded inside shard_map (check_vma=True): gk shards like k ("b t h k")."""
    inputs, h0 = gated_inputs(rng, 2, 9, 2, 16, 16, "softplus")
    mesh = _mesh(2, "x")
    tok, st = P(None, None, "x"), P(None, "x")
    call = _op("fused_recurrent", impl)
    sharded = jax.shard_map(call, mesh=mesh, in_specs=(tok,) * 6 + (st,), out_specs=(tok, st))
    check(sharded, inputs, h0)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_chunk_shard_map(impl, rng):
    """Heads sharded inside shard_map (check_vma=True), packed sequences: the gated chunk kernels
    with gk sharded like k."""
    lens = [20, 0, 13]
    cu = jnp.asarray(np.cumsum([0, *lens]), jnp.int32)
    inputs, h0 = gated_inputs(rng, 1, sum(lens), 2, 16, 16, "logsigmoid", N=len(lens))
    mesh = _mesh(2, "x")
    tok, st = P(None, None, "x"), P(None, "x")
    call = _op("chunk", impl, chunk_size=16, cu=cu)
    sharded = jax.shard_map(call, mesh=mesh, in_specs=(tok,) * 6 + (st,), out_specs=(tok, st))
    check(sharded, inputs, h0, cu=cu)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("exchange", ["allgather", "scan"])
def test_context_parallel(exchange, impl, rng):
    """T sharded over 4 devices with a gate: the widened run's final state is [h | M] with M the
    product of the gated transitions; packed sequences straddling device boundaries."""
    cu = jnp.asarray([0, 5, 30, 30, 64], jnp.int32)
    inputs, h0 = gated_inputs(rng, 1, 64, 1, 16, 8, "softplus", N=4)
    mesh = _mesh(4, "sp")
    tok = P(None, "sp")

    def local(q, k, v, a, b, gk, h0, final=True):
        return chunk_cp(
            q, k, v, a, b, gk, axis_name="sp", initial_state=h0, output_final_state=final,
            cu_seqlens=cu, chunk_size=16, implementation=impl, exchange=exchange,
        )

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(tok,) * 6 + (P(),), out_specs=(tok, P()))
    check(sharded, inputs, h0, cu=cu, eps=1e-4)


def test_fused_recurrent_jit_sharded(rng):
    """Under plain jit with batch- and head-sharded inputs: the gated kernels run per shard
    (custom_partitioning with gk as "b t h k"), no collective, results as on one device."""
    _jit_sharded("fused_recurrent", gated_inputs(rng, 2, 9, 2, 16, 16, "softplus"))


@pytest.mark.parametrize("bwd", ["jnp", "kernels"])
def test_chunk_jit_sharded(bwd, rng):
    """The gated chunk kernels and their backward (the jnp VJP, or the gated backward kernels
    from residuals sharded with the batch) per batch / head shard under jit."""
    config = BWD_KERNELS if bwd == "kernels" else None
    _jit_sharded("chunk", gated_inputs(rng, 2, 40, 2, 16, 16, "strong"), config=config)


def _jit_sharded(name, case, config=None):
    from helpers import cpu_mesh
    from jax.sharding import AxisType, NamedSharding

    if len(jax.devices("cpu")) < 4:
        pytest.skip("needs 4 devices")
    inputs, h0 = case
    mesh = cpu_mesh((2, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    tok, st = NamedSharding(mesh, P("x", None, "y", None)), NamedSharding(mesh, P("x", "y"))
    xs = [jax.device_put(x, tok) for x in inputs] + [jax.device_put(h0, st)]
    call = _op(name, "interpret", chunk_size=16, config=config)
    f = jax.jit(lambda *xs: (call(*xs), grads7(call, xs[:6], xs[6])))
    text = f.lower(*xs).compile().as_text()
    assert "all-gather" not in text and "all-to-all" not in text
    (o, ht), g = f(*xs)
    (ro, rht), rg = call(*inputs, h0), grads7(call, inputs, h0)
    for x, y in zip((o, ht, *g), (ro, rht, *rg), strict=True):
        assert rel_err(x, y) < 1e-5


# -- lowering for CUDA (no GPU needed) -----------------------------------------------------------


@pytest.mark.parametrize(
    "K, V, dtype", [(64, 64, jnp.bfloat16), (100, 60, jnp.float32), (200, 130, jnp.float32)]
)
def test_gated_fused_recurrent_lowers_for_cuda(K, V, dtype, monkeypatch, unguarded):
    """The gated fused kernels (forward and both backward sweeps) and the gated chunk kernels
    (WY, sweep, output; differentiated, also the gated backward kernels for K <= 128 or when
    `bwd_kernels=True`, the jnp form otherwise) lower through the Triton backend."""
    from test_lowering import FUSED, FUSED_BWD, INTRA, OUT, STATE, SWEEP, WY, triton_kernels

    import iplr_jax.inputs as inputs_module

    monkeypatch.setattr(inputs_module, "has_gpu", lambda: True)
    s = jax.ShapeDtypeStruct
    qk = s((2, 50, 2, K), dtype)
    x, h0 = [qk, qk, s((2, 50, 2, V), dtype), qk, qk, qk], s((2, 2, K, V), jnp.float32)
    fwd = lambda *a: iplr_jax.fused_recurrent(*a, implementation="pallas")[0]  # noqa: E731

    def step(*a):
        def loss(*d):
            o, ht = iplr_jax.fused_recurrent(
                *d[:6], initial_state=d[6], output_final_state=True, implementation="pallas"
            )
            return o.astype(jnp.float32).sum() + ht.sum()

        return jax.grad(loss, argnums=tuple(range(7)))(*a)

    assert triton_kernels(fwd, *x) == FUSED
    assert triton_kernels(step, *x, h0) == FUSED_BWD
    # by default two launches of the WY kernel (its whole-chunk factored mode, then the
    # blockwise mode for the chunks left; docs/gate.md "Whole-chunk factoring")
    blockwise = iplr_jax.ChunkConfig(gate_chunk_factored=False)
    for C in (16, 64):
        chunk = lambda *a, C=C, config=None: iplr_jax.chunk(  # noqa: E731
            *a, implementation="pallas", chunk_size=C, config=config
        )[0]
        assert triton_kernels(chunk, *x) == [WY, WY, STATE, OUT]
        assert triton_kernels(functools.partial(chunk, config=blockwise), *x) == [WY, STATE, OUT]

    def chunk_step(*a, config=None):
        def loss(*d):
            o, ht = iplr_jax.chunk(
                *d[:6], initial_state=d[6], output_final_state=True, implementation="pallas",
                config=config,
            )
            return o.astype(jnp.float32).sum() + ht.sum()

        return jax.value_and_grad(loss, argnums=tuple(range(7)))(*a)

    # differentiated: the backward kernels for K <= 128, for bf16 both routes under lax.cond
    # (the IPLR sweep and intra kernels on decayed operands; the gated dv2, sweep and intra
    # kernels), for float32 the gated ones; for K > 128, or with bwd_kernels=False, the jnp
    # form forward and backward (docs/gate.md): no kernel
    factored_bwd = [SWEEP, INTRA] if dtype == jnp.bfloat16 else []
    kernels = [WY, WY, STATE, OUT, DV2_GATED, SWEEP, INTRA, *factored_bwd]
    assert triton_kernels(chunk_step, *x, h0) == (kernels if K <= 128 else [])
    assert triton_kernels(functools.partial(chunk_step, config=BWD_KERNELS), *x, h0) == kernels
    only_blockwise = dataclasses.replace(BWD_KERNELS, gate_chunk_factored=False)
    assert triton_kernels(functools.partial(chunk_step, config=only_blockwise), *x, h0) == [
        WY, STATE, OUT, DV2_GATED, SWEEP, INTRA
    ]
    no_kernels = functools.partial(chunk_step, config=iplr_jax.ChunkConfig(bwd_kernels=False))
    assert triton_kernels(no_kernels, *x, h0) == []
