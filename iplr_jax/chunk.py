"""Chunked IPLR: the public `chunk` op (training and prefill) and its Pallas kernels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from iplr_jax._common import (
    accum_dtype,
    check_inputs,
    default_scale,
    from_chunks,
    make_layout,
    next_pow2,
    pad_last,
    resolve_implementation,
    to_chunks,
)
from iplr_jax.chunk_xla import chunk_xla

# -- forward kernels ---------------------------------------------------------------------------


def chunk_fwd(q, k, v, a, b, h0, cu_chunks, *, scale, chunk_size, interpret):
    """Forward of the chunked form on the aligned layout, through Pallas kernels.

    Args:
      q, k, a, b: [1, L, H, Kp] (input dtype), L = NC * chunk_size, Kp a power of two >= 16.
      v: [1, L, H, Vp]; Vp a power of two >= 16.
      h0: [N, H, Kp, Vp] float32.
      cu_chunks: int32 [N + 1]; sequence n owns chunks cu_chunks[n] .. cu_chunks[n+1]-1 (may be
        traced). Chunks at or past cu_chunks[-1] are zero padding.

    Returns:
      o [1, L, H, Vp] (v's dtype), ht [N, H, Kp, Vp] float32, and the residuals the backward
      needs: h [NC, H, Kp, Vp] (the state before each chunk; float32 or the input dtype) and
      v_new [1, L, H, Vp] float32 (V2[t] = a_t^T S_{t-1}).
    """
    raise NotImplementedError("the Pallas chunk forward kernels are not built yet")


# -- custom_vjp: forward kernels here, backward kernels in chunk_bwd.py --------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _chunk_aligned(q, k, v, a, b, h0, cu_chunks, scale, chunk_size, interpret):
    o, ht, _, _ = chunk_fwd(
        q, k, v, a, b, h0, cu_chunks, scale=scale, chunk_size=chunk_size, interpret=interpret
    )
    return o, ht


def _chunk_aligned_fwd(q, k, v, a, b, h0, cu_chunks, scale, chunk_size, interpret):
    o, ht, h, v_new = chunk_fwd(
        q, k, v, a, b, h0, cu_chunks, scale=scale, chunk_size=chunk_size, interpret=interpret
    )
    return (o, ht), (q, k, v, a, b, h, v_new, cu_chunks)


def _chunk_aligned_bwd(scale, chunk_size, interpret, res, cts):
    from iplr_jax.chunk_bwd import chunk_bwd

    q, k, v, a, b, h, v_new, cu_chunks = res
    do, dht = cts
    dq, dk, dv, da, db, dh0 = chunk_bwd(
        q, k, v, a, b, h, v_new, cu_chunks, do, dht,
        scale=scale, chunk_size=chunk_size, interpret=interpret,
    )
    return dq, dk, dv, da, db, dh0, None


_chunk_aligned.defvjp(_chunk_aligned_fwd, _chunk_aligned_bwd)


def _chunk_pallas(q, k, v, a, b, *, scale, h0, cu_seqlens, chunk_size, dims, interpret):
    """Lays the inputs out for the kernels (chunk-aligned sequences, power-of-two heads)."""
    layout = make_layout(dims, cu_seqlens, chunk_size)
    Kp, Vp = next_pow2(dims.K), next_pow2(dims.V)
    qa, ka, aa, ba = (pad_last(to_chunks(x, layout), Kp) for x in (q, k, a, b))
    va = pad_last(to_chunks(v, layout), Vp)
    h0p = jnp.pad(h0.astype(jnp.float32), ((0, 0), (0, 0), (0, Kp - dims.K), (0, Vp - dims.V)))
    o, ht = _chunk_aligned(
        qa, ka, va, aa, ba, h0p, layout.cu_chunks, float(scale), chunk_size, interpret
    )
    return from_chunks(o, layout)[..., : dims.V], ht[:, :, : dims.K, : dims.V]


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
        o, final = _chunk_pallas(
            q, k, v, a, b, scale=scale, h0=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
            dims=dims, interpret=impl == "interpret",
        )
    return o.astype(v.dtype), (final if output_final_state else None)
