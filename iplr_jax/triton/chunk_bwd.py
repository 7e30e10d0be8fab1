"""Backward kernels of the chunked form (docs/chunked.md): the reverse dS sweep and the
intra-chunk gradients (which hold the backward of the WY preprocessing, through dZ).

Per chunk (rows stacked into Q, K, A, B [C, K], Vc, V2, dO [C, V]; S0 the state before the
chunk, dS_C the cotangent of the state after it; Qs = scale Q, M_qk = incl(Qs K^T),
M_qb = incl(Qs B^T), L_ak = strict(A K^T), X = (I - strict(A B^T))^{-1}, W = X A):

    dV2 = M_qb^T dO + B dS_C            dZ  = X^T dV2
    dS0 = dS_C + Qs^T dO + W^T dV2      (the only sequential part)
    dV  = M_qk^T dO + K dS_C + L_ak^T dZ
    dQ  = scale (dO S0^T + incl(dO Vc^T) K + incl(dO V2^T) B)
    dK  = incl(dO Vc^T)^T Qs + Vc dS_C^T + strict(dZ Vc^T)^T A
    dA  = dZ S0^T + strict(dZ Vc^T) K + strict(dZ V2^T) B
    dB  = incl(dO V2^T)^T Qs + V2 dS_C^T + strict(dZ V2^T)^T A

X and W come from the forward (`wy_fast.wy_fwd` writes X when residuals are kept; recomputing
them cost a kernel as slow as the sweep). Two Pallas kernels (Triton backend):

1. `_sweep_kernel`, grid (sequence, head, V-block): carries dS [Kp, BV] float32 from dht back
   to the first chunk of the sequence; writes dS_C of every chunk and dh0. Per chunk it needs
   only Q, B, W, dO (two dots on the dependency chain: B dS and W^T dV2).
2. `_intra_kernel`, grid (chunk, head, V-block): all five input gradients from S0 (h), V2
   (v_new), dS_C and X; dV2 and dZ are recomputed (three small dots) instead of stored.

Residuals, per token and head (bytes, C = chunk size, dt = input dtype size): saved by the
forward h (dt Kp Vp / C), v_new (4 Vp), X (4 C: 256 B at C=64) and W (dt Kp: 256 B at bf16,
Kp=128); written by the backward dS_C in dt (dt Kp Vp / C: 512 B at bf16, K=V=128, C=64).
Not stored: dV2 / dZ (4 Vp B each in float32), recomputed in the intra kernel from dS_C.

When Vp is larger than one intra block (`config.bwd_intra_block_v`: 128), each V-block writes
float32 partial K-side gradients (dq, dk, da, db) and XLA sums them; for Vp <= 128 there is one
block and the kernel writes them directly in the inputs' dtypes. Kp = 256 does not reach the
kernels (`config.bwd_kernels`; the same equations run in jnp there).

With the gate (docs/gate.md, "Backward of the gated chunked form"; `_gated_bwd`) the two kernels
above run on decayed operands where every chunk's decay allows it ("Whole-chunk factoring": the
sweep scales dS per chunk, the intra kernel also writes dG_C); otherwise three kernels of their
own run. Either way dgk follows from the identity.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from iplr_jax import segments
from iplr_jax.inputs import Inputs
from iplr_jax.reference.chunk import chunk_bwd_aligned
from iplr_jax.sharding import shape_dtype, vma_of
from iplr_jax.triton import gate, gate_factors
from iplr_jax.triton.chunk import Residuals
from iplr_jax.triton.config import ChunkConfig
from iplr_jax.triton.gate import SUB
from iplr_jax.triton.helpers import HIGHEST, dot_as, f32_precision, identity_columns, mask, tri


def _bwd_precision(config: ChunkConfig, interpret: bool):
    """The precision of the backward's float32-operand dots (`ChunkConfig.f32_dots`)."""
    return f32_precision(config.f32_dots, interpret) or lax.Precision.DEFAULT


# -- 1. reverse dS sweep -----------------------------------------------------------------------


