"""The chunked form in plain jnp (the "xla" implementation): runs anywhere, a second oracle.

Per chunk of C steps (DESIGN.md section 2), with S0 the state before the chunk:

    X  = (I - strict(A B^T))^{-1}                  # block forward substitution
    W  = X A,  U = X strict(A K^T) V
    V2 = U + W S0                                  # the pseudo-values a_t^T S_{t-1}
    O  = scale (Q S0 + incl(Q K^T) V + incl(Q B^T) V2)
    S_C = S0 + K^T V + B^T V2

Everything is batched over chunks except the S0 -> S_C scan. Gradients come from autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iplr_jax._common import Dims, make_layout, to_chunks


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
        Xc = jnp.einsum("...ij,...jk,...kl->...il", Xd, L21, Xa)
        top = jnp.concatenate([Xa, jnp.zeros_like(Xa)], axis=-1)
        X = jnp.concatenate([top, jnp.concatenate([Xc, Xd], axis=-1)], axis=-2)
        s *= 2
    return X[..., 0, :, :]


def chunk_xla(q, k, v, a, b, *, scale, h0, cu_seqlens, chunk_size: int, dims: Dims):
    """Returns (o [B, T, H, V] in the accumulation dtype, final state [N, H, K, V])."""
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
        seq = jnp.clip(jnp.searchsorted(layout.cu_chunks[1:], c, side="right"), 0, N - 1)
        start = c == layout.cu_chunks[seq]
        valid = c < layout.cu_chunks[-1]

    q, k, v, a, b = (split(x) for x in (q, k, v, a, b))
    mm = lambda x, y: jnp.einsum("...ij,...jk->...ik", x, y)  # noqa: E731
    mmT = lambda x, y: jnp.einsum("...ij,...kj->...ik", x, y)  # noqa: E731  x @ y^T

    x = unit_lower_inverse(_tril(mmT(a, b), -1))
    w, u = mm(x, a), mm(mm(x, _tril(mmT(a, k), -1)), v)

    # scan over chunks: inputs [NT, R, H, C, D]
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (w, u, k, v, b))

    def advance(S, w_c, u_c, k_c, v_c, b_c):
        v2 = u_c + mm(w_c, S)
        S_next = S + mm(k_c.swapaxes(-1, -2), v_c) + mm(b_c.swapaxes(-1, -2), v2)
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

    o = mm(q, s0) + mm(_tril(mmT(q, k), 0), v) + mm(_tril(mmT(q, b), 0), v2)
    o = (scale * o).swapaxes(2, 3).reshape(o.shape[0], nt * C, H, V)
    if cu_seqlens is None:
        o = o[:, :T]
    else:
        o = jnp.take(o[0], layout.dst, axis=0)[None]
    return o, final
