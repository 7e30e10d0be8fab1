"""Shared memory, registers and spills of every Pallas kernel, without a GPU.

    pip install triton==3.6.0          # the CPU machine needs only the wheel (it ships ptxas)
    python benchmarks/triton_stats.py --size 4,4096,16,128,128 --mode fwd+bwd
    python benchmarks/triton_stats.py --size 1,256,2,200,130 --dtype float32 --op fused

Each op is lowered for CUDA as on the GPU (`implementation="pallas"`, `has_gpu` pretended); the
Triton IR of each kernel is captured as text, compiled for sm_90a by the `triton` wheel with the
kernel's num_warps / num_stages, and its PTX assembled by ptxas -v. Prints one line per kernel
call (a kernel lowered in two variants under one name while tracing reports the last one).

What it is good for: register use and spills of a variant before spending device time on it
(the WY kernel at Kp = 128 spills on 2 warps, and the variants that spilled most were the
slowest on the H100: benchmarks/NOTES.md). What it is not: a shared-memory verdict. XLA compiles
these kernels with its own Triton, whose layouts differ; on 2026-11-26 the K = 200 float32
backward sweep showed 288 KB here and asked for 384 KB on the H100, while the K = 200 float32
output kernel shows 288 KB here and runs there (227 KB per block).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")  # compile times without the cache
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from jax import export
from jax._src.pallas.triton import pallas_call_registration

import iplr_jax
import iplr_jax._common as common

_captured: list[str] = []
_lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module


def _capturing_lower(*args, **kwargs):
    result = _lower(*args, **kwargs)
    _captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result


def kernels(fn, *args) -> list[tuple[str, int, int, str]]:
    """(name, num_warps, num_stages, Triton IR text) of each kernel `fn` lowers, in call order."""
    _captured.clear()
    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = _capturing_lower
    common.has_gpu = lambda: True
    try:
        text = export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args).mlir_module()
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = _lower
    # a kernel may be lowered more than once while tracing: key the IR by its module's name
    ir = {re.match(r"module @(\w+)", m).group(1): m for m in _captured}
    calls = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+)', text)
    return [(name, int(warps), int(stages), ir[name]) for name, stages, warps in calls]


def compile_stats(ir: str, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "kernel.ttir")
        with open(src, "w") as f:
            f.write(ir)
        t0 = time.perf_counter()
        k = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
        )
        secs = time.perf_counter() - t0
        ptx = os.path.join(d, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        log = subprocess.run(
            [ptxas, "-v", "-arch=sm_90a", ptx, "-o", os.devnull], capture_output=True, text=True
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(
        shared_kb=k.metadata.shared / 1024,
        regs=int(regs.group(1)) if regs else -1,
        spill_bytes=int(spill.group(1)) + int(spill.group(2)) if spill else -1,
        compile_s=secs,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="4,4096,16,128,128", metavar="B,T,H,K,V")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--op", default="chunk", choices=["chunk", "fused"])
    p.add_argument("--mode", default="fwd+bwd", choices=["fwd", "fwd+bwd"])
    p.add_argument("--chunk-size", type=int, default=64)
    args = p.parse_args()
    B, T, H, K, V = map(int, args.size.split(","))
    dt = jnp.dtype(args.dtype)
    s = jax.ShapeDtypeStruct
    xs = [s((B, T, H, d), dt) for d in (K, K, V, K, K)]
    h0 = s((B, H, K, V), jnp.float32)
    op = (
        functools.partial(iplr_jax.chunk, chunk_size=args.chunk_size)
        if args.op == "chunk"
        else iplr_jax.fused_recurrent
    )

    def fwd(*a):
        return op(*a[:5], initial_state=a[5], output_final_state=True, implementation="pallas")

    def loss(*a):
        o, ht = fwd(*a)
        return o.astype(jnp.float32).sum() + ht.sum()

    fn = fwd if args.mode == "fwd" else jax.grad(loss, argnums=tuple(range(6)))
    print(f"{args.op} {args.mode} B{B} T{T} H{H} K{K} V{V} {dt.name}, sm_90a (227 KB shared per block)")
    for name, warps, stages, ir in kernels(fn, *xs, h0):
        try:
            r = compile_stats(ir, warps, stages)
            line = (
                f"shared {r['shared_kb']:6.1f} KB  regs {r['regs']:3d}  spills {r['spill_bytes']:6d} B"
                f"  compile {r['compile_s']:5.1f} s"
            )
        except Exception as e:  # report and go on: one kernel failing says something too
            line = f"failed: {type(e).__name__}: {str(e)[:200]}"
        print(f"  {name:24} warps {warps} stages {stages}  {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
