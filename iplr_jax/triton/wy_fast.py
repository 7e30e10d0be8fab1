"""WY preprocessing of the chunked form (docs/chunked.md), as one Pallas (Triton) kernel.

Per chunk of C rows with `A, B, K` ([C, Kp]) and `V` ([C, Vp]):

    X = (I - strict(A B^T))^{-1}          # unit lower-triangular C x C
    W = X A                               # [C, Kp]
    U = X strict(A K^T) V                 # [C, Vp]

Chunks are independent, so the grid is (chunks, heads) and the kernel never leaves the chunk.
The forward needs W and U; the backward needs X and W, so a forward that keeps residuals
writes X too (4 C bytes per token and head) instead of the backward recomputing them.

With the gate gk (a static mode, docs/gate.md) the products are the decayed ones, and the kernel
also writes the sweep's decayed K and B: built through the chunk's middle row as IPLR products of
decayed operands where the gate allows it (`_factored_products`), else on the 16-row blocks
(`triton/gate.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from iplr_jax.sharding import shape_dtype, vma_of
from iplr_jax.triton import gate, gate_factors
from iplr_jax.triton.config import ChunkConfig
from iplr_jax.triton.helpers import F32, HIGHEST, NN, NT, TF32X3, dot, f32_precision, is_low, mask, tri

SUB = 16  # the diagonal-block size of the triangular inverse (the smallest Triton dot)
# The float32 16 x 16 block products that build X off the diagonal and P = X L: their operands
# are results, not inputs, so they run at float32 accuracy, either on the FMA units (HIGHEST) or
# as three tf32 products on the matrix units; `config.chunk_config` picks (docs/numerics.md).
PRECISIONS = {"highest": HIGHEST, "tf32x3": TF32X3}


def _dot(x, y, precision=None):
    return dot(x, y, NN, precision)


def _input_dot_nt(x, y):
    """x @ y^T of two input tiles: 16-bit inputs on the matrix units as they are (exact
    products, float32 sums); float32 inputs at full precision (these feed the inverse)."""
    return dot(x, y, NT, None if is_low(x.dtype) else HIGHEST)


def _inv_diag_blocks(lows):
    """(I - L)^{-1} for each strictly lower L [16, 16] of `lows`, by forward substitution:
    row r of X is e_r + L[r] X, and the rows above r are final when row r is formed. All
    blocks advance in the same loop, so the dependent chain is 15 steps whatever C is."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    eye = (rows == jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)).astype(F32)

    def body(r, xs):
        out = []
        for low, x in zip(lows, xs, strict=True):
            lr = jnp.sum(mask(rows == r, low), axis=0)  # L[r, :]
            new = jnp.sum(lr[:, None] * x, axis=0)  # L[r, :] @ X
            out.append(jnp.where(rows == r, x + new[None, :], x))
        return tuple(out)

    return jax.lax.fori_loop(jnp.int32(1), jnp.int32(SUB), body, tuple(eye for _ in lows))


def _inverse_blocks(m, nb: int, precision) -> dict:
    """X = (I - M)^{-1} as 16 x 16 blocks x[i, j] (j <= i), from the blocks m[i, j] (j <= i) of
    the strictly lower M: the diagonal blocks by `_inv_diag_blocks`, the others by block rows of
    X = I + M X (see `_wy_kernel`)."""
    diag = _inv_diag_blocks([m[i, i] for i in range(nb)])
    x = {(i, i): diag[i] for i in range(nb)}
    for i in range(1, nb):
        for j in range(i - 1, -1, -1):
            acc = sum(_dot(m[i, s], x[s, j], precision) for s in range(j, i))
            x[i, j] = _dot(x[i, i], acc, precision)
    return x


def _store_lower(ref, x, nb: int):
    """Write the blocks x[i, j] (j <= i) to the [16 nb, 16 nb] `ref`, zeros above."""
    zero = jnp.zeros((SUB, SUB), F32)
    for i in range(nb):
        for j in range(nb):
            ref[pl.ds(i * SUB, SUB), pl.ds(j * SUB, SUB)] = x[i, j] if j <= i else zero


