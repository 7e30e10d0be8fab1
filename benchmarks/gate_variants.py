"""Where the gated chunk's forward time goes (issue 17, docs/gate.md "Whole-chunk factoring"):
the WY pass and the output kernel at S1 in variants timed in one process (bf16,
gk = -softplus(N(0, 1))):

    python benchmarks/gate_variants.py [--sizes S1] [--rows wy,out]

WY rows: the IPLR kernel (gk=None, the floor); the default gated route (the per-chunk flags,
the whole-chunk factored launch, the blockwise launch for the chunks left); the factored launch
alone; the blockwise launch when every chunk is flagged (what its early exits cost); the flags'
jnp pass alone; the default with the blockwise launch skipped by a `lax.cond` when every chunk
is flagged; the blockwise gated kernel alone (`gate_chunk_factored=False`).
Output rows: the gated output kernel by 16-row blocks and by whole chunks, and the IPLR one,
each with the whole forward. Session 10 measured an in-kernel route with this script too
(benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from profile_kernels import inputs
from timing import median_ms

from iplr_jax.bench import SIZES
from iplr_jax.inputs import Inputs
from iplr_jax.triton import chunk as ck
from iplr_jax.triton import gate_factors, wy_fast
from iplr_jax.triton.config import ChunkConfig, chunk_config


def profile(label, B, T, H, K, V, wanted, interp, C=64, dt=jnp.bfloat16):
    rows = []
    q, k, v, a, b, _, h0 = inputs(B, T, H, K, V, dt)
    gk = jnp.asarray(-np.logaddexp(0.0, np.random.default_rng(1).standard_normal(q.shape)), dt)
    cfg = lambda gated, **f: chunk_config(  # noqa: E731
        dataclasses.replace(ChunkConfig(), **f), N=B, H=H, Kp=q.shape[-1], Vp=v.shape[-1],
        num_chunks=q.shape[1] // C, dtype=dt, interpret=interp, gated=gated,
    )

    def wy(config, gated=True):
        f = functools.partial(
            wy_fast.wy_fwd, chunk_size=C, config=config, out_dtype=dt, with_x=True, interpret=interp
        )
        return jax.jit(lambda *x: f(*x[:4], gk=x[4] if gated else None))

    def row(name, f, *x):
        rows.append((label, name, median_ms(f, *x)))
        print(*rows[-1], flush=True)

    if "wy" in wanted:
        row("wy IPLR (gk=None)", wy(cfg(False), gated=False), a, b, k, v, gk)
        factored = cfg(True)
        row("wy gated, default (flags, factored + blockwise launches)", wy(factored), a, b, k, v, gk)
        call = functools.partial(
            wy_fast._wy_call, chunk_size=C, config=factored, out_dtype=dt, with_x=True, interpret=interp
        )
        ones = jnp.ones((T // C * B * H,), jnp.int32)
        row("wy gated, factored launch alone", jax.jit(lambda *x: call(*x[:4], gk=x[4], when=(ones, 1))),
            a, b, k, v, gk)
        warps2 = dataclasses.replace(factored, wy_warps=2)
        row("wy gated, factored launch alone, 2 warps",
            jax.jit(lambda *x: call(*x[:4], gk=x[4], when=(ones, 1), config=warps2)), a, b, k, v, gk)
        outs = jax.jit(lambda *x: call(*x[:4], gk=x[4], when=(ones, 1)))(a, b, k, v, gk)
        row("wy gated, blockwise launch with every chunk flagged (its exits)",
            jax.jit(lambda *x: call(*x[:4], gk=x[4], when=(ones, 0), into=x[5:])), a, b, k, v, gk, *outs)
        row("flags alone (jnp)", jax.jit(lambda g: gate_factors.chunk_flags(g, C)), gk)

        def skip_when_all_flagged(*x):  # the blockwise launch under a cond on all(flags)
            flags = gate_factors.chunk_flags(x[4], C)
            outs = call(*x[:4], gk=x[4], when=(flags, 1))
            rest = lambda o: tuple(call(*x[:4], gk=x[4], when=(flags, 0), into=o))  # noqa: E731
            return jax.lax.cond(jnp.all(flags == 1), lambda o: tuple(o), rest, tuple(outs))

        row("wy gated, flags + factored launch + blockwise under cond(all flags)",
            jax.jit(skip_when_all_flagged), a, b, k, v, gk)
        row("wy gated, blockwise kernel", wy(cfg(True, gate_chunk_factored=False)), a, b, k, v, gk)
    if "out" in wanted:
        cu = jnp.arange(B + 1, dtype=jnp.int32) * (T // C)
        kw = dict(scale=K**-0.5, chunk_size=C, interpret=interp)
        variants = {
            "gated, blockwise": (cfg(True, gate_chunk_factored=False), Inputs(q, k, v, a, b, gk)),
            "gated, chunk-factored": (cfg(True), Inputs(q, k, v, a, b, gk)),
            "IPLR": (cfg(False), Inputs(q, k, v, a, b)),
        }
        for tag, (config, x) in variants.items():
            fwd = jax.jit(functools.partial(ck.chunk_fwd, config=config, **kw))
            _, _, res = fwd(x, h0, cu)
            out = jax.jit(functools.partial(ck.output_fwd, config=config, **kw))
            row(f"output {tag}", lambda *y, out=out: out(*y[:6], gk=y[6]), q, k, b, v, res.v_new, res.h, x.gk)
            row(f"chunk_fwd total {tag}", fwd, x, h0, cu)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="S1")
    p.add_argument("--rows", default="wy,out")
    p.add_argument("--interpret", action="store_true", help="a CPU smoke run at a tiny size")
    args = p.parse_args()
    sizes = {"tiny": dict(B=1, T=128, H=1, K=32, V=32)} if args.interpret else SIZES
    rows = []
    for label in ["tiny"] if args.interpret else args.sizes.split(","):
        rows += profile(label, **sizes[label], wanted=args.rows, interp=args.interpret)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, median ms")
    for label, name, ms in rows:
        print(f"{label:4} {name:68} {ms:8.3f}")


if __name__ == "__main__":
    main()
