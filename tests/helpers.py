"""Shared test helpers: random IPLR inputs drawn the way a layer draws them, the float64
references (the recurrence, and the recurrence on the kernels' aligned layout), the error
measure and tolerances of docs/numerics.md, and gradients of a random functional."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import iplr_jax
from iplr_jax import layout as lay
from iplr_jax.inputs import Inputs, check_inputs

GRAD_NAMES = ("dq", "dk", "dv", "da", "db", "dh0")
_HI = jax.lax.Precision.HIGHEST


def cpu_mesh(shape, names, axis_types=None):
    """A mesh of the simulated CPU devices (conftest.py makes 8), also on a GPU machine, where
    the default backend has fewer devices: the multi-device tests check partitioning, not speed."""
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=axis_types, devices=jax.devices("cpu")[:n])


def cuda_mesh(shape, names):
    """An abstract mesh whose devices are a CUDA GPU's, for lowering the Pallas kernels inside
    `shard_map` for CUDA on any machine: from JAX 0.11 the Triton lowering reads the GPU's kind
    from the mesh's device (a mesh of CPU devices fails with "No supported GPU devices found")."""
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.sharding.AbstractMesh(tuple(shape), tuple(names), auto, abstract_device=gpu)


def make_inputs(rng, B, T, H, K, V, *, dtype=jnp.float32, delta=False, N=None, h0=True):
    """q, k, v, a, b (and an initial state) drawn in float64, then cast to `dtype`.

    IPLR case: |a| = 1, b = -beta a with beta in (0, 2), so every transition is non-expansive.
    Delta-rule case: a = -beta k, b = k with |k| = 1.
    """
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V))
    beta = rng.uniform(0.05, 1.95, (B, T, H, 1))
    if delta:
        a, b = -beta * k, k.copy()
    else:
        a = rng.standard_normal((B, T, H, K))
        a /= np.linalg.norm(a, axis=-1, keepdims=True)
        b = -beta * a
    n = B if N is None else N
    s0 = rng.standard_normal((n, H, K, V)) if h0 else None
    cast = lambda x: jnp.asarray(x, dtype)
    return tuple(cast(x) for x in (q, k, v, a, b)), (None if s0 is None else jnp.asarray(s0, jnp.float32))


def up(x):
    """float64 copy (None stays None)."""
    return None if x is None else jnp.asarray(x, jnp.float64)


def reference(q, k, v, a, b, **kw):
    """The float64 recurrence on the same (rounded) inputs."""
    kw = dict(kw)
    kw["initial_state"] = up(kw.get("initial_state"))
    return iplr_jax.naive(*(up(x) for x in (q, k, v, a, b)), **kw)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert np.all(np.isfinite(x)), "non-finite values"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def tol(dtype) -> float:
    """docs/numerics.md: bf16/fp16 inputs within 1e-2; float32 (tf32 dots on GPU) 2e-3."""
    return {jnp.float64: 1e-10, jnp.float32: 2e-3}.get(jnp.dtype(dtype).type, 1e-2)


def grads(fn, inputs, h0, *, with_final=True, seed=0):
    """Gradients of a random linear functional of (o, final_state) w.r.t. q, k, v, a, b, h0.

    The functional's weights are drawn in float32 and cast up, so the float64 reference and a
    float32/bf16 implementation differentiate the same functional.
    """

    def loss(q, k, v, a, b, h0):
        o, ht = fn(q, k, v, a, b, initial_state=h0, output_final_state=with_final)
        acc = jnp.promote_types(o.dtype, jnp.float32)  # float64 for the reference
        draw = lambda s, shape: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32).astype(acc)
        out = jnp.sum(o.astype(acc) * draw(seed, o.shape))
        if with_final:
            out = out + jnp.sum(ht.astype(acc) * draw(seed + 1, ht.shape))
        return out

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(*inputs, h0)


def assert_grads(got, want, eps, what=""):
    for name, g, w in zip(GRAD_NAMES, got, want, strict=True):
        err = rel_err(g, w)
        assert err < eps, (what, name, err)


# -- the kernels' aligned layout -----------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size"))
def aligned_reference(x: Inputs, h0, cu_chunks, *, scale, chunk_size):
    """The recurrence token by token on the aligned layout (in h0's dtype, HIGHEST precision;
    with the gate when `x` has one), with the residuals the forward kernels write: o
    [1, L, H, Vp], ht [N, H, Kp, Vp], h [NC, H, Kp, Vp] (state before each chunk, zero past
    cu_chunks[-1]) and v_new [1, L, H, Vp]."""
    C = chunk_size
    _, L, H, _ = x.q.shape
    NC, N = L // C, h0.shape[0]
    acc = h0.dtype
    split = lambda y: y[0].reshape(NC, C, H, -1).astype(acc)  # [NC, C, H, D]
    xs = tuple(split(y) for y in x.arrays())  # q, k, v, a, b (, gk)
    cu = jnp.asarray(cu_chunks, jnp.int32)
    c = jnp.arange(NC)
    seq = lay.sequence_ids(cu, c, N)
    start, valid = c == cu[seq], c < cu[-1]

    def step(S, xt):
        q_t, k_t, v_t, a_t, b_t, *g_t = xt
        v2 = jnp.einsum("hk,hkv->hv", a_t, S, precision=_HI)
        if g_t:
            S = jnp.exp(g_t[0])[..., None] * S
        S = S + k_t[..., None] * v_t[:, None] + b_t[..., None] * v2[:, None]
        return S, (scale * jnp.einsum("hk,hkv->hv", q_t, S, precision=_HI), v2)

    def chunk_body(carry, xs):
        S, final = carry
        *xc, seq_c, start_c, valid_c = xs
        S = jnp.where(start_c, h0[seq_c], S)
        S_next, (o, v2) = jax.lax.scan(step, S, tuple(xc))
        final = jnp.where(valid_c, final.at[seq_c].set(S_next), final)
        zero = lambda y: jnp.where(valid_c, y, 0)
        return (jnp.where(valid_c, S_next, S), final), (zero(o), zero(S), zero(v2))

    (_, ht), (o, h, v2) = jax.lax.scan(chunk_body, (h0[0], h0), (*xs, seq, start, valid))
    merge = lambda y: y.reshape(1, L, H, -1)
    return merge(o), ht, h, merge(v2)


def prepare_aligned(inputs, h0, cu_seqlens, chunk_size, acc=jnp.float64):
    """The inputs laid out as `iplr_jax.chunk` lays them out for the kernels, and the aligned
    reference on them: (dims, layout, aligned Inputs, (o, ht, h, v_new), scale)."""
    x = Inputs(*inputs)
    dims = check_inputs(x, initial_state=h0, cu_seqlens=cu_seqlens)
    layout = lay.make_layout(dims, cu_seqlens, chunk_size)
    Kp, Vp = lay.next_pow2(dims.K), lay.next_pow2(dims.V)
    xa = lay.align(x, layout, Kp, Vp)
    h0 = jnp.zeros((dims.N, dims.H, dims.K, dims.V)) if h0 is None else h0
    scale = dims.K**-0.5
    res = aligned_reference(
        xa.map(lambda _, y: y.astype(acc)), lay.pad_state(h0.astype(acc), Kp, Vp), layout.cu_chunks,
        scale=scale, chunk_size=chunk_size,
    )
    return dims, layout, xa, res, scale
