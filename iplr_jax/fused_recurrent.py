"""Fused IPLR recurrence: the public `fused_recurrent` op (decoding, small memory) and its kernels."""

from __future__ import annotations

import jax

from iplr_jax._common import check_inputs, resolve_implementation
from iplr_jax.naive import naive


def fused_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """IPLR attention step by step (decoding; any T, state kept in float32).

    Same arguments and results as `iplr_jax.chunk` (without `chunk_size`); the convention
    of fla's `fused_recurrent_iplr_delta_rule`.

    Args:
      q, k, a, b: [B, T, H, K].
      v: [B, T, H, V].
      initial_state: [N, H, K, V].
      cu_seqlens: int32 [N + 1] offsets of packed sequences in a batch of 1; may be traced.
      implementation: None (fastest available), "pallas", "xla" or "interpret".

    Returns:
      `o` [B, T, H, V] in v's dtype and the final state [N, H, K, V] float32 (or None).
    """
    impl = resolve_implementation(implementation)
    check_inputs(
        q, k, v, a, b, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
        implementation=impl,
    )
    if impl == "xla":
        return naive(
            q, k, v, a, b, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    raise NotImplementedError(
        f'fused_recurrent(implementation="{impl}"): the Pallas kernels are not built yet; '
        'use implementation="xla"'
    )
