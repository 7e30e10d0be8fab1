"""Backward kernels of the chunked form (DESIGN.md section 3): the reverse dS sweep and the
intra-chunk gradients (which hold the backward of the WY preprocessing, through dZ).

Per chunk (rows stacked into Q, K, A, B [C, K], Vc, V2, dO [C, V]; S0 the state before the
chunk, dS_C the cotangent of the state after it; Qs = scale Q, M_qk = incl(Qs K^T),
M_qb = incl(Qs B^T), L_ak = strict(A K^T), X = (I - strict(A B^T))^{-1}, W = X A; DESIGN.md
writes M_qk, M_qb with Q and leaves the scale implicit, autodiff says it belongs there):

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

When Vp is larger than one intra block (`_intra_block`: 128), each V-block writes float32
partial K-side gradients (dq, dk, da, db) and XLA sums them; for Vp <= 128 there is one block
and the kernel writes them directly in the inputs' dtypes. Kp = 256 does not reach the kernels
(`KERNEL_MAX_KP`, see `chunk_bwd`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from iplr_jax._common import NUM_SMS
from iplr_jax.chunk_xla import unit_lower_inverse
from iplr_jax.wy_fast import _mask

_HI = lax.Precision.HIGHEST
# float32 inputs: bulk dots at DEFAULT (tf32 on the GPU, DESIGN section 9).
_F32_PRECISION = lax.Precision.DEFAULT
_INTRA_WARPS = 8
# The largest Kp whose backward runs on the kernels; above it the jnp form (see `chunk_bwd`).
KERNEL_MAX_KP = 128


def _sweep_block(N: int, H: int, Kp: int, Vp: int) -> tuple[int, int]:
    """V-block and warps of the sweep. Its [Kp, BV] float32 carry plus the [C, Kp] tiles must
    fit in registers (BV <= 8192 / Kp); below that, smaller BV until N * H * Vp / BV programs
    fill the SMs, since each program is one dependent chain over its sequence's chunks."""
    bv = min(Vp, max(16, 8192 // Kp))
    while bv > 16 and N * H * (Vp // bv) < NUM_SMS:
        bv //= 2
    return bv, 8 if Kp * bv >= 8192 else 4


def _intra_block(Kp: int, Vp: int) -> int:
    """V-block of the intra kernel: all of V up to 128 (one block, no partial sums) unless
    Kp = 256, where [C, Kp] tiles already fill the registers."""
    return min(Vp, 128 if Kp <= 128 else 64)


def _low(dt) -> bool:
    return jnp.dtype(dt) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _dot(x, y, *, ta=False, tb=False, dt=None, precision=None):
    """x @ y (x^T if ta, y^T if tb) with float32 accumulation. With a low-precision `dt`
    both operands are cast to it (bf16/fp16 tensor-core dots); otherwise float32."""
    if dt is not None and _low(dt):
        x, y, precision = x.astype(dt), y.astype(dt), None
    else:
        x, y = x.astype(jnp.float32), y.astype(jnp.float32)
        precision = _F32_PRECISION if precision is None else precision
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(x, y, dims, precision=precision, preferred_element_type=jnp.float32)


def _tri(n, strict):
    r = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    c = lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return r > c if strict else r >= c


# -- 1. reverse dS sweep -----------------------------------------------------------------------


def _sweep_kernel(cu_ref, q_ref, b_ref, w_ref, do_ref, dht_ref, dsc_ref, dh0_ref, *, scale, C, dt):
    n = pl.program_id(0)
    c0, c1 = cu_ref[n], cu_ref[n + 1]
    incl = _tri(C, False)

    def body(i, ds):
        c = c1 - 1 - i
        dsc_ref[c] = ds.astype(dsc_ref.dtype)  # cotangent of the state after chunk c
        rows = pl.ds(c * C, C)
        q, b, w, do = q_ref[rows, :], b_ref[rows, :], w_ref[rows, :], do_ref[rows, :]
        mqb = _mask(incl, scale * _dot(q, b, tb=True, dt=dt))  # off the dS chain
        dv2 = _dot(mqb, do, ta=True, dt=dt) + _dot(b, ds, dt=dt)
        return ds + scale * _dot(q, do, ta=True, dt=dt) + _dot(w, dv2, ta=True, dt=dt)

    ds = lax.fori_loop(0, c1 - c0, body, dht_ref[...].astype(jnp.float32))
    dh0_ref[...] = ds  # empty sequence: no iterations, dh0 = dht


def _sweep(q, b, w, do, dht, cu_chunks, *, scale, chunk_size, dt, interpret):
    """dS_C [NC, H, Kp, Vp] (dt) for every chunk and dh0 [N, H, Kp, Vp] float32."""
    _, L, H, Kp = q.shape
    Vp = do.shape[-1]
    N = dht.shape[0]
    C = chunk_size
    NC = L // C
    bv, warps = _sweep_block(N, H, Kp, Vp)
    kspec = pl.BlockSpec((None, L, None, Kp), lambda n, h, j: (0, 0, h, 0))
    sspec = pl.BlockSpec((None, None, Kp, bv), lambda n, h, j: (n, h, 0, j))
    return pl.pallas_call(
        functools.partial(_sweep_kernel, scale=scale, C=C, dt=dt),
        grid=(N, H, Vp // bv),
        in_specs=[
            pl.BlockSpec((N + 1,), lambda n, h, j: (0,)),
            kspec, kspec, kspec,
            pl.BlockSpec((None, L, None, bv), lambda n, h, j: (0, 0, h, j)),
            sspec,
        ],
        out_specs=[pl.BlockSpec((NC, None, Kp, bv), lambda n, h, j: (0, h, 0, j)), sspec],
        out_shape=[
            jax.ShapeDtypeStruct((NC, H, Kp, Vp), dt),
            jax.ShapeDtypeStruct((N, H, Kp, Vp), jnp.float32),
        ],
        # two stages double-buffer the [C, Kp] tiles: ~200 KB of shared memory at Kp = 256
        compiler_params=pltr.CompilerParams(num_warps=warps, num_stages=2 if Kp <= 128 else 1),
        interpret=interpret,
        name="iplr_chunk_bwd_sweep",
    )(cu_chunks, q, b, w, do, dht)


# -- 2. intra-chunk gradients ------------------------------------------------------------------


def _intra_kernel(
    cu_ref, q_ref, k_ref, a_ref, b_ref, v_ref, v2_ref, do_ref, h_ref, dsc_ref, x_ref,
    dq_ref, dk_ref, da_ref, db_ref, dv_ref, *, scale, dt,
):
    C = q_ref.shape[0]
    n_seq = cu_ref.shape[0] - 1
    incl, strict = _tri(C, False), _tri(C, True)
    mm = functools.partial(_dot, dt=dt)
    # Loads sit right before their first use and the five gradients are finished one after
    # the other, so that few [C, Kp] / [Kp, BV] tiles are live at once (straight-line code;
    # Triton keeps program order).
    # Chunks at or past cu_chunks[-1] are padding the sweep never wrote: read dS_C as zero.
    valid = pl.program_id(0) < cu_ref[n_seq]
    ds = _mask(valid, dsc_ref[...].astype(jnp.float32))
    q, b, do = q_ref[...], b_ref[...], do_ref[...]
    dv2 = mm(_mask(incl, scale * mm(q, b, tb=True)), do, ta=True) + mm(b, ds)
    dz = _dot(x_ref[...], dv2, ta=True, dt=dt)
    k, a = k_ref[...], a_ref[...]
    mqk = _mask(incl, scale * mm(q, k, tb=True))
    lak = _mask(strict, mm(a, k, tb=True))
    dv = mm(mqk, do, ta=True) + mm(k, ds) + mm(lak, dz, ta=True)
    dv_ref[...] = dv.astype(dv_ref.dtype)

    v = v_ref[...]
    dov = _mask(incl, mm(do, v, tb=True))
    dzv = _mask(strict, mm(dz, v, tb=True))
    dk = scale * mm(dov, q, ta=True) + mm(v, ds, tb=True) + mm(dzv, a, ta=True)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    v2 = v2_ref[...]
    dov2 = _mask(incl, mm(do, v2, tb=True))
    dzv2 = _mask(strict, mm(dz, v2, tb=True))
    db = scale * mm(dov2, q, ta=True) + mm(v2, ds, tb=True) + mm(dzv2, a, ta=True)
    db_ref[...] = db.astype(db_ref.dtype)

    s0 = h_ref[...]
    dq = scale * (mm(do, s0, tb=True) + mm(dov, k) + mm(dov2, b))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    da = mm(dz, s0, tb=True) + mm(dzv, k) + mm(dzv2, b)
    da_ref[...] = da.astype(da_ref.dtype)


def _intra(q, k, v, a, b, h, v_new, do, dsc, x, cu_chunks, *, scale, chunk_size, dt, interpret):
    _, L, H, Kp = q.shape
    Vp = v.shape[-1]
    C = chunk_size
    NC = L // C
    bv = _intra_block(Kp, Vp)
    nv = Vp // bv
    kspec = pl.BlockSpec((None, C, None, Kp), lambda c, h, j: (0, c, h, 0))
    vspec = pl.BlockSpec((None, C, None, bv), lambda c, h, j: (0, c, h, j))
    sspec = pl.BlockSpec((None, None, Kp, bv), lambda c, h, j: (c, h, 0, j))
    if nv == 1:
        kout = [jax.ShapeDtypeStruct((1, L, H, Kp), y.dtype) for y in (q, k, a, b)]
    else:  # float32 partials over V-blocks, summed below
        kout = [jax.ShapeDtypeStruct((nv, L, H, Kp), jnp.float32)] * 4
    kout_spec = pl.BlockSpec((None, C, None, Kp), lambda c, h, j: (j, c, h, 0))
    dq, dk, da, db, dv = pl.pallas_call(
        functools.partial(_intra_kernel, scale=scale, dt=dt),
        grid=(NC, H, nv),
        in_specs=[
            pl.BlockSpec((cu_chunks.shape[0],), lambda c, h, j: (0,)),
            kspec, kspec, kspec, kspec, vspec, vspec, vspec, sspec, sspec,
            pl.BlockSpec((None, None, C, C), lambda c, h, j: (c, h, 0, 0)),
        ],
        out_specs=[kout_spec] * 4 + [vspec],
        out_shape=kout + [jax.ShapeDtypeStruct((1, L, H, Vp), v.dtype)],
        compiler_params=pltr.CompilerParams(num_warps=_INTRA_WARPS, num_stages=1),
        interpret=interpret,
        name="iplr_chunk_bwd_intra",
    )(cu_chunks, q, k, a, b, v, v_new, do, h, dsc, x)
    if nv > 1:
        dq, dk, da, db = (
            g.sum(0, keepdims=True).astype(y.dtype)
            for g, y in zip((dq, dk, da, db), (q, k, a, b), strict=True)
        )
    return dq, dk, da, db, dv


def chunk_bwd(q, k, v, a, b, res, cu_chunks, do, dht, *, scale, chunk_size, interpret):
    """Gradients of the chunked form on the aligned layout (see `chunk.chunk_fwd`).

    Args:
      q, k, a, b: [1, L, H, Kp]; v: [1, L, H, Vp] (input dtype), L = NC * chunk_size.
      res: `chunk.Residuals` of the forward (h, v_new, X, W).
      cu_chunks: int32 [N + 1] chunk offsets of the sequences (may be traced).
      do: [1, L, H, Vp] cotangent of o; dht: [N, H, Kp, Vp] float32 cotangent of the final state.

    Returns:
      dq, dk, da, db [1, L, H, Kp] and dv [1, L, H, Vp] in the inputs' dtypes, and dh0
      [N, H, Kp, Vp] float32. Chunks at or past cu_chunks[-1] get zero gradients.

    For Kp = 256 the same equations run as jnp (`_chunk_bwd_reference`, XLA): the kernels'
    [C, Kp] dot operands do not fit in shared memory there (H100, K = 200, float32: 384 KB
    requested, 227 KB available). In 16-bit they may (`benchmarks/sweep_configs.py`, case
    "kp256 bwd"; not yet run on a GPU).
    """
    if q.shape[-1] > KERNEL_MAX_KP:
        return _chunk_bwd_reference(
            q, k, v, a, b, res.h, res.v_new, cu_chunks, do, dht, scale=scale, chunk_size=chunk_size
        )
    dt = jnp.result_type(q, k, v, a, b)
    cu_chunks = jnp.asarray(cu_chunks, jnp.int32)
    dht = jnp.asarray(dht, jnp.float32)
    dsc, dh0 = _sweep(
        q, b, res.w, do, dht, cu_chunks, scale=scale, chunk_size=chunk_size, dt=dt, interpret=interpret
    )
    dq, dk, da, db, dv = _intra(
        q, k, v, a, b, res.h, res.v_new, do, dsc, res.x, cu_chunks, scale=scale, chunk_size=chunk_size, dt=dt,
        interpret=interpret,
    )
    return dq, dk, dv, da, db, dh0


# -- pure-jnp backward on the same layout and residuals (the kernels' oracle) ---------------------


def _chunk_bwd_reference(q, k, v, a, b, h, v_new, cu_chunks, do, dht, *, scale, chunk_size):
    """`chunk_bwd` in plain jnp (float64 when any input is float64): same arguments, results."""
    C = chunk_size
    _, L, H, _ = q.shape
    NC, N = L // C, dht.shape[0]
    acc = jnp.float64 if any(x.dtype == jnp.float64 for x in (q, k, v, a, b, h, v_new, do)) else jnp.float32
    split = lambda x: x[0].reshape(NC, C, H, -1).transpose(0, 2, 1, 3).astype(acc)  # [NC, H, C, D]
    Q, Kc, Vc, A, B, V2, dO = (split(x) for x in (q, k, v, a, b, v_new, do))
    S0 = h.astype(acc)
    mm = lambda x, y: jnp.einsum("...ij,...jk->...ik", x, y, precision=_HI)
    mmT = lambda x, y: jnp.einsum("...ij,...kj->...ik", x, y, precision=_HI)  # x y^T
    Tm = lambda x, y: jnp.einsum("...ji,...jk->...ik", x, y, precision=_HI)  # x^T y
    incl = lambda x: jnp.where(jnp.tri(C, k=0, dtype=bool), x, 0)
    strict = lambda x: jnp.where(jnp.tri(C, k=-1, dtype=bool), x, 0)
    X = unit_lower_inverse(strict(mmT(A, B)))
    W = mm(X, A)
    Mqk, Mqb, Lak = incl(scale * mmT(Q, Kc)), incl(scale * mmT(Q, B)), strict(mmT(A, Kc))

    cu = jnp.asarray(cu_chunks, jnp.int32)
    c = jnp.arange(NC)
    seq = jnp.clip(jnp.searchsorted(cu[1:], c, side="right"), 0, N - 1)
    last = c == cu[seq + 1] - 1
    valid = c < cu[-1]
    dht = dht.astype(acc)

    def body(ds, xs):
        dO_c, Q_c, B_c, W_c, Mqb_c, seq_c, last_c, valid_c = xs
        ds = jnp.where(valid_c, jnp.where(last_c, dht[seq_c], ds), 0)
        dv2 = Tm(Mqb_c, dO_c) + mm(B_c, ds)
        ds0 = ds + scale * Tm(Q_c, dO_c) + Tm(W_c, dv2)
        return ds0, (ds, ds0)

    _, (dSC, dS0) = jax.lax.scan(
        body, jnp.zeros_like(dht[0]), (dO, Q, B, W, Mqb, seq, last, valid), reverse=True
    )
    nonempty = (cu[1:] > cu[:-1])[:, None, None, None]
    dh0 = jnp.where(nonempty, dS0[jnp.clip(cu[:-1], 0, NC - 1)], dht)

    dV2 = Tm(Mqb, dO) + mm(B, dSC)
    dZ = Tm(X, dV2)
    dV = Tm(Mqk, dO) + mm(Kc, dSC) + Tm(Lak, dZ)
    dOV, dOV2 = incl(mmT(dO, Vc)), incl(mmT(dO, V2))
    dZV, dZV2 = strict(mmT(dZ, Vc)), strict(mmT(dZ, V2))
    dQ = scale * (mmT(dO, S0) + mm(dOV, Kc) + mm(dOV2, B))
    dK = scale * Tm(dOV, Q) + mmT(Vc, dSC) + Tm(dZV, A)
    dA = mmT(dZ, S0) + mm(dZV, Kc) + mm(dZV2, B)
    dB = scale * Tm(dOV2, Q) + mmT(V2, dSC) + Tm(dZV2, A)
    merge = lambda g, like: g.transpose(0, 2, 1, 3).reshape(1, L, H, -1).astype(like.dtype)
    return (
        merge(dQ, q), merge(dK, k), merge(dV, v), merge(dA, a), merge(dB, b),
        dh0.astype(jnp.promote_types(acc, jnp.float32)),
    )
