"""Where context parallelism's time goes, and the longest trainable sequence (issue 15).

    python benchmarks/cp_breakdown.py --out cp_breakdown.json       # on a 2-GPU machine

One sequence B1 H16 K=V=128, bf16, default implementation. Times (median of 10 samples of
--back-to-back calls, 1 by default, ms):
  * plain `chunk` on one GPU at T (the baseline a user has without context parallelism) and at
    T / n for each n of --devices (one slice's own work);
  * `chunk` under jit with T sharded over n devices (the kernels' path), for each
    `ChunkConfig.segment_chunks` of --segments ("rule", or 0: one summary sweep per slice);
  * `chunk` with V + K = 256 value columns at T / 2 (the widened run of the composed form);
  * `chunk_cp` on 1 and 2 devices at T: the default call (the kernels' path) and both combines
    of the composed form.
--jit keeps the first two items; --unguarded adds them without the non-finite guard. --check T
first compares n devices with one; --profile prints each kernel's time instead. With --longest,
the longest T (to 64k tokens per device) whose forward + backward fits one device's memory by
XLA's memory analysis of the compiled step, on 1 GPU (plain `chunk` under jit) and on 2 GPUs
(`chunk_cp`, or with --jit `chunk` on T-sharded inputs).
"""

from __future__ import annotations

import argparse
import functools
import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from guard_cost import guard_form  # benchmarks/ is on sys.path as the script's folder
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scaling import cp_inputs
from timing import device_profile, grads
from timing import median_ms as _median_ms

import iplr_jax
from iplr_jax.context_parallel import chunk_cp

H, K, V = 16, 128, 128
JIT_PATH = False  # --jit: the 2-GPU memory rows from `chunk` under jit (T sharded), not chunk_cp
BACK_TO_BACK = 1  # --back-to-back: calls per timed sample (1: each call synced, its dispatch timed)


def median_ms(fn, *args, reps=10):
    return _median_ms(fn, *args, reps=reps, back_to_back=BACK_TO_BACK)


def plain(T, width=V, reps=10):
    q, k, v, a, b = cp_inputs(T, H, K, width, jnp.bfloat16)
    f = lambda *x: iplr_jax.chunk(*x)[0]  # noqa: E731
    fb = jax.jit(grads(f))
    return median_ms(jax.jit(f), q, k, v, a, b, reps=reps), median_ms(fb, q, k, v, a, b, reps=reps)


def cp(T, n, combine, reps=10, fwd=True):
    mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
    spec = P(None, "sp")
    xs = [jax.device_put(x, NamedSharding(mesh, spec)) for x in cp_inputs(T, H, K, V, jnp.bfloat16)]
    local = functools.partial(lambda *x, c: chunk_cp(*x, axis_name="sp", combine=c)[0], c=combine)
    f = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)
    fb = jax.jit(grads(f))
    t_f = median_ms(jax.jit(f), *xs, reps=reps) if fwd else None
    return t_f, median_ms(fb, *xs, reps=reps)


def cp_jit(T, n, reps=10, segments=None, **fields):
    """`chunk` under plain jit with q, k, v, a, b sharded over T on n devices (the kernels'
    path, ops/chunk.py; `segments`: `ChunkConfig.segment_chunks`; `fields`: other ChunkConfig
    fields), forward and forward+backward."""
    mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
    xs = [jax.device_put(x, NamedSharding(mesh, P(None, "sp"))) for x in cp_inputs(T, H, K, V, jnp.bfloat16)]
    config = iplr_jax.ChunkConfig(segment_chunks=segments, **fields)
    f = lambda *x: iplr_jax.chunk(*x, config=config)[0]  # noqa: E731
    fb = jax.jit(grads(f))
    return median_ms(jax.jit(f), *xs, reps=reps), median_ms(fb, *xs, reps=reps)


