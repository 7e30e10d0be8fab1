"""IPLRLayer: shapes and dtypes, modes, prefill + decode == full forward, gradients, long inputs, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GPU
from flax import nnx
from helpers import tol

from iplr_jax.layer import IPLRLayer

D, H = 32, 2


def _x(T, B=2, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, T, D), dtype)


@pytest.mark.parametrize("mode", ["iplr", "delta", "linear"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(mode, dtype):
    layer = IPLRLayer(D, H, value_dim=24, mode=mode, chunk_size=16, dtype=dtype, rngs=nnx.Rngs(0))
    y = layer(_x(37, dtype=dtype))
    assert y.shape == (2, 37, D)
    assert y.dtype == dtype
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        IPLRLayer(D, H, mode="bogus", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="conv_size must be a non-negative int or None, got -3"):
        IPLRLayer(D, H, conv_size=-3, rngs=nnx.Rngs(0))
    layer = IPLRLayer(D, H, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache"):
        layer(_x(3), decode=True)
    with pytest.raises(ValueError, match="d_model"):
        layer(jnp.zeros((2, 3, D + 1)))


@pytest.mark.parametrize("mode,conv", [("iplr", 4), ("delta", 4), ("iplr", 0), ("linear", 3)])
def test_prefill_then_decode_matches_full_forward(mode, conv):
    T1, T = 21, 40
    layer = IPLRLayer(D, H, mode=mode, conv_size=conv, chunk_size=16, rngs=nnx.Rngs(1))
    x = _x(T, seed=1)
    full = layer(x)
    layer.init_cache(2)
    outs = [layer(x[:, :T1], decode=True)]  # prefill (chunked, from a zero state)
    for t in range(T1, T1 + 5):  # single steps (fused_recurrent)
        outs.append(layer(x[:, t : t + 1], decode=True))
    outs.append(layer(x[:, T1 + 5 :], decode=True))  # a multi-token chunk from the cached state
    got = jnp.concatenate(outs, axis=1)
    err = float(jnp.linalg.norm(got - full) / jnp.linalg.norm(full))
    assert err < (tol(jnp.float32) if GPU else 1e-5), err  # the kernels' tf32 dots on a GPU
    assert layer.state[...].shape == (2, H, D // H, D // H)
    assert layer.state[...].dtype == jnp.float32


@pytest.mark.parametrize("mode", ["iplr", "delta"])
def test_gradients_finite(mode):
    layer = IPLRLayer(D, H, mode=mode, chunk_size=16, rngs=nnx.Rngs(2))
    x = _x(30, seed=2)

    def loss(m):
        return jnp.mean(m(x) ** 2)

    grads = nnx.grad(loss)(layer)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert sum(float(jnp.sum(g * g)) for g in leaves) > 0


@pytest.mark.parametrize("mode", ["iplr", "delta"])
def test_long_large_inputs_stay_bounded(mode):
    """T = 4096 with inputs x 10: the state obeys |S_T| <= sum_t |k_t| |v_t| (spectral norm <= 1)."""
    T = 4096
    layer = IPLRLayer(D, H, mode=mode, chunk_size=64, rngs=nnx.Rngs(3))
    x = 10 * _x(T, B=1, seed=3)
    layer.init_cache(1)
    y = layer(x, decode=True)
    assert np.all(np.isfinite(np.asarray(y)))
    (_, k, v, _, _), _ = layer.features(x)
    S = np.asarray(layer.state[...], np.float64)
    bound = np.sum(
        np.linalg.norm(np.asarray(k, np.float64), axis=-1)
        * np.linalg.norm(np.asarray(v, np.float64), axis=-1),
        axis=1,
    )
    norms = np.linalg.norm(S, axis=(-2, -1))  # [B, H]
    assert np.all(norms <= bound * (1 + 1e-4) + 1e-3), (norms, bound)
    # the output is RMS-normalised per head before the output projection: bounded by the weights
    w = np.abs(np.asarray(layer.o_proj.kernel[...])).sum(0).max()
    g = np.asarray(jax.nn.silu(layer.g_proj(x)))
    assert float(np.abs(np.asarray(y)).max()) <= w * max(1.0, float(np.abs(g).max())) * np.sqrt(D // H) * 1.01


def test_quick_demo_beats_chance():
    """What `iplr-jax demo --quick` trains: the IPLR model must land well above chance."""
    from iplr_jax.demo import QUICK_BATCH, QUICK_LAYERS, QUICK_STEPS, QUICK_TASK, RecallTask, train

    task = RecallTask(**QUICK_TASK)
    r = train("iplr", steps=QUICK_STEPS, seed=0, task=task, batch_size=QUICK_BATCH, num_layers=QUICK_LAYERS,
              eval_batches=2, progress=False)
    assert np.isfinite(r.losses[-1])
    assert r.losses[-1] < r.losses[0]
    assert r.eval_accuracy > 3 / task.num_values, r.eval_accuracy  # chance is 1 / 16; the demo gets ~90%
