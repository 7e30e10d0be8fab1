"""Segments: each sequence's chunks cut into runs that the state sweeps walk in parallel.

A sequential sweep over chunks has one dependent chain per (sequence, head, V-block); a long
sequence at small batch leaves most of the GPU idle (docs/chunked.md "Segments inside one
GPU"). Cutting every sequence into segments of at most `segment_chunks` chunks gives each
segment its own chain. A segment is affine in the state it starts from,
`S_end = M S_start + h` (docs/chunked.md "Segments and context parallelism"), so:

  1. a summary sweep gives every segment's `[h | M]` from a zero start (the state kernel run
     with K extra identity columns that read no values; `chunk._state_pass(summary=True)`);
  2. `entering_states` folds them, left to right within each sequence, into the state
     entering every segment (a log-depth scan of affine maps over the segments);
  3. the ordinary sweep runs every segment from its entering state, writing the same
     residuals as an unsplit sweep.

The backward mirrors it with `[g | M^T]` (`exiting_cotangents`). The folds run on [NS, H, Kp,
*] states, float32 at HIGHEST precision (M need not shrink).

The same summaries by products instead of a sweep (`forward_summary`, `backward_summary`:
every chunk's map from the WY pass's operands, composed per sequence; docs/chunked.md
"Summaries by products") serve context parallelism with `ChunkConfig(summary="products")`.
"""

from __future__ import annotations

import functools
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


def _affine_prefix(m: jax.Array, c: jax.Array) -> jax.Array:
    """x_s = m_s x_{s-1} + c_s with m_0 = 0: the c part of the inclusive scan of the maps
    (m_s, c_s), composed as (m2, c2) o (m1, c1) = (m2 m1, m2 c1 + c2). [NS, H, K, K], [NS, H, K, W]."""

    def compose(e1, e2):
        (m1, c1), (m2, c2) = e1, e2
        mm = lambda x, y: jnp.einsum("shij,shjw->shiw", x, y, precision=_HI)  # noqa: E731
        return mm(m2, m1), mm(m2, c1) + c2

    return jax.lax.associative_scan(compose, (m, c))[1]


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


# -- summaries by products ---------------------------------------------------------------------
# The summary [h | M] of a run of chunks without a sweep (docs/chunked.md "Summaries by
# products"): every chunk's own affine map from the WY pass's operands, all chunks in parallel,
# then composed within each sequence, by a tree for equal rows of chunks (unpacked inputs) and
# by a segmented scan otherwise. Matrix products only, no dependent chain: [K, K] maps cost
# about 2 K^3 + 2 K^2 V per chunk against the sweep's K extra state columns walked in order.


def _mm(x, y, precision):
    return jnp.einsum("...ij,...jw->...iw", x, y, precision=precision, preferred_element_type=jnp.float32)


def _then(first, then, precision):
    """The map of `first` followed by `then`: (M, h) -> (Mt Mf, Mt hf + ht)."""
    (mf, hf), (mt, ht) = first, then
    return _mm(mt, mf, precision), _mm(mt, hf, precision) + ht


def _per_chunk(x, chunk_size):
    """[1, L, H, D] -> [NC, C, H, D]."""
    return x.reshape(-1, chunk_size, *x.shape[2:])


def _with_identity(m):
    return m + jnp.eye(m.shape[-1], dtype=m.dtype)


def forward_maps(w, u, k, b, v, *, chunk_size, precision=None):
    """Each chunk's map S_C = (I + B^T W) S0 + (K^T Vc + B^T U) (docs/chunked.md), from the
    aligned WY outputs w, u and inputs k, b [1, L, H, Kp], v [1, L, H, Vp]: (M [NC, H, Kp, Kp],
    h [NC, H, Kp, Vp]) float32."""
    w, u, k, b, v = (_per_chunk(x, chunk_size) for x in (w, u, k, b, v))
    tn = lambda x, y: jnp.einsum(  # noqa: E731
        "cthi,cthj->chij", x, y, precision=precision, preferred_element_type=jnp.float32
    )
    return _with_identity(tn(b, w)), tn(k, v) + tn(b, u)


