"""Where a context-parallel slice's summary spends its time (issue 15, docs/chunked.md
"Summaries by products"): one slice B1 T H16 K=V=128 bf16 on one GPU, the forward [h | M] and
the backward [g | M^T] by the summary sweeps and by the products' kernels (`triton/summary.py`),
their per-chunk maps and tree apart (median ms, one process). Session 12 timed an XLA version
of the products with this script (benchmarks/NOTES.md).

    python benchmarks/summary_variants.py [--T 131072]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from profile_kernels import inputs
from timing import median_ms

from iplr_jax.triton import chunk as ck
from iplr_jax.triton import chunk_bwd as cb
from iplr_jax.triton import summary
from iplr_jax.triton.config import ChunkConfig, chunk_config
from iplr_jax.triton.wy_fast import wy_fwd


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=131072)
    p.add_argument("--interpret", action="store_true", help="a CPU smoke run")
    args = p.parse_args()
    T, H, K, V, C = (args.T, 16, 128, 128, 64) if not args.interpret else (256, 2, 32, 32, 64)
    q, k, v, a, b, do, _ = inputs(1, T, H, K, V, jnp.bfloat16)
    NC = T // C
    cu = jnp.asarray([0, NC], jnp.int32)
    cfg = chunk_config(ChunkConfig(summary="products"), N=1, H=H, Kp=K, Vp=V, num_chunks=NC,
                       dtype=jnp.bfloat16, interpret=args.interpret)
    w, u = jax.jit(functools.partial(wy_fwd, chunk_size=C, config=cfg, out_dtype=jnp.bfloat16,
                                     interpret=args.interpret))(a, b, k, v)
    zeros = jnp.zeros((1, H, K, V), jnp.float32)
    rows = []

    def row(name, f, *x):
        rows.append((name, median_ms(jax.jit(f), *x, reps=10)))
        print(*rows[-1], flush=True)

    sweep = functools.partial(ck._state_pass, q=None, gc=None, chunk_size=C, scale=K**-0.5, low_v2=True,
                              config=cfg, interpret=args.interpret, summary=True)
    row("fwd summary sweep", lambda *x: sweep(*x, cu, zeros)[0], w, u, k, b, v)
    mkw = dict(chunk_size=C, config=cfg, interpret=args.interpret)
    kw = dict(rows=1, **mkw)
    row("fwd products", lambda *x: summary.forward_summary(*x, cu, **kw), w, u, k, b, v)
    row("fwd maps only", lambda *x: summary.forward_maps(*x, **mkw), w, u, k, b, v)
    h, m = jax.jit(lambda *x: summary.forward_maps(*x, **mkw))(w, u, k, b, v)
    tree = functools.partial(summary._compose_rows, rows=1, reverse=False, f32_prec=None,
                             interpret=args.interpret)
    row("tree only", tree, h, m)
    bsweep = functools.partial(cb._sweep, scale=K**-0.5, chunk_size=C, dt=jnp.bfloat16, config=cfg,
                               interpret=args.interpret, summary=True)
    row("bwd summary sweep", lambda *x: bsweep(*x, zeros, cu)[0], q, b, w, do)
    row("bwd products", lambda *x: summary.backward_summary(*x, cu, scale=K**-0.5, **kw), q, b, w, do)
    row("bwd maps only", lambda *x: summary.backward_maps(*x, scale=K**-0.5, **mkw), q, b, w, do)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, T={T} H={H} K=V={K}, median ms")
    for name, ms in rows:
        print(f"{name:40s} {ms:8.3f}")


if __name__ == "__main__":
    main()
