"""Kernels of the fused recurrence (docs/chunked.md, "Fused recurrence"): Pallas on Triton.

One program owns a `[Kp, BV]` float32 slab of one head's state and walks the tokens of one
sequence, keeping the slab in registers. The columns of `S` evolve independently (`a^T S` reads
only the same columns), so V-blocks are independent programs.

Backward, without storing anything of size [T, K, V]: the forward additionally writes the
pseudo-values `V2_t = a_t^T S_{t-1}` ([T, V] float32, the size of `o`). Then
  1. a reverse sweep carries `dS` from the final-state cotangent: with `G = dS_t + scale q_t do_t^T`
       dk_t = G v_t,  dv_t = G^T k_t,  db_t = G V2_t,  dV2_t = G^T b_t,  dS_{t-1} = G + a_t dV2_t^T;
     it needs no `S` at all (only the stored `V2`), and its last `dS` is `dh0`;
  2. a forward sweep recomputes `S_t` from `h0` (using the stored `V2`, so exactly the forward's
     states) and gives  da_t = S_{t-1} dV2_t,  dq_t = scale S_t do_t.
This is exact, O(T K V) work, and avoids both state checkpoints and the unstable inversion of
`I + b a^T`. dk, db, dq, da are reductions over V: each V-block writes float32 partials
[NV, ...] that XLA sums, so the backward's V-blocks are chosen separately from the forward's
(`config.fused_recurrent_config`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from iplr_jax.inputs import Inputs
from iplr_jax.sharding import shape_dtype, vma_of
from iplr_jax.triton.config import FusedRecurrentConfig
from iplr_jax.triton.helpers import F32, prefetched_loop

# -- kernels -------------------------------------------------------------------------------------
# Refs (the head axis squeezed by the BlockSpecs): per-token rows q/k/a/b [L, Kp], v/o/V2/do/dV2
# [L, BV]; state slabs [Kp, BV]; cu [N + 1]. Program (n, h, j) handles sequence n, head h,
# columns j*BV .. (j+1)*BV-1, tokens cu[n] .. cu[n+1]-1.


def _fwd_kernel(cu_ref, q_ref, k_ref, v_ref, a_ref, b_ref, *refs, scale, depth, gated=False):
    """With `gated`, refs begin with the gate gk [L, Kp]: the rows of S_{t-1} decay by
    exp(gk_t) after a_t^T reads them (docs/gate.md)."""
    g_refs, (h0_ref, o_ref, ht_ref, *v2_ref) = (refs[:1], refs[1:]) if gated else ((), refs)
    n = pl.program_id(0)

    def step(t, rows, S):
        q, k, v, a, b, *g = (x.astype(F32) for x in rows)
        aS = jnp.sum(a[:, None] * S, axis=0)  # V2_t = a_t^T S_{t-1}
        if g:
            S = jnp.exp(g[0])[:, None] * S
        S = S + k[:, None] * v[None, :] + b[:, None] * aS[None, :]
        o_ref[t, :] = (scale * jnp.sum(q[:, None] * S, axis=0)).astype(o_ref.dtype)
        if v2_ref:  # residual for the backward
            v2_ref[0][t, :] = aS
        return S

    ht_ref[...] = _loop(
        cu_ref[n], cu_ref[n + 1], (q_ref, k_ref, v_ref, a_ref, b_ref, *g_refs), step,
        h0_ref[...].astype(F32), depth=depth,
    )


def _bwd_dS_kernel(cu_ref, q_ref, k_ref, v_ref, a_ref, b_ref, *refs, scale, depth, gated=False):
    """Reverse sweep: dk, db (partials over this V-block), dv, dV2 and dh0. With `gated`, refs
    begin with gk and the carried cotangent decays: dS_{t-1} = exp(gk_t) G + a_t dV2_t^T."""
    g_refs, refs = (refs[:1], refs[1:]) if gated else ((), refs)
    v2_ref, do_ref, dht_ref, dk_ref, db_ref, dv_ref, dv2_ref, dh0_ref = refs
    n = pl.program_id(0)

    def step(t, rows, dS):
        q, k, a, b, v, v2, do, *g = (x.astype(F32) for x in rows)
        G = dS + (scale * q)[:, None] * do[None, :]  # cotangent of S_t
        dk_ref[t, :] = jnp.sum(G * v[None, :], axis=1)
        db_ref[t, :] = jnp.sum(G * v2[None, :], axis=1)
        dv_ref[t, :] = jnp.sum(G * k[:, None], axis=0).astype(dv_ref.dtype)
        dv2 = jnp.sum(G * b[:, None], axis=0)
        dv2_ref[t, :] = dv2
        if g:
            G = jnp.exp(g[0])[:, None] * G
        return G + a[:, None] * dv2[None, :]

    dh0_ref[...] = _loop(
        cu_ref[n], cu_ref[n + 1], (q_ref, k_ref, a_ref, b_ref, v_ref, v2_ref, do_ref, *g_refs), step,
        dht_ref[...].astype(F32), depth=depth, reverse=True,
    )


def _bwd_dq_kernel(cu_ref, k_ref, v_ref, b_ref, *refs, scale, depth, gated=False):
    """Forward sweep recomputing S_t from h0 and the stored V2: dq and da (partials). With
    `gated`, refs begin with gk and the recomputed state decays as in the forward."""
    g_refs, refs = (refs[:1], refs[1:]) if gated else ((), refs)
    v2_ref, do_ref, dv2_ref, h0_ref, dq_ref, da_ref = refs
    n = pl.program_id(0)

    def step(t, rows, S):
        k, b, v, v2, do, dv2, *g = (x.astype(F32) for x in rows)
        da_ref[t, :] = jnp.sum(S * dv2[None, :], axis=1)  # uses S_{t-1}
        if g:
            S = jnp.exp(g[0])[:, None] * S
        S = S + k[:, None] * v[None, :] + b[:, None] * v2[None, :]
        dq_ref[t, :] = scale * jnp.sum(S * do[None, :], axis=1)
        return S

    _loop(
        cu_ref[n], cu_ref[n + 1], (k_ref, b_ref, v_ref, v2_ref, do_ref, dv2_ref, *g_refs), step,
        h0_ref[...].astype(F32), depth=depth,
    )


def _loop(start, stop, refs, step, init, *, depth, reverse=False):
    """The per-token loop of every kernel here: row t of each ref, loaded `depth` steps ahead."""
    return prefetched_loop(
        start, stop, lambda t: tuple(r[t, :] for r in refs), step, init,
        rows=refs[0].shape[0], depth=depth, reverse=reverse,
    )


# -- pallas_call plumbing ------------------------------------------------------------------------


def _call(kernel, args, outs, *, grid, interpret, num_warps):
    """`outs`: (shape, dtype, spec) triples; `args`: (array, spec) pairs."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[s for _, s in args],
        out_specs=[s for _, _, s in outs],
        # inside shard_map the outputs vary like the inputs
        out_shape=[shape_dtype(shp, dt, vma_of(*(x for x, _ in args))) for shp, dt, _ in outs],
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="iplr_fused" + kernel.func.__name__.removesuffix("_kernel"),  # iplr_fused_bwd_dS, ...
    )(*(x for x, _ in args))