def backward_maps(q, b, w, do, *, scale, chunk_size, precision=None):
    """Each chunk's backward map dS0 = (I + W^T B) dS_C + g with g = Qs^T dO + W^T incl(Qs
    B^T)^T dO (docs/chunked.md "Backward", Qs = scale Q), from q, b, w [1, L, H, Kp] and do
    [1, L, H, Vp]: (M^T [NC, H, Kp, Kp], g [NC, H, Kp, Vp]) float32."""
    C = chunk_size
    q, b, w, do = (_per_chunk(x, C) for x in (q, b, w, do))
    kw = dict(precision=precision, preferred_element_type=jnp.float32)
    mqb = jnp.einsum("cthk,cshk->chts", q, b, **kw) * scale
    mqb = jnp.where(jnp.tril(jnp.ones((C, C), bool)), mqb, 0)
    from_do = jnp.einsum("chts,cthv->cshv", mqb, do.astype(jnp.float32), **kw)
    g = scale * jnp.einsum("cthk,cthv->chkv", q, do, **kw)
    g = g + jnp.einsum("cshk,cshv->chkv", w.astype(jnp.float32), from_do, **kw)
    mt = jnp.einsum("cthi,cthj->chij", w, b, **kw)
    return _with_identity(mt), g


def compose_maps(m, h, cu_chunks, *, rows=None, reverse=False, precision=None):
    """Every sequence's summary [h | M] ([N, H, Kp, W + Kp]) from its chunks' maps m [NC, H, Kp,
    Kp], h [NC, H, Kp, W], composed in order (`reverse`: last chunk first, for the backward's
    [g | M^T]). `rows`: the sequences are `rows` equal runs of NC / rows chunks (unpacked input):
    a tree of pairwise compositions. Otherwise (cu_chunks [N + 1], possibly traced) a segmented
    scan, read at each sequence's last chunk; an empty sequence gives [0 | I]."""
    compose = lambda e1, e2: _then(e1, e2, precision)  # noqa: E731
    if rows is not None:
        m, h = (x.reshape(rows, -1, *x.shape[1:]) for x in (m, h))
        if reverse:
            m, h = m[:, ::-1], h[:, ::-1]
        while m.shape[1] > 1:
            if m.shape[1] % 2:  # an identity map at the end of every row
                eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m[:, :1].shape)
                m = jnp.concatenate([m, eye], 1)
                h = jnp.concatenate([h, jnp.zeros_like(h[:, :1])], 1)
            m, h = compose((m[:, 0::2], h[:, 0::2]), (m[:, 1::2], h[:, 1::2]))
        return jnp.concatenate([h[:, 0], m[:, 0]], -1)
    NC = m.shape[0]
    cu = jnp.asarray(cu_chunks, jnp.int32)
    # a chunk that starts its sequence in the scan's order restarts the composition there
    begins = cu[1:] - 1 if reverse else cu[:-1]
    begins = jnp.where(begins < 0, NC, begins)  # out of range, dropped (not wrapped)
    fresh = jnp.zeros(NC, bool).at[begins].set(True, mode="drop")
    if reverse:
        m, h, fresh = m[::-1], h[::-1], fresh[::-1]

    def seg_compose(e1, e2):
        (f1, m1, h1), (f2, m2, h2) = e1, e2
        mc, hc = compose((m1, h1), (m2, h2))
        keep = f2[..., None, None, None]
        return f1 | f2, jnp.where(keep, m2, mc), jnp.where(keep, h2, hc)

    _, m, h = jax.lax.associative_scan(seg_compose, (fresh, m, h))
    if reverse:
        m, h = m[::-1], h[::-1]
    ends = jnp.clip(cu[:-1] if reverse else cu[1:] - 1, 0, NC - 1)
    empty = (cu[1:] == cu[:-1])[:, None, None, None]
    eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m[:1].shape)
    return jnp.concatenate([jnp.where(empty, 0, h[ends]), jnp.where(empty, eye, m[ends])], -1)


# jitted: a call of its own in the program (named in the jaxpr, where tests look for it)
@functools.partial(jax.jit, static_argnames=("chunk_size", "rows", "precision"))
def forward_summary(w, u, k, b, v, cu_chunks, *, chunk_size, rows=None, precision=None):
    """[h | M] of every sequence ([N, H, Kp, Vp + Kp] float32) by products: `forward_maps`
    composed by `compose_maps`; the summary sweep's result without its chain."""
    m, h = forward_maps(w, u, k, b, v, chunk_size=chunk_size, precision=precision)
    return compose_maps(m, h, cu_chunks, rows=rows, precision=precision)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "rows", "precision"))
def backward_summary(q, b, w, do, cu_chunks, *, scale, chunk_size, rows=None, precision=None):
    """[g | M^T] of every sequence ([N, H, Kp, Vp + Kp] float32) by products: `backward_maps`
    composed last chunk first."""
    mt, g = backward_maps(q, b, w, do, scale=scale, chunk_size=chunk_size, precision=precision)
    return compose_maps(mt, g, cu_chunks, rows=rows, reverse=True, precision=precision)
