"""In-kernel pieces of the gated (DPLR) chunk kernels: the cumulative gate of each 16-row
sub-block and the decayed products of the diagonal sub-blocks (docs/gate.md, "Numerical
safety"; the jnp oracle is `reference.chunk.decayed_gram`).

A chunk's rows are split into blocks of 16. Inside block i the gate is summed from the block's
start (`block_gate`: G local inclusive, Gx local exclusive) and `totals` holds each block's
whole decay. Every exponent the kernels form is a sum of gates over a stretch of steps, so it is
<= 0 for gk <= 0 and never overflows; e^{-G} is never formed:

- off-diagonal blocks (rows of block i, columns of block j < i) factor through the boundaries:
  e^{G_t - G_s} = e^{G_t - G_{r_{i-1}}} e^{G_{r_{i-1}} - G_{r_j}} e^{G_{r_j} - G_s}
  (r_m the last row of block m), i.e. local G of the row, the totals of the blocks strictly
  between, and the column's decay to the end of its block: `between`, `to_block_end`;
- diagonal blocks as one product of decayed operands, (x e^{GX}) (y e^{-G})^T, when every
  cumulative gate of the block is within FACTOR_BOUND of 0 (then e^{-G} <= e^{60} and no sum
  can overflow), else pairwise, elementwise e^{G_t - G_s} over K-slices (`diag_products`). The
  test is per block and per chunk (`lax.cond`), so any gate is safe and a gate of usual size
  (RWKV-7's is at least -0.61 per step) always takes the product.
A factor that underflows to 0 stands for a true product below e^{-87}: 0 is right to rounding.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from iplr_jax.triton.helpers import F32, HIGHEST, NN, NT, TF32X3, TN, dot, is_low, mask, tri

SUB = 16  # rows of a sub-block (the WY kernel's diagonal-block size)
# K-slice of the pairwise diagonal blocks: a [16, 16, BK] float32 tile per product in registers
DIAG_BK = 16
# A diagonal block is factored when |G| <= this everywhere in it (G summed from the block start):
# e^{60} times Kp = 256 terms of inputs up to 1e4 in size stays below float32's 3.4e38.
FACTOR_BOUND = 60.0


def block_gate(g_ref, i: int):
    """(G, Gx) of rows 16i .. 16i + 15 of the chunk's gate rows `g_ref` [C, Kp], summed in
    float32 from the block's start: inclusive and exclusive cumulative sums, [16, Kp] each."""
    g = g_ref[pl.ds(i * SUB, SUB), :].astype(F32)
    G = jnp.cumsum(g, axis=0)
    return G, G - g


def last_row(x):
    """Row 15 of a [16, D] tile as [D] (a masked sum: Triton cannot slice register values)."""
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(mask(rows == SUB - 1, x), axis=0)


def totals(g_ref, nb: int) -> list:
    """Each block's whole decay (the last row of its local G), [Kp] each. The kernels keep only
    these across the chunk and recompute a block's [16, Kp] cumulative gate where it is used
    (a load and a 16-row scan), so no [C, Kp] float32 tile stays live in registers."""
    return [last_row(block_gate(g_ref, i)[0]) for i in range(nb)]


def between(tot, j: int, i: int):
    """The decay of the blocks strictly between j and i (j < i): sum of tot[j+1 .. i-1], or None."""
    mid = tot[j + 1 : i]
    if not mid:
        return None
    s = mid[0]
    for t in mid[1:]:
        s = s + t
    return s


def span(tot, j: int, i: int):
    """`between` as a [1, Kp] row, zero when no block lies between."""
    mid = between(tot, j, i)
    return jnp.zeros_like(tot[0])[None, :] if mid is None else mid[None, :]


def to_block_end(g_ref, tot, j: int):
    """e^{G_{r_j} - G_s} for the rows s of block j: decay from after s to the end of its block."""
    return jnp.exp(tot[j][None, :] - block_gate(g_ref, j)[0])


# -- the whole chunk referred to its middle row m = C/2 - 1 (docs/gate.md "Whole-chunk factoring")