class _Specs:
    """BlockSpecs on the [L, H, D] token layout and [N, H, Kp, Vp] states, grid (N, H, NV)."""

    def __init__(self, L, N, Kp, BV):
        sq = pl.squeezed
        self.cu = pl.BlockSpec((N + 1,), lambda n, h, j: (0,))
        self.k = pl.BlockSpec((L, sq, Kp), lambda n, h, j: (0, h, 0))  # [L, Kp] rows
        self.v = pl.BlockSpec((L, sq, BV), lambda n, h, j: (0, h, j))  # [L, BV] rows
        self.kpart = pl.BlockSpec((sq, L, sq, Kp), lambda n, h, j: (j, 0, h, 0))  # [NV, L, H, Kp]
        self.s = pl.BlockSpec((sq, sq, Kp, BV), lambda n, h, j: (n, h, 0, j))  # state slab


def fused_fwd(x: Inputs, h0, cu, *, scale, config: FusedRecurrentConfig, interpret, residuals):
    """x: q, k, a, b (and the gate gk, if any) [L, H, Kp] and v [L, H, Vp]; h0 [N, H, Kp, Vp]
    float32; cu int32 [N + 1] token offsets -> o [L, H, Vp], ht [N, H, Kp, Vp] (and, with
    `residuals`, V2 [L, H, Vp])."""
    q, k, v, a, b = x[:5]
    (L, H, Kp), Vp, N = q.shape, v.shape[-1], h0.shape[0]
    BV, nw = config.fwd_block_v, config.fwd_warps
    sp = _Specs(L, N, Kp, BV)
    outs = [((L, H, Vp), v.dtype, sp.v), ((N, H, Kp, Vp), F32, sp.s)]
    outs += [((L, H, Vp), F32, sp.v)] if residuals else []
    return _call(
        functools.partial(_fwd_kernel, scale=scale, depth=config.prefetch, **_gate_kw(x)),
        [(cu, sp.cu), (q, sp.k), (k, sp.k), (v, sp.v), (a, sp.k), (b, sp.k), *_gate(x, sp), (h0, sp.s)],
        outs, grid=(N, H, Vp // BV), interpret=interpret, num_warps=nw,
    )


def fused_bwd(x: Inputs, h0, cu, v2, do, dht, *, scale, config: FusedRecurrentConfig, interpret):
    """Gradients of `fused_fwd` from its residual V2: (`Inputs` of dq, dk, dv, da, db and, with
    a gate, dgk; dh0). dgk is not a sweep of its own: it follows from the other gradients by a
    cumulative sum (`_gate_grad`, docs/gate.md)."""
    q, k, v, a, b = x[:5]
    (L, H, Kp), Vp, N = q.shape, v.shape[-1], h0.shape[0]
    BV, nw = config.bwd_block_v, config.bwd_warps
    NV, sp = Vp // BV, _Specs(L, N, Kp, BV)
    grid = (N, H, NV)
    kpart = ((NV, L, H, Kp), F32, sp.kpart)
    dk, db, dv, dv2, dh0 = _call(
        functools.partial(_bwd_dS_kernel, scale=scale, depth=config.prefetch, **_gate_kw(x)),
        [(cu, sp.cu), (q, sp.k), (k, sp.k), (v, sp.v), (a, sp.k), (b, sp.k), *_gate(x, sp), (v2, sp.v),
         (do, sp.v), (dht, sp.s)],
        [kpart, kpart, ((L, H, Vp), v.dtype, sp.v), ((L, H, Vp), F32, sp.v), ((N, H, Kp, Vp), F32, sp.s)],
        grid=grid, interpret=interpret, num_warps=nw,
    )
    dq, da = _call(
        functools.partial(_bwd_dq_kernel, scale=scale, depth=config.prefetch, **_gate_kw(x)),
        [(cu, sp.cu), (k, sp.k), (v, sp.v), (b, sp.k), *_gate(x, sp), (v2, sp.v), (do, sp.v),
         (dv2, sp.v), (h0, sp.s)],
        [kpart, kpart], grid=grid, interpret=interpret, num_warps=nw,
    )
    red = lambda x, like: x.sum(0).astype(like.dtype)
    if not x.gated:
        return Inputs(red(dq, q), red(dk, k), dv, red(da, a), red(db, b)), dh0
    dq, dk, da, db = (y.sum(0) for y in (dq, dk, da, db))  # float32
    dgk = _gate_grad(x, h0, cu, dq, dk, da, db, dh0)
    cast = lambda y, like: y.astype(like.dtype)
    return Inputs(cast(dq, q), cast(dk, k), dv, cast(da, a), cast(db, b), cast(dgk, x.gk)), dh0


def _gate(x: Inputs, sp: _Specs):
    """The gate's (array, spec) operand when gated, else nothing (the kernels compile it out)."""
    return [(x.gk, sp.k)] if x.gated else []


def _gate_kw(x: Inputs) -> dict:
    return dict(gated=True) if x.gated else {}


def _gate_grad(x: Inputs, h0, cu, dq, dk, da, db, dh0):
    """dgk [L, H, Kp] (float32) from the other gradients, without a sweep (docs/gate.md).

    With G_t the cotangent of S_t and R_t = sum_v dS_t * S_t (rows; dS_t the cotangent carried
    into step t + 1), the step S_t = e^{g_t} S_{t-1} + k v^T + b V2^T gives
        dgk_t   = sum_v G_t * e^{g_t} S_{t-1} = R_{t-1} - a_t da_t,
        R_{t-1} = R_t + q_t dq_t - k_t dk_t - b_t db_t + a_t da_t,
    so from R_0 = sum_v dh0 * h0 of each sequence, dgk_t = R_0 - sum_{s<t} inc_s - a_t da_t with
    inc = q dq - k dk - b db + a da: a per-sequence exclusive cumulative sum (segmented scan).
    """
    q, k, a, b = (y.astype(F32) for y in (x.q, x.k, x.a, x.b))
    L = q.shape[0]
    inc = q * dq - k * dk - b * db + a * da  # [L, H, Kp]
    t = jnp.arange(L)
    seq = jnp.clip(jnp.searchsorted(cu[1:], t, side="right"), 0, h0.shape[0] - 1)
    start = t == cu[seq]  # empty sequences own no token
    r0 = jnp.sum(dh0 * h0, axis=-1)  # [N, H, Kp]

    def combine(left, right):  # segmented sum: a start in the right operand resets the sum
        (fl, sl), (fr, sr) = left, right
        return fl | fr, jnp.where(fr[:, None, None], sr, sl + sr)

    # exclusive sum within each sequence: shift by one, the first token of a sequence sees zero
    shifted = jnp.concatenate([jnp.zeros_like(inc[:1]), inc[:-1]])
    shifted = jnp.where(start[:, None, None], 0, shifted)
    _, before = jax.lax.associative_scan(combine, (start, shifted))
    return r0[seq] - before - a * da