def _gated_products(a_ref, b_ref, k_ref, g_ref, kd_ref, bd_ref, gc_ref, nb: int, precision, factor):
    """The WY kernel's decayed products (docs/gate.md): m[i, j] = [a_t . e^{Gx_t - G_s} b_s] and
    lak[i, j] likewise with k, for blocks j <= i (s < t on the diagonal blocks). Also writes the
    sweep's operands K e^{G_C - G}, B e^{G_C - G} and e^{G_C}. Returns (m, lak, a_rows),
    a_rows(j) = A_j e^{Gx_j} (decayed from the chunk start) for W = X (A e^{Gx}).

    The decays factor through the block boundaries; the operands are float32 at the inverse's
    `precision` (they feed X); the diagonal blocks come from `gate.diag_products`."""
    f32_rows = lambda ref, i: ref[pl.ds(i * SUB, SUB), :].astype(F32)  # noqa: E731
    tot = gate.totals(g_ref, nb)
    m, lak = {}, {}
    for i in range(nb):
        m[i, i], lak[i, i] = gate.diag_products(
            a_ref, (b_ref, k_ref), g_ref, i, strict=True, factor=factor, precision=precision
        )
        if i == 0:
            continue
        a_i = f32_rows(a_ref, i) * jnp.exp(gate.block_gate(g_ref, i)[1])  # from the boundary before i
        for j in range(i):
            mid = gate.between(tot, j, i)
            a_ij = a_i if mid is None else a_i * jnp.exp(mid)[None, :]
            to_end = gate.to_block_end(g_ref, tot, j)
            m[i, j] = dot(a_ij, f32_rows(b_ref, j) * to_end, NT, precision)
            lak[i, j] = dot(a_ij, f32_rows(k_ref, j) * to_end, NT, precision)
    for j in range(nb):  # K and B decayed to the chunk's end
        after = gate.between(tot, j, nb)
        to_end = gate.to_block_end(g_ref, tot, j)
        if after is not None:
            to_end = to_end * jnp.exp(after)[None, :]
        kd_ref[pl.ds(j * SUB, SUB), :] = (f32_rows(k_ref, j) * to_end).astype(kd_ref.dtype)
        bd_ref[pl.ds(j * SUB, SUB), :] = (f32_rows(b_ref, j) * to_end).astype(bd_ref.dtype)
    gc_ref[...] = jnp.exp(gate.between(tot, -1, nb))

    def a_rows(j):
        before, gx = gate.between(tot, -1, j), gate.block_gate(g_ref, j)[1]
        return f32_rows(a_ref, j) * jnp.exp(gx if before is None else gx + before[None, :])

    return m, lak, a_rows


