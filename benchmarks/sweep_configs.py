"""Tuning experiments in one process: each kernel configuration timed through the public op.

    python benchmarks/sweep_configs.py [--only REGEX] [--interpret]

Fused recurrence: loads issued ahead of the step (`fused_recurrent.PREFETCH`) and the forward
V-block / warps at S1 and S2, forward+backward at S1, and the decode step at S4 by V-block.
Chunked forward: prefetched chunk tiles in the state sweep, bf16 products with the state (and
their error against a float32 reference), fusion and warps. Prints one line per case.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from profile_kernels import median_ms

import iplr_jax
from iplr_jax.bench import SIZES, _inputs

ck = importlib.import_module("iplr_jax.chunk")
fr = importlib.import_module("iplr_jax.fused_recurrent")


def args_for(size, dtype, seed=0):
    x = _inputs(np.random.default_rng(seed), **size, decode=size["T"] == 1)
    dev = [jnp.asarray(x[n], dtype) for n in "qkvab"]
    h0 = None if x["h0"] is None else jnp.asarray(x["h0"], jnp.float32)
    return dev, jnp.asarray(x["do"], dtype), h0


def timed(op, impl, dev, do, h0, mode):
    run = lambda *a: op(*a, initial_state=h0, output_final_state=h0 is not None, implementation=impl)
    if mode == "fwd":
        return median_ms(jax.jit(run), *dev)

    def fwd_bwd(*a):
        (o, ht), vjp = jax.vjp(run, *a)
        return vjp((do, None if ht is None else jnp.zeros_like(ht)))

    return median_ms(jax.jit(fwd_bwd), *dev)


def with_config(fwd_config):
    """Patch the fused recurrence's forward (BV, warps); None restores the default."""
    default = _ORIG_CONFIG

    def cfg(n, Kp, Vp, backward):
        return default(n, Kp, Vp, backward) if backward or fwd_config is None else fwd_config

    fr._config = cfg


_ORIG_CONFIG = fr._config
_ORIG_PLAN = ck._plan


def with_plan(**over):
    ck._plan = lambda *a: _ORIG_PLAN(*a)._replace(**over)


def fused_cases(impl, sizes):
    for label in ("S1", "S2"):
        dev, do, h0 = args_for(sizes[label], jnp.bfloat16)
        configs = [None, (16, 1), (16, 2), (32, 2), (32, 4)] if label == "S1" else [None]
        for depth, cfg in itertools.product((0, 1, 2), configs):
            fr.PREFETCH = depth
            with_config(cfg)
            yield (
                f"{label} fused fwd prefetch={depth} config={cfg or 'auto'}",
                partial(timed, iplr_jax.fused_recurrent, impl, dev, do, h0, "fwd"),
            )
        if label == "S1":
            for depth in (0, 1, 2):
                fr.PREFETCH = depth
                with_config(None)
                yield (
                    f"{label} fused fwd+bwd prefetch={depth}",
                    partial(timed, iplr_jax.fused_recurrent, impl, dev, do, h0, "fwd_bwd"),
                )
    fr.PREFETCH = 1
    dev, do, h0 = args_for(sizes["S4"], jnp.bfloat16)
    for cfg in (None, (16, 2), (32, 2), (64, 4), (64, 8), (128, 4), (128, 8)):
        with_config(cfg)
        yield (
            f"S4 decode config={cfg or 'auto'}",
            partial(timed, iplr_jax.fused_recurrent, impl, dev, do, h0, "fwd"),
        )
    with_config(None)


def chunk_cases(impl, sizes):
    for label in ("S2", "S1", "S3"):
        dev, do, h0 = args_for(sizes[label], jnp.bfloat16)
        for depth, low, fuse, warps in itertools.product((0, 1), (False, True), (False, True), (4, 8)):
            ck.SWEEP_PREFETCH, ck.STATE_DOT_LOW = depth, low
            with_plan(fuse=fuse, warps=warps)
            yield (
                f"{label} chunk fwd prefetch={depth} low={low} fuse={fuse} warps={warps}",
                partial(timed, iplr_jax.chunk, impl, dev, do, h0, "fwd"),
            )
        ck._plan = _ORIG_PLAN
        for depth, low in itertools.product((0, 1), (False, True)):
            ck.SWEEP_PREFETCH, ck.STATE_DOT_LOW = depth, low
            yield (
                f"{label} chunk fwd+bwd prefetch={depth} low={low} plan=auto",
                partial(timed, iplr_jax.chunk, impl, dev, do, h0, "fwd_bwd"),
            )
    ck.SWEEP_PREFETCH, ck.STATE_DOT_LOW = 0, False


def low_precision_error(impl, sizes):
    """Relative error of the bf16 chunk forward with float32 / bf16 state products, against the
    float32 chunked form at HIGHEST precision on the same (bf16-rounded) inputs."""
    for label in ("S2", "S3"):
        dev, _, _ = args_for(sizes[label], jnp.bfloat16)
        with jax.default_matmul_precision("highest"):
            ref, _ = jax.jit(lambda *a: iplr_jax.chunk(*a, implementation="xla"))(
                *(x.astype(jnp.float32) for x in dev)
            )
        for low in (False, True):
            ck.STATE_DOT_LOW = low
            o, _ = jax.jit(lambda *a: iplr_jax.chunk(*a, implementation=impl))(*dev)
            err = jnp.linalg.norm((o.astype(jnp.float32) - ref).ravel()) / jnp.linalg.norm(ref.ravel())
            yield f"{label} chunk fwd low={low}: rel. error {float(err):.2e}"
    ck.STATE_DOT_LOW = False


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="regex on the case name")
    p.add_argument("--interpret", action="store_true", help="tiny sizes through the interpreter")
    args = p.parse_args()
    impl = "interpret" if args.interpret else "pallas"
    sizes = SIZES
    if args.interpret:
        tiny = dict(B=1, T=128, H=1, K=32, V=32)
        sizes = {s: tiny for s in ("S1", "S2", "S3")} | {"S4": dict(tiny, B=2, T=1)}
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, median ms", flush=True)
    for line in low_precision_error(impl, sizes):
        print(line, flush=True)
    for name, run in itertools.chain(fused_cases(impl, sizes), chunk_cases(impl, sizes)):
        if re.search(args.only, name):
            try:
                print(f"{name:62} {run():9.3f}", flush=True)
            except Exception as e:  # a configuration that does not compile: say so, go on
                print(f"{name:62}   failed: {type(e).__name__}: {str(e)[:120]}", flush=True)


if __name__ == "__main__":
    main()
