"""Segmented sweeps (issue 15 item 3): forward and forward+backward of `chunk` for several
`segment_chunks` and sweep V-blocks, one process, bf16, back-to-back medians (ms).

    python benchmarks/segments_sweep.py --sizes S3,T256k

Each row also checks the output against the unsegmented run (relative error, bf16 rounding
expected) so that a fast wrong configuration cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from scaling import cp_inputs
from timing import median_ms

import iplr_jax
from iplr_jax.triton.config import ChunkConfig, chunk_config

SIZES = {  # B, T, H, K=V
    "S1": (8, 2048, 16, 64), "S2": (4, 4096, 16, 128), "S3": (1, 32768, 8, 128),
    "T64k": (1, 65536, 16, 128), "T256k": (1, 262144, 16, 128),
}


def inputs(B, T, H, D):
    xs = [cp_inputs(T, H, D, D, jnp.bfloat16, seed=i) for i in range(B)]
    return [jnp.concatenate(col, axis=0) for col in zip(*xs, strict=True)]


def timed(x, config, reps):
    f = jax.jit(lambda *x: iplr_jax.chunk(*x, config=config)[0])
    loss = lambda *x: jnp.sum(iplr_jax.chunk(*x, config=config)[0].astype(jnp.float32))  # noqa: E731
    fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return f, median_ms(f, *x, reps=reps), median_ms(fb, *x, reps=reps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="S3,T256k")
    p.add_argument("--segs", default="0,rule,16,32,64,128")
    p.add_argument("--bvs", default="rule,16,32,64")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for name in args.sizes.split(","):
        B, T, H, D = SIZES[name]
        x = inputs(B, T, H, D)
        rule = chunk_config(None, N=B, H=H, Kp=D, Vp=D, num_chunks=B * T // 64, dtype=jnp.bfloat16,
                            interpret=False)
        print(f"{name} B{B} T{T} H{H} K=V={D}: rule segment_chunks={rule.segment_chunks} "
              f"state_block_v={rule.state_block_v} bwd_sweep_block_v={rule.bwd_sweep_block_v}", flush=True)
        base = None
        for seg in args.segs.split(","):
            for bv in args.bvs.split(","):
                if seg == "0" and bv != "rule":
                    continue
                fields = {}
                if seg != "rule":
                    fields["segment_chunks"] = int(seg)
                if bv != "rule":
                    fields.update(state_block_v=int(bv), bwd_sweep_block_v=int(bv))
                cfg = ChunkConfig(**fields)
                try:
                    f, t_f, t_fb = timed(x, cfg, args.reps)
                    o = np.asarray(f(*x), np.float32)
                except Exception as e:  # noqa: BLE001  (a config the compiler rejects)
                    print(f"  seg={seg} bv={bv}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                if base is None:
                    base = o
                err = float(np.linalg.norm(o - base) / np.linalg.norm(base))
                rows.append(dict(size=name, seg=seg, bv=bv, fwd_ms=t_f, fwd_bwd_ms=t_fb,
                                 rel_err_vs_whole=err))
                print(f"  seg={seg:>4} bv={bv:>4}: fwd {t_f:7.3f} ms  fwd+bwd {t_fb:7.3f} ms  "
                      f"err vs whole {err:.1e}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