def _factored_products(a_ref, b_ref, k_ref, g_ref, kd_ref, bd_ref, gc_ref, nb: int, g_prec):
    """The decayed products of a chunk through its middle row m (docs/gate.md "Whole-chunk
    factoring"): with rel = G - Gm and rel_x = Gx - Gm, e^{Gx_t - G_s} = e^{rel_x_t} e^{-rel_s},
    so m[i, j] and lak[i, j] are IPLR products of Ad = A e^{rel_x} with Bd = B e^{-rel} and
    Kd = K e^{-rel}, rounded to 16-bit inputs' dtype (the matrix units, as the IPLR kernel's
    inputs). Taken only for chunks whose factors stay within e^{FACTOR_BOUND} (`chunk_flags`).
    Writes the sweep's K e^{G_C - G} = Kd e^{G_C - Gm}, B likewise, and e^{G_C}. Returns
    (m, lak, a_rows, e^{Gm}) with W = X Ad e^{Gm}.

    Each block's rel rows come from `gate.from_middle` (float32 gates at `g_prec`)."""
    dt = a_ref.dtype
    rows = lambda ref, i: ref[pl.ds(i * SUB, SUB), :].astype(F32)  # noqa: E731
    g_mid, g_end = gate.middle_sums(g_ref[...])  # Gm, G_C - Gm

    def rel(i, exclusive):  # G - Gm (Gx - Gm if exclusive) for the rows of block i
        return gate.from_middle(g_ref[...], i * SUB, SUB, exclusive=exclusive, precision=g_prec)

    def a_dec(i):
        return (rows(a_ref, i) * jnp.exp(rel(i, True))).astype(dt)

    def bk_dec(j):  # float32 B e^{-rel}, K e^{-rel}
        up = jnp.exp(-rel(j, False))
        return rows(b_ref, j) * up, rows(k_ref, j) * up

    # each decayed block formed once and kept live (forming them again where used measured
    # slower: benchmarks/NOTES.md, session 11)
    to_end = jnp.exp(g_end)[None, :]
    ad, bd, kd = [], [], []
    for j in range(nb):
        b_j, k_j = bk_dec(j)
        kd_ref[pl.ds(j * SUB, SUB), :] = (k_j * to_end).astype(kd_ref.dtype)
        bd_ref[pl.ds(j * SUB, SUB), :] = (b_j * to_end).astype(bd_ref.dtype)
        ad.append(a_dec(j))
        bd.append(b_j.astype(dt))
        kd.append(k_j.astype(dt))
    gc_ref[...] = jnp.exp(g_mid + g_end)
    strict = tri(SUB, strict=True)
    m, lak = {}, {}
    for i in range(nb):
        for j in range(i + 1):
            m[i, j] = _input_dot_nt(ad[i], bd[j])
            lak[i, j] = _input_dot_nt(ad[i], kd[j])
            if j == i:
                m[i, j], lak[i, j] = mask(strict, m[i, j]), mask(strict, lak[i, j])
    return m, lak, lambda j: ad[j].astype(F32), jnp.exp(g_mid)


