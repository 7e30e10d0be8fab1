"""In-kernel helpers shared by the Triton kernels: masks, dots with their precision rules, the
16-bit test, and the prefetching loop. Each is defined once here (docs/numerics.md says which
products run at which precision and why)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
TN = (((0,), (0,)), ((), ()))  # x^T @ y
NT = (((1,), (1,)), ((), ()))  # x @ y^T
NN = (((1,), (0,)), ((), ()))  # x @ y


TF32X3 = lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def f32_precision(f32_dots: str, interpret: bool = False):
    """The `precision` of a dot with float32 operands for a config's `f32_dots`: None (the
    default, tf32 on the GPU), or for "highest" three tf32 products on the GPU (float32-level
    error on the matrix units; Triton's exact float32 dot of [64, 128] tiles compiled for
    minutes) and HIGHEST in the interpreter, which has no tf32."""
    if f32_dots != "highest":
        return None
    return HIGHEST if interpret else TF32X3


def is_low(dt) -> bool:
    """Whether `dt` is a 16-bit float (bf16 / fp16): such inputs go to the matrix units as they
    are, with float32 accumulation."""
    return jnp.dtype(dt) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def mask(cond, x):
    """x where `cond`, else zero (a select: a non-finite x outside `cond` never leaks through).
    An explicit zero of x's dtype: under jax_enable_x64 a bare 0.0 is a float64 literal."""
    return jnp.where(cond, x, jnp.zeros((), x.dtype))


def tri(n: int, strict: bool):
    """[n, n] lower-triangle mask: row > col (strict) or row >= col (inclusive)."""
    r = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    c = lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return r > c if strict else r >= c


def dot(x, y, dims=None, precision=None):
    """x @ y (or `lax.dot_general` with `dims`, e.g. `TN`, `NT`) with float32 accumulation; the
    operands are used in the dtype they come in."""
    if dims is None:
        return jnp.dot(x, y, preferred_element_type=F32, precision=precision)
    return lax.dot_general(x, y, dims, precision=precision, preferred_element_type=F32)


def dot_as(x, y, *, dt, ta=False, tb=False, f32_precision=lax.Precision.DEFAULT):
    """x @ y (x^T if ta, y^T if tb) with float32 accumulation, operands cast by the input dtype
    `dt`: both to `dt` when it is 16-bit (matrix units, exact products), else both to float32
    at `f32_precision` (DEFAULT: tf32 on the GPU)."""
    if is_low(dt):
        x, y, precision = x.astype(dt), y.astype(dt), None
    else:
        x, y, precision = x.astype(F32), y.astype(F32), f32_precision
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(x, y, dims, precision=precision, preferred_element_type=F32)


def prefetched_loop(start, stop, load, body, init, *, rows: int, depth: int = 1, reverse=False):
    """`for t in range(start, stop)` (or reversed) of `carry = body(t, load(t), carry)` inside a
    kernel, with `load(t)` issued `depth` iterations early.

    Triton pipelines only loads that feed matrix-unit dots; in a per-token recurrence every
    step would otherwise wait one global-memory latency for its own row before any arithmetic.
    Carrying the next rows in the loop state overlaps that latency with the previous steps.
    Loads past the range are clamped into `[0, rows)` (in bounds, values unused). depth=0 is
    the plain loop.
    """
    n = stop - start
    at = (lambda i: stop - 1 - i) if reverse else (lambda i: start + i)
    if depth == 0:
        return jax.lax.fori_loop(0, n, lambda i, c: body(at(i), load(at(i)), c), init)

    def fetch(i):
        return load(jnp.clip(at(i), 0, rows - 1))

    def step(i, carry):
        c, ahead = carry
        nxt = fetch(i + depth)
        return body(at(i), ahead[0], c), (*ahead[1:], nxt)

    ahead = tuple(fetch(jnp.int32(j)) for j in range(depth))
    return jax.lax.fori_loop(0, n, step, (init, ahead))[0]


def identity_columns(shape, offset, on):
    """A [Kp, BV] block of columns offset .. offset + BV of I_Kp where `on`, else zeros."""
    rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + offset
    return jnp.where(on & (rows == cols), 1.0, 0.0).astype(F32)
