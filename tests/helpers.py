"""Random IPLR inputs drawn the way a layer draws them, and the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import iplr_jax


def make_inputs(rng, B, T, H, K, V, *, dtype=jnp.float32, delta=False, N=None, h0=True):
    """q, k, v, a, b (and an initial state) as numpy float64, then cast to `dtype`.

    IPLR case: |a| = 1, b = -beta a with beta in (0, 2), so every transition is a contraction.
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


def reference(q, k, v, a, b, **kw):
    """The float64 recurrence on the same (rounded) inputs."""
    up = lambda x: None if x is None else jnp.asarray(x, jnp.float64)
    kw = dict(kw)
    kw["initial_state"] = up(kw.get("initial_state"))
    return iplr_jax.naive(*(up(x) for x in (q, k, v, a, b)), **kw)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert np.all(np.isfinite(x)), "non-finite values"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def tol(dtype) -> float:
    """DESIGN.md section 9: bf16/fp16 inputs within 1e-2; float32 (tf32 dots on GPU) 2e-3."""
    return {jnp.float64: 1e-10, jnp.float32: 2e-3}.get(jnp.dtype(dtype).type, 1e-2)


def grads(fn, inputs, h0, *, with_final=True, seed=0):
    """Gradients of a random linear functional of (o, final_state) w.r.t. q, k, v, a, b, h0."""

    def loss(q, k, v, a, b, h0):
        o, ht = fn(q, k, v, a, b, initial_state=h0, output_final_state=with_final)
        acc = jnp.promote_types(o.dtype, jnp.float32)  # float64 for the reference
        # drawn in float32 then cast: the same key gives other numbers when drawn in float64
        r = jax.random.normal(jax.random.PRNGKey(seed), o.shape, jnp.float32).astype(acc)
        out = jnp.sum(o.astype(acc) * r)
        if with_final:
            r2 = jax.random.normal(jax.random.PRNGKey(seed + 1), ht.shape, jnp.float32).astype(acc)
            out = out + jnp.sum(ht.astype(acc) * r2)
        return out

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(*inputs, h0)
