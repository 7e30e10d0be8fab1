"""The recurrence, step by step with `jax.lax.scan`: the oracle every fast path is checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iplr_jax.inputs import (
    Inputs,
    accum_dtype,
    check_inputs,
    default_scale,
    guard_nonfinite,
    initial_state_or_zeros,
    malformed_offsets,
    poison,
)
from iplr_jax.layout import sequence_ids
from iplr_jax.sharding import like_inputs

_HI = jax.lax.Precision.HIGHEST


def _step(S, q_t, k_t, v_t, a_t, b_t, *gk_t, scale):
    """One step for state S [..., K, V] and per-step vectors [..., K] / [..., V]; with a gate
    gk_t [..., K] the K rows of the previous state decay by exp(gk_t), while a_t reads the
    undecayed S_{t-1} (fla's convention, docs/gate.md)."""
    aS = jnp.einsum("...k,...kv->...v", a_t, S, precision=_HI)
    if gk_t:
        S = jnp.exp(gk_t[0])[..., :, None] * S
    S = S + k_t[..., :, None] * v_t[..., None, :] + b_t[..., :, None] * aS[..., None, :]
    o_t = scale * jnp.einsum("...k,...kv->...v", q_t, S, precision=_HI)
    return S, o_t


def naive(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    gk: jax.Array | None = None,
    *,
    scale: float | jax.Array | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Reference IPLR recurrence: `S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T`, `o_t = scale S_t^T q_t`,
    or with a gate the DPLR recurrence `S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T`
    (fla's `dplr_recurrence` convention: a_t reads the undecayed S_{t-1}; docs/gate.md).

    Args:
      q, k, a, b: [B, T, H, K].
      v: [B, T, H, V].
      gk: optional log-decay [B, T, H, K] (<= 0 for a decay); None: IPLR.
      scale: output scale, default `K ** -0.5`.
      initial_state: [N, H, K, V], N = B (or the number of packed sequences).
      output_final_state: also return the state after the last token of each sequence.
      cu_seqlens: int [N + 1] offsets of packed sequences in a batch of 1 (may be traced).

    Returns:
      `o` [B, T, H, V] in v's dtype, and the final state [N, H, K, V] (float32, float64 for
      float64 inputs) or None. A NaN / inf input makes o NaN from its token on, never before
      (docs/numerics.md "Non-finite inputs").
    """
    x = Inputs(q, k, v, a, b, gk)
    dims = check_inputs(x, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
    B, T, H, K, V, N = dims
    bad, cu_seqlens = malformed_offsets(cu_seqlens, T)
    # even the scan's autodiff would send 0 * NaN to earlier tokens: select (docs/numerics.md)
    x, nonfinite = guard_nonfinite(x, cu_seqlens, dims)
    acc = accum_dtype(x)
    scale = default_scale(scale, K)
    # inside shard_map the scan carry must vary over the mesh axes like the inputs it meets
    h0 = like_inputs(initial_state_or_zeros(initial_state, dims, acc), *x.arrays(), scale)
    # time-major [T, B, H, D]
    xs = tuple(jnp.moveaxis(jnp.asarray(y, acc), 1, 0) for y in x.arrays())

    if cu_seqlens is None:
        def body(S, xt):
            return _step(S, *xt, scale=scale)

        S, o = jax.lax.scan(body, h0, xs)
        final = S
    else:
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        t = jnp.arange(T)
        seq = sequence_ids(cu, t, N)
        start = t == cu[seq]

        def body(carry, x):
            S, final = carry
            seq_t, start_t, xt = x
            S = jnp.where(start_t, h0[seq_t], S)
            S, o_t = _step(S, *(y[0] for y in xt), scale=scale)
            # the last write for each sequence is its final state; empty sequences keep h0
            return (S, final.at[seq_t].set(S)), o_t[None]

        (_, final), o = jax.lax.scan(body, (h0[0], h0), (seq, start, xs))
    o = jnp.moveaxis(o, 0, 1).astype(v.dtype)
    o, final = poison(bad, *nonfinite.poison(o, final))
    return o, (final if output_final_state else None)
