"""Summaries by products (docs/chunked.md "Summaries by products"), Pallas on the Triton backend.

A run of chunks is an affine map of its start state; context parallelism needs each slice's
`[h | M]` forward and `[g | M^T]` backward. Instead of a sweep carrying K identity columns
through the chunks in order, every chunk's own map is formed in parallel (`forward_maps`,
`backward_maps`: one program per (chunk, head)) and the maps of each row are composed pairwise,
log2(NC) levels of `_compose_kernel`. Packed offsets compose by `segments.compose_maps`'
segmented scan instead. Maps travel as two arrays, h [n, H, Kp, Vp] and M [n, H, Kp, Kp],
float32.

Dot operands as in the sweeps (docs/numerics.md): products of inputs in their dtype (16-bit:
matrix units, exact products); float32 operands (the maps themselves) at `config.f32_dots`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from iplr_jax import segments
from iplr_jax.sharding import shape_dtype, vma_of
from iplr_jax.triton.config import ChunkConfig
from iplr_jax.triton.helpers import F32, dot, dot_as, f32_precision, identity_columns, mask, tri


def _forward_maps_kernel(w_ref, u_ref, k_ref, b_ref, v_ref, h_ref, m_ref, *, dt, f32_prec):
    """One (chunk, head): S_C = (I + B^T W) S0 + (K^T Vc + B^T U)."""
    b = b_ref[...]
    mm = functools.partial(dot_as, dt=dt, f32_precision=f32_prec, ta=True)
    h_ref[...] = mm(k_ref[...], v_ref[...]) + mm(b, u_ref[...])
    m_ref[...] = identity_columns(m_ref.shape, 0, True) + mm(b, w_ref[...])


def _backward_maps_kernel(q_ref, b_ref, w_ref, do_ref, g_ref, m_ref, *, scale, dt, f32_prec):
    """One (chunk, head): dS0 = (I + W^T B) dS_C + Qs^T dO + W^T incl(Qs B^T)^T dO, the dS
    sweep's step (chunk_bwd._sweep_kernel) with dS_C = 0 and with dS_C = I."""
    q, b, w, do = q_ref[...], b_ref[...], w_ref[...], do_ref[...]
    mm = functools.partial(dot_as, dt=dt, f32_precision=f32_prec)
    mqb = mask(tri(q.shape[0], strict=False), scale * mm(q, b, tb=True))
    g_ref[...] = scale * mm(q, do, ta=True) + mm(w, mm(mqb, do, ta=True), ta=True)
    m_ref[...] = identity_columns(m_ref.shape, 0, True) + mm(w, b, ta=True)


