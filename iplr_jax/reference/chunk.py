"""The chunked form in plain jnp: the "xla" implementation of `chunk` (runs anywhere, a second
oracle) and the backward equations on the kernels' aligned layout (the backward kernels' oracle,
and their fallback where Kp is too large for them).

Per chunk of C steps (docs/chunked.md), with S0 the state before the chunk:

    X  = (I - strict(A B^T))^{-1}                  # block forward substitution
    W  = X A,  U = X strict(A K^T) V
    V2 = U + W S0                                  # the pseudo-values a_t^T S_{t-1}
    O  = scale (Q S0 + incl(Q K^T) V + incl(Q B^T) V2)
    S_C = S0 + K^T V + B^T V2

Everything is batched over chunks except the S0 -> S_C scan. `chunk_xla`'s gradients come from
autodiff.

With a gate gk (DPLR, docs/gate.md) the same form holds with the products replaced by decayed
ones (`decayed_gram`), every exponent a sum of gates over a stretch of steps, so never positive
for gk <= 0: with G the inclusive and Gx the exclusive cumulative gate of the chunk,

    X  = (I - [a_t . b_s e^{Gx_t - G_s}]_{s<t})^{-1}
    W  = X (A e^{Gx}),  U = X [a_t . k_s e^{Gx_t - G_s}]_{s<t} V
    O  = scale ((Q e^G) S0 + [q_t . k_s e^{G_t - G_s}]_{s<=t} V + [q_t . b_s e^{G_t - G_s}]_{s<=t} V2)
    S_C = e^{G_C} S0 + (K e^{G_C - G})^T V + (B e^{G_C - G})^T V2
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from iplr_jax.inputs import Dims, Inputs
from iplr_jax.layout import make_layout, sequence_ids, to_chunks

_HI = jax.lax.Precision.HIGHEST


def _tril(x, k):
    C = x.shape[-1]
    return jnp.where(jnp.tri(C, k=k, dtype=bool), x, 0)


def unit_lower_inverse(L: jax.Array) -> jax.Array:
    """(I - L)^{-1} for strictly lower-triangular L [..., C, C], C a power of two.

    Block forward substitution from the bottom up: with the s x s diagonal blocks of the
    inverse known, each pair merges as [[Xa, 0], [Xd L21 Xa, Xd]]. Matrix products only, as
    stable as substitution (unlike the Neumann product (I + L)(I + L^2)..., whose powers of L
    grow combinatorially when consecutive a, b align), and cheap to differentiate. Used
    instead of `solve_triangular`, whose gradient deadlocks at random on jax 0.10.2's CPU
    runtime (a batched LAPACK trsm custom call).
    """
    C = L.shape[-1]
    batch = L.shape[:-2]
    X = jnp.ones(batch + (C, 1, 1), L.dtype)  # the 1 x 1 diagonal blocks of a unit triangle
    s = 1
    while s < C:
        n = C // (2 * s)
        # L21 of each 2s x 2s diagonal block: rows of its second half, columns of its first
        Lb = L.reshape(batch + (n, 2, s, n, 2, s))
        L21 = jnp.diagonal(Lb[..., :, 1, :, :, 0, :], axis1=-4, axis2=-2)  # [..., s, s, n]
        L21 = jnp.moveaxis(L21, -1, -3)  # [..., n, s, s]
        Xa, Xd = X[..., 0::2, :, :], X[..., 1::2, :, :]
        # HIGHEST: X feeds every later product (the kernels' WY builds it at float32 accuracy
        # too); at tf32 the jnp backward of precision="highest" had 2e-4 error (H100)
        Xc = jnp.einsum("...ij,...jk,...kl->...il", Xd, L21, Xa, precision=_HI)
        top = jnp.concatenate([Xa, jnp.zeros_like(Xa)], axis=-1)
        X = jnp.concatenate([top, jnp.concatenate([Xc, Xd], axis=-1)], axis=-2)
        s *= 2
    return X[..., 0, :, :]


SUB_BLOCK = 16


def decayed_gram(X, GX, Y, GY, G, *, strict: bool):
    """M[t, s] = sum_k X[t, k] Y[s, k] exp(GX[t, k] - GY[s, k]) on the lower triangle of each
    [C, C] chunk (s < t if `strict`, else s <= t), zero above; X, Y [..., C, K]. Two uses:
    GX = GY = G (inclusive cumulative gate, `strict=False`) and GX = Gx = G shifted down by one
    row (exclusive, `strict=True`). Every exponent formed is a sum of gates over a stretch of
    steps, never positive for gk <= 0, so never inf:

    - sub-blocks of 16 rows; an off-diagonal block (rows i > columns j) factors through the
      boundary r_j (the last row of column block j): exp(GX_t - G_{r_j}) * exp(G_{r_j} - GY_s),
      both exponents <= 0, as two scaled operands of one matrix product;
    - a diagonal block is computed pairwise, elementwise exp(GX_t - GY_s) for the pairs kept.

    Masked exponents are zeroed before `exp`, so neither the values nor the gradients see an
    overflow. Exponents that are zero by construction (G_t - G_t; Gx_t - G_{t-1}) are the
    constant 0 rather than a difference of equal numbers: their derivatives, +1 and -1 into the
    same cumulative gate, would otherwise cancel only to rounding, an absolute error that
    swamps dgk when the gates are strong and the true dgk tiny (docs/gate.md).
    """
    C, K = X.shape[-2:]
    c = min(SUB_BLOCK, C)
    n = C // c
    batch = X.shape[:-2]
    blk = lambda y: y.reshape(batch + (n, c, K))  # noqa: E731
    Xb, GXb, Yb, GYb = blk(X), blk(GX), blk(Y), blk(GY)
    # diagonal blocks, pairwise: [..., n, c (t), c (s), K]
    lag = 1 if strict else 0  # the pair (t, t - lag) has exponent 0 by construction
    keep = jnp.tri(c, k=-lag, dtype=bool)[:, :, None]
    decays = jnp.tri(c, k=-lag - 1, dtype=bool)[:, :, None]
    e = jnp.where(decays, GXb[..., :, None, :] - GYb[..., None, :, :], 0)
    diag = jnp.sum(jnp.where(keep, jnp.exp(e), 0) * Xb[..., :, None, :] * Yb[..., None, :, :], -1)
    if n == 1:
        return diag[..., 0, :, :]
    # off-diagonal blocks through the boundary r_j = last row of column block j
    ref = blk(G)[..., :, -1, :]  # [..., n (j), K]
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    below = (i > j)[:, :, None, None]  # [i, j, 1, 1]
    # GX_t - G_{r_j}: zero by construction for the first row of block j + 1 when GX = Gx
    row0 = (jnp.arange(c) == 0)[None, None, :, None]
    xdecays = below & ~((i == j + 1)[:, :, None, None] & row0) if strict else below
    e = jnp.where(xdecays, GXb[..., :, None, :, :] - ref[..., None, :, None, :], 0)  # [.., i, j, c, K]
    Xf = jnp.where(below, jnp.exp(e), 0) * Xb[..., :, None, :, :]
    # G_{r_j} - GY_s: zero by construction for the last row of block j
    last = (jnp.arange(c) == c - 1)[:, None]
    Yf = Yb * jnp.exp(jnp.where(last, 0, ref[..., :, None, :] - GYb))  # [..., j, c, K]
    off = jnp.einsum("...ijtk,...jsk->...ijts", Xf, Yf)
    same = (i == j)[:, :, None, None]
    M = jnp.where(same, diag[..., :, None, :, :], off)  # [..., i, j, c, c]
    return M.swapaxes(-3, -2).reshape(batch + (C, C))


def chunk_xla(x: Inputs, *, scale, h0, cu_seqlens, chunk_size: int, dims: Dims):
    """The chunked form of x (q, k, a, b [B, T, H, K], v [B, T, H, V], optionally the gate gk
    [B, T, H, K]) from h0 [N, H, K, V].

    Returns (o [B, T, H, V] in h0's dtype, the accumulation dtype; final state [N, H, K, V]).
    """
    B, T, H, K, V, N = dims
    C = chunk_size
    acc = h0.dtype
    if cu_seqlens is None:
        nt = -(-T // C)

        def split(x):  # [B, T, H, D] -> [B, NT, H, C, D]
            x = jnp.pad(x, ((0, 0), (0, nt * C - T), (0, 0), (0, 0)))
            return x.reshape(B, nt, C, H, -1).swapaxes(2, 3).astype(acc)

        seq = start = None
    else:
        layout = make_layout(dims, cu_seqlens, C)
        nt = layout.num_chunks

        def split(x):
            return to_chunks(x, layout).reshape(1, nt, C, H, -1).swapaxes(2, 3).astype(acc)

        c = jnp.arange(nt)
        seq = sequence_ids(layout.cu_chunks, c, N)
        start = c == layout.cu_chunks[seq]
        valid = c < layout.cu_chunks[-1]

    q, k, v, a, b = (split(y) for y in x[:5])
    mm = lambda x, y: jnp.einsum("...ij,...jk->...ik", x, y)  # noqa: E731
    mmT = lambda x, y: jnp.einsum("...ij,...kj->...ik", x, y)  # noqa: E731  x @ y^T

    if x.gated:
        g = split(x.gk)
        G = jnp.cumsum(g, axis=-2)  # inclusive: G_t = gk_1 + ... + gk_t within the chunk
        Gx = jnp.concatenate([jnp.zeros_like(G[..., :1, :]), G[..., :-1, :]], axis=-2)  # G_{t-1}
        GC = G[..., -1:, :]  # the whole chunk's decay
        # rematerialised in the backward: the pairwise diagonal blocks ([.., C, 16, K] each)
        # would otherwise be kept for autodiff, four times
        strict_gram = jax.checkpoint(functools.partial(decayed_gram, strict=True))
        incl_gram = jax.checkpoint(functools.partial(decayed_gram, strict=False))
        X = unit_lower_inverse(strict_gram(a, Gx, b, G, G))
        w = mm(X, a * jnp.exp(Gx))
        u = mm(mm(X, strict_gram(a, Gx, k, G, G)), v)
        # decay from step t to the end of the chunk, G_C - G_t, summed directly (exclusive
        # reverse cumsum) rather than as a difference: where the gates after t are exactly zero
        # (padding of the last chunk) the exponent is then exactly zero with no +-1 derivatives
        # into G that cancel only to rounding (see decayed_gram)
        after = jnp.flip(jnp.cumsum(jnp.flip(g, -2), -2), -2)  # sum over u >= t
        after = jnp.concatenate([after[..., 1:, :], jnp.zeros_like(after[..., :1, :])], -2)
        tail = jnp.exp(after)
        kd, bd = k * tail, b * tail
        xs = tuple(jnp.moveaxis(y, 1, 0) for y in (w, u, kd, v, bd, jnp.exp(GC)[..., 0, :]))
    else:
        X = unit_lower_inverse(_tril(mmT(a, b), -1))
        w, u = mm(X, a), mm(mm(X, _tril(mmT(a, k), -1)), v)
        # scan over chunks: inputs [NT, R, H, C, D]
        xs = tuple(jnp.moveaxis(y, 1, 0) for y in (w, u, k, v, b))

    def advance(S, w_c, u_c, k_c, v_c, b_c, *decay):
        v2 = u_c + mm(w_c, S)
        S_dec = decay[0][..., :, None] * S if decay else S
        S_next = S_dec + mm(k_c.swapaxes(-1, -2), v_c) + mm(b_c.swapaxes(-1, -2), v2)
        return S_next, v2

    if seq is None:
        def body(S, x):
            S_next, v2 = advance(S, *x)
            return S_next, (S, v2)

        final, (s0, v2) = jax.lax.scan(body, h0, xs)
    else:
        def body(carry, x):
            S, final = carry
            seq_c, start_c, valid_c, xc = x
            S = jnp.where(start_c, h0[seq_c][None], S)
            S_next, v2 = advance(S, *xc)
            final = jnp.where(valid_c, final.at[seq_c].set(S_next[0]), final)
            return (S_next, final), (S, v2)

        (_, final), (s0, v2) = jax.lax.scan(body, (h0[:1], h0), (seq, start, valid, xs))
    s0, v2 = jnp.moveaxis(s0, 0, 1), jnp.moveaxis(v2, 0, 1)  # [R, NT, H, K, V], [R, NT, H, C, V]

    if x.gated:
        o = (
            mm(q * jnp.exp(G), s0) + mm(incl_gram(q, G, k, G, G), v)
            + mm(incl_gram(q, G, b, G, G), v2)
        )
    else:
        o = mm(q, s0) + mm(_tril(mmT(q, k), 0), v) + mm(_tril(mmT(q, b), 0), v2)
    o = (scale * o).swapaxes(2, 3).reshape(o.shape[0], nt * C, H, V)
    if cu_seqlens is None:
        o = o[:, :T]
    else:
        o = jnp.take(o[0], layout.dst, axis=0)[None]
    return o, final


def chunk_bwd_aligned(x: Inputs, h, v_new, cu_chunks, do, dht, *, scale, chunk_size):
    """The backward of the chunked form on the kernels' aligned layout, in jnp (float64 when any
    input is float64): the equations of docs/chunked.md, batched over chunks but for the dS scan.

    Args:
      x: q, k, a, b [1, L, H, Kp] and v [1, L, H, Vp], L = NC * chunk_size.
      h: [NC, H, Kp, Vp] state before each chunk; v_new: [1, L, H, Vp] V2.
      cu_chunks: int32 [N + 1] chunk offsets of the sequences (may be traced).
      do: [1, L, H, Vp]; dht: [N, H, Kp, Vp].

    Returns:
      dq, dk, dv, da, db in the inputs' dtypes and dh0 [N, H, Kp, Vp] (at least float32).
    """
    if x.gated:
        return chunk_bwd_aligned_gated(
            x, h, v_new, cu_chunks, do, dht, scale=scale, chunk_size=chunk_size
        )
    q, k, v, a, b = x[:5]
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
    seq = sequence_ids(cu, c, N)
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


def chunk_bwd_aligned_gated(x: Inputs, h, v_new, cu_chunks, do, dht, *, scale, chunk_size):
    """The backward of the gated chunked form (docs/gate.md, "Backward") on the aligned layout,
    in jnp: the oracle of gated backward kernels, written as they would compute it. Per chunk,
    with Qb = Q e^G, Ab = A e^{Gx}, Kh = K e^{G_C - G}, Bh = B e^{G_C - G}, gam = e^{G_C} and the
    decayed products M_qk, M_qb (scale inside), M_ak, M_ab:

        dV2 = M_qb^T dO + Bh dS_C,   dZ = X^T dV2,   dS0 = gam dS_C + scale Qb^T dO + W^T dV2
        dV  = M_qk^T dO + Kh dS_C + M_ak^T dZ
        dQ, dK, dA, dB: the IPLR terms with every product decayed pairwise (`pairs`)
        dgk = dG_C + sum_{t >= u} (q dq - k dk - b db)_t + sum_{t > u} (a da)_t,
        dG_C = sum_v dS_C * S_C   (per chunk, every row)

    The decays are formed pairwise ([.., C, C, K]: small shapes only). Same arguments as
    `chunk_bwd_aligned` with the gate gk in `x`; returns dq, dk, dv, da, db, dgk, dh0.
    """
    q, k, v, a, b, gk = x
    C = chunk_size
    _, L, H, _ = q.shape
    NC, N = L // C, dht.shape[0]
    arrays = (q, k, v, a, b, gk, h, v_new, do)
    acc = jnp.float64 if any(y.dtype == jnp.float64 for y in arrays) else jnp.float32
    split = lambda x: x[0].reshape(NC, C, H, -1).transpose(0, 2, 1, 3).astype(acc)  # [NC, H, C, D]
    Q, Kc, Vc, A, B, g, V2, dO = (split(y) for y in (q, k, v, a, b, gk, v_new, do))
    S0 = h.astype(acc)
    mm = lambda x, y: jnp.einsum("...ij,...jk->...ik", x, y, precision=_HI)
    mmT = lambda x, y: jnp.einsum("...ij,...kj->...ik", x, y, precision=_HI)  # x y^T
    Tm = lambda x, y: jnp.einsum("...ji,...jk->...ik", x, y, precision=_HI)  # x^T y
    G = jnp.cumsum(g, axis=-2)
    Gx = G - g
    GC = G[..., -1:, :]

    def decays(F, strict):  # E[t, s, k] = e^{F_t - G_s} on the kept pairs, else 0
        keep = jnp.tri(C, k=-1 if strict else 0, dtype=bool)[:, :, None]
        return jnp.exp(jnp.where(keep, F[..., :, None, :] - G[..., None, :, :], -jnp.inf))

    E_in, E_st = decays(G, False), decays(Gx, True)
    gram = lambda x, y, E: jnp.einsum("...tk,...sk,...tsk->...ts", x, y, E, precision=_HI)
    # the gradients of a decayed product M = [x_t . e^{F_t - G_s} y_s] w.r.t. x and y, given dM
    d_rows = lambda dM, y, E: jnp.einsum("...ts,...sk,...tsk->...tk", dM, y, E, precision=_HI)
    d_cols = lambda dM, x, E: jnp.einsum("...ts,...tk,...tsk->...sk", dM, x, E, precision=_HI)
    Mqk, Mqb = scale * gram(Q, Kc, E_in), scale * gram(Q, B, E_in)
    Mak = gram(A, Kc, E_st)
    X = unit_lower_inverse(gram(A, B, E_st))
    Qb, Ab = Q * jnp.exp(G), A * jnp.exp(Gx)
    tail = jnp.exp(GC - G)
    Kh, Bh, gam = Kc * tail, B * tail, jnp.exp(GC)[..., 0, :, None]  # gam [NC, H, K, 1]
    W = mm(X, Ab)

    cu = jnp.asarray(cu_chunks, jnp.int32)
    c = jnp.arange(NC)
    seq = sequence_ids(cu, c, N)
    last = c == cu[seq + 1] - 1
    valid = c < cu[-1]
    dht = dht.astype(acc)

    def body(ds, xs):
        dO_c, Qb_c, Bh_c, W_c, Mqb_c, gam_c, seq_c, last_c, valid_c = xs
        ds = jnp.where(valid_c, jnp.where(last_c, dht[seq_c], ds), 0)
        dv2 = Tm(Mqb_c, dO_c) + mm(Bh_c, ds)
        ds0 = gam_c * ds + scale * Tm(Qb_c, dO_c) + Tm(W_c, dv2)
        return ds0, (ds, ds0)

    _, (dSC, dS0) = jax.lax.scan(
        body, jnp.zeros_like(dht[0]), (dO, Qb, Bh, W, Mqb, gam, seq, last, valid), reverse=True
    )
    nonempty = (cu[1:] > cu[:-1])[:, None, None, None]
    dh0 = jnp.where(nonempty, dS0[jnp.clip(cu[:-1], 0, NC - 1)], dht)

    dV2 = Tm(Mqb, dO) + mm(Bh, dSC)
    dZ = Tm(X, dV2)
    dV = Tm(Mqk, dO) + mm(Kh, dSC) + Tm(Mak, dZ)
    incl = lambda x: jnp.where(jnp.tri(C, k=0, dtype=bool), x, 0)
    strict = lambda x: jnp.where(jnp.tri(C, k=-1, dtype=bool), x, 0)
    dOV, dOV2 = incl(mmT(dO, Vc)), incl(mmT(dO, V2))
    dZV, dZV2 = strict(mmT(dZ, Vc)), strict(mmT(dZ, V2))
    dQ = scale * (mmT(dO, S0) * jnp.exp(G) + d_rows(dOV, Kc, E_in) + d_rows(dOV2, B, E_in))
    dK = scale * d_cols(dOV, Q, E_in) + d_cols(dZV, A, E_st) + mmT(Vc, dSC) * tail
    dB = scale * d_cols(dOV2, Q, E_in) + d_cols(dZV2, A, E_st) + mmT(V2, dSC) * tail
    dA = mmT(dZ, S0) * jnp.exp(Gx) + d_rows(dZV, Kc, E_st) + d_rows(dZV2, B, E_st)
    # the gate: every q_t appears as q_t e^{G_t}, a_t as a_t e^{Gx_t}, k_s and b_s as
    # k_s e^{-G_s} (inside sums that are finite), the state after the chunk as e^{G_C} (...)
    SC = gam * S0 + Tm(Kh, Vc) + Tm(Bh, V2)
    dGC = jnp.sum(dSC * SC, axis=-1)[..., None, :]  # [NC, H, 1, K]
    dG = Q * dQ - Kc * dK - B * dB
    rev_incl = jnp.flip(jnp.cumsum(jnp.flip(dG, -2), -2), -2)  # sum over t >= u
    aa = A * dA
    rev_excl = jnp.flip(jnp.cumsum(jnp.flip(aa, -2), -2), -2) - aa  # sum over t > u
    dg = dGC + rev_incl + rev_excl
    merge = lambda g, like: g.transpose(0, 2, 1, 3).reshape(1, L, H, -1).astype(like.dtype)
    return (
        merge(dQ, q), merge(dK, k), merge(dV, v), merge(dA, a), merge(dB, b), merge(dg, gk),
        dh0.astype(jnp.promote_types(acc, jnp.float32)),
    )
