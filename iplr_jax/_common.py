"""Shared helpers: input validation, implementation choice, and the chunk layout.

Every public op validates its inputs here, before any tracing, so a bad call fails with a
`ValueError` that names the argument, the shape it got and the shape it needs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("pallas", "xla", "interpret")
CHUNK_SIZES = (16, 32, 64)
# Streaming multiprocessors of the H100 the kernels were tuned on; only steers block sizes.
NUM_SMS = 132
# Largest key head size the Pallas kernels hold in one block (the state slab is [K, BV]).
MAX_KERNEL_HEAD_DIM = 256


class Dims(NamedTuple):
    B: int  # batch (1 when packed)
    T: int  # tokens per batch row
    H: int  # heads
    K: int  # key / low-rank head size
    V: int  # value head size
    N: int  # number of sequences (B, or len(cu_seqlens) - 1 when packed)


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def resolve_implementation(implementation: str | None, *inputs) -> str:
    """`None` -> the fastest available: "pallas" on a GPU, "xla" elsewhere, and "xla" for
    float64 `inputs` everywhere (the kernels compute in float32, the xla path in float64)."""
    if implementation is None:
        if any(getattr(x, "dtype", None) == jnp.float64 for x in inputs):
            return "xla"
        return "pallas" if has_gpu() else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if implementation == "pallas" and not has_gpu():
        raise ValueError(
            'implementation="pallas" needs a GPU (the kernels use the Triton backend); '
            'use "xla" on CPU/TPU, or "interpret" to run the kernels through the Pallas interpreter'
        )
    return implementation


def _shape(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def check_inputs(
    q, k, v, a, b, *, scale=None, initial_state=None, cu_seqlens=None, chunk_size=None,
    implementation: str = "xla",
) -> Dims:
    """Validates the arguments shared by `naive`, `chunk` and `fused_recurrent`."""
    for name, x in (("q", q), ("k", k), ("v", v), ("a", a), ("b", b)):
        if len(_shape(x)) != 4:
            want = "[B, T, H, V]" if name == "v" else "[B, T, H, K]"
            raise ValueError(f"{name} must have shape {want}, got shape {_shape(x)}")
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")
    B, T, H, K = _shape(q)
    for name, x in (("k", k), ("a", a), ("b", b)):
        if _shape(x) != (B, T, H, K):
            raise ValueError(
                f"{name} must have the shape of q, [B, T, H, K] = {(B, T, H, K)}, got {_shape(x)}"
            )
    if _shape(v)[:3] != (B, T, H):
        raise ValueError(
            f"v must have shape [B, T, H, V] = ({B}, {T}, {H}, V) to match q, got {_shape(v)}"
        )
    V = _shape(v)[3]
    if min(K, V) < 1:
        raise ValueError(f"head sizes must be positive, got K={K} (q.shape[-1]) and V={V} (v.shape[-1])")
    if T < 1:
        raise ValueError(f"q must hold at least one token, got T={T} in q.shape={_shape(q)}")
    if implementation in ("pallas", "interpret") and K > MAX_KERNEL_HEAD_DIM:
        raise ValueError(
            f"the Pallas kernels support K <= {MAX_KERNEL_HEAD_DIM}, got K={K} "
            f"(q.shape={_shape(q)}); use implementation='xla' for larger heads"
        )
    if scale is not None and not isinstance(scale, (int, float)):
        if _shape(scale) != ():
            raise ValueError(f"scale must be a scalar, got shape {_shape(scale)}")
    if chunk_size is not None and chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be a power of two in {CHUNK_SIZES}, got {chunk_size!r}")

    N = B
    if cu_seqlens is not None:
        if isinstance(cu_seqlens, (list, tuple)):  # offsets typed in by hand
            cu_seqlens = np.asarray(cu_seqlens)
        if len(_shape(cu_seqlens)) != 1 or _shape(cu_seqlens)[0] < 2:
            raise ValueError(
                f"cu_seqlens must have shape [N + 1] with N >= 1, got shape {_shape(cu_seqlens)}"
            )
        if not jnp.issubdtype(jnp.result_type(cu_seqlens), jnp.integer):
            raise ValueError(f"cu_seqlens must be integer offsets, got dtype {jnp.result_type(cu_seqlens)}")
        if B != 1:
            raise ValueError(
                f"with cu_seqlens the sequences are packed into a batch of 1: q must have shape "
                f"[1, T, H, K], got {_shape(q)}"
            )
        N = _shape(cu_seqlens)[0] - 1
        if not isinstance(cu_seqlens, jax.core.Tracer):
            cu = np.asarray(cu_seqlens)
            if cu[0] != 0 or cu[-1] != T or np.any(np.diff(cu) < 0):
                raise ValueError(
                    f"cu_seqlens must be non-decreasing offsets from 0 to T={T}, got {cu.tolist()}"
                )
    if initial_state is not None and _shape(initial_state) != (N, H, K, V):
        what = "N = len(cu_seqlens) - 1" if cu_seqlens is not None else "N = B"
        raise ValueError(
            f"initial_state must have shape [N, H, K, V] = {(N, H, K, V)} ({what}), "
            f"got {_shape(initial_state)}"
        )
    return Dims(B, T, H, K, V, N)


def default_scale(scale, K: int) -> float:
    return K**-0.5 if scale is None else scale


def static_scale(q: jax.Array, scale) -> tuple[jax.Array, float]:
    """The kernels take `scale` as a Python float; a traced one (under jit) is folded into q."""
    try:
        return q, float(scale)
    except jax.errors.ConcretizationTypeError:
        return (q * scale).astype(q.dtype), 1.0


def accum_dtype(*xs) -> jnp.dtype:
    """float32 accumulation, float64 when any input is float64 (the oracle)."""
    return jnp.float64 if any(jnp.result_type(x) == jnp.float64 for x in xs) else jnp.float32


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


# -- chunk layout -----------------------------------------------------------------------------
# Every chunked path works on a layout where no chunk straddles two sequences: each sequence
# starts on a chunk boundary and its last chunk is zero-padded. Zero rows are harmless: with
# a = b = k = v = 0 a step leaves the state as it was, so the state after a sequence's last
# chunk is its final state.


class ChunkLayout(NamedTuple):
    """Where each token sits in the chunk-aligned layout of one flattened row.

    cu_chunks:  int32 [N + 1], sequence n owns chunks cu_chunks[n] .. cu_chunks[n+1]-1.
    src:        int32 [NC * C], token index (into the flattened [B*T] tokens) of each padded
                slot, or -1 for padding.  None when the layout is a plain reshape+pad.
    dst:        int32 [B*T], slot of each token in the padded layout.  None likewise.
    num_chunks: static NC, an upper bound on cu_chunks[-1] for packed inputs.
    """

    cu_chunks: jax.Array
    src: jax.Array | None
    dst: jax.Array | None
    num_chunks: int
    chunk_size: int
    B: int
    T: int


def make_layout(dims: Dims, cu_seqlens, chunk_size: int) -> ChunkLayout:
    C = chunk_size
    if cu_seqlens is None:
        nt = -(-dims.T // C)
        cu_chunks = jnp.arange(dims.B + 1, dtype=jnp.int32) * nt
        return ChunkLayout(cu_chunks, None, None, dims.B * nt, C, dims.B, dims.T)
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    N, T = dims.N, dims.T
    lens = cu[1:] - cu[:-1]
    cu_chunks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum((lens + C - 1) // C)])
    cu_chunks = cu_chunks.astype(jnp.int32)
    # sum_n ceil(l_n / C) <= (T + N (C - 1)) / C
    nc = max(1, (T + N * (C - 1)) // C)
    slot = jnp.arange(nc * C, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_chunks[1:], slot // C, side="right"), 0, N - 1)
    src = cu[seq] + slot - cu_chunks[seq] * C
    src = jnp.where((src < cu[seq + 1]) & (slot < cu_chunks[-1] * C), src, -1)
    tok = jnp.arange(T, dtype=jnp.int32)
    tseq = jnp.clip(jnp.searchsorted(cu[1:], tok, side="right"), 0, N - 1)
    dst = cu_chunks[tseq] * C + tok - cu[tseq]
    return ChunkLayout(cu_chunks, src, dst, nc, C, 1, T)


def to_chunks(x: jax.Array, layout: ChunkLayout) -> jax.Array:
    """[B, T, H, D] -> [1, NC * C, H, D] in the chunk-aligned layout (padding is zero)."""
    B, T, H, D = x.shape
    C = layout.chunk_size
    if layout.src is None:
        pad = layout.num_chunks // B * C - T
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(1, -1, H, D)
    g = jnp.take(x[0], jnp.maximum(layout.src, 0), axis=0)
    return jnp.where((layout.src >= 0)[:, None, None], g, 0)[None]


def from_chunks(y: jax.Array, layout: ChunkLayout) -> jax.Array:
    """Inverse of `to_chunks`: [1, NC * C, H, D] -> [B, T, H, D]."""
    H, D = y.shape[2:]
    if layout.src is None:
        return y.reshape(layout.B, -1, H, D)[:, : layout.T]
    return jnp.take(y[0], layout.dst, axis=0)[None]


def pad_last(x: jax.Array, size: int) -> jax.Array:
    """Zero-pads the last axis to `size` (kernels want power-of-two head blocks)."""
    d = x.shape[-1]
    if d == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - d)])


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
