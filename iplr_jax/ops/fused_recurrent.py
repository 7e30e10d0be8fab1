"""`fused_recurrent`: IPLR step by step (decoding, small memory).

Validation and the choice of implementation, then either the `lax.scan` recurrence
(`reference.naive`, differentiated by autodiff) or a Pallas backend's kernels, tied by the
`custom_vjp` below (`triton.fused_recurrent.fused_fwd` / `fused_bwd`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from iplr_jax import layout as lay
from iplr_jax.inputs import Dims, Inputs, check_inputs, default_scale, resolve_implementation, static_scale
from iplr_jax.reference.naive import naive
from iplr_jax.triton import fused_recurrent as triton_fused
from iplr_jax.triton.config import FusedRecurrentConfig, fused_recurrent_config


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(x: Inputs, h0, cu, scale, config, interpret):
    return tuple(triton_fused.fused_fwd(
        x, h0, cu, scale=scale, config=config, interpret=interpret, residuals=False
    ))


def _fused_fwd(x, h0, cu, scale, config, interpret):
    o, ht, v2 = triton_fused.fused_fwd(
        x, h0, cu, scale=scale, config=config, interpret=interpret, residuals=True
    )
    return (o, ht), (x, h0, cu, v2)


def _fused_bwd(scale, config, interpret, saved, cts):
    x, h0, cu, v2 = saved
    do, dht = cts
    dx, dh0 = triton_fused.fused_bwd(
        x, h0, cu, v2, do, dht, scale=scale, config=config, interpret=interpret
    )
    return dx, dh0, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _fused_recurrent_pallas(x: Inputs, *, scale, initial_state, cu_seqlens, dims: Dims, config, interpret):
    """Packs [B, T] into one row of sequences (a free reshape) and pads heads to powers of two;
    with K, V already powers of two >= 16 and a float32 state nothing is copied."""
    B, T, H, K, V, N = dims
    Kp, Vp = lay.next_pow2(K), lay.next_pow2(V)
    q, scale = static_scale(x.q, scale)
    x = x._replace(q=q)
    if cu_seqlens is None:
        cu = jnp.arange(B + 1, dtype=jnp.int32) * T
    else:
        cu = jnp.asarray(cu_seqlens, jnp.int32)
    xp = x.map(lambda name, y: lay.pad_last(y.reshape(B * T, H, -1), Vp if name == "v" else Kp))
    if initial_state is None:
        h0 = jnp.zeros((N, H, Kp, Vp), jnp.float32)
    else:
        h0 = lay.pad_state(jnp.asarray(initial_state, jnp.float32), Kp, Vp)
    config = fused_recurrent_config(config, pairs=N * H, Kp=Kp, Vp=Vp)
    o, ht = _fused(xp, h0, cu, scale, config, interpret)
    if Vp != V:
        o = o[..., :V]
    if (Kp, Vp) != (K, V):
        ht = ht[:, :, :K, :V]
    return o.reshape(B, T, H, V), ht


def fused_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    scale: float | jax.Array | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | None = None,
    implementation: str | None = None,
    config: FusedRecurrentConfig | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """IPLR attention step by step (decoding; any T, state kept in float32).

    Same arguments and results as `iplr_jax.chunk` (without `chunk_size`); the convention
    of fla's `fused_recurrent_iplr_delta_rule` (docs/operator.md).

    Args:
      q, k, a, b: [B, T, H, K].
      v: [B, T, H, V].
      scale: output scale, default `K ** -0.5`; a number or a scalar array (may be traced).
      initial_state: [N, H, K, V].
      output_final_state: also return the state after each sequence's last token.
      cu_seqlens: int32 [N + 1] offsets of packed sequences in a batch of 1; may be traced.
      implementation: None (fastest available; "xla" for float64 inputs, which the float32
        kernels would round), "pallas", "xla" or "interpret".
      config: block sizes of the Pallas kernels (`iplr_jax.FusedRecurrentConfig`; fields left
        None follow the tuned rules); ignored by "xla".

    Returns:
      `o` [B, T, H, V] in v's dtype and the final state [N, H, K, V] float32 (or None).
    """
    x = Inputs(q, k, v, a, b)
    impl = resolve_implementation(implementation, x)
    dims = check_inputs(
        x, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, implementation=impl
    )
    if config is not None and not isinstance(config, FusedRecurrentConfig):
        raise ValueError(f"config must be an iplr_jax.FusedRecurrentConfig or None, got {config!r}")
    if impl == "xla":
        return naive(
            q, k, v, a, b, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    o, ht = _fused_recurrent_pallas(
        x, scale=default_scale(scale, dims.K), initial_state=initial_state, cu_seqlens=cu_seqlens,
        dims=dims, config=config, interpret=impl == "interpret",
    )
    return o, (ht if output_final_state else None)
