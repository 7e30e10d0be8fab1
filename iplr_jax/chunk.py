"""Chunked IPLR: the public `chunk` op (training and prefill) and its Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iplr_jax._common import accum_dtype, check_inputs, default_scale, resolve_implementation
from iplr_jax.chunk_xla import chunk_xla


def chunk(
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
    chunk_size: int = 64,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """IPLR attention in the chunked parallel form (training, prefill).

    Computes `S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`, the
    convention of fla's `chunk_iplr_delta_rule`.

    Args:
      q, k, a, b: [B, T, H, K].
      v: [B, T, H, V].
      scale: output scale, default `K ** -0.5`.
      initial_state: [N, H, K, V] state before the first token of each sequence.
      output_final_state: also return the state after each sequence's last token.
      cu_seqlens: int32 [N + 1] offsets of packed sequences in a batch of 1; may be traced.
      chunk_size: 16, 32 or 64.
      implementation: None (fastest available), "pallas", "xla" or "interpret".

    Returns:
      `o` [B, T, H, V] in v's dtype and the final state [N, H, K, V] float32 (or None).
    """
    impl = resolve_implementation(implementation)
    dims = check_inputs(
        q, k, v, a, b, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
        chunk_size=chunk_size, implementation=impl,
    )
    acc = accum_dtype(q, k, v, a, b)
    scale = default_scale(scale, dims.K)
    h0 = (
        jnp.zeros((dims.N, dims.H, dims.K, dims.V), acc)
        if initial_state is None
        else jnp.asarray(initial_state, acc)
    )
    if impl == "xla":
        o, final = chunk_xla(
            q, k, v, a, b, scale=scale, h0=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
            dims=dims,
        )
    else:
        raise NotImplementedError(
            f'chunk(implementation="{impl}"): the Pallas chunk kernels are not built yet; '
            'use implementation="xla"'
        )
    return o.astype(v.dtype), (final if output_final_state else None)
