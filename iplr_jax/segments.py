"""Segments: each sequence's chunks cut into runs that the state sweeps walk in parallel.

A sequential sweep over chunks has one dependent chain per (sequence, head, V-block); a long
sequence at small batch leaves most of the GPU idle (docs/chunked.md "Segments inside one
GPU"). Cutting every sequence into segments of at most `segment_chunks` chunks gives each
segment its own chain. A segment is affine in the state it starts from,
`S_end = M S_start + h` (docs/chunked.md "Segments and context parallelism"), so:

  1. a summary sweep gives every segment's `[h | M]` from a zero start (the state kernel run
     with K extra identity columns that read no values; `chunk._state_pass(summary=True)`);
  2. `entering_states` folds them, left to right within each sequence, into the state
     entering every segment (a fold of affine maps: a loop over a few segments, a log-depth
     scan over many);
  3. the ordinary sweep runs every segment from its entering state, writing the same
     residuals as an unsplit sweep.

The backward mirrors it with `[g | M^T]` (`exiting_cotangents`). The folds run on [NS, H, Kp,
*] states, float32 at HIGHEST precision (M need not shrink).

Under context parallelism the slice's own summary is the composition of its segments'
(`sequence_summaries`), so there the segments cost no extra pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from iplr_jax.layout import sequence_ids

_HI = jax.lax.Precision.HIGHEST


class Segments(NamedTuple):
    """Segments refining the sequences' chunk ranges (NS a static bound; some may be empty).

    cu: int32 [NS + 1] chunk offsets; every sequence boundary is among them.
    seq: int32 [NS] the sequence owning each segment's first chunk.
    starts: bool [NS] the segment starts its sequence (enters from `h0`).
    first: int32 [N] the segment holding each sequence's first chunk.
    last: int32 [N] the segment holding each sequence's last chunk.
    empty: bool [N] the sequence has no chunk (its final state is h0, its dh0 dht).
    """

    cu: jax.Array
    seq: jax.Array
    starts: jax.Array
    first: jax.Array
    last: jax.Array
    empty: jax.Array


def split(cu_chunks: jax.Array, num_chunks: int, segment_chunks: int) -> Segments:
    """Cuts at every sequence boundary and every multiple of `segment_chunks` (chunk offsets
    [N + 1], possibly traced; `num_chunks` the static bound on cu_chunks[-1])."""
    cu_chunks = jnp.asarray(cu_chunks, jnp.int32)
    N = cu_chunks.shape[0] - 1
    cuts = jnp.arange(1, num_chunks // segment_chunks + 1, dtype=jnp.int32) * segment_chunks
    cu = jnp.sort(jnp.concatenate([cu_chunks, jnp.minimum(cuts, cu_chunks[-1])]))
    seq = sequence_ids(cu_chunks, cu[:-1], N)
    starts = cu_chunks[seq] == cu[:-1]
    # the last of equal offsets opens the non-empty segment; the first closes the one before
    first = jnp.searchsorted(cu, cu_chunks[:-1], side="right").astype(jnp.int32) - 1
    last = jnp.searchsorted(cu, cu_chunks[1:], side="left").astype(jnp.int32) - 1
    empty = cu_chunks[1:] == cu_chunks[:-1]
    ns = cu.shape[0] - 1
    return Segments(cu, seq, starts, jnp.clip(first, 0, ns - 1), jnp.clip(last, 0, ns - 1), empty)


def _mm(x, y):
    return jnp.einsum("...hij,...hjw->...hiw", x, y, precision=_HI)


def _compose(e1, e2):
    """(m2, c2) o (m1, c1) = (m2 m1, m2 c1 + c2), batched over segments and heads."""
    (m1, c1), (m2, c2) = e1, e2
    return _mm(m2, m1), _mm(m2, c1) + c2


# Up to this many segments the prefix is a plain loop, one small product per segment: the
# log-depth scan launches several times as many slices, products and concatenations, each a
# separate small kernel on the GPU (benchmarks/NOTES.md, session 16).
SEQUENTIAL_PREFIX = 16


def _affine_prefix(m: jax.Array, c: jax.Array) -> jax.Array:
    """x_s = m_s x_{s-1} + c_s with m_0 = 0: the c part of the inclusive scan of the maps
    (m_s, c_s). [NS, H, K, K], [NS, H, K, W]."""
    if m.shape[0] > SEQUENTIAL_PREFIX:
        return jax.lax.associative_scan(_compose, (m, c))[1]
    xs = [c[0]]
    for s in range(1, m.shape[0]):
        xs.append(_mm(m[s], xs[-1]) + c[s])
    return jnp.stack(xs)


def entering_states(summary: jax.Array, segs: Segments, h0: jax.Array) -> jax.Array:
    """The state entering every segment, [NS, H, Kp, Vp] float32, from the summary sweep's
    [h | M] ([NS, H, Kp, Vp + Kp]) and the sequences' initial states h0 [N, H, Kp, Vp]."""
    Vp = h0.shape[-1]
    h, m = summary[..., :Vp], summary[..., Vp:]
    shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]])  # noqa: E731
    start = segs.starts[:, None, None, None]
    # segment s enters from h0 if it starts its sequence, else from segment s - 1's end
    return _affine_prefix(jnp.where(start, 0, shift(m)), jnp.where(start, h0[segs.seq], shift(h)))


