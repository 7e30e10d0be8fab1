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
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from iplr_jax.inputs import Inputs
from iplr_jax.reference.chunk import chunk_bwd_aligned
from iplr_jax.sharding import shape_dtype, vma_of
from iplr_jax.triton.chunk import Residuals
from iplr_jax.triton.config import ChunkConfig
from iplr_jax.triton.helpers import dot_as, mask, tri


def _bwd_precision(config: ChunkConfig):
    """The precision of the backward's float32-operand dots (`ChunkConfig.f32_dots`)."""
    return lax.Precision.HIGHEST if config.f32_dots == "highest" else lax.Precision.DEFAULT


# -- 1. reverse dS sweep -----------------------------------------------------------------------


def _sweep_kernel(
    cu_ref, q_ref, b_ref, w_ref, do_ref, dht_ref, dsc_ref, dh0_ref, *, scale, C, dt,
    f32_prec=lax.Precision.DEFAULT,
):
    n = pl.program_id(0)
    c0, c1 = cu_ref[n], cu_ref[n + 1]
    incl = tri(C, strict=False)

    def body(i, ds):
        c = c1 - 1 - i
        dsc_ref[c] = ds.astype(dsc_ref.dtype)  # cotangent of the state after chunk c
        rows = pl.ds(c * C, C)
        q, b, w, do = q_ref[rows, :], b_ref[rows, :], w_ref[rows, :], do_ref[rows, :]
        mm = functools.partial(dot_as, dt=dt, f32_precision=f32_prec)
        mqb = mask(incl, scale * mm(q, b, tb=True))  # off the dS chain
        dv2 = mm(mqb, do, ta=True) + mm(b, ds)
        return ds + scale * mm(q, do, ta=True) + mm(w, dv2, ta=True)

    ds = lax.fori_loop(0, c1 - c0, body, dht_ref[...].astype(jnp.float32))
    dh0_ref[...] = ds  # empty sequence: no iterations, dh0 = dht


