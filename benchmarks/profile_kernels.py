"""Time each kernel of the Pallas paths on its own: where does the time go?

    python benchmarks/profile_kernels.py                 # on the GPU: S1, S2, S3 and decode S4
    python benchmarks/profile_kernels.py --interpret     # a CPU smoke run at a tiny size

Chunked forward: WY alone, the whole forward with the output kernel separate
and fused into the sweep (`ChunkConfig.fuse_output`; state sweep + output = total - WY);
chunked backward: reverse dS sweep, intra-chunk gradients (X and W come from the forward); fused recurrence:
the bare forward kernel against the public jitted call (wrapper cost), at the decode size too.
Inputs are drawn as a layer draws them, on the aligned layout the kernels take.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_ms  # benchmarks/ is on sys.path as the script's folder

import iplr_jax
from iplr_jax.bench import SIZES
from iplr_jax.inputs import Inputs
from iplr_jax.triton import chunk as ck
from iplr_jax.triton import chunk_bwd as cb
from iplr_jax.triton import fused_recurrent as fr
from iplr_jax.triton.config import ChunkConfig, chunk_config, fused_recurrent_config
from iplr_jax.triton.wy_fast import wy_fwd


def inputs(B, T, H, K, V, dtype, seed=0):
    r = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    k = unit(r.standard_normal((1, B * T, H, K)))
    a = unit(r.standard_normal((1, B * T, H, K)))
    b = -r.uniform(0.05, 1.95, (1, B * T, H, 1)) * a
    q, v, do = (r.standard_normal((1, B * T, H, d)) for d in (K, V, V))
    h0 = jnp.asarray(r.standard_normal((B, H, K, V)), jnp.float32)
    cast = lambda x: jnp.asarray(x, dtype)
    return [cast(x) for x in (q, k, v, a, b, do)] + [h0]


def profile_chunk(label, B, T, H, K, V, dtype, interpret, C=64):
    q, k, v, a, b, do, h0 = inputs(B, T, H, K, V, dtype)
    x = Inputs(q, k, v, a, b)
    cu = jnp.arange(B + 1, dtype=jnp.int32) * (T // C)
    scale = K**-0.5
    rule = functools.partial(
        chunk_config, N=B, H=H, Kp=q.shape[-1], Vp=v.shape[-1], num_chunks=q.shape[1] // C,
        dtype=dtype, interpret=interpret,
    )
    cfg = rule(None)
    kw = dict(scale=scale, chunk_size=C, interpret=interpret)
    wy = jax.jit(functools.partial(wy_fwd, chunk_size=C, config=cfg, out_dtype=dtype, interpret=interpret))
    rows = [(label, "wy_fwd", median_ms(wy, a, b, k, v))]
    # the state sweep alone (residuals written, as in training) by V-block, and the summary
    # sweep that context parallelism adds ([h | M], nothing written but the end state)
    w, u = wy(a, b, k, v)[:2]
    for bv in sorted({cfg.state_block_v, 16, 32, 64}):
        if bv > v.shape[-1]:
            continue
        c_bv = rule(ChunkConfig(state_block_v=bv))
        sw = functools.partial(ck._state_pass, q=None, gc=None, chunk_size=C, scale=scale,
                               low_v2=c_bv.low_precision_v2, config=c_bv, interpret=interpret)
        run = jax.jit(lambda w, u, k, b, v, cu, h0, sw=sw: sw(w, u, k, b, v, cu, h0, residuals=True))
        summ = jax.jit(lambda w, u, k, b, v, cu, h0, sw=sw: sw(w, u, k, b, v, cu, h0, summary=True))
        mark = " (rule)" if bv == cfg.state_block_v else ""
        rows.append((label, f"state sweep, bv={bv}{mark}", median_ms(run, w, u, k, b, v, cu, h0)))
        rows.append((label, f"summary sweep, bv={bv}{mark}", median_ms(summ, w, u, k, b, v, cu, h0)))
        if bv != cfg.state_block_v:
            continue
        # the step's variants: a static trip count (unpacked inputs), 16-bit state operands
        variants = [("static trips", dict(static_chunks=T // C)), ("16-bit state dots", dict(low_state=True)),
                    ("both", dict(static_chunks=T // C, low_state=True))]
        for name, kw_v in variants:
            var = jax.jit(lambda w, u, k, b, v, cu, h0, sw=sw, kw_v=kw_v: sw(
                w, u, k, b, v, cu, h0, residuals=True, **kw_v))
            rows.append((label, f"state sweep, bv={bv}, {name}", median_ms(var, w, u, k, b, v, cu, h0)))
    for fuse in (False, True):
        cfg_f = rule(ChunkConfig(fuse_output=fuse))
        f = jax.jit(functools.partial(ck.chunk_fwd, residuals=False, config=cfg_f, **kw))
        name = f"chunk_fwd total, {'fused' if fuse else 'separate'}"
        rows.append((label, name, median_ms(f, x, h0, cu)))
    _, _, res = jax.jit(functools.partial(ck.chunk_fwd, config=cfg, **kw))(x, h0, cu)
    dt = jnp.dtype(dtype)
    dht = jnp.zeros_like(h0)
    wy_x = jax.jit(functools.partial(wy_fwd, chunk_size=C, config=cfg, out_dtype=dtype, with_x=True,
                                     interpret=interpret))
    sweep = jax.jit(functools.partial(cb._sweep, dt=dt, config=cfg, **kw))
    dsc, _ = sweep(q, b, res.w, do, dht, cu)
    intra = jax.jit(functools.partial(cb._intra, dt=dt, config=cfg, **kw))
    # the output kernel as the forward without residuals runs it (16-bit v_new for 16-bit inputs)
    out = jax.jit(functools.partial(ck.output_fwd, config=cfg, **kw))
    v_new = res.v_new.astype(dtype if cfg.low_precision_v2 else jnp.float32)
    bwd = jax.jit(functools.partial(cb.chunk_bwd, config=cfg, **kw))
    rows += [
        (label, "output kernel alone", median_ms(out, q, k, b, v, v_new, res.h)),
        (label, "wy_fwd with X (fwd with residuals)", median_ms(wy_x, a, b, k, v)),
        (label, "bwd: dS sweep", median_ms(sweep, q, b, res.w, do, dht, cu)),
        (label, "bwd: intra-chunk grads",
         median_ms(intra, q, k, v, a, b, res.h, res.v_new, do, dsc, res.x, cu)),
        (label, "bwd total", median_ms(bwd, x, res, cu, do, dht)),
    ]
    return rows


GATE_VARIANTS = {
    "factored": ChunkConfig(gate_chunk_factored=False),  # the 16-row diagonal blocks factored
    "chunk-factored": ChunkConfig(gate_chunk_factored=True),  # the whole chunk, where it may be
    "pairwise": ChunkConfig(gate_factored=False, gate_chunk_factored=False),
}


def profile_gated(label, B, T, H, K, V, dtype, interpret, C=64, variants=tuple(GATE_VARIANTS), bwd=True):
    """The gated (DPLR) kernels, gk = -softplus(N(0, 1)), in the `GATE_VARIANTS` named by
    `variants` (`ChunkConfig.gate_factored`, `gate_chunk_factored`); `bwd=False` skips the
    backward's row (its compile is the slowest)."""
    q, k, v, a, b, do, h0 = inputs(B, T, H, K, V, dtype)
    gk = jnp.asarray(-np.logaddexp(0.0, np.random.default_rng(1).standard_normal(q.shape)), dtype)
    x = Inputs(q, k, v, a, b, gk)
    cu = jnp.arange(B + 1, dtype=jnp.int32) * (T // C)
    kw = dict(scale=K**-0.5, chunk_size=C, interpret=interpret)
    rows = []
    for tag in variants:
        fields = GATE_VARIANTS[tag]
        cfg = chunk_config(
            dataclasses.replace(fields, bwd_kernels=True), N=B, H=H, Kp=q.shape[-1],
            Vp=v.shape[-1], num_chunks=q.shape[1] // C, dtype=dtype, interpret=interpret, gated=True,
        )
        wy = jax.jit(lambda a, b, k, v, gk, cfg=cfg: wy_fwd(
            a, b, k, v, chunk_size=C, config=cfg, out_dtype=dtype, with_x=True, interpret=interpret, gk=gk))
        fwd = jax.jit(functools.partial(ck.chunk_fwd, config=cfg, **kw))
        new = [
            (label, f"gated wy_fwd with X, {tag}", median_ms(wy, a, b, k, v, gk)),
            (label, f"gated chunk_fwd total, {tag}", median_ms(fwd, x, h0, cu)),
        ]
        if bwd:
            _, _, res = fwd(x, h0, cu)
            back = jax.jit(functools.partial(cb.chunk_bwd, config=cfg, **kw))
            dht = jnp.zeros_like(h0)
            new.append((label, f"gated bwd total, {tag}", median_ms(back, x, res, cu, do, dht)))
        rows += new
        print(*new, sep="\n", flush=True)
    return rows


def profile_recurrent(label, B, T, H, K, V, dtype, interpret):
    q, k, v, a, b, _, h0 = inputs(B, T, H, K, V, dtype)
    cu = jnp.arange(B + 1, dtype=jnp.int32) * T
    cfg = fused_recurrent_config(None, pairs=B * H, Kp=q.shape[-1], Vp=v.shape[-1])
    bare = jax.jit(lambda *x: fr.fused_fwd(
        Inputs(*x[:5]), x[5], cu, scale=K**-0.5, config=cfg, interpret=interpret, residuals=False
    ))
    sq = lambda x: x[0]  # the kernels take [L, H, D]
    public = jax.jit(
        functools.partial(
            iplr_jax.fused_recurrent,
            output_final_state=True,
            implementation="interpret" if interpret else "pallas",
        )
    )
    args4 = [x.reshape(B, T, H, -1) for x in (q, k, v, a, b)]
    return [
        (label, "fused fwd kernel (bare)", median_ms(bare, *map(sq, (q, k, v, a, b)), h0)),
        (label, "fused_recurrent (public, jit)", median_ms(lambda *x: public(*x, initial_state=h0), *args4)),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interpret", action="store_true", help="tiny sizes through the interpreter")
    p.add_argument("--sizes", default="S1,S2,S3", help="chunk sizes to profile, e.g. S2")
    p.add_argument("--no-recurrent", action="store_true", help="skip the fused recurrence")
    p.add_argument("--gate", action="store_true", help="the gated kernels only (gk = -softplus(N(0, 1)))")
    p.add_argument("--gate-variants", default=",".join(GATE_VARIANTS), help="with --gate: which configs")
    p.add_argument("--no-bwd", action="store_true", help="with --gate: forward rows only")
    args = p.parse_args()
    if args.interpret:
        sizes = {"tiny": dict(B=1, T=128, H=1, K=32, V=32)}
        dec = {"tiny-dec": dict(B=2, T=1, H=1, K=32, V=32)}
    else:
        sizes = {s: SIZES[s] for s in args.sizes.split(",")}
        dec = {"S4": SIZES["S4"]}
    rows = []
    for label, d in sizes.items():
        if args.gate:
            rows += profile_gated(label, **d, dtype=jnp.bfloat16, interpret=args.interpret,
                                  variants=args.gate_variants.split(","), bwd=not args.no_bwd)
            continue
        new = profile_chunk(label, **d, dtype=jnp.bfloat16, interpret=args.interpret)
        rows += new
        print(*new, sep="\n", flush=True)
    recurrent = {} if args.no_recurrent or args.gate else {
        **dec, **({} if args.interpret else {"S1": SIZES["S1"]})
    }
    for label, d in recurrent.items():
        rows += profile_recurrent(label, **d, dtype=jnp.bfloat16, interpret=args.interpret)
        print(*rows[-2:], sep="\n", flush=True)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, median ms")
    for label, name, ms in rows:
        print(f"{label:8} {name:42} {ms:9.3f}")


if __name__ == "__main__":
    main()
