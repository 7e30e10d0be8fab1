"""Dump every Pallas kernel the public ops launch (body jaxpr, grid mapping, compiler params,
operand types) at a fixed set of shapes, one file per path, to check that a refactor leaves
the kernels unchanged:

    python benchmarks/kernel_jaxprs.py /tmp/before   # on the old commit
    python benchmarks/kernel_jaxprs.py /tmp/after    # on the new one
    diff -r /tmp/before /tmp/after                   # no output: identical kernels

Runs on a CPU (the "pallas" implementation is traced, not compiled: a GPU is pretended).
"""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
from jax._src import core as jcore

import iplr_jax
import iplr_jax.inputs as inputs_module

CASES = [  # B, T, H, K, V, dtype, packed, chunk_size
    (2, 100, 2, 64, 64, jnp.bfloat16, False, 64),
    (8, 2048, 16, 64, 64, jnp.bfloat16, False, 64),  # S1
    (4, 4096, 16, 128, 128, jnp.bfloat16, False, 64),  # S2
    (1, 32768, 8, 128, 128, jnp.bfloat16, False, 64),  # S3
    (1, 300, 2, 100, 60, jnp.float32, True, 32),
    (2, 77, 3, 16, 200, jnp.float16, False, 16),
    (1, 70, 1, 200, 130, jnp.float32, False, 64),
    (2, 90, 2, 128, 128, jnp.float32, False, 64),
    (2, 90, 2, 256, 64, jnp.bfloat16, False, 64),
]


def kernels(closed) -> list[str]:
    found = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "pallas_call":
                p = e.params
                found.append("\n".join([
                    str(p["jaxpr"]), str(p["grid_mapping"]), str(p["compiler_params"]),
                    str([str(v.aval) for v in e.invars]), str([str(v.aval) for v in e.outvars]),
                ]))
            for v in e.params.values():
                for sub in v if isinstance(v, (list, tuple)) else [v]:
                    if isinstance(sub, jcore.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jcore.Jaxpr):
                        walk(sub)

    walk(closed.jaxpr)
    return found


def main(out: str) -> None:
    inputs_module.has_gpu = lambda: True  # trace the "pallas" path without a GPU
    os.makedirs(out, exist_ok=True)
    s = jax.ShapeDtypeStruct
    for B, T, H, K, V, dt, packed, C in CASES:
        N = 3 if packed else B
        args = [s((B, T, H, K), dt)] * 2 + [s((B, T, H, V), dt)] + [s((B, T, H, K), dt)] * 2
        args += [s((N, H, K, V), jnp.float32)] + ([s((N + 1,), jnp.int32)] if packed else [])
        for name in ("chunk", "fused_recurrent"):
            if name == "fused_recurrent" and T > 4096:
                continue
            op = getattr(iplr_jax, name)
            kw = dict(implementation="pallas") | (dict(chunk_size=C) if name == "chunk" else {})

            def fwd(q, k, v, a, b, h0, *cu, op=op, kw=kw):
                extra = dict(cu_seqlens=cu[0]) if cu else {}
                return op(q, k, v, a, b, initial_state=h0, output_final_state=True, **kw, **extra)

            def grad(*xs, fwd=fwd):
                def loss(*d):
                    o, ht = fwd(*d, *xs[6:])
                    return o.astype(jnp.float32).sum() + ht.sum()

                return jax.grad(loss, argnums=tuple(range(6)))(*xs[:6])

            for mode, fn in (("fwd", fwd), ("grad", grad)):
                layout = "packed" if packed else "dense"
                tag = f"{name}-{mode}-B{B}T{T}H{H}K{K}V{V}-{jnp.dtype(dt).name}-{layout}-C{C}"
                text = "\n=====\n".join(kernels(jax.make_jaxpr(fn)(*args)))
                with open(os.path.join(out, tag + ".txt"), "w") as f:
                    f.write(re.sub(r"0x[0-9a-f]+", "0x", text))
                print(tag, text.count("====") + 1, "kernels")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kernel_jaxprs")
