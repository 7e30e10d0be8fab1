"""Chunked IPLR: the public `chunk` op (training and prefill) and its Pallas kernels."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from iplr_jax._common import (
    NUM_SMS,
    accum_dtype,
    check_inputs,
    default_scale,
    from_chunks,
    make_layout,
    next_pow2,
    pad_last,
    resolve_implementation,
    static_scale,
    to_chunks,
)
from iplr_jax.chunk_xla import chunk_xla
from iplr_jax.wy_fast import _low, _mask, wy_fwd

# -- forward kernels ---------------------------------------------------------------------------
#
# Up to three passes (DESIGN.md section 2):
#   1. `wy_fast.wy_fwd`: W, U (and X for the backward) per (chunk, head), parallel over chunks.
#   2. `_state_kernel`: per (sequence, head, V-block) the sequential S0 -> S_C sweep; writes the
#      residuals h (state before each chunk) and v_new (V2), and optionally the output too.
#   3. `_output_kernel`: O per (chunk, head, V-block) from h and v_new, parallel over chunks.
# Fusing 3 into 2 saves re-reading h and v_new (and, when no gradient is taken, writing them)
# at the price of recomputing Q K^T and Q B^T per V-block on the sequential path; it pays when
# there are enough (sequence, head, V-block) programs to fill the GPU, see `_plan`.
#
# Dot operands: products of two inputs (Q K^T, Q B^T, K^T V, incl(Q K^T) V) take the inputs'
# dtype (bf16 matrix units, exact products, f32 accumulation); products with the float32 state
# or V2 in the sweep (W S0, B^T V2) take float32 operands (tf32 on the GPU) so the carried state
# is never rounded to 16 bits. The output's incl(Q B^T) V2 feeds no later step: for 16-bit inputs
# it runs in 16 bits (`LOW_PRECISION_V2`). W and U are stored in the inputs' dtype (like fla), h
# too.

_F32 = jnp.float32
_TN = (((0,), (0,)), ((), ()))  # x^T @ y
_NT = (((1,), (1,)), ((), ()))  # x @ y^T
# None: `_plan` decides whether the output is fused into the state sweep; True/False force it
# (for benchmarks and tests).
FUSE_OUTPUT: bool | None = None
# The output's incl(Q B^T) V2 with both operands in the inputs' dtype when that is 16-bit (fla's
# choice), and then v_new stored in it too when no backward reads it. H100, bf16, the output
# kernel alone at S2: 0.294 -> 0.219 ms; the output moves by 2.2e-3 relative (the products
# with bf16 inputs are rounded the same way). Float32 inputs are unaffected.
LOW_PRECISION_V2 = True


def _low_v2(dt) -> bool:
    """Whether the output's incl(Q B^T) V2 runs in the inputs' dtype `dt` (`LOW_PRECISION_V2`)."""
    return LOW_PRECISION_V2 and _low(dt)


def _dot(x, y, dims=None):
    if dims is None:
        return jnp.dot(x, y, preferred_element_type=_F32)
    return jax.lax.dot_general(x, y, dims, preferred_element_type=_F32)


def _chunk_output(q, k, b, v, v2, s0, dt, scale, low_v2):
    """scale (Q S0 + incl(Q K^T) V + incl(Q B^T) V2) for one chunk, float32 [C, BV].
    `low_v2`: incl(Q B^T) V2 with both operands rounded to the inputs' dtype."""
    C = q.shape[0]
    incl = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0) >= jax.lax.broadcasted_iota(
        jnp.int32, (C, C), 1
    )
    qk = _mask(incl, _dot(q, k, _NT))
    qb = _mask(incl, _dot(q, b, _NT))
    qb_v2 = _dot(qb.astype(dt), v2.astype(dt)) if low_v2 else _dot(qb, v2.astype(_F32))
    o = _dot(q, s0.astype(dt)) + _dot(qk.astype(dt), v) + qb_v2
    return scale * o


