"""`chunk`: IPLR in the chunked parallel form (training, prefill).

Validation and the choice of implementation, then either the jnp chunked form
(`reference.chunk.chunk_xla`, differentiated by autodiff) or a Pallas backend's kernels on the
chunk-aligned layout, tied by the `custom_vjp` below (forward `triton.chunk.chunk_fwd`, backward
`triton.chunk_bwd.chunk_bwd`; docs/architecture.md says where a second backend plugs in).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from iplr_jax import layout as lay
from iplr_jax.inputs import (
    Dims,
    Inputs,
    accum_dtype,
    check_inputs,
    default_scale,
    initial_state_or_zeros,
    resolve_implementation,
    static_scale,
)
from iplr_jax.reference.chunk import chunk_xla
from iplr_jax.triton import chunk as triton_fwd
from iplr_jax.triton import chunk_bwd as triton_bwd
from iplr_jax.triton.config import ChunkConfig, chunk_config


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunk_aligned(x: Inputs, h0, cu_chunks, scale, chunk_size, config, interpret):
    # no gradient taken: the residuals need not be written
    o, ht, _ = triton_fwd.chunk_fwd(
        x, h0, cu_chunks, scale=scale, chunk_size=chunk_size, config=config, interpret=interpret,
        residuals=False,
    )
    return o, ht


def _chunk_aligned_fwd(x, h0, cu_chunks, scale, chunk_size, config, interpret):
    o, ht, res = triton_fwd.chunk_fwd(
        x, h0, cu_chunks, scale=scale, chunk_size=chunk_size, config=config, interpret=interpret
    )
    return (o, ht), (x, res, cu_chunks)


def _chunk_aligned_bwd(scale, chunk_size, config, interpret, saved, cts):
    x, res, cu_chunks = saved
    do, dht = cts
    dx, dh0 = triton_bwd.chunk_bwd(
        x, res, cu_chunks, do, dht, scale=scale, chunk_size=chunk_size, config=config,
        interpret=interpret,
    )
    return dx, dh0, None


_chunk_aligned.defvjp(_chunk_aligned_fwd, _chunk_aligned_bwd)


def _chunk_pallas(x: Inputs, *, scale, h0, cu_seqlens, chunk_size, dims: Dims, config, interpret):
    """Lays the inputs out for the kernels (chunk-aligned sequences, power-of-two heads)."""
    q, scale = static_scale(x.q, scale)
    x = x._replace(q=q)
    layout = lay.make_layout(dims, cu_seqlens, chunk_size)
    Kp, Vp = lay.next_pow2(dims.K), lay.next_pow2(dims.V)
    config = chunk_config(
        config, N=dims.N, H=dims.H, Kp=Kp, Vp=Vp, num_chunks=layout.num_chunks,
        dtype=jnp.result_type(*x), interpret=interpret,
    )
    o, ht = _chunk_aligned(
        lay.align(x, layout, Kp, Vp), lay.pad_state(h0.astype(jnp.float32), Kp, Vp),
        layout.cu_chunks, scale, chunk_size, config, interpret,
    )
    return lay.from_chunks(o, layout)[..., : dims.V], ht[:, :, : dims.K, : dims.V]


def chunk(
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
    chunk_size: int = 64,
    implementation: str | None = None,
    config: ChunkConfig | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """IPLR attention in the chunked parallel form (training, prefill).

    Computes `S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`, the
    convention of fla's `chunk_iplr_delta_rule` (docs/operator.md).

    Args:
      q, k, a, b: [B, T, H, K].
      v: [B, T, H, V].
      scale: output scale, default `K ** -0.5`; a number or a scalar array (may be traced).
      initial_state: [N, H, K, V] state before the first token of each sequence.
      output_final_state: also return the state after each sequence's last token.
      cu_seqlens: int32 [N + 1] offsets of packed sequences in a batch of 1; may be traced.
      chunk_size: 16, 32 or 64.
      implementation: None (fastest available; "xla" for float64 inputs, which the float32
        kernels would round), "pallas", "xla" or "interpret".
      config: block sizes and choices of the Pallas kernels (`iplr_jax.ChunkConfig`; fields
        left None follow the tuned rules); ignored by "xla".

    Returns:
      `o` [B, T, H, V] in v's dtype and the final state [N, H, K, V] float32 (or None).
    """
    x = Inputs(q, k, v, a, b)
    impl = resolve_implementation(implementation, x)
    dims = check_inputs(
        x, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        implementation=impl,
    )
    if config is not None and not isinstance(config, ChunkConfig):
        raise ValueError(f"config must be an iplr_jax.ChunkConfig or None, got {config!r}")
    scale = default_scale(scale, dims.K)
    h0 = initial_state_or_zeros(initial_state, dims, accum_dtype(x))
    if impl == "xla":
        o, final = chunk_xla(x, scale=scale, h0=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size, dims=dims)
    else:
        o, final = _chunk_pallas(
            x, scale=scale, h0=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size, dims=dims,
            config=config, interpret=impl == "interpret",
        )
    return o.astype(v.dtype), (final if output_final_state else None)