def sum_precision(dtype, interpret: bool):
    """The precision of `from_middle`'s product for gates of `dtype`: 16-bit gates exactly as
    they are; float32 ones at float32 accuracy (three tf32 products on the GPU)."""
    return None if is_low(dtype) else (HIGHEST if interpret else TF32X3)


def from_middle(g, start: int, rows: int, *, exclusive: bool, precision):
    """G - Gm (Gx - Gm if `exclusive`) for `rows` rows from `start` of a chunk's gate rows g
    [C, Kp], as one product of g with a [rows, C] matrix of 0 / +-1 (s <= t minus s <= m):
    exact products, float32 sums, no scan inside the kernel."""
    C = g.shape[0]
    gdt = g.dtype if is_low(g.dtype) else F32
    t = lax.broadcasted_iota(jnp.int32, (rows, C), 0)
    t = t + start if start else t
    s = lax.broadcasted_iota(jnp.int32, (rows, C), 1)
    upto = ((s < t) if exclusive else (s <= t)).astype(F32) - (s <= C // 2 - 1).astype(F32)
    return dot(upto.astype(gdt), g.astype(gdt), NN, precision)


def middle_sums(g):
    """(Gm, G_C - Gm) [Kp] of a chunk's gate rows g [C, Kp]: g summed over rows 0 .. m and over
    rows m+1 .. C-1, in float32."""
    g = g.astype(F32)
    upto = lax.broadcasted_iota(jnp.int32, g.shape, 0) <= g.shape[0] // 2 - 1
    return jnp.sum(mask(upto, g), axis=0), jnp.sum(mask(~upto, g), axis=0)


def diag_precision(dt, f32_precision):
    """The precision of a factored diagonal block's product outside the WY kernel: the config's
    (tf32 by default) for 16-bit inputs, whose products are rounded to 16 bits anyway; HIGHEST
    for float32 inputs, for which the pairwise form is exact and the gate's gradient, formed from
    the others by an identity with cancellation, showed tf32's error (2.5e-3 on an H100)."""
    return f32_precision if is_low(dt) else HIGHEST


def factorable(G):
    """Whether the diagonal block of cumulative gate G [16, Kp] may be factored (a scalar)."""
    return jnp.max(jnp.abs(G)) <= FACTOR_BOUND


def diag_products(x_ref, y_refs, g_ref, i: int, *, strict: bool, factor: bool = True, precision=None):
    """For the diagonal block i: [sum_k x_t[k] y_s[k] e^{GX_t[k] - G_s[k]}]_{t, s} for each y of
    `y_refs` ([16, 16] float32 each), GX = Gx (exclusive) and s < t if `strict` (the WY products
    A_ab, A_ak), else GX = G and s <= t (the output's A_qk, A_qb); zero above.

    With `factor`, where the block allows (`factorable`): (x e^{GX}) (y e^{-G})^T, float32
    operands at `precision`; entries above the diagonal may be huge there and are masked.
    Otherwise pairwise: [16, 16, BK] elementwise products summed over K-slices of width BK, so
    no exponent is factored. Exponents outside the kept triangle (positive there) are set to 0
    before exp. Refs are [C, Kp] rows; the slices are loaded from them (Triton cannot slice
    register values), and the block's cumulative gate is recomputed per slice."""
    Kp = x_ref.shape[-1]
    bk = min(DIAG_BK, Kp)
    keep = tri(SUB, strict)
    keep3 = keep[:, :, None]
    rows = pl.ds(i * SUB, SUB)

    def body(kk, accs):
        cols = pl.ds(kk * bk, bk)
        g = g_ref[rows, cols].astype(F32)
        G = jnp.cumsum(g, axis=0)
        GX = G - g if strict else G
        e = jnp.exp(mask(keep3, GX[:, None, :] - G[None, :, :]))  # [16 (t), 16 (s), BK]
        ex = e * x_ref[rows, cols].astype(F32)[:, None, :]
        return tuple(
            acc + jnp.sum(ex * y_ref[rows, cols].astype(F32)[None, :, :], axis=2)
            for acc, y_ref in zip(accs, y_refs, strict=True)
        )

    def pairwise():
        init = tuple(jnp.zeros((SUB, SUB), F32) for _ in y_refs)
        accs = lax.fori_loop(jnp.int32(0), jnp.int32(Kp // bk), body, init)
        return tuple(mask(keep, acc) for acc in accs)

    if not factor:
        return pairwise()
    G, Gx = block_gate(g_ref, i)

    def factored():
        x = x_ref[rows, :].astype(F32) * jnp.exp(Gx if strict else G)
        up = jnp.exp(-G)
        return tuple(
            mask(keep, dot(x, y_ref[rows, :].astype(F32) * up, NT, precision)) for y_ref in y_refs
        )

    return lax.cond(factorable(G), factored, pairwise)


def row_of(x, r):
    """Row r (may be traced) of a [16, D] tile as [1, D] (a masked sum)."""
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(mask(rows == r, x), axis=0)[None, :]


def col_of(x, c):
    """Column c (may be traced) of a [16, 16] tile as [16, 1]."""
    cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.sum(mask(cols == c, x), axis=1)[:, None]


def diag_row_grads(pairs, g_ref, i: int, *, factor: bool = True, precision=None):
    """Row gradients of the diagonal block i of decayed products: for each (dM, y_ref, strict)
    of `pairs`, sum_s dM[t, s] y_s e^{GX_t - G_s} ([16, Kp] float32, GX = Gx if strict else G),
    all summed. Factored where the block allows: e^{GX} (dM (y e^{-G})), at `precision`.
    Otherwise a loop over the 16 columns s with full-width rows (the K-sliced pairwise form
    could not be assembled into one [16, Kp] tile in registers); exponents outside the kept
    triangle are 0 before exp and their terms are masked."""
    G, Gx = block_gate(g_ref, i)
    t = lax.broadcasted_iota(jnp.int32, G.shape, 0)

    def body(s, acc):
        Gs = row_of(G, s)
        for dM, y_ref, strict in pairs:
            keep = t > s if strict else t >= s
            e = jnp.exp(mask(keep, (Gx if strict else G) - Gs))
            y = y_ref[pl.ds(i * SUB + s, 1), :].astype(F32)
            acc = acc + mask(keep, col_of(dM, s) * y * e)
        return acc

    def loop():
        return lax.fori_loop(jnp.int32(0), jnp.int32(SUB), body, jnp.zeros(G.shape, F32))

    def factored():
        up, acc = jnp.exp(-G), jnp.zeros(G.shape, F32)
        for dM, y_ref, strict in pairs:
            y = y_ref[pl.ds(i * SUB, SUB), :].astype(F32) * up
            acc = acc + jnp.exp(Gx if strict else G) * dot(mask(tri(SUB, strict), dM), y, None, precision)
        return acc

    return lax.cond(factorable(G), factored, loop) if factor else loop()


def diag_col_grads(pairs, g_ref, i: int, *, factor: bool = True, precision=None):
    """Column gradients of the diagonal block i: for each (dM, x_ref, strict) of `pairs`,
    sum_t dM[t, s] x_t e^{GX_t - G_s} ([16, Kp] float32), all summed. Factored where the block
    allows: e^{-G} (dM^T (x e^{GX})), at `precision`; otherwise a loop over the rows t."""
    G, Gx = block_gate(g_ref, i)
    s = lax.broadcasted_iota(jnp.int32, G.shape, 0)

    def body(t, acc):
        for dM, x_ref, strict in pairs:
            keep = s < t if strict else s <= t
            e = jnp.exp(mask(keep, row_of(Gx if strict else G, t) - G))
            x = x_ref[pl.ds(i * SUB + t, 1), :].astype(F32)
            acc = acc + mask(keep, row_of(dM, t).reshape(SUB, 1) * x * e)
        return acc

    def loop():
        return lax.fori_loop(jnp.int32(0), jnp.int32(SUB), body, jnp.zeros(G.shape, F32))

    def factored():
        acc = jnp.zeros(G.shape, F32)
        for dM, x_ref, strict in pairs:
            x = x_ref[pl.ds(i * SUB, SUB), :].astype(F32) * jnp.exp(Gx if strict else G)
            acc = acc + dot(mask(tri(SUB, strict), dM), x, TN, precision)
        return jnp.exp(-G) * acc

    return lax.cond(factorable(G), factored, loop) if factor else loop()
