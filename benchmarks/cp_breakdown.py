"""Where context parallelism's time goes, and the longest trainable sequence (issue 15).

    python benchmarks/cp_breakdown.py --out cp_breakdown.json       # on a 2-GPU machine

One sequence B1 H16 K=V=128, bf16, default implementation. Times (median of 10, ms):
  * plain `chunk` on one GPU at T (the baseline a user has without context parallelism);
  * `chunk` with V + K = 256 value columns at T / 2 (the widened run each of 2 devices does);
  * `chunk_cp` on 1 and 2 devices at T, both combines.
Then the longest T (powers of two times 64k) whose forward + backward runs, on 1 GPU (plain
`chunk`) and on 2 GPUs (`chunk_cp`).
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scaling import cp_inputs, median_ms  # benchmarks/ is on sys.path as the script's folder

import iplr_jax
from iplr_jax.context_parallel import chunk_cp

H, K, V = 16, 128, 128


def plain(T, width=V, reps=10):
    q, k, v, a, b = cp_inputs(T, H, K, width, jnp.bfloat16)
    f = lambda *x: iplr_jax.chunk(*x)[0]  # noqa: E731
    fb = jax.jit(jax.grad(lambda *x: jnp.sum(f(*x).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)))
    return median_ms(jax.jit(f), q, k, v, a, b, reps=reps), median_ms(fb, q, k, v, a, b, reps=reps)


def cp(T, n, combine, reps=10, fwd=True):
    mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
    spec = P(None, "sp")
    xs = [jax.device_put(x, NamedSharding(mesh, spec)) for x in cp_inputs(T, H, K, V, jnp.bfloat16)]
    local = functools.partial(lambda *x, c: chunk_cp(*x, axis_name="sp", combine=c)[0], c=combine)
    f = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)
    fb = jax.jit(jax.grad(lambda *x: jnp.sum(f(*x).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)))
    t_f = median_ms(jax.jit(f), *xs, reps=reps) if fwd else None
    return t_f, median_ms(fb, *xs, reps=reps)


def longest(run, start, limit):
    best, T = None, start
    while T <= limit:
        try:
            run(T)
            best = T
            print(f"  T={T}: ok", flush=True)
        except Exception as e:  # out of memory
            print(f"  T={T}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            break
        T *= 2
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=262144)
    p.add_argument("--longest", action="store_true", help="also search the longest trainable T")
    p.add_argument("--limit", type=int, default=1 << 24)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    T, rows = args.T, {}
    rows["plain_1gpu"] = plain(T)
    print("plain chunk, 1 GPU, T", T, rows["plain_1gpu"], flush=True)
    rows["plain_half"] = plain(T // 2)
    print("plain chunk, 1 GPU, T/2", rows["plain_half"], flush=True)
    rows["widened_half"] = plain(T // 2, width=V + K)
    print("chunk with V+K columns, T/2", rows["widened_half"], flush=True)
    for n in (1, 2):
        for combine in ("rerun", "linear"):
            rows[f"cp_n{n}_{combine}"] = cp(T, n, combine)
            print(f"chunk_cp n={n} {combine}", rows[f"cp_n{n}_{combine}"], flush=True)
    if args.longest:
        print("longest T, plain chunk fwd+bwd, 1 GPU", flush=True)
        rows["longest_1gpu"] = longest(lambda t: plain(t, reps=1), 1 << 20, args.limit)
        print("longest T, chunk_cp fwd+bwd, 2 GPUs", flush=True)
        rows["longest_2gpu"] = longest(lambda t: cp(t, 2, "rerun", reps=1, fwd=False), 1 << 20, args.limit)
        print("longest", rows["longest_1gpu"], rows["longest_2gpu"], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), T=T, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
