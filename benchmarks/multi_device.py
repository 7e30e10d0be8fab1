"""The ops and an IPLRLayer training step on N devices against one device (issue 14).

    python benchmarks/multi_device.py --devices 2 --out results.json   # on a 2-GPU host
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python benchmarks/multi_device.py --tiny                       # CPU smoke run

1. `iplr_jax.chunk`, forward and forward + backward (gradients of q, k, v, a, b), bf16, the
   default implementation (Pallas on a GPU, "xla" elsewhere), at S1 (B8 T2048 H16 K=V=64) and
   S2 (B4 T4096 H16 K=V=128): the global batch sharded over N devices
   (`NamedSharding(mesh, P("data"))`, plain `jax.jit`) against the same global batch on one
   device (a 1-device mesh, same process).
2. An `IPLRLayer` training step (d_model 2048, 16 heads, bf16 compute, float32 parameters,
   `sharding={"batch": "data"}`), forward + backward + an optax Adam update, with a batch of
   B4 T4096 per device: tokens/s on 1 and on N devices (N times the global batch).

Each time is the median of `--runs` samples of 5 back-to-back calls (then
`jax.block_until_ready`) after warm-up calls; session 6's figures synced after every call.
Every compiled program's all-gathers and all-to-alls are counted (all-reduces
too: the data-parallel step needs one for its gradients), and the N-device results are
compared with the 1-device ones. Needs neither torch nor fla.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing  # benchmarks/ is on sys.path: the script's folder
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import iplr_jax

# name: (B, T, H, K, V) of the global batch
SIZES = {"S1": (8, 2048, 16, 64, 64), "S2": (4, 4096, 16, 128, 128)}
TINY_SIZES = {"S1": (8, 64, 4, 16, 16), "S2": (4, 128, 4, 32, 32)}
LAYER = dict(d_model=2048, num_heads=16, B=4, T=4096)  # B per device
TINY_LAYER = dict(d_model=64, num_heads=4, B=2, T=64)
COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter")


def mesh_of(n: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))


def count_collectives(compiled) -> dict[str, int]:
    text = compiled.as_text()
    return {c: len(re.findall(rf"\b{c}(-start)?\(", text)) for c in COLLECTIVES}


def median_ms(f, args, runs: int, warmup: int) -> float:
    """Median per-call time of samples of 5 back-to-back calls then a sync, so the host's
    dispatch overlaps the device work as in a training loop (a sync after every call added
    about 0.2 ms per call at S1 on 2 H200s, which made the 2-GPU ratios look worse)."""
    for _ in range(warmup - 1):
        jax.block_until_ready(f(*args))
    return timing.median_ms(f, *args, reps=runs)


def rel_err(got, want) -> float:
    """Largest relative (Frobenius) difference over the leaves of two pytrees."""
    errs = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        errs.append(float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)))
    return max(errs)


# -- 1. the op ---------------------------------------------------------------------------------


def op_inputs(B, T, H, K, V, dtype=jnp.bfloat16, seed=0):
    """q, k, v, a, b as a layer draws them: |k| = |a| = 1, b = -beta a with beta in (0, 2)."""
    r = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = r.standard_normal((B, T, H, K)) / K**0.5
    k, a = unit(r.standard_normal((B, T, H, K))), unit(r.standard_normal((B, T, H, K)))
    b = -r.uniform(0.05, 1.95, (B, T, H, 1)) * a
    v = r.standard_normal((B, T, H, V))
    return [np.asarray(x, np.float32).astype(dtype) for x in (q, k, v, a, b)]


def op_fwd(q, k, v, a, b, implementation=None):
    return iplr_jax.chunk(q, k, v, a, b, implementation=implementation)[0]


def op_fwd_bwd(q, k, v, a, b, implementation=None):
    def loss(*xs):
        return jnp.sum(iplr_jax.chunk(*xs, implementation=implementation)[0].astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=range(5))(q, k, v, a, b)


def bench_op(name, shape, n, args):
    B = shape[0]
    if B % n:
        raise SystemExit(f"{name}: global batch {B} is not divisible by {n} devices")
    host = op_inputs(*shape)
    rows = []
    for what, fn in (("fwd", op_fwd), ("fwd+bwd", op_fwd_bwd)):
        row = dict(kind="op", size=name, shape=dict(zip("BTHKV", shape, strict=True)), what=what)
        outs = {}
        for nd in (1, n):
            mesh = mesh_of(nd)
            xs = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in host]
            f = functools.partial(fn, implementation=args.implementation)
            compiled = jax.jit(f).lower(*xs).compile()
            row[f"ms_{nd}"] = median_ms(compiled, xs, args.runs, args.warmup)
            row[f"collectives_{nd}"] = count_collectives(compiled)
            outs[nd] = compiled(*xs)
            if nd == n == 1:
                break
        row["ratio"] = row[f"ms_{n}"] / row["ms_1"]
        row["rel_err"] = rel_err(outs[n], outs[1])
        rows.append(row)
    return rows


# -- 2. the layer training step ------------------------------------------------------------------


def bench_layer(n, args):
    cfg = TINY_LAYER if args.tiny else LAYER
    D, H, Bd, T = cfg["d_model"], cfg["num_heads"], cfg["B"], cfg["T"]
    row = dict(kind="layer", what="train step (fwd+bwd+adam)", d_model=D, heads=H, B_per_device=Bd, T=T)
    tx = optax.adam(1e-4)
    r = np.random.default_rng(1)
    host_x = r.standard_normal((Bd * n, T, D)).astype(np.float32)
    host_y = r.standard_normal((Bd * n, T, D)).astype(np.float32)
    results = {}
    for nd in (1, n):
        mesh = mesh_of(nd)
        with jax.set_mesh(mesh):
            layer = iplr_jax.IPLRLayer(
                D, H, dtype=jnp.bfloat16, implementation=args.implementation,
                sharding={"batch": "data"}, rngs=nnx.Rngs(0),
            )
            graphdef, params = nnx.split(layer)
            opt_state = tx.init(params)
            tokens = NamedSharding(mesh, P("data"))
            x = jax.device_put(host_x[: Bd * nd].astype(jnp.bfloat16), tokens)
            y = jax.device_put(host_y[: Bd * nd].astype(jnp.bfloat16), tokens)

            def step(params, opt_state, x, y, graphdef=graphdef):
                def loss_fn(params):
                    out = nnx.merge(graphdef, params)(x).astype(jnp.float32)
                    return jnp.mean((out - y.astype(jnp.float32)) ** 2)

                loss, grads = jax.value_and_grad(loss_fn)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            compiled = jax.jit(step).lower(params, opt_state, x, y).compile()
            # the same parameters and optimiser state every call: only the time is measured
            ms = median_ms(compiled, (params, opt_state, x, y), args.runs, args.warmup)
            results[nd] = compiled(params, opt_state, x, y)[2]
        row[f"ms_{nd}"] = ms
        row[f"tokens_per_s_{nd}"] = Bd * nd * T / (ms * 1e-3)
        row[f"collectives_{nd}"] = count_collectives(compiled)
        if nd == n == 1:
            break
    row["ratio"] = row[f"tokens_per_s_{n}"] / row["tokens_per_s_1"]
    # one device's loss is over its B-per-device batch, N devices' over all: not comparable;
    # the step's equality with one device is what tests/test_layer_sharding.py checks
    row["loss_1"], row[f"loss_{n}"] = float(results[1]), float(results[n])
    return row


# -- table ---------------------------------------------------------------------------------------


def fmt_coll(c):
    return f"{c['all-gather']}/{c['all-to-all']}"


def print_table(rows, n):
    print(f"\nops: ms (median), ratio = {n} devices / 1 device (lower is better); "
          "collectives = all-gather/all-to-all in the compiled program")
    print(f"{'size':5} {'what':8} {'1 dev ms':>9} {f'{n} dev ms':>9} {'ratio':>6} "
          f"{'coll 1':>7} {f'coll {n}':>7} {'rel err':>8}")
    for r in rows:
        if r["kind"] != "op":
            continue
        print(f"{r['size']:5} {r['what']:8} {r['ms_1']:9.3f} {r[f'ms_{n}']:9.3f} {r['ratio']:6.3f} "
              f"{fmt_coll(r['collectives_1']):>7} {fmt_coll(r[f'collectives_{n}']):>7} {r['rel_err']:8.1e}")
    for r in rows:
        if r["kind"] != "layer":
            continue
        print(f"\nlayer training step (d_model {r['d_model']}, {r['heads']} heads, B{r['B_per_device']} "
              f"T{r['T']} per device, bf16, adam): ratio = tokens/s on {n} / on 1 (higher is better)")
        print(f"{'devices':>7} {'ms':>9} {'tokens/s':>12} {'all-gather/all-to-all':>22} {'all-reduce':>10}")
        for nd in (1, n):
            c = r[f"collectives_{nd}"]
            print(f"{nd:7} {r[f'ms_{nd}']:9.2f} {r[f'tokens_per_s_{nd}']:12.0f} {fmt_coll(c):>22} "
                  f"{c['all-reduce']:10}")
        print(f"ratio {r['ratio']:.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=None, help="N (default: all devices)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke run)")
    ap.add_argument("--runs", type=int, default=20, help="timed calls per case (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sizes", default="S1,S2", help="op sizes, comma-separated")
    ap.add_argument("--implementation", default=None, choices=["pallas", "xla", "interpret"],
                    help="default: pallas on a GPU, xla elsewhere")
    ap.add_argument("--skip-layer", action="store_true", help="only the op")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    n = args.devices or jax.device_count()
    if not 1 <= n <= jax.device_count():
        raise SystemExit(f"--devices {n}: {jax.device_count()} available")
    devs = jax.devices()[:n]
    impl = args.implementation or ("pallas" if jax.default_backend() == "gpu" else "xla") + " (default)"
    print(f"jax {jax.__version__}, {n} x {devs[0].device_kind} ({jax.default_backend()}), "
          f"implementation {impl}")
    sizes = TINY_SIZES if args.tiny else SIZES
    rows = []
    for name in args.sizes.split(","):
        rows += bench_op(name, sizes[name], n, args)
        for r in rows[-2:]:
            ms_1, ms_n = r["ms_1"], r[f"ms_{n}"]
            print(f"  {name} {r['what']}: 1 dev {ms_1:.3f} ms, {n} dev {ms_n:.3f} ms", flush=True)
    if not args.skip_layer:
        rows.append(bench_layer(n, args))
    print_table(rows, n)
    if args.out:
        meta = dict(jax=jax.__version__, device_kind=devs[0].device_kind, backend=jax.default_backend(),
                    devices=n, implementation=impl, tiny=args.tiny, runs=args.runs, warmup=args.warmup,
                    host=platform.node())
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
