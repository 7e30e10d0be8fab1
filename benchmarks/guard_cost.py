"""What the non-finite guard costs (issue 13; docs/numerics.md "Non-finite inputs").

    python benchmarks/guard_cost.py --sizes S1,S2

Times, in one process, the public `iplr_jax.chunk` (inputs sanitized, outputs poisoned by
selects) against the same kernels called without the guard (`ops.chunk._chunk_pallas`), forward
and forward + backward, bf16, medians of 20.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_ms  # benchmarks/ is on sys.path as the script's folder

import iplr_jax
from iplr_jax.inputs import Inputs
from iplr_jax.ops.chunk import _chunk_pallas

SIZES = {"S1": (8, 2048, 16, 64, 64), "S2": (4, 4096, 16, 128, 128), "S3": (1, 32768, 8, 128, 128)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="S1,S2")
    args = p.parse_args()
    for name in args.sizes.split(","):
        B, T, H, K, V = SIZES[name]
        rng = np.random.default_rng(0)
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        a = unit(rng.standard_normal((B, T, H, K)))
        xs = [rng.standard_normal((B, T, H, K)), unit(rng.standard_normal((B, T, H, K))),
              rng.standard_normal((B, T, H, V)), a, -0.5 * a]
        xs = [jnp.asarray(x, jnp.bfloat16) for x in xs]
        h0 = jnp.zeros((B, H, K, V), jnp.float32)

        def guarded(*x):
            return iplr_jax.chunk(*x)[0]

        def bare(*x, h0=h0, scale=K**-0.5):
            return _chunk_pallas(Inputs(*x), scale=scale, h0=h0, cu_seqlens=None, chunk_size=64,
                                 config=None, interpret=False)[0].astype(x[2].dtype)

        for label, f in (("guarded", guarded), ("bare", bare)):
            fwd = jax.jit(f)
            fb = jax.jit(jax.grad(lambda *x, f=f: jnp.sum(f(*x).astype(jnp.float32)), argnums=range(5)))
            print(f"{name} {label:8} fwd {median_ms(fwd, *xs):.3f} ms  fwd+bwd {median_ms(fb, *xs):.3f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