def _sweep(q, b, w, do, dht, cu_chunks, *, scale, chunk_size, dt, config, interpret):
    """dS_C [NC, H, Kp, Vp] (dt) for every chunk and dh0 [N, H, Kp, Vp] float32."""
    _, L, H, Kp = q.shape
    Vp = do.shape[-1]
    N = dht.shape[0]
    C = chunk_size
    NC = L // C
    bv = config.bwd_sweep_block_v
    kspec = pl.BlockSpec((None, L, None, Kp), lambda n, h, j: (0, 0, h, 0))
    sspec = pl.BlockSpec((None, None, Kp, bv), lambda n, h, j: (n, h, 0, j))
    return pl.pallas_call(
        functools.partial(_sweep_kernel, scale=scale, C=C, dt=dt, f32_prec=_bwd_precision(config)),
        grid=(N, H, Vp // bv),
        in_specs=[
            pl.BlockSpec((N + 1,), lambda n, h, j: (0,)),
            kspec, kspec, kspec,
            pl.BlockSpec((None, L, None, bv), lambda n, h, j: (0, 0, h, j)),
            sspec,
        ],
        out_specs=[pl.BlockSpec((NC, None, Kp, bv), lambda n, h, j: (0, h, 0, j)), sspec],
        out_shape=[
            shape_dtype((NC, H, Kp, Vp), dt, vma_of(q, b, w, do, dht, cu_chunks)),
            shape_dtype((N, H, Kp, Vp), jnp.float32, vma_of(q, b, w, do, dht, cu_chunks)),
        ],
        compiler_params=pltr.CompilerParams(
            num_warps=config.bwd_sweep_warps, num_stages=config.bwd_sweep_stages
        ),
        interpret=interpret,
        name="iplr_chunk_bwd_sweep",
    )(cu_chunks, q, b, w, do, dht)


# -- 2. intra-chunk gradients ------------------------------------------------------------------


def _intra_kernel(
    cu_ref, q_ref, k_ref, a_ref, b_ref, v_ref, v2_ref, do_ref, h_ref, dsc_ref, x_ref,
    dq_ref, dk_ref, da_ref, db_ref, dv_ref, *, scale, dt, f32_prec=lax.Precision.DEFAULT,
):
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


def _intra(q, k, v, a, b, h, v_new, do, dsc, x, cu_chunks, *, scale, chunk_size, dt, config, interpret):
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
    if nv == 1:
        kout = [shape_dtype((1, L, H, Kp), y.dtype, vma) for y in (q, k, a, b)]
    else:  # float32 partials over V-blocks, summed below
        kout = [shape_dtype((nv, L, H, Kp), jnp.float32, vma)] * 4
    kout_spec = pl.BlockSpec((None, C, None, Kp), lambda c, h, j: (j, c, h, 0))
    dq, dk, da, db, dv = pl.pallas_call(
        functools.partial(_intra_kernel, scale=scale, dt=dt, f32_prec=_bwd_precision(config)),
        grid=(NC, H, nv),
        in_specs=[
            pl.BlockSpec((cu_chunks.shape[0],), lambda c, h, j: (0,)),
            kspec, kspec, kspec, kspec, vspec, vspec, vspec, sspec, sspec,
            pl.BlockSpec((None, None, C, C), lambda c, h, j: (c, h, 0, 0)),
        ],
        out_specs=[kout_spec] * 4 + [vspec],
        out_shape=kout + [shape_dtype((1, L, H, Vp), v.dtype, vma)],
        compiler_params=pltr.CompilerParams(num_warps=config.bwd_intra_warps, num_stages=1),
        interpret=interpret,
        name="iplr_chunk_bwd_intra",
    )(cu_chunks, q, k, a, b, v, v_new, do, h, dsc, x)
    if nv > 1:
        dq, dk, da, db = (
            g.sum(0, keepdims=True).astype(y.dtype)
            for g, y in zip((dq, dk, da, db), (q, k, a, b), strict=True)
        )
    return dq, dk, da, db, dv


def chunk_bwd(
    x: Inputs, res: Residuals, cu_chunks, do, dht, *, scale, chunk_size, config: ChunkConfig,
    interpret,
):
    """Gradients of the chunked form on the aligned layout (see `chunk.chunk_fwd`).

    Args:
      x: q, k, a, b [1, L, H, Kp] and v [1, L, H, Vp] (input dtype), L = NC * chunk_size.
      res: `Residuals` of the forward (h, v_new, X, W).
      cu_chunks: int32 [N + 1] chunk offsets of the sequences (may be traced).
      do: [1, L, H, Vp] cotangent of o; dht: [N, H, Kp, Vp] float32 cotangent of the final state.
      config: a filled `ChunkConfig`; with `bwd_kernels` False the same equations run in jnp
        (`reference.chunk.chunk_bwd_aligned`).

    Returns:
      `Inputs` of dq, dk, dv, da, db in the inputs' dtypes, and dh0 [N, H, Kp, Vp] float32.
      Chunks at or past cu_chunks[-1] get zero gradients.
    """
    if not config.bwd_kernels:
        *g, dh0 = chunk_bwd_aligned(
            x, res.h, res.v_new, cu_chunks, do, dht, scale=scale, chunk_size=chunk_size
        )
        return Inputs(*g), dh0
    q, k, v, a, b = x[:5]
    dt = jnp.result_type(q, k, v, a, b)
    cu_chunks = jnp.asarray(cu_chunks, jnp.int32)
    dht = jnp.asarray(dht, jnp.float32)
    dsc, dh0 = _sweep(
        q, b, res.w, do, dht, cu_chunks, scale=scale, chunk_size=chunk_size, dt=dt, config=config,
        interpret=interpret,
    )
    dq, dk, da, db, dv = _intra(
        q, k, v, a, b, res.h, res.v_new, do, dsc, res.x, cu_chunks, scale=scale,
        chunk_size=chunk_size, dt=dt, config=config, interpret=interpret,
    )
    return Inputs(dq, dk, dv, da, db), dh0
