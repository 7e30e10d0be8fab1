"""The gated chunk as the IPLR chunk on decayed operands (docs/gate.md, "Whole-chunk factoring").

Refer each chunk's cumulative gate to its middle row m: G inclusive and Gx exclusive sums from
the chunk's start, Gm = G at row m, G_C = G at the last row. Every decay the chunked form needs
splits there, e^{G_t - G_s} = e^{G_t - Gm} e^{Gm - G_s}, so with

    Qd = Q e^{G - Gm},  Ad = A e^{Gx - Gm},  Kd = K e^{Gm - G},  Bd = B e^{Gm - G}

the chunk's decayed products are the IPLR products of Qd, Kd, Ad, Bd; the state entering the
chunk is read as S0' = e^{Gm} S0 (rows), and the state leaving it is S_C = e^{G_C - Gm} S_C', S_C'
the IPLR chunk's. So the IPLR WY and intra-chunk kernels run the gated chunk unchanged, and the
sweeps only scale their state by e^{Gm} and e^{G_C - Gm} per chunk. `chunk_flags` says where the
factors stay below e^{FACTOR_BOUND}: the WY pass chooses per (chunk, head) between its factored
mode (the decays formed in the kernel) and its blockwise mode; the backward takes this route
when every chunk allows it (one `lax.cond`, the factors formed here in jnp; otherwise the
blockwise gated kernels, exact for any gate). A gate of RWKV-7's size always qualifies.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from iplr_jax.triton.gate import FACTOR_BOUND
from iplr_jax.triton.helpers import F32, HIGHEST


class Factors(NamedTuple):
    """Per chunk, float32, chunk-major: `rel` = G - Gm and `rel_x` = Gx - Gm [NC, C, H, Kp];
    `mid` = Gm and `end` = G_C [NC, 1, H, Kp]. Used where `chunk_flags` allows (every
    |rel|, |rel_x| <= FACTOR_BOUND)."""

    rel: jax.Array
    rel_x: jax.Array
    mid: jax.Array
    end: jax.Array


def applies(dtype, backward: bool = False) -> bool:
    """Whether the route is open to inputs of `dtype`: the decayed operands reach e^{60} in size,
    beyond fp16's range (bf16 and float32 hold them). The backward takes it for bf16 alone: on
    float32 inputs the IPLR intra kernel's tf32 products left 2.7e-3 in dgk on an H100 (the
    identity's terms cancel), where the blockwise kernels' diagonal blocks run at float32
    accuracy (benchmarks/NOTES.md, session 11)."""
    if backward:
        return jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
    return jnp.dtype(dtype) != jnp.dtype(jnp.float16)


def factors(gk: jax.Array, chunk_size: int) -> Factors:
    """`Factors` of the gate gk [1, L, H, Kp]. The in-chunk cumulative sum is one product with
    a triangle of ones: exact products, float32 sums (float32 gates at HIGHEST)."""
    _, L, H, Kp = gk.shape
    C = chunk_size
    g = gk.reshape(L // C, C, H, Kp)
    ones = jnp.tril(jnp.ones((C, C), g.dtype))
    precision = HIGHEST if jnp.dtype(g.dtype) == jnp.dtype(F32) else None
    G = jnp.einsum("ts,nshk->nthk", ones, g, preferred_element_type=F32, precision=precision)
    mid, end = G[:, C // 2 - 1 : C // 2], G[:, -1:]
    return Factors(G - mid, G - g.astype(F32) - mid, mid, end)


def chunk_flags(gk: jax.Array, chunk_size: int) -> jax.Array:
    """int32 [NC * H] (chunk-major): 1 where the chunk's factors certainly stay within
    e^{FACTOR_BOUND} for every key, from the sums of |gk| over the rows up to the middle row and
    after it, which bound every |G - Gm| and |Gx - Gm| (equal to their largest for a gate of one
    sign). One reduction over gk, no cumulative sum; the WY pass picks its mode per (chunk,
    head) with it."""
    _, L, H, Kp = gk.shape
    halves = jnp.abs(gk.astype(F32)).reshape(L // chunk_size, 2, chunk_size // 2, H, Kp).sum(2)
    return (jnp.max(halves, axis=(1, 3)) <= FACTOR_BOUND).astype(jnp.int32).reshape(-1)


def decay(y: jax.Array, exponent: jax.Array, dtype=None) -> jax.Array:
    """y [1, L, H, D] times e^{exponent} ([NC, C or 1, H, D], chunk-major), as [1, L, H, D] in
    `dtype` (default y's)."""
    NC = exponent.shape[0]
    out = y.astype(F32).reshape(NC, -1, *y.shape[2:]) * jnp.exp(exponent)
    return out.reshape(y.shape).astype(dtype or y.dtype)


def per_chunk(x: jax.Array) -> jax.Array:
    """[NC, 1, H, Kp] -> [NC, H, Kp], as the kernels take per-chunk rows."""
    return x[:, 0]
