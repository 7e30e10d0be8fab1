"""Where tokens sit: sequence ids of packed inputs, the chunk-aligned layout, head padding.

Every chunked path works on a layout where no chunk straddles two sequences: each sequence
starts on a chunk boundary and its last chunk is zero-padded. Zero rows are harmless: with
a = b = k = v = 0 a step leaves the state as it was, so the state after a sequence's last
chunk is its final state (docs/numerics.md).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from iplr_jax.inputs import Dims, Inputs


def sequence_ids(offsets: jax.Array, positions: jax.Array, num_sequences: int) -> jax.Array:
    """Index n of the sequence owning each position, for offsets [N + 1] (sequence n owns
    offsets[n] .. offsets[n + 1] - 1). Positions past the end map to the last sequence."""
    return jnp.clip(jnp.searchsorted(offsets[1:], positions, side="right"), 0, num_sequences - 1)


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def pad_last(x: jax.Array, size: int) -> jax.Array:
    """Zero-pads the last axis to `size` (kernels want power-of-two head blocks)."""
    d = x.shape[-1]
    if d == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - d)])


def pad_state(h: jax.Array, Kp: int, Vp: int) -> jax.Array:
    """[N, H, K, V] -> [N, H, Kp, Vp], zero-padded."""
    K, V = h.shape[-2:]
    if (K, V) == (Kp, Vp):
        return h
    return jnp.pad(h, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))


class ChunkLayout(NamedTuple):
    """Where each token sits in the chunk-aligned layout of one flattened row.

    cu_chunks:  int32 [N + 1], sequence n owns chunks cu_chunks[n] .. cu_chunks[n+1]-1.
    src:        int32 [NC * C], token index (into the flattened [B*T] tokens) of each padded
                slot, or -1 for padding.  None when the layout is a plain reshape+pad.
    dst:        int32 [B*T], slot of each token in the padded layout.  None likewise.
    num_chunks: static NC, an upper bound on cu_chunks[-1] for packed inputs.
    """

    cu_chunks: jax.Array
    src: jax.Array | None
    dst: jax.Array | None
    num_chunks: int
    chunk_size: int
    B: int
    T: int


def make_layout(dims: Dims, cu_seqlens, chunk_size: int) -> ChunkLayout:
    C = chunk_size
    if cu_seqlens is None:
        nt = -(-dims.T // C)
        cu_chunks = jnp.arange(dims.B + 1, dtype=jnp.int32) * nt
        return ChunkLayout(cu_chunks, None, None, dims.B * nt, C, dims.B, dims.T)
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    N, T = dims.N, dims.T
    lens = cu[1:] - cu[:-1]
    cu_chunks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum((lens + C - 1) // C)])
    cu_chunks = cu_chunks.astype(jnp.int32)
    # sum_n ceil(l_n / C) <= (T + N (C - 1)) / C
    nc = max(1, (T + N * (C - 1)) // C)
    slot = jnp.arange(nc * C, dtype=jnp.int32)
    seq = sequence_ids(cu_chunks, slot // C, N)
    src = cu[seq] + slot - cu_chunks[seq] * C
    src = jnp.where((src < cu[seq + 1]) & (slot < cu_chunks[-1] * C), src, -1)
    tok = jnp.arange(T, dtype=jnp.int32)
    tseq = sequence_ids(cu, tok, N)
    dst = cu_chunks[tseq] * C + tok - cu[tseq]
    return ChunkLayout(cu_chunks, src, dst, nc, C, 1, T)


def to_chunks(x: jax.Array, layout: ChunkLayout) -> jax.Array:
    """[B, T, H, D] -> [1, NC * C, H, D] in the chunk-aligned layout (padding is zero)."""
    B, T, H, D = x.shape
    C = layout.chunk_size
    if layout.src is None:
        pad = layout.num_chunks // B * C - T
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(1, -1, H, D)
    g = jnp.take(x[0], jnp.maximum(layout.src, 0), axis=0)
    return jnp.where((layout.src >= 0)[:, None, None], g, 0)[None]


def from_chunks(y: jax.Array, layout: ChunkLayout) -> jax.Array:
    """Inverse of `to_chunks`: [1, NC * C, H, D] -> [B, T, H, D]."""
    H, D = y.shape[2:]
    if layout.src is None:
        return y.reshape(layout.B, -1, H, D)[:, : layout.T]
    return jnp.take(y[0], layout.dst, axis=0)[None]


def align(x: Inputs, layout: ChunkLayout, Kp: int, Vp: int) -> Inputs:
    """The inputs on the chunk-aligned layout, heads zero-padded: [1, NC * C, H, Kp or Vp]."""
    return x.map(lambda name, y: pad_last(to_chunks(y, layout), Vp if name == "v" else Kp))