def _sweep_kernel(
    cu_ref, q_ref, b_ref, w_ref, do_ref, dht_ref, *refs, scale, C, dt,
    f32_prec=lax.Precision.DEFAULT, summary_blocks=0, scaled=False,
):
    """One (sequence, head, V-block): dS from dht back to the sequence's first chunk. With
    `summary_blocks` (the number of V-blocks) a segment summary (`segments`): value columns
    from 0, programs past them K identity columns that read no dO, ending at [g | M^T]; only
    that start cotangent is written. With `scaled` (the gated chunk on decayed operands,
    `gate_factors`), two refs of per-chunk rows [NC, Kp] come first: dS_C is scaled by
    e^{G_C - Gm} on entering the chunk (and written so) and dS0 by e^{Gm} on leaving it."""
    (into_ref, out_ref, *refs) = refs if scaled else (None, None, *refs)
    dsc_ref, dh0_ref = (None, refs[0]) if summary_blocks else refs
    n = pl.program_id(0)
    c0, c1 = cu_ref[n], cu_ref[n + 1]
    incl = tri(C, strict=False)
    if summary_blocks:
        j = pl.program_id(2)
        takes_do = (j < summary_blocks).astype(jnp.float32)
        ds0 = identity_columns(dh0_ref.shape, (j - summary_blocks) * dh0_ref.shape[-1], j >= summary_blocks)
    else:
        takes_do, ds0 = None, dht_ref[...].astype(jnp.float32)

    def body(i, ds):
        c = c1 - 1 - i
        if scaled:
            ds = into_ref[c][:, None] * ds
        if dsc_ref is not None:
            dsc_ref[c] = ds.astype(dsc_ref.dtype)  # cotangent of the state after chunk c
        rows = pl.ds(c * C, C)
        q, b, w, do = q_ref[rows, :], b_ref[rows, :], w_ref[rows, :], do_ref[rows, :]
        mm = functools.partial(dot_as, dt=dt, f32_precision=f32_prec)
        mqb = mask(incl, scale * mm(q, b, tb=True))  # off the dS chain
        from_do = mm(mqb, do, ta=True)
        from_q = scale * mm(q, do, ta=True)
        if takes_do is not None:
            from_do, from_q = takes_do * from_do, takes_do * from_q
        dv2 = from_do + mm(b, ds)
        ds = ds + from_q + mm(w, dv2, ta=True)
        return out_ref[c][:, None] * ds if scaled else ds

    ds = lax.fori_loop(0, c1 - c0, body, ds0)
    dh0_ref[...] = ds  # empty sequence: no iterations, dh0 = dht


