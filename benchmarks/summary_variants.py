"""Where a context-parallel slice's summary and sweeps spend their time (issue 15, docs/chunked.md
"Segments under context parallelism"): one slice B1 T H16 K=V=128 bf16 on one GPU, the forward
[h | M] and the backward [g | M^T] by one summary sweep of the slice and from segments of G
chunks swept in parallel and composed, and the state sweeps proper, whole and cut into the same
segments (median ms, one process). Sessions 12 and 13 timed summaries by products with an
earlier version of this script (benchmarks/NOTES.md).

    python benchmarks/summary_variants.py [--T 131072] [--segments 512,256,128]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from profile_kernels import inputs
from timing import median_ms

from iplr_jax import segments
from iplr_jax.triton import chunk as ck
from iplr_jax.triton import chunk_bwd as cb
from iplr_jax.triton.config import ChunkConfig, chunk_config
from iplr_jax.triton.wy_fast import wy_fwd


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=131072)
    p.add_argument("--interpret", action="store_true", help="a CPU smoke run")
    p.add_argument("--segments", type=lambda s: [int(x) for x in s.split(",") if x], default=[512, 256, 128],
                   help="segment lengths (chunks)")
    args = p.parse_args()
    T, H, K, V, C = (args.T, 16, 128, 128, 64) if not args.interpret else (256, 2, 32, 32, 64)
    x = inputs(1, T, H, K, V, jnp.bfloat16)[:6]  # q, k, v, a, b, do
    NC = T // C
    cu = jnp.asarray([0, NC], jnp.int32)
    rows = []

    def row(name, f, *x):
        rows.append((name, median_ms(jax.jit(f), *x, reps=10)))
        print(*rows[-1], flush=True)

    for G in [0, *args.segments]:
        segment_rows(row, G, NC, cu, *x, C, args.interpret)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, T={T} H={H} K=V={K}, median ms")
    for name, ms in rows:
        print(f"{name:40s} {ms:8.3f}")


def segment_rows(row, G, NC, cu, q, k, v, a, b, do, C, interpret):
    """The slice's summaries (G = 0: one summary sweep of the slice; else from segments of G
    chunks, composed by `segments.sequence_summaries`) and its state sweeps cut alike (entering
    states given), with the config's rule for G."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    segs = segments.split(cu, NC, G) if G else None
    NS = segs.seq.shape[0] if G else 1
    seg_cu = segs.cu if G else cu
    cfg = chunk_config(ChunkConfig(segment_chunks=G), N=1, H=H, Kp=K, Vp=V, num_chunks=NC,
                       dtype=jnp.bfloat16, interpret=interpret)
    w, u = jax.jit(functools.partial(wy_fwd, chunk_size=C, config=cfg, out_dtype=jnp.bfloat16,
                                     interpret=interpret))(a, b, k, v)
    zeros = jnp.zeros((NS, H, K, V), jnp.float32)
    kw = dict(q=None, gc=None, chunk_size=C, scale=K**-0.5, low_v2=True, config=cfg, interpret=interpret)
    sweep = functools.partial(ck._state_pass, **kw)
    bkw = dict(scale=K**-0.5, chunk_size=C, dt=jnp.bfloat16, config=cfg, interpret=interpret)
    what = f"{NS} segments of {G}" if G else "whole slice"
    fold = (lambda s, **r: segments.sequence_summaries(s, segs, cu, **r)) if G else (lambda s, **r: s)
    fwd_summary = lambda *x: fold(sweep(*x, seg_cu, zeros, summary=True)[0])  # noqa: E731
    bwd_summary = lambda *x: fold(cb._sweep(*x, zeros, seg_cu, summary=True, **bkw)[0], reverse=True)  # noqa: E731
    row(f"fwd summary, {what}", fwd_summary, w, u, k, b, v)
    row(f"bwd summary, {what}", bwd_summary, q, b, w, do)
    row(f"fwd state sweep, {what}", lambda *x: sweep(*x, seg_cu, zeros, residuals=True), w, u, k, b, v)
    row(f"bwd sweep, {what}", lambda *x: cb._sweep(*x, zeros, seg_cu, **bkw), q, b, w, do)
    if G:  # the composed summary against one sweep's (16-bit state operands in both)
        whole = chunk_config(None, N=1, H=H, Kp=K, Vp=V, num_chunks=NC, dtype=jnp.bfloat16,
                             interpret=interpret)
        ref = jax.jit(lambda *x: ck._state_pass(*x, cu, zeros[:1], **{**kw, "config": whole},
                                                summary=True)[0])(w, u, k, b, v)
        got = jax.jit(fwd_summary)(w, u, k, b, v)
        print(f"{what}: composed summary against the whole sweep's, max rel err",
              float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))), flush=True)


if __name__ == "__main__":
    main()
