"""`chunk(..., precision=...)` with float32 inputs: error against the float64 recurrence and time
(issue 16, item 4).

    python benchmarks/precision_check.py            # B2 T1024 H4 K=V=128, as in the issue

Relative error (Frobenius) of the output and of the gradients of q, k, v, a, b for
precision None (JAX's default: tf32 on a GPU) and "highest", and forward / forward+backward
medians in ms.
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_enable_x64", True)  # the float64 reference; the ops get float32 inputs

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import median_ms  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)

import iplr_jax  # noqa: E402


def inputs(B, T, H, K, V, seed=0):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, v = rng.standard_normal((B, T, H, K)), rng.standard_normal((B, T, H, V))
    k, a = unit(rng.standard_normal((B, T, H, K))), unit(rng.standard_normal((B, T, H, K)))
    b = -rng.uniform(0.05, 1.95, (B, T, H, 1)) * a
    return [np.asarray(x, np.float32) for x in (q, k, v, a, b)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="2,1024,4,128,128", help="B,T,H,K,V")
    p.add_argument("--implementation", default=None)
    args = p.parse_args()
    B, T, H, K, V = (int(s) for s in args.size.split(","))
    xs = inputs(B, T, H, K, V)
    ct = np.random.default_rng(1).standard_normal((B, T, H, V)).astype(np.float32)

    def loss(op, *x):
        return jnp.sum(op(*x)[0].astype(x[0].dtype) * ct.astype(x[0].dtype))

    ref = lambda *x: iplr_jax.naive(*x)  # noqa: E731
    x64 = [jnp.asarray(x, jnp.float64) for x in xs]
    want_o = np.asarray(ref(*x64)[0])
    want_g = [np.asarray(g) for g in jax.grad(lambda *x: loss(ref, *x), argnums=range(5))(*x64)]
    rel = lambda g, w: float(np.linalg.norm(np.asarray(g, np.float64) - w) / np.linalg.norm(w))  # noqa: E731
    x32 = [jnp.asarray(x) for x in xs]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, float32 inputs B{B} T{T} H{H} K{K} V{V}")
    # the third row: the WY kernel's float32 block products as three tf32 passes too (the rule
    # keeps HIGHEST there for float32 inputs: a 15% error was once measured with tf32x3)
    rows = [(None, None), ("highest", None), ("highest", iplr_jax.ChunkConfig(wy_precision="tf32x3"))]
    for precision, config in rows:
        op = lambda *x, p=precision, c=config: iplr_jax.chunk(  # noqa: E731
            *x, precision=p, implementation=args.implementation, config=c
        )
        fwd = jax.jit(lambda *x, op=op: op(*x)[0])
        step = jax.jit(jax.grad(lambda *x, op=op: loss(op, *x), argnums=range(5)))
        err_o = rel(fwd(*x32), want_o)
        err_g = [rel(g, w) for g, w in zip(step(*x32), want_g, strict=True)]
        t_f, t_fb = median_ms(fwd, *x32), median_ms(step, *x32)
        grads = " ".join(f"d{n} {e:.1e}" for n, e in zip("qkvab", err_g, strict=True))
        times = f"fwd {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms"
        tag = "" if config is None else " wy tf32x3"
        print(f"precision={precision!s:8}{tag} output {err_o:.1e}  {grads}  {times}", flush=True)


if __name__ == "__main__":
    main()