def _state_kernel(
    cu_ref, w_ref, u_ref, k_ref, b_ref, v_ref, h0_ref, *refs, chunk_size, num_chunks, residuals,
    fuse, scale, low_v2,
):
    """One (sequence n, head, V-block): S [Kp, BV] float32 carried over the sequence's chunks.

    Bytes per chunk: reads W, K, B [C, Kp] and U, V [C, BV] (input dtype); writes h [Kp, BV]
    (input dtype) and v_new [C, BV] (float32; 16-bit when only the output reads it, see
    `LOW_PRECISION_V2`) when residuals are wanted; fused, it also reads
    Q [C, Kp] and writes O [C, BV]. The state never leaves registers between chunks. BV is
    small (16-64, `_plan`) so that S and the [C, Kp] operand tiles fit for Kp up to 256, and
    so that N * H * (Vp / BV) programs fill the GPU: this sweep is latency-bound.
    """
    refs = list(refs)
    q_ref = refs.pop(0) if fuse else None
    ht_ref = refs.pop(0)
    h_ref, vn_ref = (refs.pop(0), refs.pop(0)) if residuals else (None, None)
    o_ref = refs.pop(0) if fuse else None
    C, dt = chunk_size, k_ref.dtype
    n = pl.program_id(0)
    start, end = cu_ref[n], cu_ref[n + 1]

    def body(c, s):
        r = pl.ds(c * C, C)
        if residuals:
            h_ref[c] = s.astype(h_ref.dtype)
        v2 = u_ref[r, :].astype(_F32) + _dot(w_ref[r, :].astype(_F32), s)  # V2 = U + W S0
        if residuals:
            vn_ref[r, :] = v2.astype(vn_ref.dtype)
        k, b, v = k_ref[r, :], b_ref[r, :], v_ref[r, :]
        if fuse:
            o = _chunk_output(q_ref[r, :], k, b, v, v2, s, dt, scale, low_v2)
            o_ref[r, :] = o.astype(o_ref.dtype)
        return s + _dot(k, v, _TN) + _dot(b.astype(_F32), v2, _TN)  # S0 + K^T V + B^T V2

    # A plain loop: Triton pipelines these tile loads itself (they feed dots). Measured on the
    # H100 (benchmarks/NOTES.md): loading the next chunk by hand (`prefetched_loop`) was slower
    # (S2 1.55 -> 1.80..3.20 ms); bf16 operands for W S0 and B^T V2 (fla's choice) saved at most
    # 7% (S3 2.43 -> 2.26 ms) and raised the output error at S2 from 3.4e-3 to 4.4e-3.
    s = jax.lax.fori_loop(start, end, body, h0_ref[...].astype(_F32))
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


def _output_kernel(q_ref, k_ref, b_ref, v_ref, vn_ref, h_ref, o_ref, *, scale, low_v2):
    """One (chunk, head, V-block): O = scale (Q S0 + incl(Q K^T) V + incl(Q B^T) V2).

    Bytes: reads Q, K, B [C, Kp], V [C, BV], v_new [C, BV] and h [Kp, BV]; writes O. BV is
    as wide as registers allow (`_plan`), so Q K^T and Q B^T are recomputed for few V-blocks;
    chunks are independent, so the grid is large whatever the batch.
    """
    o = _chunk_output(
        q_ref[...], k_ref[...], b_ref[...], v_ref[...], vn_ref[...], h_ref[...], k_ref.dtype, scale,
        low_v2,
    )
    o_ref[...] = o.astype(o_ref.dtype)


