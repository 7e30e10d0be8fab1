"""What the non-finite guard costs (issue 13; docs/numerics.md "Non-finite inputs").

    python benchmarks/guard_cost.py --sizes S1,S2,L --forms bare,cond,unaligned [--devices 2]

Times the public `iplr_jax.chunk` (bf16, default implementation, medians of 20) in one process
with the guard in each form:
  * bare: no guard (`guarded_unless_finite` replaced by the plain run);
  * cond: the guard as it is (`inputs._branch`: the plain run, or the guarded one, under one
    `lax.cond`, forward and backward);
  * select: the plain run and its VJP outside any branch, only the guarded run under the cond,
    then a select (session 13: faster on 2 GPUs with T sharded, where it escaped the all-gather
    that the tie now removes, and slower on one GPU at T = 256k;
    benchmarks/NOTES.md);
  * unaligned: cond without `sharding.sharded_like` (the cond's results left to the partitioner).
(Session 14 also timed the plain VJP passed through the cond's fast branch, with and without an
`optimization_barrier`: the same as cond; benchmarks/NOTES.md.)
With --devices n the inputs are sharded over T (context parallelism under jit) or, with
--shard b, over the batch, on n devices; the all-gathers of each compiled fwd+bwd are printed.
L is one sequence B1 T = 256k H16 K=V=128; XS a CPU smoke size.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from timing import device_profile, grads, median_ms  # benchmarks/ is on sys.path as the script's folder

import iplr_jax
import iplr_jax.inputs as inputs_module
import iplr_jax.ops.chunk as chunk_module
import iplr_jax.sharding as sharding_module

SIZES = {"S1": (8, 2048, 16, 64, 64), "S2": (4, 4096, 16, 128, 128), "S3": (1, 32768, 8, 128, 128),
         "L": (1, 262144, 16, 128, 128), "XS": (2, 512, 2, 32, 32)}


def _output(*x, implementation):
    return iplr_jax.chunk(*x, implementation=implementation)[0]


def _bare(run, x, cu_seqlens, dims, *extra, **_):
    return run(x, cu_seqlens, *extra)


def _select(ok, fast, slow):
    first = fast()
    other = jax.lax.cond(ok, lambda: jax.tree.map(jnp.zeros_like, first), slow)
    return jax.tree.map(lambda f, s: jnp.where(ok, f, s), first, other)


@contextlib.contextmanager
def guard_form(form):
    """The guard in `form` while the functions trace (each form is jitted afresh inside)."""
    module, name, value = {
        "bare": (chunk_module, "guarded_unless_finite", _bare),
        "select": (inputs_module, "_branch", _select),
        "unaligned": (sharding_module, "sharded_like", lambda new, old: new),
        "cond": (inputs_module, "_branch", inputs_module._branch),
    }[form]
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="S1,S2")
    p.add_argument("--forms", default="bare,cond")
    p.add_argument("--devices", type=int, default=1, help="shard over this many devices")
    p.add_argument("--shard", default="t", choices=("t", "b"), help="shard T or the batch")
    p.add_argument("--memory", action="store_true", help="print XLA's temp bytes of fwd+bwd")
    p.add_argument("--profile", action="store_true", help="print what fwd+bwd runs on GPU 0")
    p.add_argument("--hlo", help="write each form's compiled fwd+bwd HLO into this folder")
    p.add_argument("--implementation", default=None, help="chunk's implementation (default: its own)")
    args = p.parse_args()
    for name in args.sizes.split(","):
        B, T, H, K, V = SIZES[name]
        rng = np.random.default_rng(0)
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        a = unit(rng.standard_normal((B, T, H, K)))
        xs = [rng.standard_normal((B, T, H, K)), unit(rng.standard_normal((B, T, H, K))),
              rng.standard_normal((B, T, H, V)), a, -0.5 * a]
        xs = [jnp.asarray(x, jnp.bfloat16) for x in xs]
        if args.devices > 1:
            mesh = Mesh(np.array(jax.devices()[: args.devices]), ("sp",))
            spec = P(None, "sp") if args.shard == "t" else P("sp")
            xs = [jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]
        for form in args.forms.split(","):
            with guard_form(form):
                run = functools.partial(_output, implementation=args.implementation)
                fwd, fb = jax.jit(run), jax.jit(grads(run))
                t_f, t_fb = median_ms(fwd, *xs), median_ms(fb, *xs)
                compiled = fb.lower(*xs).compile()  # a second compile, for its text and memory
                memory = ""
                if args.memory:
                    temp = compiled.memory_analysis().temp_size_in_bytes
                    memory = f"  (fwd+bwd temp {temp / 2**20:.1f} MiB per device)"
                print(f"{name} devices={args.devices} {form:7} fwd {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms"
                      + memory, flush=True)
                if args.profile:
                    print(device_profile(fb, *xs), flush=True)
                text = compiled.as_text()
                gathered = sorted({re.findall(r"\w+\[[\d,]*\]", line.split(" all-gather")[0])[-1]
                                   for line in text.splitlines()
                                   if re.search(r" all-gather(-start)?\(", line)})
                print(f"  all-gathers in fwd+bwd: {gathered}", flush=True)
                if args.hlo:
                    with open(f"{args.hlo}/{name}_{args.devices}_{form}.txt", "w") as out:
                        out.write(text)


if __name__ == "__main__":
    main()