def _maps(kernel, token_arrays, widths, *, chunk_size, warps, interpret, name):
    """Per-chunk maps [NC, H, Kp, width] for each of `widths` from [1, L, H, *] token arrays."""
    _, L, H, Kp = token_arrays[0].shape
    C = chunk_size
    in_specs = [pl.BlockSpec((None, C, None, x.shape[-1]), lambda c, h: (0, c, h, 0)) for x in token_arrays]
    vma = vma_of(*token_arrays)
    return pl.pallas_call(
        kernel,
        grid=(L // C, H),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, Kp, wd), lambda c, h: (c, h, 0, 0)) for wd in widths],
        out_shape=[shape_dtype((L // C, H, Kp, wd), F32, vma) for wd in widths],
        compiler_params=pltr.CompilerParams(num_warps=warps),
        interpret=interpret,
        name=name,
    )(*token_arrays)


def _compose_kernel(m_ref, x_ref, *refs, precision):
    """One column block of M_then @ X_first (+ Y_then): a level of the tree."""
    out_ref = refs[-1]
    out = dot(m_ref[...], x_ref[...], precision=precision)
    out_ref[...] = out + refs[0][...] if len(refs) == 2 else out


def _compose_level(h, m, *, reverse, f32_prec, interpret):
    """Pairs (2p, 2p + 1) of maps h [2n, H, Kp, Vp], M [2n, H, Kp, Kp] composed into n maps: the
    earlier chunk applied first (`reverse`: the later one)."""
    n2, H, Kp, Vp = h.shape
    first, then = (1, 0) if reverse else (0, 1)
    vma = vma_of(h, m)
    m_then = pl.BlockSpec((None, None, Kp, Kp), lambda p, i, j: (2 * p + then, i, 0, 0))

    def apply(x, add):  # M_then @ x_first (+ x_then), in column blocks of at most 64
        W = x.shape[-1]
        bw = min(W, 64)
        blk = lambda which: pl.BlockSpec((None, None, Kp, bw), lambda p, i, j: (2 * p + which, i, 0, j))  # noqa: E731
        return pl.pallas_call(
            functools.partial(_compose_kernel, precision=f32_prec),
            grid=(n2 // 2, H, W // bw),
            in_specs=[m_then, blk(first)] + ([blk(then)] if add else []),
            out_specs=pl.BlockSpec((None, None, Kp, bw), lambda p, i, j: (p, i, 0, j)),
            out_shape=shape_dtype((n2 // 2, H, Kp, W), F32, vma),
            compiler_params=pltr.CompilerParams(num_warps=4),
            interpret=interpret,
            name="iplr_summary_compose",
        )(m, x, *([x] if add else []))

    return apply(h, True), apply(m, False)


def _compose_rows(h, m, rows, *, reverse, f32_prec, interpret):
    """Each of `rows` equal runs of maps ([NC, H, Kp, *]) composed into one: [rows, H, Kp, *]."""
    n = h.shape[0] // rows
    while n > 1:
        if n % 2:  # an identity map at the end of every row
            h, m = (x.reshape(rows, n, *x.shape[1:]) for x in (h, m))
            eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=F32), m[:, :1].shape)
            h = jnp.concatenate([h, jnp.zeros_like(h[:, :1])], 1).reshape(-1, *h.shape[2:])
            m = jnp.concatenate([m, eye], 1).reshape(-1, *m.shape[2:])
            n += 1
        h, m = _compose_level(h, m, reverse=reverse, f32_prec=f32_prec, interpret=interpret)
        n //= 2
    return h, m


def _summarize(h, m, cu_chunks, rows, *, reverse, config, interpret):
    f32_prec = f32_precision(config.f32_dots, interpret)
    if rows is None:  # packed offsets: the segmented scan (XLA)
        return segments.compose_maps(m, h, cu_chunks, reverse=reverse,
                                     precision=jax.lax.Precision.HIGHEST if f32_prec else None)
    h, m = _compose_rows(h, m, rows, reverse=reverse, f32_prec=f32_prec, interpret=interpret)
    return jnp.concatenate([h, m], -1)


def forward_maps(w, u, k, b, v, *, chunk_size, config: ChunkConfig, interpret):
    """Every chunk's forward map (h [NC, H, Kp, Vp], M [NC, H, Kp, Kp]) from the WY pass's W, U
    and the aligned k, b [1, L, H, Kp], v [1, L, H, Vp]."""
    prec = f32_precision(config.f32_dots, interpret) or jax.lax.Precision.DEFAULT
    kernel = functools.partial(_forward_maps_kernel, dt=jnp.result_type(w, u, k, b, v), f32_prec=prec)
    return _maps(kernel, [w, u, k, b, v], [v.shape[-1], k.shape[-1]], chunk_size=chunk_size, warps=8,
                 interpret=interpret, name="iplr_summary_maps_fwd")


def backward_maps(q, b, w, do, *, scale, chunk_size, config: ChunkConfig, interpret):
    """Every chunk's backward map (g [NC, H, Kp, Vp], M^T [NC, H, Kp, Kp]) from the aligned q, b,
    W [1, L, H, Kp] and dO [1, L, H, Vp]."""
    prec = f32_precision(config.f32_dots, interpret) or jax.lax.Precision.DEFAULT
    kernel = functools.partial(_backward_maps_kernel, scale=scale, dt=jnp.result_type(q, b, w), f32_prec=prec)
    return _maps(kernel, [q, b, w, do], [do.shape[-1], q.shape[-1]], chunk_size=chunk_size, warps=8,
                 interpret=interpret, name="iplr_summary_maps_bwd")


def forward_summary(w, u, k, b, v, cu_chunks, *, chunk_size, rows, config: ChunkConfig, interpret):
    """[h | M] of every sequence, [N, H, Kp, Vp + Kp] float32 (what the forward summary sweep
    gives), from `forward_maps`' operands. `rows`: N for the equal rows of an unpacked input
    (the tree), None for packed `cu_chunks` (the segmented scan)."""
    h, m = forward_maps(w, u, k, b, v, chunk_size=chunk_size, config=config, interpret=interpret)
    return _summarize(h, m, cu_chunks, rows, reverse=False, config=config, interpret=interpret)


def backward_summary(q, b, w, do, cu_chunks, *, scale, chunk_size, rows, config: ChunkConfig, interpret):
    """[g | M^T] of every sequence, [N, H, Kp, Vp + Kp] float32 (what the backward summary sweep
    gives; last chunk first), from `backward_maps`' operands."""
    g, mt = backward_maps(q, b, w, do, scale=scale, chunk_size=chunk_size, config=config, interpret=interpret)
    return _summarize(g, mt, cu_chunks, rows, reverse=True, config=config, interpret=interpret)