def exiting_cotangents(summary: jax.Array, segs: Segments, dht: jax.Array) -> jax.Array:
    """The cotangent of the state leaving every segment, [NS, H, Kp, Vp] float32, from the
    backward summary sweep's [g | M^T] at each segment's start ([NS, H, Kp, Vp + Kp]) and the
    sequences' final-state cotangents dht [N, H, Kp, Vp]. Right to left: the same scan on the
    reversed segments."""
    Vp = dht.shape[-1]
    g, mt = summary[..., :Vp], summary[..., Vp:]
    nxt = lambda x: jnp.concatenate([x[1:], jnp.zeros_like(x[:1])])  # noqa: E731
    # segment s ends its sequence (its exit cotangent is dht) when s + 1 starts one
    ends = jnp.concatenate([segs.starts[1:], jnp.ones((1,), bool)])[:, None, None, None]
    rev = lambda x: x[::-1]  # noqa: E731
    m = rev(jnp.where(ends, 0, nxt(mt)))
    c = rev(jnp.where(ends, dht[segs.seq], nxt(g)))
    return rev(_affine_prefix(m, c))


def per_sequence(per_segment: jax.Array, index: jax.Array, empty: jax.Array, fallback: jax.Array):
    """[N, ...]: `per_segment[index[n]]`, or `fallback[n]` for an empty sequence."""
    return jnp.where(empty[:, None, None, None], fallback, per_segment[index])


# -- context parallelism: a slice's summary from its segments' ---------------------------------
# Under context parallelism the slice's [h | M] must be computed anyway; taking it from the
# segment summaries (composed here by the same scan as the folds) makes the segmented sweeps
# free of any extra pass (docs/chunked.md "Segments under context parallelism").


def sequence_summaries(summary: jax.Array, segs: Segments, cu_chunks: jax.Array, *, reverse=False):
    """Every sequence's [h | M] ([N, H, Kp, W + Kp], float32) from its segments' summaries
    ([NS, H, Kp, W + Kp]), composed in time order; `reverse`: the backward's [g | M^T], the last
    segment's map applied first. An empty sequence gives [0 | I] (as an empty segment does)."""
    W = summary.shape[-1] - summary.shape[-2]
    NS = summary.shape[0]
    # segments refine the sequences: sequence n owns segments cu[n] .. cu[n + 1] - 1 (empty
    # segments among them are identities)
    cu = jnp.searchsorted(segs.cu[:-1], jnp.asarray(cu_chunks, jnp.int32), side="left").astype(jnp.int32)
    begins = cu[1:] - 1 if reverse else cu[:-1]
    begins = jnp.where((begins < 0) | (cu[1:] == cu[:-1]), NS, begins)  # dropped, not wrapped
    fresh = jnp.zeros(NS, bool).at[begins].set(True, mode="drop")[:, None, None, None]
    flip = (lambda x: x[::-1]) if reverse else (lambda x: x)  # noqa: E731
    summary, fresh = flip(summary), flip(fresh)
    m = summary[..., W:]
    # [h | M] composed since the sequence's first segment: x_s = M_s x_{s-1} + [h_s | 0], a
    # sequence's first segment restarting from [h_s | M_s]
    c = jnp.concatenate([summary[..., :W], jnp.where(fresh, m, 0)], -1)
    total = flip(_affine_prefix(jnp.where(fresh, 0, m), c))
    ends = jnp.clip(cu[:-1] if reverse else cu[1:] - 1, 0, NS - 1)
    empty = (cu[1:] == cu[:-1])[:, None, None, None]
    eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m[:1].shape)
    identity = jnp.concatenate([jnp.zeros_like(summary[:1, ..., :W]), eye], -1)
    return jnp.where(empty, identity, total[ends])
