"""Fused IPLR recurrence: the public `fused_recurrent` op (decoding, small memory) and its kernels.

One Pallas program owns a `[Kp, BV]` float32 slab of one head's state and walks the tokens of
one sequence, keeping the slab in registers (DESIGN.md section 4). The columns of `S` evolve
independently (`a^T S` reads only the same columns), so V-blocks are independent programs.

Backward, without storing anything of size [T, K, V]: the forward additionally writes the
pseudo-values `V2_t = a_t^T S_{t-1}` ([T, V] float32, the size of `o`). Then
  1. a reverse sweep carries `dS` from the final-state cotangent: with `G = dS_t + scale q_t do_t^T`
       dk_t = G v_t,  dv_t = G^T k_t,  db_t = G V2_t,  dV2_t = G^T b_t,  dS_{t-1} = G + a_t dV2_t^T;
     it needs no `S` at all (only the stored `V2`), and its last `dS` is `dh0`;
  2. a forward sweep recomputes `S_t` from `h0` (using the stored `V2`, so exactly the forward's
     states) and gives  da_t = S_{t-1} dV2_t,  dq_t = scale S_t do_t.
This is exact, O(T K V) work, and avoids both state checkpoints and the unstable inversion of
`I + b a^T`. dk, db, dq, da are reductions over V: each V-block writes float32 partials
[NV, ...] that XLA sums. The backward therefore uses wider V-blocks than the forward (NV = 2
for K = V = 128, see `_config`): more blocks add programs, but a sequential loop is bound by
per-step latency once the programs fit on the GPU at once, while partials cost memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from iplr_jax._common import (
    check_inputs,
    default_scale,
    next_pow2,
    pad_last,
    prefetched_loop,
    resolve_implementation,
    static_scale,
)
from iplr_jax.naive import naive

_F32 = jnp.float32
# How many tokens ahead the kernels load their rows (`prefetched_loop`; 0 = not at all).
# H100, S1 forward+backward: 0 -> 8.08 ms, 1 -> 8.31 ms, 2 -> 6.95 ms.
PREFETCH = 2


def _config(Kp: int, Vp: int, backward: bool, pairs: int = 1) -> tuple[int, int]:
    """(BV, num_warps): the grid is (sequences, heads, Vp // BV), each program a loop over T;
    `pairs` = sequences x heads.

    Forward: V-blocks of 32 columns. Splitting V further to occupy more SMs does not pay:
    measured on the H100 (bf16, benchmarks/results/2026-11-25-H100-session2.md) S1 (256
    programs of BV 32): BV 32 / 2 warps 1.45 ms, BV 16 / 1 warp 1.97, BV 16 / 2 warps 1.58;
    S3 (32 programs of BV 32): BV 32 / 4 warps 26.0 ms, BV 16 / 2 warps 28.4.

    Backward: the widest block that fits (8192 state elements), halved while there are fewer
    than 512 programs, down to BV 16 at Kp <= 64 and 32 above; about 64 state elements per
    thread. More programs won, although every V-block adds a float32 [L, H, Kp] partial of dk,
    db, dq and da: forward+backward on the H100 (benchmarks/results/2026-11-26-H100-session4.md),
    S1 (Kp 64, 128 pairs) BV 16 / 1 warp 6.28 ms, BV 32 / 2 warps 6.61, BV 64 / 4 warps 7.25;
    S2 (Kp 128, 64 pairs) BV 32 / 2 warps 15.10 ms, BV 16 / 2 warps 15.99, BV 64 / 4 warps
    20.29. Halving only while programs are few keeps those partials at a few blocks when V or
    the batch is large.
    """
    if not backward:
        bv = min(Vp, 32)
        return bv, max(2, min(8, Kp * bv // 1024))
    bv, smallest = min(Vp, 8192 // Kp), (16 if Kp <= 64 else 32)
    while bv > smallest and pairs * (Vp // bv) < 512:
        bv //= 2
    return bv, max(1, min(8, Kp * bv // 2048))


# -- kernels -------------------------------------------------------------------------------------
# Refs (the head axis squeezed by the BlockSpecs): per-token rows q/k/a/b [L, Kp], v/o/V2/do/dV2
# [L, BV]; state slabs [Kp, BV]; cu [N + 1]. Program (n, h, j) handles sequence n, head h,
# columns j*BV .. (j+1)*BV-1, tokens cu[n] .. cu[n+1]-1.


def _fwd_kernel(cu_ref, q_ref, k_ref, v_ref, a_ref, b_ref, h0_ref, o_ref, ht_ref, *v2_ref, scale):
    n = pl.program_id(0)

    def step(t, rows, S):
        q, k, v, a, b = (x.astype(_F32) for x in rows)
        aS = jnp.sum(a[:, None] * S, axis=0)  # V2_t = a_t^T S_{t-1}
        S = S + k[:, None] * v[None, :] + b[:, None] * aS[None, :]
        o_ref[t, :] = (scale * jnp.sum(q[:, None] * S, axis=0)).astype(o_ref.dtype)
        if v2_ref:  # residual for the backward
            v2_ref[0][t, :] = aS
        return S

    ht_ref[...] = _loop(
        cu_ref[n], cu_ref[n + 1], (q_ref, k_ref, v_ref, a_ref, b_ref), step,
        h0_ref[...].astype(_F32),
    )


def _bwd_dS_kernel(cu_ref, q_ref, k_ref, v_ref, a_ref, b_ref, v2_ref, do_ref, dht_ref,
                   dk_ref, db_ref, dv_ref, dv2_ref, dh0_ref, *, scale):
    """Reverse sweep: dk, db (partials over this V-block), dv, dV2 and dh0."""
    n = pl.program_id(0)

    def step(t, rows, dS):
        q, k, a, b, v, v2, do = (x.astype(_F32) for x in rows)
        G = dS + (scale * q)[:, None] * do[None, :]  # cotangent of S_t
        dk_ref[t, :] = jnp.sum(G * v[None, :], axis=1)
        db_ref[t, :] = jnp.sum(G * v2[None, :], axis=1)
        dv_ref[t, :] = jnp.sum(G * k[:, None], axis=0).astype(dv_ref.dtype)
        dv2 = jnp.sum(G * b[:, None], axis=0)
        dv2_ref[t, :] = dv2
        return G + a[:, None] * dv2[None, :]

    dh0_ref[...] = _loop(
        cu_ref[n], cu_ref[n + 1], (q_ref, k_ref, a_ref, b_ref, v_ref, v2_ref, do_ref), step,
        dht_ref[...].astype(_F32), reverse=True,
    )


def _bwd_dq_kernel(cu_ref, k_ref, v_ref, b_ref, v2_ref, do_ref, dv2_ref, h0_ref, dq_ref, da_ref,
                   *, scale):
    """Forward sweep recomputing S_t from h0 and the stored V2: dq and da (partials)."""
    n = pl.program_id(0)

    def step(t, rows, S):
        k, b, v, v2, do, dv2 = (x.astype(_F32) for x in rows)
        da_ref[t, :] = jnp.sum(S * dv2[None, :], axis=1)  # uses S_{t-1}
        S = S + k[:, None] * v[None, :] + b[:, None] * v2[None, :]
        dq_ref[t, :] = scale * jnp.sum(S * do[None, :], axis=1)
        return S

    _loop(
        cu_ref[n], cu_ref[n + 1], (k_ref, b_ref, v_ref, v2_ref, do_ref, dv2_ref), step,
        h0_ref[...].astype(_F32),
    )


def _loop(start, stop, refs, step, init, reverse=False):
    """The per-token loop of every kernel here: row t of each ref, loaded ahead of its step."""
    return prefetched_loop(
        start, stop, lambda t: tuple(r[t, :] for r in refs), step, init,
        rows=refs[0].shape[0], depth=PREFETCH, reverse=reverse,
    )


# -- pallas_call plumbing ------------------------------------------------------------------------


def _call(kernel, args, outs, *, grid, interpret, num_warps):
    """`outs`: (shape, dtype, spec) triples; `args`: (array, spec) pairs."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[s for _, s in args],
        out_specs=[s for _, _, s in outs],
        out_shape=[jax.ShapeDtypeStruct(shp, dt) for shp, dt, _ in outs],
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


def _fwd(q, k, v, a, b, h0, cu, scale, interpret, residuals):
    """q, k, a, b [L, H, Kp]; v [L, H, Vp]; h0 [N, H, Kp, Vp] f32 -> o, ht (, V2 [L, H, Vp] f32)."""
    (L, H, Kp), Vp, N = q.shape, v.shape[-1], h0.shape[0]
    BV, nw = _config(Kp, Vp, backward=False)
    sp = _Specs(L, N, Kp, BV)
    outs = [((L, H, Vp), v.dtype, sp.v), ((N, H, Kp, Vp), _F32, sp.s)]
    outs += [((L, H, Vp), _F32, sp.v)] if residuals else []
    return _call(
        functools.partial(_fwd_kernel, scale=scale),
        [(cu, sp.cu), (q, sp.k), (k, sp.k), (v, sp.v), (a, sp.k), (b, sp.k), (h0, sp.s)],
        outs, grid=(N, H, Vp // BV), interpret=interpret, num_warps=nw,
    )


def _bwd(q, k, v, a, b, h0, cu, v2, do, dht, scale, interpret):
    (L, H, Kp), Vp, N = q.shape, v.shape[-1], h0.shape[0]
    BV, nw = _config(Kp, Vp, backward=True, pairs=N * H)
    NV, sp = Vp // BV, _Specs(L, N, Kp, BV)
    grid = (N, H, NV)
    kpart = ((NV, L, H, Kp), _F32, sp.kpart)
    dk, db, dv, dv2, dh0 = _call(
        functools.partial(_bwd_dS_kernel, scale=scale),
        [(cu, sp.cu), (q, sp.k), (k, sp.k), (v, sp.v), (a, sp.k), (b, sp.k), (v2, sp.v),
         (do, sp.v), (dht, sp.s)],
        [kpart, kpart, ((L, H, Vp), v.dtype, sp.v), ((L, H, Vp), _F32, sp.v), ((N, H, Kp, Vp), _F32, sp.s)],
        grid=grid, interpret=interpret, num_warps=nw,
    )
    dq, da = _call(
        functools.partial(_bwd_dq_kernel, scale=scale),
        [(cu, sp.cu), (k, sp.k), (v, sp.v), (b, sp.k), (v2, sp.v), (do, sp.v), (dv2, sp.v), (h0, sp.s)],
        [kpart, kpart], grid=grid, interpret=interpret, num_warps=nw,
    )
    red = lambda x, like: x.sum(0).astype(like.dtype)
    return red(dq, q), red(dk, k), dv, red(da, a), red(db, b), dh0


# -- custom_vjp ----------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _fused(q, k, v, a, b, h0, cu, scale, interpret):
    return tuple(_fwd(q, k, v, a, b, h0, cu, scale, interpret, residuals=False))


def _fused_fwd(q, k, v, a, b, h0, cu, scale, interpret):
    o, ht, v2 = _fwd(q, k, v, a, b, h0, cu, scale, interpret, residuals=True)
    return (o, ht), (q, k, v, a, b, h0, cu, v2)


def _fused_bwd(scale, interpret, res, cts):
    q, k, v, a, b, h0, cu, v2 = res
    do, dht = cts
    return (*_bwd(q, k, v, a, b, h0, cu, v2, do, dht, scale, interpret), None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _fused_recurrent_pallas(q, k, v, a, b, *, scale, initial_state, cu_seqlens, dims, interpret):
    """Packs [B, T] into one row of sequences (a free reshape) and pads heads to powers of two;
    with K, V already powers of two >= 16 and a float32 state nothing is copied."""
    B, T, H, K, V, N = dims
    Kp, Vp = next_pow2(K), next_pow2(V)
    q, scale = static_scale(q, scale)
    if cu_seqlens is None:
        cu = jnp.arange(B + 1, dtype=jnp.int32) * T
    else:
        cu = jnp.asarray(cu_seqlens, jnp.int32)
    qp, kp, ap, bp = (pad_last(x.reshape(B * T, H, K), Kp) for x in (q, k, a, b))
    vp = pad_last(v.reshape(B * T, H, V), Vp)
    if initial_state is None:
        h0 = jnp.zeros((N, H, Kp, Vp), _F32)
    else:
        h0 = jnp.asarray(initial_state, _F32)
        if (Kp, Vp) != (K, V):
            h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    o, ht = _fused(qp, kp, vp, ap, bp, h0, cu, scale, interpret)
    if Vp != V:
        o = o[..., :V]
    if (Kp, Vp) != (K, V):
        ht = ht[:, :, :K, :V]
    return o.reshape(B, T, H, V), ht


# -- public op -----------------------------------------------------------------------------------


def fused_recurrent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """IPLR attention step by step (decoding; any T, state kept in float32).

    Same arguments and results as `iplr_jax.chunk` (without `chunk_size`); the convention
    of fla's `fused_recurrent_iplr_delta_rule`.

    Args:
      q, k, a, b: [B, T, H, K].
      v: [B, T, H, V].
      scale: output scale, default `K ** -0.5`.
      initial_state: [N, H, K, V].
      output_final_state: also return the state after each sequence's last token.
      cu_seqlens: int32 [N + 1] offsets of packed sequences in a batch of 1; may be traced.
      implementation: None (fastest available; "xla" for float64 inputs, which the float32
        kernels would round), "pallas", "xla" or "interpret".

    Returns:
      `o` [B, T, H, V] in v's dtype and the final state [N, H, K, V] float32 (or None).
    """
    impl = resolve_implementation(implementation, q, k, v, a, b)
    dims = check_inputs(
        q, k, v, a, b, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
        implementation=impl,
    )
    if impl == "xla":
        return naive(
            q, k, v, a, b, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    o, ht = _fused_recurrent_pallas(
        q, k, v, a, b, scale=default_scale(scale, dims.K), initial_state=initial_state,
        cu_seqlens=cu_seqlens, dims=dims, interpret=impl == "interpret",
    )
    return o, (ht if output_final_state else None)
