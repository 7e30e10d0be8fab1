"""Times of the gated ops (DPLR, docs/gate.md) against IPLR on a GPU, same process, bf16:

    python benchmarks/gate_timing.py [--sizes S1,S2,S4] [--reps 20]

Rows: `chunk` forward and forward+backward with gk=None (the IPLR kernels) and with a real gate
(gk = -softplus(N(0, 1)); today the jnp chunked form, docs/gate.md), and `fused_recurrent`
(decode S4: B = 64, T = 1) with and without the gate (the gated Triton kernels). Prints
milliseconds (median of `reps` x 5 calls) and the ratio gated / IPLR. Not a replacement for
`python -m iplr_jax bench`, whose rows against fla are issue 17's targets.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import iplr_jax

SIZES = {  # B, T, H, K = V
    "S1": (8, 2048, 16, 64),
    "S2": (4, 4096, 16, 128),
    "S3": (1, 32768, 8, 128),
    "S4": (64, 1, 16, 128),
    "tiny": (1, 64, 2, 16),  # a smoke test (CPU)
}


def median_ms(f, *args, reps=20):
    jax.block_until_ready(f(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(5):
            out = f(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / 5 * 1e3)
    return float(np.median(samples))


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="S1,S2,S4")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    print(jax.devices()[0].device_kind)
    for name in args.sizes.split(","):
        B, T, H, K = SIZES[name]
        x, gk, h0 = inputs(B, T, H, K)
        op = iplr_jax.fused_recurrent if T == 1 else iplr_jax.chunk
        fwd = jax.jit(lambda *a, op=op, h0=h0: op(*a, initial_state=h0, output_final_state=True))

        def loss(*a, op=op, h0=h0):
            o, ht = op(*a, initial_state=h0, output_final_state=True)
            return o.astype(jnp.float32).sum() + ht.sum()

        rows = [("fwd", fwd)]
        if T > 1:
            rows.append(("fwd+bwd", jax.jit(jax.grad(loss, argnums=tuple(range(5))))))
        for mode, f in rows:
            t_iplr = median_ms(f, *x, reps=args.reps)
            grad_gated = jax.jit(jax.grad(loss, argnums=tuple(range(6)))) if mode == "fwd+bwd" else f
            t_gated = median_ms(grad_gated, *x, gk, reps=args.reps)
            print(f"{name} {op.__name__:16s} {mode:8s} IPLR {t_iplr:8.3f} ms   gated {t_gated:8.3f} ms"
                  f"   ratio {t_gated / t_iplr:5.2f}", flush=True)
        fla_row(name, x, gk, h0, T, args.reps)


def fla_row(name, x, gk, h0, T, reps):
    """fla's gated kernels on the same inputs, when fla and a CUDA torch import: the chunked DPLR
    at its default chunk (a real gate gives no `safe_gate` promise) and the fused decode step."""
    try:
        import torch
        from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule
    except Exception:
        return
    t = [torch.from_numpy(np.asarray(y.astype(jnp.float32))).cuda().to(torch.bfloat16) for y in (*x, gk)]
    s0 = torch.from_numpy(np.asarray(h0)).cuda()

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - t0) / 5 * 1e3)
        return float(np.median(samples))

    if T == 1:
        ms = timed(lambda: fused_recurrent_dplr_delta_rule(*t, initial_state=s0, output_final_state=True))
        print(f"{name} fla fused_recurrent_dplr fwd {ms:8.3f} ms", flush=True)
        return
    with torch.no_grad():
        ms = timed(lambda: chunk_dplr_delta_rule(*t, initial_state=s0, output_final_state=True))
    print(f"{name} fla chunk_dplr (gated)  fwd      {ms:8.3f} ms", flush=True)

    def fb():
        ins = [y.detach().requires_grad_() for y in t]
        o, ht = chunk_dplr_delta_rule(*ins, initial_state=s0, output_final_state=True)
        (o.float().sum() + ht.sum()).backward()

    print(f"{name} fla chunk_dplr (gated)  fwd+bwd  {timed(fb):8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
