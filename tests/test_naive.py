"""The oracle itself: float32 naive against float64 naive, and packed sequences against each alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_inputs, reference, rel_err

import iplr_jax


@pytest.mark.parametrize("delta", [False, True])
def test_float32_matches_float64(rng, delta):
    (q, k, v, a, b), h0 = make_inputs(rng, 2, 37, 2, 12, 9, delta=delta)
    o, ht = iplr_jax.naive(q, k, v, a, b, initial_state=h0, output_final_state=True)
    o64, ht64 = reference(q, k, v, a, b, initial_state=h0, output_final_state=True)
    assert o.dtype == jnp.float32 and ht.dtype == jnp.float32 and o64.dtype == jnp.float64
    assert rel_err(o, o64) < 1e-5 and rel_err(ht, ht64) < 1e-5


def test_recurrence_by_hand(rng):
    """Two explicit steps of S_t = (I + b a^T) S + k v^T, written with numpy matrices."""
    (q, k, v, a, b), h0 = make_inputs(rng, 1, 2, 1, 5, 3, dtype=jnp.float64)
    S = np.asarray(h0[0, 0], np.float64)
    outs = []
    for t in range(2):
        at, bt, kt, vt, qt = (np.asarray(x[0, t, 0]) for x in (a, b, k, v, q))
        S = (np.eye(5) + np.outer(bt, at)) @ S + np.outer(kt, vt)
        outs.append(5**-0.5 * S.T @ qt)
    o, ht = iplr_jax.naive(q, k, v, a, b, initial_state=h0.astype(jnp.float64), output_final_state=True)
    np.testing.assert_allclose(np.asarray(o[0, :, 0]), np.stack(outs), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ht[0, 0]), S, rtol=1e-12, atol=1e-12)


def test_packed_equals_each_alone(rng):
    cu = np.array([0, 5, 5, 23, 40], np.int32)  # includes an empty sequence
    (q, k, v, a, b), h0 = make_inputs(rng, 1, 40, 2, 8, 6, dtype=jnp.float64, N=4)
    f = jax.jit(lambda cu: iplr_jax.naive(q, k, v, a, b, initial_state=h0, output_final_state=True,
                                           cu_seqlens=cu))
    o, ht = f(jnp.asarray(cu))
    for n in range(4):
        s, e = cu[n], cu[n + 1]
        if s == e:
            np.testing.assert_array_equal(ht[n], h0[n])
            continue
        o1, h1 = iplr_jax.naive(*(x[:, s:e] for x in (q, k, v, a, b)), initial_state=h0[n : n + 1],
                                output_final_state=True)
        np.testing.assert_allclose(o[:, s:e], o1, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ht[n], h1[0], rtol=1e-12, atol=1e-12)


def test_bfloat16_output_dtype(rng):
    (q, k, v, a, b), _ = make_inputs(rng, 1, 9, 1, 8, 4, dtype=jnp.bfloat16)
    o, ht = iplr_jax.naive(q, k, v, a, b, output_final_state=True)
    assert o.dtype == jnp.bfloat16 and ht.dtype == jnp.float32
    o64, _ = reference(q, k, v, a, b)
    assert rel_err(o, o64) < 1e-2
