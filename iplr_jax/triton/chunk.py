"""Forward kernels of the chunked form (docs/chunked.md), Pallas on the Triton backend.

Up to three passes:
  1. `wy_fast.wy_fwd`: W, U (and X for the backward) per (chunk, head), parallel over chunks.
  2. `_state_kernel`: per (sequence, head, V-block) the sequential S0 -> S_C sweep; writes the
     residuals h (state before each chunk) and v_new (V2), and optionally the output too.
  3. `_output_kernel`: O per (chunk, head, V-block) from h and v_new, parallel over chunks.
Fusing 3 into 2 saves re-reading h and v_new (and, when no gradient is taken, writing them) at
the price of recomputing Q K^T and Q B^T per V-block on the sequential path; `config.fuse_output`
says when (`config.chunk_config`).

Dot operands (docs/numerics.md): products of two inputs (Q K^T, Q B^T, K^T V, incl(Q K^T) V)
take the inputs' dtype (bf16 matrix units, exact products, float32 accumulation). The sweep's
products with the float32 state or V2 (W S0, B^T V2) round that operand to 16-bit inputs'
dtype (`config.low_precision_state`, as the backward's dS chain and fla do: the step is the
sweep's bound and 16-bit operands shorten it); the state itself is accumulated in float32.
Float32 inputs keep float32 operands (tf32 on the GPU unless `f32_dots="highest"`). The
output's incl(Q B^T) V2 feeds no later step: for 16-bit inputs it runs in 16 bits
(`config.low_precision_v2`). W and U are stored in the inputs' dtype, h too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from iplr_jax import segments
from iplr_jax.inputs import Inputs
from iplr_jax.sharding import shape_dtype, vma_of
from iplr_jax.triton import gate
from iplr_jax.triton.config import ChunkConfig
from iplr_jax.triton.gate import SUB
from iplr_jax.triton.helpers import (
    F32,
    NT,
    TN,
    dot,
    dot_as,
    f32_precision,
    identity_columns,
    is_low,
    mask,
    tri,
)
from iplr_jax.triton.wy_fast import wy_fwd


class Residuals(NamedTuple):
    """What the forward keeps for `chunk_bwd.chunk_bwd` (aligned layout, see `chunk_fwd`)."""

    h: jax.Array  # [NC, H, Kp, Vp] state before each chunk, inputs' dtype; zero past the end
    v_new: jax.Array  # [1, L, H, Vp] float32, V2[t] = a_t^T S_{t-1}; zero in padding rows
    x: jax.Array  # [NC, H, C, C] float32, X = (I - strict(A B^T))^{-1} per chunk
    w: jax.Array  # [1, L, H, Kp] inputs' dtype, W = X A


def _chunk_output(q, k, b, v, v2, s0, dt, scale, low_v2, prec=None):
    """scale (Q S0 + incl(Q K^T) V + incl(Q B^T) V2) for one chunk, float32 [C, BV].
    `low_v2`: incl(Q B^T) V2 with both operands rounded to the inputs' dtype. `prec`: the
    precision of products with float32 operands (16-bit operands take the matrix units as they
    are)."""
    pin = None if is_low(dt) else prec  # products of two inputs
    incl = tri(q.shape[0], strict=False)
    qk = mask(incl, dot(q, k, NT, pin))
    qb = mask(incl, dot(q, b, NT, pin))
    qb_v2 = dot(qb.astype(dt), v2.astype(dt), None, pin) if low_v2 else dot(qb, v2.astype(F32), None, prec)
    o = dot(q, s0.astype(dt), None, pin) + dot(qk.astype(dt), v, None, pin) + qb_v2
    return scale * o


def _state_kernel(
    cu_ref, w_ref, u_ref, k_ref, b_ref, v_ref, h0_ref, *refs, chunk_size, num_chunks, residuals,
    fuse, scale, low_v2, prec=None, gated=False, summary_blocks=0, low_state=False,
):
    """One (sequence n, head, V-block): S [Kp, BV] float32 carried over the sequence's chunks.

    Bytes per chunk: reads W, K, B [C, Kp] and U, V [C, BV] (input dtype); writes h [Kp, BV]
    (input dtype) and v_new [C, BV] (float32; 16-bit when only the output reads it) when
    residuals are wanted; fused, it also reads Q [C, Kp] and writes O [C, BV]. The state never
    leaves registers between chunks. BV is small (16-64) so that S and the [C, Kp] operand tiles
    fit for Kp up to 256, and so that N * H * (Vp / BV) programs fill the GPU: this sweep is
    latency-bound.

    With `gated`, k_ref and b_ref hold K e^{G_C - G}, B e^{G_C - G} (from the WY kernel) and a
    ref of e^{G_C} per chunk [NC, Kp] follows h0 (after q): S_C = e^{G_C} S0 + ..., V2 reading
    the undecayed S0 (docs/gate.md).

    With `summary_blocks` (the number of V-blocks) the launch is a segment summary
    (`segments`): programs past the V-blocks carry K identity columns that read no values, so
    each sequence (segment) ends at [h | M] from a zero start; only that end state is written.
    """
    refs = list(refs)
    q_ref = refs.pop(0) if fuse else None
    gc_ref = refs.pop(0) if gated else None
    ht_ref = refs.pop(0)
    h_ref, vn_ref = (refs.pop(0), refs.pop(0)) if residuals else (None, None)
    o_ref = refs.pop(0) if fuse else None
    C, dt = chunk_size, k_ref.dtype
    n = pl.program_id(0)
    start, end = cu_ref[n], cu_ref[n + 1]
    if summary_blocks:  # value columns from 0, identity columns from I (and no values)
        j = pl.program_id(2)
        takes_values = (j < summary_blocks).astype(F32)
        s0 = identity_columns(ht_ref.shape, (j - summary_blocks) * ht_ref.shape[-1], j >= summary_blocks)
    else:
        takes_values, s0 = None, h0_ref[...].astype(F32)

    def body(c, s):
        r = pl.ds(c * C, C)
        if residuals:
            h_ref[c] = s.astype(h_ref.dtype)
        u = u_ref[r, :].astype(F32)
        u = u if takes_values is None else takes_values * u
        if low_state:  # V2 = U + W S0
            v2 = u + dot(w_ref[r, :], s.astype(dt))
        else:
            v2 = u + dot(w_ref[r, :].astype(F32), s, None, prec)
        if residuals:
            vn_ref[r, :] = v2.astype(vn_ref.dtype)
        k, b, v = k_ref[r, :], b_ref[r, :], v_ref[r, :]
        if fuse:
            o = _chunk_output(q_ref[r, :], k, b, v, v2, s, dt, scale, low_v2, prec)
            o_ref[r, :] = o.astype(o_ref.dtype)
        kv = dot(k, v, TN, None if is_low(dt) else prec)
        if takes_values is not None:
            kv = takes_values * kv
        if gated:
            s = gc_ref[c][:, None] * s
        if low_state:
            return s + kv + dot(b, v2.astype(dt), TN)
        return s + kv + dot(b.astype(F32), v2, TN, prec)  # S0 + K^T V + B^T V2

    # A plain loop: Triton pipelines these tile loads itself, since they feed dots (loading the
    # next chunk by hand measured slower, benchmarks/NOTES.md).
    s = jax.lax.fori_loop(start, end, body, s0)
    ht_ref[...] = s  # an empty sequence keeps h0

    if residuals or fuse:
        # The last program of each (head, V-block) zero-fills the padding chunks past
        # cu_chunks[-1], so no residual the backward reads is ever uninitialised memory.
        def zero(c, carry):
            r = pl.ds(c * C, C)
            if residuals:
                h_ref[c] = jnp.zeros(h_ref.shape[1:], h_ref.dtype)
                vn_ref[r, :] = jnp.zeros((C, vn_ref.shape[-1]), vn_ref.dtype)
            if fuse:
                o_ref[r, :] = jnp.zeros((C, o_ref.shape[-1]), o_ref.dtype)
            return carry

        stop = jnp.where(n == pl.num_programs(0) - 1, jnp.int32(num_chunks), end)
        jax.lax.fori_loop(end, stop, zero, jnp.int32(0))


def _output_kernel(q_ref, k_ref, b_ref, v_ref, vn_ref, h_ref, o_ref, *, scale, low_v2, prec=None):
    """One (chunk, head, V-block): O = scale (Q S0 + incl(Q K^T) V + incl(Q B^T) V2).

    Bytes: reads Q, K, B [C, Kp], V [C, BV], v_new [C, BV] and h [Kp, BV]; writes O. BV is as
    wide as registers allow, so Q K^T and Q B^T are recomputed for few V-blocks; chunks are
    independent, so the grid is large whatever the batch.
    """
    o = _chunk_output(
        q_ref[...], k_ref[...], b_ref[...], v_ref[...], vn_ref[...], h_ref[...], k_ref.dtype, scale,
        low_v2, prec,
    )
    o_ref[...] = o.astype(o_ref.dtype)


def _gated_output_kernel(
    q_ref, k_ref, b_ref, v_ref, vn_ref, h_ref, g_ref, o_ref, *, scale, low_v2, prec=None, factor=True,
    chunk_factor=False, g_prec=None,
):
    """One (chunk, head, V-block) with the gate (docs/gate.md):

        O = scale ((Q e^{G}) S0 + incl(A_qk) V + incl(A_qb) V2),
        A_qk[t, s] = q_t . e^{G_t - G_s} k_s  (s <= t),  A_qb likewise with b.

    With `chunk_factor`, a chunk whose gate stays within FACTOR_BOUND of its middle row takes
    `_output_factored` (whole [C, Kp] tiles); others, and every chunk without it, go by 16-row
    blocks (`_output_blockwise`).
    """
    refs = (q_ref, k_ref, b_ref, v_ref, vn_ref, h_ref, g_ref, o_ref)
    kw = dict(scale=scale, low_v2=low_v2, prec=prec)
    if not chunk_factor:
        _output_blockwise(*refs, factor=factor, **kw)
        return
    g = g_ref[...]
    rel = gate.from_middle(g, 0, g.shape[0], exclusive=False, precision=g_prec)  # G - Gm
    g_mid, _ = gate.middle_sums(g)  # Gm
    ok = jnp.max(jnp.abs(rel)) <= gate.FACTOR_BOUND
    pl.when(ok)(lambda: _output_factored(*refs, rel=rel, g_mid=g_mid, **kw))
    pl.when(jnp.logical_not(ok))(lambda: _output_blockwise(*refs, factor=factor, **kw))


def _output_factored(
    q_ref, k_ref, b_ref, v_ref, vn_ref, h_ref, g_ref, o_ref, *, rel, g_mid, scale, low_v2, prec
):
    """The gated output of a chunk through its middle row m: e^{G_t - G_s} = e^{G_t - Gm}
    e^{Gm - G_s}, so A_qk and A_qb are products of Qd = Q e^{G - Gm} with K, B e^{Gm - G}
    (factors below e^{60} where taken; entries above the diagonal may overflow and are masked),
    and Q e^{G} = Qd e^{Gm}. The decayed operands are rounded to bf16 inputs' dtype, else
    float32 at `prec` (fp16's range is below e^{60})."""
    dt = k_ref.dtype
    fdt = dt if dt == jnp.bfloat16 else F32
    mm = functools.partial(dot_as, dt=fdt, f32_precision=prec)
    mm_v2 = functools.partial(dot_as, dt=dt if low_v2 else F32, f32_precision=prec)
    incl = tri(q_ref.shape[0], strict=False)
    up = jnp.exp(-rel)
    qd = q_ref[...].astype(F32) * jnp.exp(rel)
    qk = mask(incl, mm(qd, k_ref[...].astype(F32) * up, tb=True))
    qb = mask(incl, mm(qd, b_ref[...].astype(F32) * up, tb=True))
    o = dot_as(qd * jnp.exp(g_mid)[None, :], h_ref[...], dt=dt, f32_precision=prec)  # (Q e^{G}) S0
    o = o + mm(qk, v_ref[...]) + mm_v2(qb, vn_ref[...])
    o_ref[...] = (scale * o).astype(o_ref.dtype)


def _output_blockwise(
    q_ref, k_ref, b_ref, v_ref, vn_ref, h_ref, g_ref, o_ref, *, scale, low_v2, prec, factor
):
    """The gated output by 16-row blocks i: O_i = scale ((Q_i e^{G_i}) S0 + sum_{j<=i} A_qk[i, j]
    V_j + A_qb[i, j] V2_j). Off-diagonal blocks factor through the block boundaries (`gate`),
    the diagonal ones by `gate.diag_products`. Dot operands as in `_chunk_output`: the decayed
    float32 operands (at most 1) are rounded to 16-bit inputs' dtype (the output feeds nothing
    later), else float32 at `prec`."""
    C = q_ref.shape[0]
    nb, dt = C // SUB, k_ref.dtype
    mm = functools.partial(dot_as, dt=dt, f32_precision=prec)
    mm_v2 = functools.partial(dot_as, dt=dt if low_v2 else F32, f32_precision=prec)
    f32_rows = lambda ref, i: ref[pl.ds(i * SUB, SUB), :].astype(F32)  # noqa: E731
    tot = gate.totals(g_ref, nb)
    s0 = h_ref[...]
    for i in range(nb):
        q_i = f32_rows(q_ref, i) * jnp.exp(gate.block_gate(g_ref, i)[0])  # from the boundary before i
        before = gate.between(tot, -1, i)
        q0 = q_i if before is None else q_i * jnp.exp(before)[None, :]  # from the chunk start
        qk, qb = gate.diag_products(
            q_ref, (k_ref, b_ref), g_ref, i, strict=False, factor=factor,
            precision=gate.diag_precision(dt, prec),
        )
        o = mm(q0, s0) + mm(qk, v_ref[pl.ds(i * SUB, SUB), :]) + mm_v2(qb, vn_ref[pl.ds(i * SUB, SUB), :])
        for j in range(i):
            mid = gate.between(tot, j, i)
            q_ij = q_i if mid is None else q_i * jnp.exp(mid)[None, :]
            to_end = gate.to_block_end(g_ref, tot, j)
            qk = mm(q_ij, f32_rows(k_ref, j) * to_end, tb=True)
            qb = mm(q_ij, f32_rows(b_ref, j) * to_end, tb=True)
            rows_j = pl.ds(j * SUB, SUB)
            o = o + mm(qk, v_ref[rows_j, :]) + mm_v2(qb, vn_ref[rows_j, :])
        o_ref[pl.ds(i * SUB, SUB), :] = (scale * o).astype(o_ref.dtype)


def output_fwd(
    q, k, b, v, v_new, h, *, scale, chunk_size, config: ChunkConfig, interpret, gk=None
):
    """The output pass (`_output_kernel`, with a gate `gk` `_gated_output_kernel`) over every
    (chunk, head, V-block): o [1, L, H, Vp]."""
    _, L, H, Kp = q.shape
    Vp = v.shape[-1]
    C, BVo = chunk_size, config.output_block_v
    kc = pl.BlockSpec((None, C, None, Kp), lambda c, h, j: (0, c, h, 0))
    vc = pl.BlockSpec((None, C, None, BVo), lambda c, h, j: (0, c, h, j))
    hc = pl.BlockSpec((None, None, Kp, BVo), lambda c, h, j: (c, h, 0, j))
    kernel, args, in_specs = _output_kernel, [q, k, b, v, v_new, h], [kc, kc, kc, vc, vc, hc]
    if gk is not None:
        kernel = functools.partial(
            _gated_output_kernel, factor=config.gate_factored,
            chunk_factor=config.gate_chunk_factored and C > SUB and Kp <= 128,
            g_prec=gate.sum_precision(gk.dtype, interpret),
        )
        args, in_specs = args + [gk], in_specs + [kc]
    return pl.pallas_call(
        functools.partial(
            kernel, scale=scale, low_v2=config.low_precision_v2,
            prec=f32_precision(config.f32_dots, interpret),
        ),
        grid=(L // C, H, Vp // BVo),
        in_specs=in_specs,
        out_specs=vc,
        out_shape=shape_dtype((1, L, H, Vp), v.dtype, vma_of(*args)),
        compiler_params=pltr.CompilerParams(num_warps=config.output_warps, num_stages=2),
        interpret=interpret,
        name="iplr_chunk_output_fwd",
    )(*args)


def _state_pass(
    w, u, k, b, v, cu, h0, *, q, gc, chunk_size, scale, low_v2, config, interpret,
    residuals=False, fuse=False, summary=False, out_v_dtype=F32,
):
    """One launch of `_state_kernel` over the sequences (or segments) of `cu` [N + 1] from h0
    [N, H, Kp, Vp]: [ht] + [h, v_new] with `residuals` + [o] with `fuse`. `summary`: the
    segment summary [h | M] [N, H, Kp, Vp + Kp] alone (h0 unread, only its shape)."""
    _, L, H, Kp = k.shape
    Vp = v.shape[-1]
    N, C, BV = h0.shape[0], chunk_size, config.state_block_v
    NC, nvb = L // C, Vp // BV
    clamp = (lambda j: jnp.minimum(j, nvb - 1)) if summary else (lambda j: j)
    kfull = pl.BlockSpec((None, L, None, Kp), lambda n, h, j: (0, 0, h, 0))
    vfull = pl.BlockSpec((None, L, None, BV), lambda n, h, j: (0, 0, h, clamp(j)))
    state = pl.BlockSpec((None, None, Kp, BV), lambda n, h, j: (n, h, 0, j))
    in_specs = [pl.BlockSpec((N + 1,), lambda n, h, j: (0,)), kfull, vfull, kfull, kfull, vfull,
                pl.BlockSpec((None, None, Kp, BV), lambda n, h, j: (n, h, 0, clamp(j)))]
    args = [cu.astype(jnp.int32), w, u, k, b, v, h0.astype(F32)]
    vma = vma_of(*args, *([q] if q is not None else []))  # inside shard_map outputs vary like inputs
    out_specs, out_shape = [state], [shape_dtype((N, H, Kp, Vp + (Kp if summary else 0)), F32, vma)]
    if fuse:
        in_specs.append(kfull)
        args.append(q)
    if gc is not None:
        in_specs.append(pl.BlockSpec((NC, None, Kp), lambda n, h, j: (0, h, 0)))
        args.append(gc)
    if residuals:
        out_specs += [pl.BlockSpec((NC, None, Kp, BV), lambda n, h, j: (0, h, 0, j)), vfull]
        # the backward reads v_new at float32; the output alone rounds it (`low_v2`)
        out_shape += [
            shape_dtype((NC, H, Kp, Vp), k.dtype, vma), shape_dtype((1, L, H, Vp), out_v_dtype, vma)
        ]
    if fuse:
        out_specs.append(vfull)
        out_shape.append(shape_dtype((1, L, H, Vp), v.dtype, vma))
    return pl.pallas_call(
        functools.partial(
            _state_kernel, chunk_size=C, num_chunks=NC, residuals=residuals, fuse=fuse, scale=scale,
            low_v2=low_v2, prec=f32_precision(config.f32_dots, interpret),
            **({"gated": True} if gc is not None else {}), **({"summary_blocks": nvb} if summary else {}),
            low_state=config.low_precision_state and is_low(k.dtype),
        ),
        grid=(N, H, nvb + (Kp // BV if summary else 0)),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltr.CompilerParams(num_warps=config.state_warps, num_stages=config.state_stages),
        interpret=interpret,
        name="iplr_chunk_summary_fwd" if summary else "iplr_chunk_state_fwd",
    )(*args)


def chunk_fwd(
    x: Inputs, h0, cu_chunks, *, scale, chunk_size, config: ChunkConfig, interpret, residuals=True,
    enter=None,
):
    """Forward of the chunked form on the aligned layout.

    Args:
      x: q, k, a, b [1, L, H, Kp] and v [1, L, H, Vp] (input dtype), L = NC * chunk_size, Kp and
        Vp powers of two >= 16; optionally the gate gk [1, L, H, Kp] (docs/gate.md: every kernel
        then runs its gated form, and the output is never fused into the sweep).
      h0: [N, H, Kp, Vp] float32.
      cu_chunks: int32 [N + 1]; sequence n owns chunks cu_chunks[n] .. cu_chunks[n+1]-1 (may be
        traced). Chunks at or past cu_chunks[-1] are zero padding.
      config: a filled `ChunkConfig` (`config.chunk_config`).
      residuals: also return what the backward needs (False: None, and the kernels may skip
        writing it; for the primal without a gradient).
      enter: context parallelism (docs/architecture.md "Several devices"): a function of this
        slice's summary [h | M] ([N, H, Kp, Vp + Kp], sharing the WY pass: from a summary sweep,
        or composed from the segments' summaries when `config.segment_chunks` cuts the slice)
        and h0, returning the state entering the slice, from which the sweep then runs.

    Returns:
      o [1, L, H, Vp] (v's dtype), ht [N, H, Kp, Vp] float32, and `Residuals` (or None; with a
      gate X and W are the decayed ones).
    """
    q, k, v, a, b = x[:5]
    _, L, H, Kp = q.shape
    Vp = v.shape[-1]
    C = chunk_size
    NC = L // C
    dt = k.dtype
    # gated: the output's pairwise diagonal blocks stay off the sequential sweep
    fuse, low_v2 = config.fuse_output and not x.gated, config.low_precision_v2
    gated = dict(gk=x.gk) if x.gated else {}
    w, u, *rest = wy_fwd(
        a, b, k, v, chunk_size=C, config=config, out_dtype=dt, with_x=residuals, interpret=interpret,
        **gated,
    )
    if x.gated:  # the sweep reads K, B decayed to the chunk's end and e^{G_C}
        *rest, k_sweep, b_sweep, gc = rest
    else:
        k_sweep, b_sweep = k, b
    keep = residuals or not fuse
    sweep = functools.partial(
        _state_pass, w, u, k_sweep, b_sweep, v, q=q if fuse else None, gc=gc if x.gated else None,
        chunk_size=C, scale=scale, low_v2=low_v2, config=config, interpret=interpret,
    )
    seg, v_dtype = bool(config.segment_chunks) and not x.gated, dt if low_v2 and not residuals else F32
    h0 = h0.astype(F32)
    if enter is not None and not seg:
        (summary,) = sweep(cu_chunks, h0, summary=True)
        h0 = enter(summary, h0)
    if seg:  # long sequences in parallel segments (`segments`)
        segs = segments.split(cu_chunks, NC, config.segment_chunks)
        (summary,) = sweep(segs.cu, jnp.zeros((segs.seq.shape[0], H, Kp, Vp), F32), summary=True)
        if enter is not None:  # the slice's summary from its segments'
            h0 = enter(segments.sequence_summaries(summary, segs, cu_chunks), h0)
        h_in = segments.entering_states(summary, segs, h0)
        outs = sweep(segs.cu, h_in, residuals=keep, fuse=fuse, out_v_dtype=v_dtype)
        ht = segments.per_sequence(outs[0], segs.last, segs.empty, h0)
    else:
        outs = sweep(cu_chunks, h0, residuals=keep, fuse=fuse, out_v_dtype=v_dtype)
        ht = outs[0]
    h, v_new = (outs[1], outs[2]) if keep else (None, None)
    o = outs[-1] if fuse else output_fwd(
        q, k, b, v, v_new, h, scale=scale, chunk_size=C, config=config, interpret=interpret,
        **gated,
    )
    return o, ht, (Residuals(h, v_new, rest[0], w) if residuals else None)
