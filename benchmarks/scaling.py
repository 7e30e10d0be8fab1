"""Scaling over several devices: context parallelism (one sequence split over devices) and data
parallelism (the layer's training step with the batch split), in one command.

    python benchmarks/scaling.py --devices 1,2                # on the GPU machine
    python benchmarks/scaling.py --tiny --devices 1,2,4,8     # CPU smoke run (simulated devices)
    python benchmarks/scaling.py ... --out benchmarks/results/<file>.json

Context parallel (`iplr_jax.chunk(..., sequence_axis=...)` inside `shard_map`): one sequence
B1 H16 K=V=128, bf16, forward and forward+backward,
  * weak scaling: a fixed number of tokens per device (--cp-tokens, default 64k), so T grows
    with the devices; efficiency = time on 1 device / time on n;
  * strong scaling: a fixed T (--cp-total, default 256k) split over 1, 2, ... devices;
  * both exchanges ("allgather": one all-gather and a local fold; "scan": log2 n ppermute
    rounds), and the bytes each device sends per step, read from the compiled program's
    collectives (independent of T).
Data parallel (`--dp`): the layer's training step (d_model 2048, 16 heads, B4 T4096 per
device) with the batch sharded: tokens/s and efficiency against 1 device.

Medians of 10 timed calls (context parallel; 20 for the layer step) after a warm-up,
`jax.block_until_ready`, all in one process.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from timing import median_ms as _median_ms

from iplr_jax.context_parallel import chunk_cp


def median_ms(fn, *args, reps=20):
    """Per-call sync (these calls take tens of ms)."""
    return _median_ms(fn, *args, reps=reps, back_to_back=1)


def cp_inputs(T, H, K, V, dtype, seed=0):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = rng.standard_normal((1, T, H, K), np.float32)
    k = unit(rng.standard_normal((1, T, H, K), np.float32))
    a = unit(rng.standard_normal((1, T, H, K), np.float32))
    b = -rng.uniform(0.05, 1.95, (1, T, H, 1)).astype(np.float32) * a
    v = rng.standard_normal((1, T, H, V), np.float32)
    return [jnp.asarray(x, dtype) for x in (q, k, v, a, b)]


_COLL = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|collective-permute|reduce-scatter|all-to-all)(?:-start)?\("
)
_SHAPE = re.compile(r"(f32|bf16|f16|s32|f64|u32|pred)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "f64": 8, "u32": 4, "pred": 1}


def collective_bytes(hlo: str) -> dict:
    """Bytes of the results of each kind of collective in a compiled module (per device)."""
    out = {}
    for m in _COLL.finditer(hlo):
        shapes, kind = m.group(1), m.group(2)
        n = 0
        for dt, dims in _SHAPE.findall(shapes):
            n += _BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        out[kind] = out.get(kind, 0) + n
    return out


def cp_case(n, T, H, K, V, dtype, exchange, implementation, devices, combine=None):
    """(fwd ms, fwd+bwd ms, exchanged bytes per device) of one sequence of T over n devices."""
    mesh = Mesh(np.array(devices[:n]), ("sp",))
    tok = NamedSharding(mesh, P(None, "sp"))
    xs = [jax.device_put(x, tok) for x in cp_inputs(T, H, K, V, dtype)]

    def local(q, k, v, a, b):
        return chunk_cp(q, k, v, a, b, axis_name="sp", implementation=implementation,
                        exchange=exchange, combine=combine)[0]

    spec = P(None, "sp")
    f = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)
    fwd = jax.jit(f)

    def loss(*x):
        return jnp.sum(f(*x).astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    hlo = step.lower(*xs).compile().as_text()
    return median_ms(fwd, *xs, reps=10), median_ms(step, *xs, reps=10), collective_bytes(hlo)


def run_cp(args, devices):
    rows = []
    H, K, V = args.heads, args.head_dim, args.head_dim
    dtype = jnp.bfloat16
    ns = [n for n in args.devices if n <= len(devices)]
    cases = [("weak", n, args.cp_tokens * n) for n in ns if "weak" in args.kinds]
    cases += [("strong", n, args.cp_total) for n in ns if "strong" in args.kinds]
    for kind, n, T in cases:
        for exchange in ("allgather", "scan") if n > 1 else ("allgather",):
            try:
                fwd, fb, coll = cp_case(n, T, H, K, V, dtype, exchange, args.implementation, devices,
                                        combine=args.combine)
            except Exception as e:  # out of memory at the largest T: say so, go on
                print(f"cp {kind} n={n} T={T} {exchange}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            row = dict(kind=kind, devices=n, T=T, exchange=exchange, fwd_ms=fwd, fwd_bwd_ms=fb,
                       exchanged_bytes=coll)
            rows.append(row)
            print(f"cp {kind:6} n={n} T={T:7d} {exchange:9} fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms  "
                  f"collectives {coll}", flush=True)
    for kind in ("weak", "strong"):
        base = {r["exchange"]: r for r in rows if r["kind"] == kind and r["devices"] == 1}
        b1 = base.get("allgather")
        if b1 is None:
            continue
        for r in rows:
            if r["kind"] != kind:
                continue
            if kind == "weak":  # same work per device: ideal time is constant
                r["efficiency_fwd_bwd"] = b1["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            else:  # same total work: ideal time is 1/n
                r["efficiency_fwd_bwd"] = b1["fwd_bwd_ms"] / (r["fwd_bwd_ms"] * r["devices"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,2", help="device counts, e.g. 1,2,4,8")
    p.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke run")
    p.add_argument("--cp-tokens", type=int, default=65536, help="tokens per device (weak scaling)")
    p.add_argument("--cp-total", type=int, default=262144, help="total tokens (strong scaling)")
    p.add_argument("--kinds", default="weak,strong", help="context-parallel runs: weak, strong or both")
    p.add_argument("--combine", default=None, choices=["linear", "rerun"], help="chunk_cp's combine")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--implementation", default=None)
    p.add_argument("--dp", action="store_true", help="also the data-parallel layer step")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.devices = [int(n) for n in args.devices.split(",")]
    devices = jax.devices()
    if args.tiny:
        args.cp_tokens, args.cp_total, args.heads, args.head_dim = 128, 512, 2, 16
        args.implementation = args.implementation or "xla"
        devices = jax.devices("cpu")
    print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}", flush=True)
    result = dict(device=devices[0].device_kind, jax=jax.__version__, cp=run_cp(args, devices))
    if args.dp:
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        from multi_device import bench_layer  # the data-parallel layer step, 1 against n devices

        opts = argparse.Namespace(tiny=args.tiny, runs=20, warmup=3, implementation=args.implementation)
        result["dp"] = []
        for n in (n for n in args.devices if 1 < n <= len(devices)):
            row = bench_layer(n, opts)
            row["efficiency"] = row["ratio"] / n
            result["dp"].append(row)
            print(f"dp n={n}: {row['tokens_per_s_1']:.0f} -> {row[f'tokens_per_s_{n}']:.0f} tokens/s, "
                  f"efficiency {row['efficiency']:.2f}, collectives {row[f'collectives_{n}']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