def _sweep(
    q, b, w, do, dht, cu_chunks, *, scale, chunk_size, dt, config, interpret, summary=False, scales=None
):
    """dS_C [NC, H, Kp, Vp] (dt) for every chunk and dh0 [N, H, Kp, Vp] float32; `summary`:
    [g | M^T] [N, H, Kp, Vp + Kp] alone (dht unread, only its shape). `scales`: the per-chunk
    rows (e^{G_C - Gm}, e^{Gm}) [NC, H, Kp] of `_sweep_kernel`'s `scaled` mode."""
    _, L, H, Kp = q.shape
    Vp = do.shape[-1]
    N = dht.shape[0]
    C = chunk_size
    NC = L // C
    bv = config.bwd_sweep_block_v
    nvb = Vp // bv
    clamp = (lambda j: jnp.minimum(j, nvb - 1)) if summary else (lambda j: j)
    kspec = pl.BlockSpec((None, L, None, Kp), lambda n, h, j: (0, 0, h, 0))
    sspec = pl.BlockSpec((None, None, Kp, bv), lambda n, h, j: (n, h, 0, j))
    vma = vma_of(q, b, w, do, dht, cu_chunks)
    dh0_shape = shape_dtype((N, H, Kp, Vp + (Kp if summary else 0)), jnp.float32, vma)
    rows = [] if scales is None else [pl.BlockSpec((NC, None, Kp), lambda n, h, j: (0, h, 0))] * 2
    return pl.pallas_call(
        functools.partial(
            _sweep_kernel, scale=scale, C=C, dt=dt, f32_prec=_bwd_precision(config, interpret),
            **({"summary_blocks": nvb} if summary else {}), scaled=scales is not None,
        ),
        grid=(N, H, nvb + (Kp // bv if summary else 0)),
        in_specs=[
            pl.BlockSpec((N + 1,), lambda n, h, j: (0,)),
            kspec, kspec, kspec,
            pl.BlockSpec((None, L, None, bv), lambda n, h, j: (0, 0, h, clamp(j))),
            pl.BlockSpec((None, None, Kp, bv), lambda n, h, j: (n, h, 0, clamp(j))),
            *rows,
        ],
        out_specs=[sspec] if summary else [
            pl.BlockSpec((NC, None, Kp, bv), lambda n, h, j: (0, h, 0, j)), sspec
        ],
        out_shape=[dh0_shape] if summary else [shape_dtype((NC, H, Kp, Vp), dt, vma), dh0_shape],
        compiler_params=pltr.CompilerParams(
            num_warps=config.bwd_sweep_warps, num_stages=config.bwd_sweep_stages
        ),
        interpret=interpret,
        name="iplr_chunk_bwd_summary" if summary else "iplr_chunk_bwd_sweep",
    )(cu_chunks, q, b, w, do, dht, *(scales or ()))


def _segmented_sweep(q, b, w, do, dht, cu_chunks, *, chunk_size, exit=None, **kw):
    """`_sweep` with each sequence cut into segments of `segment_chunks` chunks swept in
    parallel (`segments`): a summary sweep, the right-to-left fold, the sweep proper. With
    `exit` (context parallelism, `chunk_bwd`) dht is first replaced by exit(the slice's [g |
    M^T] composed from its segments', dht)."""
    NC = q.shape[1] // chunk_size
    segs = segments.split(cu_chunks, NC, kw["config"].segment_chunks)
    shape = jnp.zeros((segs.seq.shape[0], *dht.shape[1:]), jnp.float32)
    (summary,) = _sweep(q, b, w, do, shape, segs.cu, chunk_size=chunk_size, summary=True, **kw)
    if exit is not None:
        dht = exit(segments.sequence_summaries(summary, segs, cu_chunks, reverse=True), dht)
    d_out = segments.exiting_cotangents(summary, segs, dht)
    dsc, dh0 = _sweep(q, b, w, do, d_out, segs.cu, chunk_size=chunk_size, **kw)
    return dsc, segments.per_sequence(dh0, segs.first, segs.empty, dht)


# -- 2. intra-chunk gradients ------------------------------------------------------------------


def _intra_kernel(
    cu_ref, q_ref, k_ref, a_ref, b_ref, v_ref, v2_ref, do_ref, h_ref, dsc_ref, x_ref,
    dq_ref, dk_ref, da_ref, db_ref, dv_ref, *dgc_ref, scale, dt, f32_prec=lax.Precision.DEFAULT,
):
    """One (chunk, head, V-block): the five input gradients (the module's equations). With a
    `dgc_ref` (the gated chunk on decayed operands, `gate_factors`) also the cotangent of the
    chunk's total decay, dG_C = rowsum(dS_C' * S_C') over this V-block, S_C' = S0' + K^T Vc +
    B^T V2 the IPLR chunk's end state (equal to dS_C * S_C of the gated one)."""
    C = q_ref.shape[0]
    n_seq = cu_ref.shape[0] - 1
    incl, strict = tri(C, strict=False), tri(C, strict=True)
    mm = functools.partial(dot_as, dt=dt, f32_precision=f32_prec)
    # Loads sit right before their first use and the five gradients are finished one after
    # the other, so that few [C, Kp] / [Kp, BV] tiles are live at once (straight-line code;
    # Triton keeps program order).
    # Chunks at or past cu_chunks[-1] are padding the sweep never wrote: read dS_C as zero.
    valid = pl.program_id(0) < cu_ref[n_seq]
    ds = mask(valid, dsc_ref[...].astype(jnp.float32))
    q, b, do = q_ref[...], b_ref[...], do_ref[...]
    dv2 = mm(mask(incl, scale * mm(q, b, tb=True)), do, ta=True) + mm(b, ds)
    dz = mm(x_ref[...], dv2, ta=True)
    k, a = k_ref[...], a_ref[...]
    mqk = mask(incl, scale * mm(q, k, tb=True))
    lak = mask(strict, mm(a, k, tb=True))
    dv = mm(mqk, do, ta=True) + mm(k, ds) + mm(lak, dz, ta=True)
    dv_ref[...] = dv.astype(dv_ref.dtype)

    v = v_ref[...]
    dov = mask(incl, mm(do, v, tb=True))
    dzv = mask(strict, mm(dz, v, tb=True))
    dk = scale * mm(dov, q, ta=True) + mm(v, ds, tb=True) + mm(dzv, a, ta=True)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    v2 = v2_ref[...]
    dov2 = mask(incl, mm(do, v2, tb=True))
    dzv2 = mask(strict, mm(dz, v2, tb=True))
    db = scale * mm(dov2, q, ta=True) + mm(v2, ds, tb=True) + mm(dzv2, a, ta=True)
    db_ref[...] = db.astype(db_ref.dtype)

    s0 = h_ref[...]
    dq = scale * (mm(do, s0, tb=True) + mm(dov, k) + mm(dov2, b))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    da = mm(dz, s0, tb=True) + mm(dzv, k) + mm(dzv2, b)
    da_ref[...] = da.astype(da_ref.dtype)
    if dgc_ref:
        sc = s0.astype(jnp.float32) + mm(k, v, ta=True) + mm(b, v2, ta=True)
        dgc_ref[0][...] = jnp.sum(ds * sc, axis=1)


def _intra(
    q, k, v, a, b, h, v_new, do, dsc, x, cu_chunks, *, scale, chunk_size, dt, config, interpret,
    state_grad=False,
):
    """dq, dk, da, db (inputs' dtypes; float32 with `state_grad`), dv; with `state_grad` also
    dG_C [NC, H, Kp] float32 (`_intra_kernel`)."""
    _, L, H, Kp = q.shape
    Vp = v.shape[-1]
    C = chunk_size
    NC = L // C
    bv = config.bwd_intra_block_v
    nv = Vp // bv
    kspec = pl.BlockSpec((None, C, None, Kp), lambda c, h, j: (0, c, h, 0))
    vspec = pl.BlockSpec((None, C, None, bv), lambda c, h, j: (0, c, h, j))
    sspec = pl.BlockSpec((None, None, Kp, bv), lambda c, h, j: (c, h, 0, j))
    vma = vma_of(cu_chunks, q, k, a, b, v, v_new, do, h, dsc, x)
    if nv == 1 and not state_grad:
        kout = [shape_dtype((1, L, H, Kp), y.dtype, vma) for y in (q, k, a, b)]
    else:  # float32 partials over V-blocks, summed below
        kout = [shape_dtype((nv, L, H, Kp), jnp.float32, vma)] * 4
    kout_spec = pl.BlockSpec((None, C, None, Kp), lambda c, h, j: (j, c, h, 0))
    extra, extra_spec = [], []
    if state_grad:
        extra = [shape_dtype((nv, NC, H, Kp), jnp.float32, vma)]
        extra_spec = [pl.BlockSpec((None, None, None, Kp), lambda c, h, j: (j, c, h, 0))]
    dq, dk, da, db, dv, *dgc = pl.pallas_call(
        functools.partial(_intra_kernel, scale=scale, dt=dt, f32_prec=_bwd_precision(config, interpret)),
        grid=(NC, H, nv),
        in_specs=[
            pl.BlockSpec((cu_chunks.shape[0],), lambda c, h, j: (0,)),
            kspec, kspec, kspec, kspec, vspec, vspec, vspec, sspec, sspec,
            pl.BlockSpec((None, None, C, C), lambda c, h, j: (c, h, 0, 0)),
        ],
        out_specs=[kout_spec] * 4 + [vspec] + extra_spec,
        out_shape=kout + [shape_dtype((1, L, H, Vp), v.dtype, vma)] + extra,
        compiler_params=pltr.CompilerParams(num_warps=config.bwd_intra_warps, num_stages=1),
        interpret=interpret,
        name="iplr_chunk_bwd_intra",
    )(cu_chunks, q, k, a, b, v, v_new, do, h, dsc, x)
    if state_grad:
        return (*(g.sum(0, keepdims=True) for g in (dq, dk, da, db)), dv, dgc[0].sum(0))
    if nv > 1:
        dq, dk, da, db = (
            g.sum(0, keepdims=True).astype(y.dtype)
            for g, y in zip((dq, dk, da, db), (q, k, a, b), strict=True)
        )
    return dq, dk, da, db, dv


# -- the gate (docs/gate.md, "Backward of the gated chunked form") -------------------------------
# `_gated_bwd` picks the route under lax.cond: `_factored_bwd` (the kernels above on decayed
# operands, `gate_factors`) or `_blockwise_bwd`, three kernels of their own: `_gated_dv2_kernel`
# (P = M_qb^T dO per chunk, parallel: the part of dV2 the reverse sweep would otherwise recompute
# on its sequential path), `_gated_sweep_kernel` (dS with the decays) and `_gated_intra_kernel`
# (the five input gradients and dG_C per chunk); dgk then follows in jnp from the identity
# (`_gate_grad`).


def _rows(ref, i):
    return ref[pl.ds(i * SUB, SUB), :]


def _gated_dv2_kernel(q_ref, b_ref, g_ref, do_ref, p_ref, *, scale, dt, f32_prec, factor):
    """One (chunk, head, V-block): P_j = sum_{i >= j} M_qb[i, j]^T dO_i, M_qb the decayed
    incl(scale Q B^T) (off the diagonal through the block boundaries, pairwise on it)."""
    nb = q_ref.shape[0] // SUB
    mm = functools.partial(dot_as, dt=dt, f32_precision=f32_prec)
    diag = dict(factor=factor, precision=gate.diag_precision(dt, f32_prec))
    tot = gate.totals(g_ref, nb)
    for j in range(nb):
        (qb,) = gate.diag_products(q_ref, (b_ref,), g_ref, j, strict=False, **diag)
        p = mm(scale * qb, _rows(do_ref, j), ta=True)
        bc = _rows(b_ref, j).astype(jnp.float32) * gate.to_block_end(g_ref, tot, j)
        for i in range(j + 1, nb):
            G = gate.block_gate(g_ref, i)[0]
            qr = _rows(q_ref, i).astype(jnp.float32) * jnp.exp(G + gate.span(tot, j, i))
            p = p + mm(scale * mm(qr, bc, tb=True), _rows(do_ref, i), ta=True)
        p_ref[pl.ds(j * SUB, SUB), :] = p


def _gated_sweep_kernel(
    cu_ref, q_ref, b_ref, g_ref, w_ref, p_ref, do_ref, dht_ref, dsc_ref, dh0_ref, *, scale, C, dt,
    f32_prec=lax.Precision.DEFAULT,
):
    """The reverse dS sweep with the gate: dS0 = e^{G_C} dS_C + scale (Q e^G)^T dO + W^T dV2,
    dV2 = P + (B e^{G_C - G}) dS_C. The decays (a scan over the chunk's rows) are off the chain."""
    n = pl.program_id(0)
    c0, c1 = cu_ref[n], cu_ref[n + 1]
    last = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1

    def body(i, ds):
        c = c1 - 1 - i
        dsc_ref[c] = ds.astype(dsc_ref.dtype)
        rows = pl.ds(c * C, C)
        G = jnp.cumsum(g_ref[rows, :].astype(jnp.float32), axis=0)
        GC = jnp.sum(mask(last, G), axis=0)[None, :]
        qd = q_ref[rows, :].astype(jnp.float32) * jnp.exp(G)
        bd = b_ref[rows, :].astype(jnp.float32) * jnp.exp(GC - G)
        mm = functools.partial(dot_as, dt=dt, f32_precision=f32_prec)
        dv2 = p_ref[rows, :] + mm(bd, ds)
        return jnp.exp(GC).reshape(-1, 1) * ds + scale * mm(qd, do_ref[rows, :], ta=True) + mm(
            w_ref[rows, :], dv2, ta=True
        )

    ds = lax.fori_loop(0, c1 - c0, body, dht_ref[...].astype(jnp.float32))
    dh0_ref[...] = ds


def _gated_intra_kernel(
    cu_ref, q_ref, k_ref, a_ref, b_ref, g_ref, v_ref, v2_ref, do_ref, p_ref, h_ref, dsc_ref, x_ref,
    dq_ref, dk_ref, da_ref, db_ref, dv_ref, dgc_ref, *, scale, dt, f32_prec=lax.Precision.DEFAULT,
    factor=True,
):
    """One (chunk, head, V-block) with the gate, by 16-row blocks: dV2 = P + Bh dS_C,
    dZ = X^T dV2, then the row gradients (dq, da: blocks j <= i of each row block i) and the
    column ones (dk, db, dv: blocks i >= j of each column block j), each finished and stored
    before the next so few [16, Kp] accumulators are live; and dG_C = sum_v dS_C * S_C.
    Off-diagonal blocks factor through the block boundaries, diagonal ones loop over a row or
    column (`gate.diag_row_grads`, `gate.diag_col_grads`). K-side outputs are float32 (dgk
    is formed from them)."""
    C = q_ref.shape[0]
    nb = C // SUB
    n_seq = cu_ref.shape[0] - 1
    f32 = jnp.float32
    incl, strict = tri(SUB, strict=False), tri(SUB, strict=True)
    mm = functools.partial(dot_as, dt=dt, f32_precision=f32_prec)
    diag = dict(factor=factor, precision=gate.diag_precision(dt, f32_prec))
    rows32 = lambda ref, i: _rows(ref, i).astype(f32)  # noqa: E731
    valid = pl.program_id(0) < cu_ref[n_seq]
    ds = mask(valid, dsc_ref[...].astype(f32))
    s0 = h_ref[...]
    tot = gate.totals(g_ref, nb)
    to_chunk_end = lambda j: gate.to_block_end(g_ref, tot, j) * jnp.exp(gate.span(tot, j, nb))  # noqa: E731
    dv2 = [rows32(p_ref, i) + mm(rows32(b_ref, i) * to_chunk_end(i), ds) for i in range(nb)]
    dz = []
    for j in range(nb):  # dZ_j = sum_{i >= j} X_ij^T dV2_i
        acc = None
        for i in range(j, nb):
            term = mm(x_ref[pl.ds(i * SUB, SUB), pl.ds(j * SUB, SUB)], dv2[i], ta=True)
            acc = term if acc is None else acc + term
        dz.append(acc)
    del dv2

    def dms(i, j):  # the cotangents of M_qk, M_qb, M_ak, M_ab in block (i, j)
        do, v, v2 = _rows(do_ref, i), _rows(v_ref, j), _rows(v2_ref, j)
        out = (mm(do, v, tb=True), mm(do, v2, tb=True), mm(dz[i], v, tb=True), mm(dz[i], v2, tb=True))
        if i == j:
            out = (mask(incl, out[0]), mask(incl, out[1]), mask(strict, out[2]), mask(strict, out[3]))
        return out

    for i in range(nb):  # rows: dq_i, da_i
        G, Gx = gate.block_gate(g_ref, i)
        pre = gate.span(tot, -1, i)
        dq = mm(_rows(do_ref, i), s0, tb=True) * jnp.exp(G + pre)
        da = mm(dz[i], s0, tb=True) * jnp.exp(Gx + pre)
        dqk, dqb, dak, dab = dms(i, i)
        dq = dq + gate.diag_row_grads(((dqk, k_ref, False), (dqb, b_ref, False)), g_ref, i, **diag)
        da = da + gate.diag_row_grads(((dak, k_ref, True), (dab, b_ref, True)), g_ref, i, **diag)
        for j in range(i):
            cy = gate.to_block_end(g_ref, tot, j)
            kc, bc = rows32(k_ref, j) * cy, rows32(b_ref, j) * cy
            m = jnp.exp(gate.span(tot, j, i))
            dqk, dqb, dak, dab = dms(i, j)
            dq = dq + jnp.exp(G) * m * (mm(dqk, kc) + mm(dqb, bc))
            da = da + jnp.exp(Gx) * m * (mm(dak, kc) + mm(dab, bc))
        dq_ref[pl.ds(i * SUB, SUB), :] = scale * dq
        da_ref[pl.ds(i * SUB, SUB), :] = da

    sc = jnp.exp(gate.span(tot, -1, nb)).reshape(-1, 1) * s0.astype(f32)  # S_C, for dG_C
    for j in range(nb):  # columns: dk_j, db_j, dv_j
        cy = gate.to_block_end(g_ref, tot, j)
        tail = to_chunk_end(j)
        v, v2 = _rows(v_ref, j), _rows(v2_ref, j)
        kh, bh = rows32(k_ref, j) * tail, rows32(b_ref, j) * tail
        sc = sc + mm(kh, v, ta=True) + mm(bh, v2, ta=True)
        dk = mm(v, ds, tb=True) * tail
        db = mm(v2, ds, tb=True) * tail
        (mqk,) = gate.diag_products(q_ref, (k_ref,), g_ref, j, strict=False, **diag)
        (mak,) = gate.diag_products(a_ref, (k_ref,), g_ref, j, strict=True, **diag)
        dv = mm(kh, ds) + mm(scale * mqk, _rows(do_ref, j), ta=True) + mm(mak, dz[j], ta=True)
        dqk, dqb, dak, dab = dms(j, j)
        dk = dk + gate.diag_col_grads(((scale * dqk, q_ref, False), (dak, a_ref, True)), g_ref, j, **diag)
        db = db + gate.diag_col_grads(((scale * dqb, q_ref, False), (dab, a_ref, True)), g_ref, j, **diag)
        kc, bc = rows32(k_ref, j) * cy, rows32(b_ref, j) * cy
        for i in range(j + 1, nb):
            G, Gx = gate.block_gate(g_ref, i)
            m = jnp.exp(gate.span(tot, j, i))
            qr, ar = rows32(q_ref, i) * jnp.exp(G) * m, rows32(a_ref, i) * jnp.exp(Gx) * m
            dv = dv + mm(scale * mm(qr, kc, tb=True), _rows(do_ref, i), ta=True)
            dv = dv + mm(mm(ar, kc, tb=True), dz[i], ta=True)
            dqk, dqb, dak, dab = dms(i, j)
            dk = dk + cy * (scale * mm(dqk, qr, ta=True) + mm(dak, ar, ta=True))
            db = db + cy * (scale * mm(dqb, qr, ta=True) + mm(dab, ar, ta=True))
        dk_ref[pl.ds(j * SUB, SUB), :] = dk
        db_ref[pl.ds(j * SUB, SUB), :] = db
        dv_ref[pl.ds(j * SUB, SUB), :] = dv.astype(dv_ref.dtype)
    dgc_ref[...] = jnp.sum(ds * sc, axis=1)


def _gated_bwd(x: Inputs, res: Residuals, cu_chunks, do, dht, *, scale, chunk_size, config, interpret):
    """The gated backward: with `config.gate_chunk_factored`, when every chunk allows it, the
    IPLR kernels on decayed operands (`_factored_bwd`), else the gated kernels (`_blockwise_bwd`)."""
    kw = dict(scale=scale, chunk_size=chunk_size, config=config, interpret=interpret)
    if not (config.gate_chunk_factored and gate_factors.applies(jnp.result_type(*x), backward=True)):
        return _blockwise_bwd(x, res, cu_chunks, do, dht, **kw)
    # the predicate from the flags' one reduction; the factors are formed inside the branch, so
    # XLA fuses them into their uses instead of materialising them as operands of the cond
    ok = jnp.all(gate_factors.chunk_flags(x.gk, chunk_size) > 0)
    return lax.cond(
        ok, lambda: _factored_bwd(x, res, cu_chunks, do, dht, gate_factors.factors(x.gk, chunk_size), **kw),
        lambda: _blockwise_bwd(x, res, cu_chunks, do, dht, **kw),
    )


def _factored_bwd(x: Inputs, res: Residuals, cu_chunks, do, dht, f, *, scale, chunk_size, config, interpret):
    """The gated backward as the IPLR backward on the decayed operands of `gate_factors`: the
    dS sweep scales dS by e^{G_C - Gm} entering each chunk and by e^{Gm} leaving it, the intra
    kernel reads S0' = e^{Gm} S0 and W e^{-Gm} = X Ad, and also gives dG_C; the gradients of
    the decayed operands map back by their factors, and dgk follows from the identity."""
    q, k, v, a, b, _ = x
    dt = jnp.result_type(q, k, v, a, b)
    decay = gate_factors.decay
    up = -f.rel
    qd, kd, ad, bd = decay(q, f.rel), decay(k, up), decay(a, f.rel_x), decay(b, up)
    mid = gate_factors.per_chunk(f.mid)
    scales = (jnp.exp(gate_factors.per_chunk(f.end) - mid), jnp.exp(mid))
    kw = dict(scale=scale, chunk_size=chunk_size, dt=dt, config=config, interpret=interpret)
    dsc, dh0 = _sweep(qd, bd, decay(res.w, -f.mid), do, dht, cu_chunks, scales=scales, **kw)
    h = (res.h.astype(jnp.float32) * scales[1][..., None]).astype(res.h.dtype)
    dqd, dkd, dad, dbd, dv, dgc = _intra(
        qd, kd, v, ad, bd, h, res.v_new, do, dsc, res.x, cu_chunks, state_grad=True, **kw
    )
    dq, dk, da, db = (
        decay(g, e, jnp.float32) for g, e in ((dqd, f.rel), (dkd, up), (dad, f.rel_x), (dbd, up))
    )
    # the identity on the operands the kernels multiplied (q dq = Qd dQd, ...): with the
    # rounded decayed operands of 16-bit inputs its cancellation stays at their rounding
    used = x._replace(q=qd, k=kd, a=ad, b=bd)
    dgk = _gate_grad(used, dqd, dkd, dad, dbd, dgc, chunk_size)
    grads = (dq, dk, dv, da, db, dgk)
    return Inputs(*(g.astype(y.dtype) for g, y in zip(grads, x, strict=True))), dh0


def _blockwise_bwd(x: Inputs, res: Residuals, cu_chunks, do, dht, *, scale, chunk_size, config, interpret):
    """The gated backward kernels and dgk (see the section's comment)."""
    q, k, v, a, b, gk = x
    _, L, H, Kp = q.shape
    Vp = v.shape[-1]
    N, C = dht.shape[0], chunk_size
    NC = L // C
    dt = jnp.result_type(q, k, v, a, b)
    prec = _bwd_precision(config, interpret)
    bv = config.bwd_intra_block_v
    nv = Vp // bv
    kc = pl.BlockSpec((None, C, None, Kp), lambda c, h, j: (0, c, h, 0))
    vc = pl.BlockSpec((None, C, None, bv), lambda c, h, j: (0, c, h, j))
    sc = pl.BlockSpec((None, None, Kp, bv), lambda c, h, j: (c, h, 0, j))
    vma = vma_of(cu_chunks, q, k, v, a, b, gk, do, dht, *res)
    params = pltr.CompilerParams(num_warps=config.bwd_intra_warps, num_stages=1)
    p = pl.pallas_call(
        functools.partial(_gated_dv2_kernel, scale=scale, dt=dt, f32_prec=prec, factor=config.gate_factored),
        grid=(NC, H, nv), in_specs=[kc, kc, kc, vc], out_specs=vc,
        out_shape=shape_dtype((1, L, H, Vp), jnp.float32, vma),
        compiler_params=params, interpret=interpret, name="iplr_chunk_bwd_dv2_gated",
    )(q, b, gk, do)

    sbv = config.bwd_sweep_block_v
    kfull = pl.BlockSpec((None, L, None, Kp), lambda n, h, j: (0, 0, h, 0))
    vfull = pl.BlockSpec((None, L, None, sbv), lambda n, h, j: (0, 0, h, j))
    sspec = pl.BlockSpec((None, None, Kp, sbv), lambda n, h, j: (n, h, 0, j))
    dsc, dh0 = pl.pallas_call(
        functools.partial(_gated_sweep_kernel, scale=scale, C=C, dt=dt, f32_prec=prec),
        grid=(N, H, Vp // sbv),
        in_specs=[pl.BlockSpec((N + 1,), lambda n, h, j: (0,)), kfull, kfull, kfull, kfull, vfull,
                  vfull, sspec],
        out_specs=[pl.BlockSpec((NC, None, Kp, sbv), lambda n, h, j: (0, h, 0, j)), sspec],
        out_shape=[shape_dtype((NC, H, Kp, Vp), dt, vma), shape_dtype((N, H, Kp, Vp), jnp.float32, vma)],
        compiler_params=pltr.CompilerParams(
            num_warps=config.bwd_sweep_warps, num_stages=config.bwd_sweep_stages
        ),
        interpret=interpret, name="iplr_chunk_bwd_sweep",
    )(cu_chunks, q, b, gk, res.w, p, do, dht)

    kpart = pl.BlockSpec((None, C, None, Kp), lambda c, h, j: (j, c, h, 0))
    gpart = pl.BlockSpec((None, None, None, Kp), lambda c, h, j: (j, c, h, 0))
    dq, dk, da, db, dv, dgc = pl.pallas_call(
        functools.partial(
            _gated_intra_kernel, scale=scale, dt=dt, f32_prec=prec, factor=config.gate_factored
        ),
        grid=(NC, H, nv),
        in_specs=[pl.BlockSpec((cu_chunks.shape[0],), lambda c, h, j: (0,)), kc, kc, kc, kc, kc,
                  vc, vc, vc, vc, sc, sc, pl.BlockSpec((None, None, C, C), lambda c, h, j: (c, h, 0, 0))],
        out_specs=[kpart] * 4 + [vc, gpart],
        out_shape=[shape_dtype((nv, L, H, Kp), jnp.float32, vma)] * 4
        + [shape_dtype((1, L, H, Vp), v.dtype, vma), shape_dtype((nv, NC, H, Kp), jnp.float32, vma)],
        compiler_params=params, interpret=interpret, name="iplr_chunk_bwd_intra",
    )(cu_chunks, q, k, a, b, gk, v, res.v_new, do, p, res.h, dsc, res.x)
    dq, dk, da, db, dgc = (y.sum(0) for y in (dq, dk, da, db, dgc))
    dgk = _gate_grad(x, dq[None], dk[None], da[None], db[None], dgc, C)
    cast = lambda y, like: y[None].astype(like.dtype) if y.ndim == 3 else y.astype(like.dtype)  # noqa: E731
    return Inputs(cast(dq, q), cast(dk, k), dv, cast(da, a), cast(db, b), cast(dgk, gk)), dh0


def _gate_grad(x: Inputs, dq, dk, da, db, dgc, C):
    """dgk [1, L, H, Kp] float32 from the other gradients (float32) and dG_C [NC, H, Kp]:
    dgk_u = dG_C + sum_{t >= u} (q dq - k dk - b db)_t + sum_{t > u} (a da)_t within each chunk
    (docs/gate.md, "Backward of the gated chunked form")."""
    q, k, a, b = (y.astype(jnp.float32) for y in (x.q, x.k, x.a, x.b))
    _, L, H, Kp = q.shape
    chunks = lambda y: y.reshape(L // C, C, H, Kp)  # noqa: E731
    aa = chunks(a * da)
    # the in-chunk reverse cumulative sum as one product with a triangle of ones (XLA lowers
    # jnp.cumsum on the GPU to a log-depth scan of strided slices over the whole array)
    after = jnp.triu(jnp.ones((C, C), jnp.float32))  # [u, t]: t >= u
    summed = jnp.einsum("ut,nthk->nuhk", after, chunks(q * dq - k * dk - b * db) + aa, precision=HIGHEST)
    dgk = dgc[:, None] + summed - aa
    return dgk.reshape(1, L, H, Kp)


def chunk_bwd(
    x: Inputs, res: Residuals, cu_chunks, do, dht, *, scale, chunk_size, config: ChunkConfig,
    interpret, exit=None,
):
    """Gradients of the chunked form on the aligned layout (see `chunk.chunk_fwd`).

    Args:
      x: q, k, a, b [1, L, H, Kp] and v [1, L, H, Vp] (input dtype), L = NC * chunk_size.
      res: `Residuals` of the forward (h, v_new, X, W).
      cu_chunks: int32 [N + 1] chunk offsets of the sequences (may be traced).
      do: [1, L, H, Vp] cotangent of o; dht: [N, H, Kp, Vp] float32 cotangent of the final state.
      config: a filled `ChunkConfig`; with `bwd_kernels` False the same equations run in jnp
        (`reference.chunk.chunk_bwd_aligned`).
      exit: context parallelism, the mirror of `chunk_fwd`'s `enter` (kernels only): a function
        of this slice's backward summary [g | M^T] ([N, H, Kp, Vp + Kp]) and dht, returning the
        cotangent of the state leaving the slice, from which the sweep then runs.

    Returns:
      `Inputs` of dq, dk, dv, da, db in the inputs' dtypes, and dh0 [N, H, Kp, Vp] float32.
      Chunks at or past cu_chunks[-1] get zero gradients.
    """
    if exit is not None and (x.gated or not config.bwd_kernels):
        raise NotImplementedError("chunk_bwd(exit=...) runs on the IPLR backward kernels only")
    if not config.bwd_kernels:
        *g, dh0 = chunk_bwd_aligned(
            x, res.h, res.v_new, cu_chunks, do, dht, scale=scale, chunk_size=chunk_size
        )
        return Inputs(*g), dh0
    if x.gated:
        return _gated_bwd(
            x, res, jnp.asarray(cu_chunks, jnp.int32), do, jnp.asarray(dht, jnp.float32),
            scale=scale, chunk_size=chunk_size, config=config, interpret=interpret,
        )
    q, k, v, a, b = x[:5]
    dt = jnp.result_type(q, k, v, a, b)
    cu_chunks = jnp.asarray(cu_chunks, jnp.int32)
    dht = jnp.asarray(dht, jnp.float32)
    if config.segment_chunks:
        sweep = functools.partial(_segmented_sweep, exit=exit)
    elif exit is not None:
        (summary,) = _sweep(
            q, b, res.w, do, dht, cu_chunks, scale=scale, chunk_size=chunk_size, dt=dt, config=config,
            interpret=interpret, summary=True,
        )
        dht, sweep = exit(summary, dht), _sweep
    else:
        sweep = _sweep
    dsc, dh0 = sweep(
        q, b, res.w, do, dht, cu_chunks, scale=scale, chunk_size=chunk_size, dt=dt, config=config,
        interpret=interpret,
    )
    dq, dk, da, db, dv = _intra(
        q, k, v, a, b, res.h, res.v_new, do, dsc, res.x, cu_chunks, scale=scale,
        chunk_size=chunk_size, dt=dt, config=config, interpret=interpret,
    )
    return Inputs(dq, dk, dv, da, db), dh0
