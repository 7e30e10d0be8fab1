"""WY preprocessing of the chunked form (DESIGN.md section 2), as one Pallas (Triton) kernel.

Per chunk of C rows with `A, B, K` ([C, Kp]) and `V` ([C, Vp]):

    X = (I - strict(A B^T))^{-1}          # unit lower-triangular C x C
    W = X A                               # [C, Kp]
    U = X strict(A K^T) V                 # [C, Vp]

Chunks are independent, so the grid is (chunks, heads) and the kernel never leaves the chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

_HI = jax.lax.Precision.HIGHEST
_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # dot_general dims for x @ y^T
SUB = 16  # the diagonal-block size of the triangular inverse (the smallest Triton dot)


def _dot(x, y, precision=None):
    return jnp.dot(x, y, preferred_element_type=_F32, precision=precision)


def _mask(cond, x):
    # explicit zero of x's dtype: under jax_enable_x64 a bare 0.0 is a float64 literal
    return jnp.where(cond, x, jnp.zeros((), x.dtype))


def _dot_nt(x, y, precision=None):
    return jax.lax.dot_general(x, y, _NT, preferred_element_type=_F32, precision=precision)


def _wy_kernel(a_ref, b_ref, k_ref, v_ref, w_ref, u_ref, *, chunk_size: int, block_v: int):
    """One (chunk, head): X blockwise, then W and U.

    Bytes: reads A, B, K ([C, Kp]) and V ([C, Vp]) once, writes W [C, Kp] and U [C, Vp] once
    (input dtype): the kernel is bandwidth-bound, its matrix work (~3 C^2 Kp + 2 C^2 Vp MACs)
    is small. Rows are handled in 16-row blocks loaded straight from the refs (Triton cannot
    slice register values), so no [C, Kp] tile has to stay live across the whole kernel.

    The inverse. Solving row by row over all C rows needs C dependent steps, each with two
    cross-warp reductions over a C x C tile; that sequential chain is what costs. Here only
    the 16 x 16 diagonal blocks are solved row by row (15 steps, the C/16 blocks side by side
    in one loop so each step is one round of reductions), and the off-diagonal blocks follow
    from X = I + strict(A B^T) X by block rows:

        X_ij = X_ii sum_{k=j}^{i-1} M_ik X_kj,     M = strict(A B^T), i > j,

    16 x 16 x 16 dots on the matrix units. Substitution and these dots run in float32
    (HIGHEST: IEEE fp32 on the GPU, tiny 16^3 dots), because X feeds every later product and
    its entries can be large when consecutive transitions nearly cancel.
    """
    C, BV = chunk_size, block_v
    nb = C // SUB
    Vp = v_ref.shape[-1]
    cdt = _F32  # bf16/fp16 inputs upcast exactly; tf32 dots of them are exact products

    def rows(ref, i, cols=None):
        idx = (pl.ds(i * SUB, SUB), slice(None) if cols is None else cols)
        return ref[idx].astype(cdt)

    ri = jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    ci = jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    strict = ci < ri

    # M_ik = A_i B_k^T (strict on the diagonal), L_jk = A_j K_k^T likewise.
    m = {}
    lak = {}
    for i in range(nb):
        a_i = rows(a_ref, i)
        for k in range(i + 1):
            bk, kk = rows(b_ref, k), rows(k_ref, k)
            m[i, k] = _dot_nt(a_i, bk)
            lak[i, k] = _dot_nt(a_i, kk)
            if k == i:
                m[i, k] = _mask(strict, m[i, k])
                lak[i, k] = _mask(strict, lak[i, k])

    # Diagonal blocks: Y = X_ii - I solves Y = M_ii + M_ii Y, row r from the rows above it.
    def substitute(r, ys):
        out = []
        for i, y in enumerate(ys):
            sel = ri == r
            row = jnp.sum(_mask(sel, m[i, i]), axis=0)  # M_ii[r, :]
            row = row + jnp.sum(row[:, None] * y, axis=0)  # + M_ii[r, :] @ Y
            out.append(jnp.where(sel, row[None, :], y))
        return tuple(out)

    zeros = tuple(jnp.zeros((SUB, SUB), _F32) for _ in range(nb))
    ys = jax.lax.fori_loop(jnp.int32(1), jnp.int32(SUB), substitute, zeros)
    eye = (ri == ci).astype(_F32)
    x = {(i, i): eye + ys[i] for i in range(nb)}
    for i in range(1, nb):
        for j in range(i - 1, -1, -1):
            s = _dot(m[i, j], x[j, j], _HI)
            for k in range(j + 1, i):
                s = s + _dot(m[i, k], x[k, j], _HI)
            x[i, j] = _dot(x[i, i], s, _HI)

    # W_i = sum_j X_ij A_j (A re-read rather than kept live through the inverse: for Kp = 256
    # the [C, Kp] float32 tile alone would fill the registers);  P = X L, so that
    # U_i = sum_k P_ik V_k needs no [C, V] temporary.
    for i in range(nb):
        w = _dot(x[i, 0], rows(a_ref, 0))
        for j in range(1, i + 1):
            w = w + _dot(x[i, j], rows(a_ref, j))
        w_ref[pl.ds(i * SUB, SUB), :] = w.astype(w_ref.dtype)
    p = {}
    for i in range(nb):
        for k in range(i + 1):
            s = _dot(x[i, k], lak[k, k], _HI)
            for j in range(k + 1, i + 1):
                s = s + _dot(x[i, j], lak[j, k], _HI)
            p[i, k] = s
    for vb in range(Vp // BV):
        cols = pl.ds(vb * BV, BV)
        v_blk = [rows(v_ref, k, cols) for k in range(nb)]
        for i in range(nb):
            u = _dot(p[i, 0], v_blk[0])
            for k in range(1, i + 1):
                u = u + _dot(p[i, k], v_blk[k])
            u_ref[pl.ds(i * SUB, SUB), cols] = u.astype(u_ref.dtype)


def wy_fwd(
    a: jax.Array, b: jax.Array, k: jax.Array, v: jax.Array, *, chunk_size: int,
    out_dtype=None, interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """W = X A and U = X strict(A K^T) V for every chunk, X = (I - strict(A B^T))^{-1}.

    Args:
      a, b, k: [1, L, H, Kp]; v: [1, L, H, Vp]; L a multiple of `chunk_size` (16, 32 or 64),
        Kp and Vp powers of two >= 16.
      out_dtype: dtype of W and U (default float32).

    Returns:
      W [1, L, H, Kp] and U [1, L, H, Vp] in `out_dtype`.
    """
    _, L, H, Kp = a.shape
    Vp = v.shape[-1]
    C = chunk_size
    if C % SUB or L % C:
        raise ValueError(f"chunk_size must be a multiple of {SUB} dividing L={L}, got {C}")
    out_dtype = _F32 if out_dtype is None else out_dtype
    BV = min(Vp, 64)
    kspec = pl.BlockSpec((None, C, None, Kp), lambda c, h: (0, c, h, 0))
    vspec = pl.BlockSpec((None, C, None, Vp), lambda c, h: (0, c, h, 0))
    return pl.pallas_call(
        functools.partial(_wy_kernel, chunk_size=C, block_v=BV),
        grid=(L // C, H),
        in_specs=[kspec, kspec, kspec, vspec],
        out_specs=[kspec, vspec],
        out_shape=[
            jax.ShapeDtypeStruct((1, L, H, Kp), out_dtype),
            jax.ShapeDtypeStruct((1, L, H, Vp), out_dtype),
        ],
        compiler_params=pltr.CompilerParams(num_warps=4 if Kp <= 128 else 8, num_stages=2),
        interpret=interpret,
        name="iplr_wy_fwd",
    )(a, b, k, v)
