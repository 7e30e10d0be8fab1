"""Times of the gated ops (DPLR, docs/gate.md) against IPLR on a GPU, same process, bf16:

    python benchmarks/gate_timing.py [--sizes S1,S2,S4] [--reps 20] [--config ...] [--fla default,chunk64]
        [--blockwise] [--xla]

Rows: `chunk` forward and forward+backward (value and gradients) with gk=None (the IPLR kernels)
and with a real gate (gk = -softplus(N(0, 1))): the default ("gated": the IPLR kernels on decayed
operands where every chunk allows it, docs/gate.md "Whole-chunk factoring"), with `--blockwise`
the sub-block kernels ("gated blockwise", `ChunkConfig(gate_chunk_factored=False)`: they take
minutes to compile), with `--xla` the jnp form too; `fused_recurrent` (decode S4: B = 64,
T = 1) with and without the gate (the gated Triton kernels). Then fla's DPLR kernels on the
same inputs when fla imports: its default chunk and its fastest user setting (`chunk_size=64,
safe_gate=True`, a promise about the gate's lower bound that this gate can break: timing only),
forward and forward+backward. Prints
milliseconds (median of `reps` x 5 calls) and the ratio to IPLR. `--config` sets
`iplr_jax.ChunkConfig` fields for the gated kernels (tuning).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_ms  # benchmarks/ is on sys.path as the script's folder

import iplr_jax

SIZES = {  # B, T, H, K = V
    "S1": (8, 2048, 16, 64),
    "S2": (4, 4096, 16, 128),
    "S3": (1, 32768, 8, 128),
    "S4": (64, 1, 16, 128),
    "tiny": (1, 64, 2, 16),  # a smoke test (CPU)
}


def inputs(B, T, H, K, seed=0):
    r = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k, v, a = (r.standard_normal((B, T, H, K)) for _ in range(4))
    k, a = unit(k), unit(a)
    b = -r.uniform(0.05, 1.95, (B, T, H, 1)) * a
    gk = -np.logaddexp(0.0, r.standard_normal((B, T, H, K)))
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    h0 = jnp.asarray(r.standard_normal((B, H, K, K)), jnp.float32)
    return [cast(x) for x in (q, k, v, a, b)], cast(gk), h0


def parse_config(text: str) -> iplr_jax.ChunkConfig | None:
    """"wy_warps=4,fuse_output=false" -> ChunkConfig(wy_warps=4, fuse_output=False)."""
    if not text:
        return None
    fields = {}
    for item in text.split(","):
        key, value = item.split("=")
        low = value.strip().lower()
        fields[key.strip()] = {"true": True, "false": False}.get(low, int(low) if low.isdigit() else value)
    return iplr_jax.ChunkConfig(**fields)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="S1,S2,S4")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--config", default="", help="ChunkConfig fields for the gated chunk kernels")
    p.add_argument("--blockwise", action="store_true", help="also the sub-block gated kernels")
    p.add_argument("--fla", default="default,chunk64",
                   help="fla settings to time: default (its chunk), chunk64 (chunk_size=64, safe_gate)")
    p.add_argument("--fla-first", action="store_true", help="fla's rows before ours (its autotuning is long)")
    p.add_argument("--xla", action="store_true", help="also the jnp form (slow to compile)")
    args = p.parse_args()
    config = parse_config(args.config)
    print(jax.devices()[0].device_kind, "" if config is None else config)
    for name in args.sizes.split(","):
        B, T, H, K = SIZES[name]
        x, gk, h0 = inputs(B, T, H, K)
        decode = T == 1
        base = iplr_jax.fused_recurrent if decode else iplr_jax.chunk
        blockwise = dataclasses.replace(config or iplr_jax.ChunkConfig(), gate_chunk_factored=False)
        gated_ops = [("gated", base)] if decode else [("gated", functools.partial(base, config=config))]
        if args.blockwise and not decode:
            gated_ops.append(("gated blockwise", functools.partial(base, config=blockwise)))
        if args.xla and not decode:
            gated_ops.append(("gated xla", functools.partial(base, implementation="xla")))
        if args.fla_first:
            fla_row(name, x, gk, h0, T, args.reps, args.fla.split(","))
        for mode in ("fwd",) if decode else ("fwd", "fwd+bwd"):
            t_iplr = median_ms(_timed(base, h0, mode, 5), *x, reps=args.reps)
            line = f"{name} {base.__name__:16s} {mode:8s} IPLR {t_iplr:8.3f} ms"
            for label, op in gated_ops:
                t = median_ms(_timed(op, h0, mode, 6), *x, gk, reps=args.reps)
                line += f"   {label} {t:8.3f} ms ({t / t_iplr:5.2f}x)"
            print(line, flush=True)
        if not args.fla_first:
            fla_row(name, x, gk, h0, T, args.reps, args.fla.split(","))


def _timed(op, h0, mode, n):
    """The jitted forward, or value and gradients of a loss on (o, final state) w.r.t. the n
    inputs (value too: with the gate the backward needs no forward residual, so a plain grad
    would skip the forward kernels)."""
    def fwd(*a):
        return op(*a, initial_state=h0, output_final_state=True)

    if mode == "fwd":
        return jax.jit(fwd)

    def loss(*a):
        o, ht = fwd(*a)
        return o.astype(jnp.float32).sum() + ht.sum()

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n))))


def fla_row(name, x, gk, h0, T, reps, wanted=("default", "chunk64")):
    """fla's gated kernels on the same inputs (the gate in float32, as fla's tests pass it), when
    fla and a CUDA torch import: the chunked DPLR at its default chunk and at chunk 64 with
    `safe_gate` (timing only: this gate can break that promise), or the fused decode step."""
    try:
        import torch
        from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule
    except Exception:
        return
    t = [torch.from_numpy(np.asarray(y.astype(jnp.float32))).cuda().to(torch.bfloat16) for y in x]
    t.append(torch.from_numpy(np.asarray(gk.astype(jnp.float32))).cuda())
    s0 = torch.from_numpy(np.asarray(h0)).cuda()

    def timed(fn):
        return median_ms(fn, reps=reps, sync=lambda _: torch.cuda.synchronize())

    if T == 1:
        ms = timed(lambda: fused_recurrent_dplr_delta_rule(*t, initial_state=s0, output_final_state=True))
        print(f"{name} fla fused_recurrent_dplr fwd {ms:8.3f} ms", flush=True)
        return
    settings = {
        "default": ("chunk_dplr (gated)", {}),
        "chunk64": ("chunk_dplr64 safe_gate (gated)", dict(chunk_size=64, safe_gate=True)),
    }
    for label, kw in (settings[w] for w in wanted):
        def fwd(kw=kw):
            with torch.no_grad():
                return chunk_dplr_delta_rule(*t, initial_state=s0, output_final_state=True, **kw)

        def fb(kw=kw):
            ins = [y.detach().requires_grad_() for y in t]
            o, ht = chunk_dplr_delta_rule(*ins, initial_state=s0, output_final_state=True, **kw)
            (o.float().sum() + ht.sum()).backward()

        print(f"{name} fla {label} fwd {timed(fwd):8.3f} ms  fwd+bwd {timed(fb):8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
