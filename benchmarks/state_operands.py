"""16-bit against float32 operands in the state sweep (`ChunkConfig.low_precision_state`):
time and error of `chunk` with bf16 inputs, both settings in one process.

    python benchmarks/state_operands.py [--sizes S1,S2,S3]

Per size and setting: forward and forward+backward medians (ms) and the relative error
(Frobenius) of the output and of dq, dv against the same bf16 values upcast to float32 through
the "xla" path at precision "highest".
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_ms  # benchmarks/ is on sys.path as the script's folder

import iplr_jax
from iplr_jax.bench import SIZES


def inputs(B, T, H, K, V, seed=0):
    r = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, v, do = (r.standard_normal((B, T, H, d)) for d in (K, V, V))
    k, a = unit(r.standard_normal((B, T, H, K))), unit(r.standard_normal((B, T, H, K)))
    b = -r.uniform(0.05, 1.95, (B, T, H, 1)) * a
    return [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, a, b, do)]


def rel(x, y):
    x = x.astype(jnp.float32)
    return float(jnp.linalg.norm((x - y).ravel()) / jnp.linalg.norm(y.ravel()))


def run_size(name):
    *x, do = inputs(**SIZES[name])

    def grads(op, *x):
        loss = lambda *x: jnp.sum(op(*x)[0].astype(jnp.float32) * do.astype(jnp.float32))  # noqa: E731
        return jax.grad(loss, argnums=(0, 2))(*x)

    def ref(*x):
        return iplr_jax.chunk(*x, implementation="xla", precision="highest")

    x32 = [y.astype(jnp.float32) for y in x]
    want_o = jax.jit(lambda *x: ref(*x)[0])(*x32)
    want_dq, want_dv = jax.jit(lambda *x: grads(ref, *x))(*x32)
    for low in (False, True):
        cfg = iplr_jax.ChunkConfig(low_precision_state=low)
        op = lambda *x, cfg=cfg: iplr_jax.chunk(*x, config=cfg)  # noqa: E731
        fwd = jax.jit(lambda *x, op=op: op(*x)[0])
        step = jax.jit(lambda *x, op=op: grads(op, *x))
        dq, dv = step(*x)
        print(
            f"{name} low_precision_state={low!s:5}  fwd {median_ms(fwd, *x):7.3f} ms  "
            f"fwd+bwd {median_ms(step, *x):7.3f} ms  err o {rel(fwd(*x), want_o):.2e}  "
            f"dq {rel(dq, want_dq):.2e}  dv {rel(dv, want_dv):.2e}",
            flush=True,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="S1,S2,S3")
    args = p.parse_args()
    print(jax.devices()[0].device_kind, f"jax {jax.__version__}, bf16 inputs")
    for name in args.sizes.split(","):
        run_size(name)


if __name__ == "__main__":
    main()