def profile(T, n):
    """Each kernel's device time per call (GPU 0): plain `chunk` on one GPU at T / n, and `chunk`
    under jit with T sharded over n devices; forward, then forward+backward. Then the times of
    the latter with the segments' folds as a loop (the default) and as a log-depth scan."""
    f = lambda *x: iplr_jax.chunk(*x)[0]  # noqa: E731
    one = cp_inputs(T // n, H, K, V, jnp.bfloat16)
    mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
    xs = [jax.device_put(x, NamedSharding(mesh, P(None, "sp"))) for x in cp_inputs(T, H, K, V, jnp.bfloat16)]
    for label, args in ((f"one GPU, T/{n}", one), (f"{n} devices, T", xs)):
        for step, fn in (("forward", jax.jit(f)), ("forward+backward", jax.jit(grads(f)))):
            print(f"--- {label}, {step}", flush=True)
            print(device_profile(fn, *args, top=30, gaps=15), flush=True)
    print(f"chunk under jit, T sharded over {n} devices, the segments' folds as a loop", cp_jit(T, n),
          flush=True)
    with mock.patch("iplr_jax.segments.SEQUENTIAL_PREFIX", 0):
        print(f"chunk under jit, T sharded over {n} devices, the folds as a log-depth scan", cp_jit(T, n),
              flush=True)


def check(T, n, segments=None):
    """Relative errors of the T-sharded jit path on n devices against one device: the output
    and the gradients of q, k, v, a, b (bf16 inputs, float32 loss)."""
    xs = cp_inputs(T, H, K, V, jnp.bfloat16)
    config = iplr_jax.ChunkConfig(segment_chunks=segments)
    run = lambda *x: iplr_jax.chunk(*x, config=config)[0]  # noqa: E731
    both = jax.jit(lambda *x: (run(*x), grads(run)(*x)))
    ref = both(*xs)
    mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
    got = both(*[jax.device_put(x, NamedSharding(mesh, P(None, "sp"))) for x in xs])
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    err = lambda a, b: float(jnp.linalg.norm(f32(a) - f32(b)) / jnp.linalg.norm(f32(b)))  # noqa: E731
    return {name: err(g, r) for name, g, r in zip(("o", "dq", "dk", "dv", "da", "db"),
                                                   [got[0], *got[1]], [ref[0], *ref[1]], strict=True)}


def peak_bytes(T, n):
    """Bytes one device needs for forward + backward at T (compiled, not run): arguments,
    outputs and temporaries from XLA's memory analysis (Pallas buffers are XLA buffers)."""
    xs = cp_inputs(1024, H, K, V, jnp.bfloat16)  # shapes only
    shapes = [jax.ShapeDtypeStruct((1, T, H, x.shape[-1]), x.dtype) for x in xs]
    if n == 1 or JIT_PATH:
        grad = grads(lambda *x: iplr_jax.chunk(*x)[0])
        # one device: plain jit (a 1-device in_shardings analysed ~1.7x higher in session 8)
        shard = NamedSharding(Mesh(np.array(jax.devices()[:n]), ("sp",)), P(None, "sp"))
        step = jax.jit(grad) if n == 1 else jax.jit(grad, in_shardings=(shard,) * 5)
    else:
        mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
        spec = P(None, "sp")
        f = jax.shard_map(lambda *x: chunk_cp(*x, axis_name="sp")[0], mesh=mesh,
                          in_specs=(spec,) * 5, out_specs=spec)
        step = jax.jit(grads(f),
                       in_shardings=(NamedSharding(mesh, spec),) * 5)
    m = step.lower(*shapes).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def longest(n, limit, step=1 << 16):
    """The longest T (a multiple of n * `step` tokens) whose forward + backward fits one
    device's memory (95%), from compiled memory analyses: a line through the bytes at two
    lengths predicts it, then compiles at the prediction and one step either side settle it."""
    cap = 0.95 * jax.devices()[0].memory_stats()["bytes_limit"]
    unit = n * step
    seen = {}

    def fits(T):
        if T not in seen:
            seen[T] = peak_bytes(T, n)
            print(f"  n={n} T={T}: {seen[T] / 2**30:.2f} GiB per device (cap {cap / 2**30:.1f})", flush=True)
        return seen[T] <= cap

    t1, t2 = 4 * unit, 8 * unit
    fits(t1), fits(t2)
    per_token = max(seen[t2] - seen[t1], 1) / (t2 - t1)  # bytes per token (> 0)
    T = min(limit, max(unit, int((cap - seen[t1]) / per_token + t1) // unit * unit))
    while T > unit and not fits(T):
        T -= unit
    while T + unit <= limit and fits(T + unit):
        T += unit
    return T if fits(T) else None


def run_cases(T, rows, jit_only=False, devices=(2,), segment_rows=(None,), unguarded=False):
    rows["plain_1gpu"] = plain(T)
    print("plain chunk, 1 GPU, T", T, rows["plain_1gpu"], flush=True)
    for n in devices:
        rows[f"plain_1/{n}"] = plain(T // n)
        print(f"plain chunk, 1 GPU, T/{n}", rows[f"plain_1/{n}"], flush=True)
    for n in devices:
        for seg in segment_rows:
            key = f"jit_n{n}_seg{'rule' if seg is None else seg}"
            rows[key] = cp_jit(T, n, segments=seg)
            print(f"chunk under jit, T sharded over {n} devices, segment_chunks {seg}", rows[key], flush=True)
    if unguarded:  # what the non-finite guard (docs/numerics.md) costs each row
        with guard_form("bare"):
            rows["plain_1gpu_unguarded"] = plain(T)
            print("plain chunk, 1 GPU, T, unguarded", rows["plain_1gpu_unguarded"], flush=True)
            for n in devices:
                rows[f"jit_n{n}_unguarded"] = cp_jit(T, n)
                print(f"chunk under jit, T sharded over {n} devices, unguarded", rows[f"jit_n{n}_unguarded"],
                      flush=True)
    if jit_only:
        return
    rows["widened_half"] = plain(T // 2, width=V + K)
    print("chunk with V+K columns, T/2", rows["widened_half"], flush=True)
    for n in (2, 1):
        for combine in (None, "rerun", "linear"):  # None: the default call, the kernels' path
            name = combine or "default"
            rows[f"cp_n{n}_{name}"] = cp(T, n, combine)
            print(f"chunk_cp n={n} {name}", rows[f"cp_n{n}_{name}"], flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=262144)
    p.add_argument("--skip-times", action="store_true", help="only the longest-T search")
    p.add_argument("--longest", action="store_true", help="also the longest trainable T")
    p.add_argument("--limit", type=int, default=1 << 24)
    p.add_argument("--ts", default=None, help="T values to analyse, e.g. 1048576,1572864")
    p.add_argument("--out", default=None)
    p.add_argument("--configs", default=None,
                   help="only these jit rows on the first of --devices, each a ChunkConfig, e.g. "
                        "'state_block_v=64;bwd_sweep_block_v=64' (';' between rows, ',' between fields)")
    p.add_argument("--back-to-back", type=int, default=1,
                   help="calls per timed sample: 1 times each call with its dispatch and sync; more "
                        "overlap the dispatch with the previous call, as a training loop does")
    p.add_argument("--profile", action="store_true",
                   help="only each kernel's time: one GPU at T / n against n devices at T")
    p.add_argument("--check", type=int, default=0, metavar="T",
                   help="first compare the 2-device jit path with one device at this T")
    p.add_argument("--jit", action="store_true",
                   help="only the jit rows (T sharded by NamedSharding); memory rows from that path")
    p.add_argument("--devices", default="2", help="device counts for the sharded rows, e.g. 2,4")
    p.add_argument("--unguarded", action="store_true",
                   help="also the jit rows without the non-finite guard's check and cond")
    p.add_argument("--segments", default="rule",
                   help="ChunkConfig.segment_chunks values for the jit rows: rule, or a number (0: whole)")
    args = p.parse_args()
    devices = tuple(int(n) for n in args.devices.split(","))
    segment_rows = tuple(None if s == "rule" else int(s) for s in args.segments.split(","))
    global JIT_PATH, BACK_TO_BACK
    JIT_PATH, BACK_TO_BACK = args.jit, args.back_to_back
    rows = {}
    if args.profile:
        return profile(args.T, devices[0])
    if args.configs:
        for row in args.configs.split(";"):
            fields = {k: int(v) for k, v in (f.split("=") for f in row.split(","))}
            print(f"chunk under jit, T sharded over {devices[0]} devices, {fields}",
                  cp_jit(args.T, devices[0], **fields), flush=True)
        return None
    if args.check:
        for n in devices:
            for seg in segment_rows:
                key = f"check_n{n}_seg{'rule' if seg is None else seg}"
                rows[key] = check(args.check, n, seg)
                print(f"{n} devices vs 1 at T={args.check}, segment_chunks {seg}, relative errors:",
                      rows[key], flush=True)
    if not args.skip_times:
        run_cases(args.T, rows, jit_only=args.jit, devices=devices, segment_rows=segment_rows,
                  unguarded=args.unguarded)
    if args.ts:
        cap = 0.95 * jax.devices()[0].memory_stats()["bytes_limit"]
        for n in (1, 2):
            for T in (int(t) for t in args.ts.split(",")):
                need = peak_bytes(T, n)
                rows[f"bytes_n{n}_T{T}"] = need
                print(f"  n={n} T={T}: {need / 2**30:.1f} GiB per device, fits: {need <= cap}", flush=True)
    if args.longest:
        rows["longest_1gpu"] = longest(1, args.limit)
        rows["longest_2gpu"] = longest(2, args.limit)
        print("longest trainable T: 1 GPU", rows["longest_1gpu"], "2 GPUs", rows["longest_2gpu"], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), T=args.T, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