def _wy_kernel(
    a_ref, b_ref, k_ref, v_ref, *refs, block_v: int, precision, f32_prec=None, gated=False,
    factor=True, chunk_factored=False, g_prec=None,
):
    """One (chunk, head): X blockwise, then W, U (and X, when a ref for it is given).

    Bytes: reads A, B, K ([C, Kp]) and V ([C, Vp]) once, writes W [C, Kp] and U [C, Vp] (input
    dtype) and X [C, C] float32. Rows are handled in 16-row blocks loaded straight from the refs
    (Triton cannot slice register values), so no [C, Kp] tile stays live throughout.

    The inverse. Solving row by row over all C rows needs C dependent steps, each with two
    cross-warp reductions over a C x C tile. Here only the 16 x 16 diagonal blocks are solved
    row by row (`_inv_diag_blocks`: 15 steps, all blocks side by side), and the off-diagonal
    blocks follow from X = I + strict(A B^T) X by block rows:

        X_ij = X_ii sum_{m=j}^{i-1} M_im X_mj,     M = strict(A B^T), i > j,

    as 16 x 16 x 16 dots at float32 accuracy (`precision`): X feeds every later product and its
    entries can be large when consecutive transitions nearly cancel. W = X A and U = P V with
    P = X strict(A K^T) take float32 X and P at `f32_prec` (by default tf32 on the GPU, about
    the rounding of W and U to 16 bits; HIGHEST with `ChunkConfig.f32_dots="highest"`).
    """
    g_ref, refs = (refs[0], refs[1:]) if gated else (None, refs)
    w_ref, u_ref, *refs = refs
    if gated:
        *refs, kd_ref, bd_ref, gc_ref = refs
    x_ref = refs[0] if refs else None
    C = a_ref.shape[0]
    nb = C // SUB
    Vp = v_ref.shape[-1]
    strict = tri(SUB, strict=True)
    f32 = lambda t: t.astype(F32)
    w_scale = None

    def rows(ref, i, cols=slice(None)):
        return ref[pl.ds(i * SUB, SUB), cols]

    if chunk_factored:
        m, lak, a_rows, w_scale = _factored_products(
            a_ref, b_ref, k_ref, g_ref, kd_ref, bd_ref, gc_ref, nb, g_prec
        )
    elif gated:
        m, lak, a_rows = _gated_products(
            a_ref, b_ref, k_ref, g_ref, kd_ref, bd_ref, gc_ref, nb, precision, factor
        )
    else:
        # M_im = A_i B_m^T and L_im = A_i K_m^T for m <= i (strict on the diagonal)
        m, lak = {}, {}
        for i in range(nb):
            a_i = rows(a_ref, i)
            for j in range(i + 1):
                m[i, j] = _input_dot_nt(a_i, rows(b_ref, j))
                lak[i, j] = _input_dot_nt(a_i, rows(k_ref, j))
                if j == i:
                    m[i, j], lak[i, j] = mask(strict, m[i, j]), mask(strict, lak[i, j])
        a_rows = lambda j: f32(rows(a_ref, j))  # noqa: E731

    x = _inverse_blocks(m, nb, precision)
    if x_ref is not None:
        _store_lower(x_ref, x, nb)

    # W_i = sum_j X_ij A_j (A re-read rather than kept live through the inverse: for Kp = 256
    # the [C, Kp] float32 tile alone would fill the registers);  P = X L, so that
    # U_i = sum_k P_ik V_k needs no [C, V] temporary. Gated: W = X (A e^{Gx}).
    for i in range(nb):
        w = sum(_dot(x[i, j], a_rows(j), f32_prec) for j in range(i + 1))
        if w_scale is not None:
            w = w * w_scale[None, :]
        w_ref[pl.ds(i * SUB, SUB), :] = w.astype(w_ref.dtype)
    p = {
        (i, s): sum(_dot(x[i, j], lak[j, s], precision) for j in range(s, i + 1))
        for i in range(nb)
        for s in range(i + 1)
    }
    for vb in range(Vp // block_v):
        cols = pl.ds(vb * block_v, block_v)
        v_blk = [f32(rows(v_ref, s, cols)) for s in range(nb)]
        for i in range(nb):
            u = sum(_dot(p[i, s], v_blk[s], f32_prec) for s in range(i + 1))
            u_ref[pl.ds(i * SUB, SUB), cols] = u.astype(u_ref.dtype)


def wy_fwd(
    a: jax.Array, b: jax.Array, k: jax.Array, v: jax.Array, *, chunk_size: int, config: ChunkConfig,
    out_dtype=None, with_x: bool = False, interpret: bool = False, gk: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """W = X A and U = X strict(A K^T) V for every chunk, X = (I - strict(A B^T))^{-1}.

    Args:
      a, b, k: [1, L, H, Kp]; v: [1, L, H, Vp]; L a multiple of `chunk_size` (16, 32 or 64),
        Kp and Vp powers of two >= 16.
      config: a filled `ChunkConfig` (its `wy_*` fields).
      out_dtype: dtype of W and U (default float32).
      with_x: also return X (for the backward).
      gk: the gate [1, L, H, Kp] or None. Given, the products are the decayed ones of
        docs/gate.md (X = (I - [a_t . e^{Gx_t - G_s} b_s]_{s<t})^{-1}, W = X (A e^{Gx}),
        U = X [a_t . e^{Gx_t - G_s} k_s]_{s<t} V) and the sweep's decayed operands come too.
        With `config.gate_chunk_factored`, each (chunk, head) whose `gate_factors.chunk_flags`
        allows it takes the whole-chunk factored mode (`_factored_products`), the others the
        blockwise one, in two launches writing the same buffers.

    Returns:
      W [1, L, H, Kp] and U [1, L, H, Vp] in `out_dtype`; with `with_x` also X [NC, H, C, C]
      float32 (NC = L / chunk_size); with `gk` then K e^{G_C - G}, B e^{G_C - G} [1, L, H, Kp]
      in `out_dtype` and e^{G_C} [NC, H, Kp] float32.
    """
    L, C = a.shape[1], chunk_size
    if C % SUB or L % C:
        raise ValueError(f"chunk_size must be a multiple of {SUB} dividing L={L}, got {C}")
    kw = dict(chunk_size=C, config=config, out_dtype=F32 if out_dtype is None else out_dtype,
              with_x=with_x, interpret=interpret)
    if gk is None or not (config.gate_chunk_factored and gate_factors.applies(a.dtype)):
        return _wy_call(a, b, k, v, gk=gk, **kw)
    # each (chunk, head) by one of two launches, chosen by its flag: the factored mode writes
    # its chunks, then the blockwise mode writes the others into the same buffers
    flags = gate_factors.chunk_flags(gk, C)
    outs = _wy_call(a, b, k, v, gk=gk, when=(flags, 1), **kw)
    return _wy_call(a, b, k, v, gk=gk, when=(flags, 0), into=outs, **kw)


def _selected(*refs, n_in: int, n_into: int, want: int, kernel):
    """`kernel` on the (chunk, head) of this program if its flag is `want`, else nothing
    written: the flags ([NC * H] int32) are the last input; `n_into` buffers aliased to the
    outputs follow it, unread (their other chunks are kept)."""
    flag = refs[n_in - 1][pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)]
    pl.when(flag == want)(lambda: kernel(*refs[: n_in - 1], *refs[n_in + n_into :]))


def _wy_call(a, b, k, v, *, chunk_size, config, out_dtype, with_x, interpret, gk, when=None, into=None):
    """`wy_fwd` as one launch of `_wy_kernel` (with a gate, its blockwise gated mode). `when`:
    (flags, want) runs only the chunks whose flag is `want`, in the whole-chunk factored mode
    for want = 1; `into`: the outputs of an earlier launch to write into (aliased)."""
    _, L, H, Kp = a.shape
    Vp, C = v.shape[-1], chunk_size
    kspec = pl.BlockSpec((None, C, None, Kp), lambda c, h: (0, c, h, 0))
    vspec = pl.BlockSpec((None, C, None, Vp), lambda c, h: (0, c, h, 0))
    out_specs = [kspec, vspec]
    vma = vma_of(a, b, k, v, *([] if gk is None else [gk]))  # outputs vary like the inputs
    out_shape = [shape_dtype((1, L, H, Kp), out_dtype, vma), shape_dtype((1, L, H, Vp), out_dtype, vma)]
    if with_x:
        out_specs.append(pl.BlockSpec((None, None, C, C), lambda c, h: (c, h, 0, 0)))
        out_shape.append(shape_dtype((L // C, H, C, C), F32, vma))
    in_specs, args, gated = [kspec, kspec, kspec, vspec], [a, b, k, v], {}
    if gk is not None:  # a static flag: without a gate the kernel is compiled as it always was
        in_specs.append(kspec)
        args.append(gk)
        gated = dict(gated=True, factor=config.gate_factored)
        if when is not None and when[1]:
            gated.update(chunk_factored=True, g_prec=gate.sum_precision(gk.dtype, interpret))
        out_specs += [kspec, kspec, pl.BlockSpec((None, None, Kp), lambda c, h: (c, h, 0))]
        out_shape += [
            shape_dtype((1, L, H, Kp), out_dtype, vma), shape_dtype((1, L, H, Kp), out_dtype, vma),
            shape_dtype((L // C, H, Kp), F32, vma),
        ]
    kernel = functools.partial(
        _wy_kernel, block_v=config.wy_block_v, precision=PRECISIONS[config.wy_precision],
        f32_prec=f32_precision(config.f32_dots, interpret), **gated,
    )
    aliases = {}
    if when is not None:
        flags, want = when
        in_specs.append(pl.BlockSpec(flags.shape, lambda c, h: (0,)))
        args.append(flags)
        into = list(into or [])
        aliases = {len(args) + n: n for n in range(len(into))}
        in_specs += out_specs[: len(into)]
        kernel = functools.partial(
            _selected, n_in=len(args), n_into=len(into), want=want, kernel=kernel
        )
        args += into
    return tuple(pl.pallas_call(
        kernel,
        grid=(L // C, H),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltr.CompilerParams(num_warps=config.wy_warps, num_stages=1),
        interpret=interpret,
        name="iplr_wy_fwd",
    )(*args))