def output_fwd(
    q, k, b, v, v_new, h, *, scale, chunk_size, block_v, interpret, low_v2, warps=None
):
    """The output pass (`_output_kernel`) over every (chunk, head, V-block): o [1, L, H, Vp]."""
    _, L, H, Kp = q.shape
    Vp = v.shape[-1]
    C, BVo = chunk_size, block_v
    kc = pl.BlockSpec((None, C, None, Kp), lambda c, h, j: (0, c, h, 0))
    vc = pl.BlockSpec((None, C, None, BVo), lambda c, h, j: (0, c, h, j))
    hc = pl.BlockSpec((None, None, Kp, BVo), lambda c, h, j: (c, h, 0, j))
    return pl.pallas_call(
        functools.partial(_output_kernel, scale=scale, low_v2=low_v2),
        grid=(L // C, H, Vp // BVo),
        in_specs=[kc, kc, kc, vc, vc, hc],
        out_specs=vc,
        out_shape=jax.ShapeDtypeStruct((1, L, H, Vp), v.dtype),
        compiler_params=pltr.CompilerParams(
            num_warps=warps or (4 if Kp <= 128 else 8), num_stages=2
        ),
        interpret=interpret,
        name="iplr_chunk_output_fwd",
    )(q, k, b, v, v_new, h)


class Residuals(NamedTuple):
    """What the forward keeps for `chunk_bwd.chunk_bwd` (aligned layout, see `chunk_fwd`)."""

    h: jax.Array  # [NC, H, Kp, Vp] state before each chunk, inputs' dtype; zero past the end
    v_new: jax.Array  # [1, L, H, Vp] float32, V2[t] = a_t^T S_{t-1}; zero in padding rows
    x: jax.Array  # [NC, H, C, C] float32, X = (I - strict(A B^T))^{-1} per chunk
    w: jax.Array  # [1, L, H, Kp] inputs' dtype, W = X A


class _Plan(NamedTuple):
    block_v: int  # V-block of the state sweep
    block_v_out: int  # V-block of the output kernel
    fuse: bool  # output computed in the state sweep
    warps: int


def _plan(N: int, H: int, Kp: int, Vp: int, num_chunks: int) -> _Plan:
    """Block sizes, and whether the output is fused into the sweep. The sweep's [Kp, BV]
    float32 state plus its [C, Kp] tiles must fit in registers: BV <= 8192 / Kp (64 for
    Kp = 128, 32 for Kp = 256); smaller BV when there are too few programs to occupy the SMs
    (the sweep is a dependent chain per program)."""
    bv = min(Vp, max(16, 8192 // Kp))
    while bv > 16 and N * H * (Vp // bv) < NUM_SMS:
        bv //= 2
    programs = N * H * (Vp // bv)
    # Fusing adds Q K^T, Q B^T and three more dots to every step of the sequential chain;
    # it pays only when that chain is short next to the traffic it saves: the sweep already
    # fills the SMs, each program walks few chunks, and the [C, Kp] products are small.
    # Measured on the H100, bf16 (benchmarks/results/2026-11-25-H100.md), fused vs separate:
    # S1 (Kp 64, 32 chunks/seq) 0.637 vs 0.755 ms; S2 (Kp 128, 64 chunks/seq) 1.916 vs 1.763;
    # S3 (Kp 128, 512 chunks/seq, 64 programs) 3.718 vs 2.853. Hence Kp <= 64 only.
    # Moving that work into the parallel WY kernel instead (it wrote Q' = Q + incl(Q B^T) W and
    # O_intra, leaving one product per chunk here) was 5-10x slower on the H100 (S2 7.30 ms;
    # benchmarks/results/2026-11-26-H100-session4.md) and was dropped.
    per_seq = num_chunks / max(N, 1)
    fuse = programs >= NUM_SMS and per_seq <= 64 and Kp <= 64
    fuse = fuse if FUSE_OUTPUT is None else FUSE_OUTPUT
    # the fused step holds Q, K, B tiles and two [C, C] products besides S: more warps
    warps = 8 if Kp * bv >= 8192 or (fuse and Kp >= 128) else 4
    # Output kernel: [C, Kp] tiles of Q, K, B, h [Kp, BVo] and O [C, BVo]. H100, bf16, the
    # kernel alone (benchmarks/results/2026-11-26-H100-session5.md): at Kp = 128 one V-block of
    # 128 on 4 warps 0.294 ms at S2, against 0.338 for two of 64 and 0.366 for 128 on 8 warps.
    # Kp = 256 keeps the [Kp, 64] tiles it was tested with.
    return _Plan(bv, min(Vp, 128, 16384 // Kp), fuse, warps)


def chunk_fwd(q, k, v, a, b, h0, cu_chunks, *, scale, chunk_size, interpret, residuals=True):
    """Forward of the chunked form on the aligned layout, through Pallas kernels.

    Args:
      q, k, a, b: [1, L, H, Kp] (input dtype), L = NC * chunk_size, Kp a power of two >= 16.
      v: [1, L, H, Vp]; Vp a power of two >= 16.
      h0: [N, H, Kp, Vp] float32.
      cu_chunks: int32 [N + 1]; sequence n owns chunks cu_chunks[n] .. cu_chunks[n+1]-1 (may be
        traced). Chunks at or past cu_chunks[-1] are zero padding.
      residuals: also return what the backward needs (False: None, and the kernels may skip
        writing it; for the primal without a gradient).

    Returns:
      o [1, L, H, Vp] (v's dtype), ht [N, H, Kp, Vp] float32, and `Residuals` (or None).
    """
    _, L, H, Kp = q.shape
    Vp = v.shape[-1]
    N = h0.shape[0]
    C = chunk_size
    NC = L // C
    dt = k.dtype
    plan = _plan(N, H, Kp, Vp, NC)
    fuse = plan.fuse
    low_v2 = _low_v2(dt)
    w, u, *rest = wy_fwd(a, b, k, v, chunk_size=C, out_dtype=dt, with_x=residuals, interpret=interpret)
    x = rest[0] if residuals else None
    keep = residuals or not fuse
    BV = plan.block_v
    nv = Vp // BV
    kfull = pl.BlockSpec((None, L, None, Kp), lambda n, h, j: (0, 0, h, 0))
    vfull = pl.BlockSpec((None, L, None, BV), lambda n, h, j: (0, 0, h, j))
    state = pl.BlockSpec((None, None, Kp, BV), lambda n, h, j: (n, h, 0, j))
    in_specs = [pl.BlockSpec((N + 1,), lambda n, h, j: (0,)), kfull, vfull, kfull, kfull, vfull, state]
    args = [cu_chunks.astype(jnp.int32), w, u, k, b, v, h0.astype(_F32)]
    out_specs = [state]
    out_shape = [jax.ShapeDtypeStruct((N, H, Kp, Vp), _F32)]
    if fuse:
        in_specs.append(kfull)
        args.append(q)
    if keep:
        out_specs += [pl.BlockSpec((NC, None, Kp, BV), lambda n, h, j: (0, h, 0, j)), vfull]
        out_shape += [
            jax.ShapeDtypeStruct((NC, H, Kp, Vp), dt),
            # the backward reads v_new at float32; the output alone rounds it (`low_v2`)
            jax.ShapeDtypeStruct((1, L, H, Vp), dt if low_v2 and not residuals else _F32),
        ]
    if fuse:
        out_specs.append(vfull)
        out_shape.append(jax.ShapeDtypeStruct((1, L, H, Vp), v.dtype))
    outs = pl.pallas_call(
        functools.partial(
            _state_kernel, chunk_size=C, num_chunks=NC, residuals=keep, fuse=fuse, scale=scale,
            low_v2=low_v2,
        ),
        grid=(N, H, nv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        # two stages double-buffer the [C, Kp] tiles: ~200 KB of shared memory at Kp = 256
        compiler_params=pltr.CompilerParams(num_warps=plan.warps, num_stages=2 if Kp <= 128 else 1),
        interpret=interpret,
        name="iplr_chunk_state_fwd",
    )(*args)
    ht = outs[0]
    h, v_new = (outs[1], outs[2]) if keep else (None, None)
    o = outs[-1] if fuse else output_fwd(
        q, k, b, v, v_new, h, scale=scale, chunk_size=C, block_v=plan.block_v_out,
        interpret=interpret, low_v2=low_v2,
    )
    return o, ht, (Residuals(h, v_new, x, w) if residuals else None)


# -- custom_vjp: forward kernels here, backward kernels in chunk_bwd.py --------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _chunk_aligned(q, k, v, a, b, h0, cu_chunks, scale, chunk_size, interpret):
    # no gradient taken: the residuals need not be written
    o, ht, _ = chunk_fwd(
        q, k, v, a, b, h0, cu_chunks, scale=scale, chunk_size=chunk_size, interpret=interpret,
        residuals=False,
    )
    return o, ht


def _chunk_aligned_fwd(q, k, v, a, b, h0, cu_chunks, scale, chunk_size, interpret):
    o, ht, res = chunk_fwd(
        q, k, v, a, b, h0, cu_chunks, scale=scale, chunk_size=chunk_size, interpret=interpret
    )
    return (o, ht), (q, k, v, a, b, res, cu_chunks)


def _chunk_aligned_bwd(scale, chunk_size, interpret, res, cts):
    from iplr_jax.chunk_bwd import chunk_bwd

    q, k, v, a, b, saved, cu_chunks = res
    do, dht = cts
    dq, dk, dv, da, db, dh0 = chunk_bwd(
        q, k, v, a, b, saved, cu_chunks, do, dht,
        scale=scale, chunk_size=chunk_size, interpret=interpret,
    )
    return dq, dk, dv, da, db, dh0, None


_chunk_aligned.defvjp(_chunk_aligned_fwd, _chunk_aligned_bwd)


def _chunk_pallas(q, k, v, a, b, *, scale, h0, cu_seqlens, chunk_size, dims, interpret):
    """Lays the inputs out for the kernels (chunk-aligned sequences, power-of-two heads)."""
    q, scale = static_scale(q, scale)
    layout = make_layout(dims, cu_seqlens, chunk_size)
    Kp, Vp = next_pow2(dims.K), next_pow2(dims.V)
    qa, ka, aa, ba = (pad_last(to_chunks(x, layout), Kp) for x in (q, k, a, b))
    va = pad_last(to_chunks(v, layout), Vp)
    h0p = jnp.pad(h0.astype(jnp.float32), ((0, 0), (0, 0), (0, Kp - dims.K), (0, Vp - dims.V)))
    o, ht = _chunk_aligned(
        qa, ka, va, aa, ba, h0p, layout.cu_chunks, scale, chunk_size, interpret
    )
    return from_chunks(o, layout)[..., : dims.V], ht[:, :, : dims.K, : dims.V]


def chunk(
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
    chunk_size: int = 64,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """IPLR attention in the chunked parallel form (training, prefill).

    Computes `S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`, the
    convention of fla's `chunk_iplr_delta_rule`.

    Args:
      q, k, a, b: [B, T, H, K].
      v: [B, T, H, V].
      scale: output scale, default `K ** -0.5`.
      initial_state: [N, H, K, V] state before the first token of each sequence.
      output_final_state: also return the state after each sequence's last token.
      cu_seqlens: int32 [N + 1] offsets of packed sequences in a batch of 1; may be traced.
      chunk_size: 16, 32 or 64.
      implementation: None (fastest available; "xla" for float64 inputs, which the float32
        kernels would round), "pallas", "xla" or "interpret".

    Returns:
      `o` [B, T, H, V] in v's dtype and the final state [N, H, K, V] float32 (or None).
    """
    impl = resolve_implementation(implementation, q, k, v, a, b)
    dims = check_inputs(
        q, k, v, a, b, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
        chunk_size=chunk_size, implementation=impl,
    )
    acc = accum_dtype(q, k, v, a, b)
    scale = default_scale(scale, dims.K)
    h0 = (
        jnp.zeros((dims.N, dims.H, dims.K, dims.V), acc)
        if initial_state is None
        else jnp.asarray(initial_state, acc)
    )
    if impl == "xla":
        o, final = chunk_xla(
            q, k, v, a, b, scale=scale, h0=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
            dims=dims,
        )
    else:
        o, final = _chunk_pallas(
            q, k, v, a, b, scale=scale, h0=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
            dims=dims, interpret=impl == "interpret",
        )
    return o.astype(v.dtype), (final if output_final_state else None)
