"""`python -m iplr_jax bench`: time every implementation on the same inputs, in one process.

Times `chunk` and `fused_recurrent` for each implementation available here, and fla-core's
Triton kernels when `fla` and a CUDA torch import (`chunk_iplr_delta_rule` forward,
`chunk_dplr_delta_rule` with a zero decay gate, which computes the same function and has a
backward, `fused_recurrent_iplr_delta_rule`, and plain DeltaNet `chunk_delta_rule` for scale).
Medians of per-call times after warm-up, a table with ratios against the fastest entry of the
same size and mode and against the floor, and a JSON file with date, device and versions.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import iplr_jax
from iplr_jax.inputs import has_gpu

# DESIGN.md section 8
SIZES = {
    "S1": dict(B=8, T=2048, H=16, K=64, V=64),
    "S2": dict(B=4, T=4096, H=16, K=128, V=128),
    "S3": dict(B=1, T=32768, H=8, K=128, V=128),
    "S4": dict(B=64, T=1, H=16, K=128, V=128),  # decode: one token with a state
}
# measured on the H100 (DESIGN.md section 8): a device-to-device copy and a bf16 matmul
PEAK_BYTES_PER_S = 3.0e12
PEAK_FLOPS = 700e12
CHUNK = 64


def _inputs(rng, B, T, H, K, V, decode):
    """float32 numpy inputs drawn the way a layer draws them (|a| = 1, b = -beta a)."""
    q = rng.standard_normal((B, T, H, K), np.float32)
    k = rng.standard_normal((B, T, H, K), np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V), np.float32)
    a = rng.standard_normal((B, T, H, K), np.float32)
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    beta = rng.uniform(0.05, 1.95, (B, T, H, 1)).astype(np.float32)
    b = -beta * a
    do = rng.standard_normal((B, T, H, V), np.float32)
    h0 = rng.standard_normal((B, H, K, V), np.float32) if decode else None
    return dict(q=q, k=k, v=v, a=a, b=b, beta=beta[..., 0], do=do, h0=h0)


def floor_ms(B, T, H, K, V, mode, decode, itemsize):
    """Time to move each input once (and the state when decoding) or do the matrix work."""
    tok = B * T * H
    nbytes = tok * (4 * K + 2 * V) * itemsize
    if mode == "fwd+bwd":  # read inputs and dO again, write five gradients
        nbytes += tok * (8 * K + 3 * V) * itemsize
    if decode:
        nbytes += 2 * B * H * K * V * 4  # read and write the float32 state
    c = min(CHUNK, T)
    flops = 2 * tok * (5 * c * K + 3 * c * V + 4 * K * V)
    if mode == "fwd+bwd":
        flops *= 3
    return 1e3 * max(nbytes / PEAK_BYTES_PER_S, flops / PEAK_FLOPS)


def _time_ms(call, sync, reps):
    """Median per-call time: each sample runs the call n times back to back, then syncs."""
    sync(call())  # compile / autotune
    t0 = time.perf_counter()
    sync(call())
    first = time.perf_counter() - t0
    # ~20 ms of back-to-back calls per sample: the host's dispatch and the sync overlap the
    # device work, as in a training loop (the same for the jax and the torch cases)
    n = int(min(50, max(1, 20e-3 / max(first, 1e-6))))
    reps = reps if first < 0.5 else 3
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            out = call()
        sync(out)
        samples.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(samples)


# -- our implementations ------------------------------------------------------------------------


def _jax_cases(x, dtype, decode, impls):
    dev = {k: None if v is None else jnp.asarray(v, dtype) for k, v in x.items()}
    args = tuple(dev[n] for n in "qkvab")
    h0 = None if x["h0"] is None else jnp.asarray(x["h0"], jnp.float32)
    ops = {}
    for impl in impls:
        if not decode:
            ops[("chunk", impl)] = functools.partial(iplr_jax.chunk, implementation=impl)
        if impl != "xla" or x["q"].shape[1] <= 2048:  # the xla recurrence is a lax.scan over T
            ops[("fused_recurrent", impl)] = functools.partial(iplr_jax.fused_recurrent, implementation=impl)
    for (op, impl), fn in ops.items():
        run = lambda *a, fn=fn: fn(*a, initial_state=h0, output_final_state=decode)

        def fwd_bwd(*a, run=run):
            (o, ht), vjp = jax.vjp(run, *a)
            return vjp((dev["do"], jnp.zeros_like(ht) if ht is not None else None))

        yield op, impl, jax.jit(run), jax.jit(fwd_bwd), args


def _jax_peak_bytes(f, args):
    """Peak device memory of one compiled call: arguments + outputs + XLA temporaries."""
    try:
        m = f.lower(*args).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # memory_analysis is not available on every backend
        return None


# -- fla-core, when importable -------------------------------------------------------------------


def _fla_cases(x, dtype, decode):
    try:
        import torch
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.generalized_delta_rule import (
            chunk_dplr_delta_rule,
            chunk_iplr_delta_rule,
            fused_recurrent_iplr_delta_rule,
        )
    except Exception:
        return
    if not torch.cuda.is_available():
        return
    tdt = {jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16, jnp.float32: torch.float32}[dtype]
    t = {k: None if v is None else torch.from_numpy(v).cuda().to(tdt) for k, v in x.items()}
    h0 = None if x["h0"] is None else torch.from_numpy(x["h0"]).cuda()
    gk = torch.zeros_like(t["k"])
    ops = {
        "fla-fused": lambda q, k, v, a, b: fused_recurrent_iplr_delta_rule(
            q, k, v, a, b, initial_state=h0, output_final_state=decode)[0],
    }
    if not decode:
        ops["fla-chunk"] = lambda q, k, v, a, b: chunk_iplr_delta_rule(q, k, v, a, b)[0]
        ops["fla-dplr"] = lambda q, k, v, a, b: chunk_dplr_delta_rule(q, k, v, a, b, gk)[0]
        # DeltaNet on the same q, k, v: a special case of IPLR, the speed fla reaches with a scalar gate
        ops["fla-deltanet"] = lambda q, k, v, a, b: chunk_delta_rule(q, k, v, t["beta"])[0]
    for name, fn in ops.items():
        def fwd(fn=fn):
            with torch.no_grad():
                return fn(*(t[n] for n in "qkvab"))

        def fwd_bwd(fn=fn):
            ins = [t[n].detach().requires_grad_() for n in "qkvab"]
            fn(*ins).backward(t["do"])
            return ins[0].grad

        yield name, fwd, (None if name == "fla-chunk" else fwd_bwd)  # fla's chunk IPLR has no backward


def _torch_peak_bytes(call):
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


# -- driver --------------------------------------------------------------------------------------


def run(sizes, modes, impls, dtype, reps, fla=True, progress=True, log=None, only=None):
    rows = []
    rng = np.random.default_rng(0)
    jsync = jax.block_until_ready
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for label, dims in sizes.items():
        decode = dims["T"] == 1
        x = _inputs(rng, **dims, decode=decode)
        itemsize = jnp.dtype(dtype).itemsize
        cases = []
        for op, impl, f_fwd, f_fb, args in _jax_cases(x, dtype, decode, impls):
            for mode in modes:
                f = f_fwd if mode == "fwd" else f_fb
                cases.append((op, impl, mode, functools.partial(f, *args), jsync,
                              (lambda f=f, args=args: _jax_peak_bytes(f, args)) if mode != "fwd" else None))
        if fla:
            import_sync = None
            for name, f_fwd, f_fb in _fla_cases(x, dtype, decode) or ():
                import torch

                import_sync = lambda _: torch.cuda.synchronize()  # noqa: E731
                for mode in modes:
                    f = f_fwd if mode == "fwd" else f_fb
                    if f is not None:
                        cases.append(("fla", name, mode, f, import_sync,
                                      (lambda f=f: _torch_peak_bytes(f)) if mode != "fwd" else None))
        if only:  # e.g. "S3|S2 fla-dplr": keep the cases whose "size impl" matches
            cases = [c for c in cases if re.search(only, f"{label} {c[1]}")]
        it = tqdm(cases, desc=label, leave=False) if (tqdm and progress) else cases
        for op, impl, mode, call, sync, peak in it:
            row = dict(size=label, **dims, dtype=jnp.dtype(dtype).name, op=op, impl=impl, mode=mode)
            try:
                row["median_ms"] = _time_ms(call, sync, reps)
                row["peak_bytes"] = peak() if (peak and label == "S2") else None
            except Exception as e:  # report, never hide: the table shows the error
                row["median_ms"] = None
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            row["floor_ms"] = floor_ms(**dims, mode=mode, decode=decode, itemsize=itemsize)
            rows.append(row)
            if log:  # one line per case as it finishes, so a run cut short still reports
                ms = row["median_ms"]
                log(f"{label} {op} {impl} {mode}: " + (f"{ms:.3f} ms" if ms is not None else row["error"]))
    for r in rows:
        group = [s["median_ms"] for s in rows if s["size"] == r["size"] and s["mode"] == r["mode"]
                 and s["median_ms"] is not None]
        if r["median_ms"] is not None:
            r["x_fastest"] = r["median_ms"] / min(group)
            r["x_floor"] = r["median_ms"] / r["floor_ms"]
    return rows


def format_table(rows) -> str:
    head = f"{'size':4} {'op':16} {'impl':13} {'mode':8} {'median ms':>10} {'x fastest':>9} {'x floor':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["median_ms"] is None:
            lines.append(f"{r['size']:4} {r['op']:16} {r['impl']:13} {r['mode']:8} {r.get('error', '')}")
            continue
        mem = f"  peak {r['peak_bytes'] / 1e9:.2f} GB" if r.get("peak_bytes") else ""
        lines.append(
            f"{r['size']:4} {r['op']:16} {r['impl']:13} {r['mode']:8} {r['median_ms']:10.3f} "
            f"{r['x_fastest']:9.2f} {r['x_floor']:8.1f}{mem}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m iplr_jax bench", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="S1,S2,S3,S4", help="comma-separated names from DESIGN.md section 8")
    p.add_argument("--size", action="append", default=[], metavar="B,T,H,K,V",
                   help="an extra size (T=1 means decode with a state); may repeat")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--impls", default=None, help="default: pallas and xla on a GPU, xla elsewhere")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-fla", action="store_true", help="skip fla-core even when importable")
    p.add_argument("--only", default=None, help='regex on "size impl", e.g. "S3|S2 fla-dplr"')
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>-<device>.json)")
    args = p.parse_args(argv)

    sizes = {s: SIZES[s] for s in args.sizes.split(",") if s}
    for i, s in enumerate(args.size):
        B, T, H, K, V = (int(n) for n in s.split(","))
        sizes[f"C{i + 1}"] = dict(B=B, T=T, H=H, K=K, V=V)
    impls = args.impls.split(",") if args.impls else (["pallas", "xla"] if has_gpu() else ["xla"])
    dtype = jnp.dtype(args.dtype).type
    rows = run(sizes, args.modes.split(","), impls, dtype, args.reps, fla=not args.no_fla,
               progress=False, log=functools.partial(print, flush=True), only=args.only)

    device = jax.devices()[0].device_kind
    meta = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        device=device, backend=jax.default_backend(), jax_version=jax.__version__,
        python=platform.python_version(), iplr_jax=iplr_jax.__version__,
    )
    try:
        import fla
        import torch

        meta.update(torch_version=torch.__version__, fla_version=getattr(fla, "__version__", "?"))
    except Exception:
        pass
    out = args.out or os.path.join(
        "benchmarks", "results", f"{meta['date'][:10]}-{device.replace(' ', '_')}.json"
    )
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(**meta, results=rows), f, indent=1)
    print(f"{meta['date']}  {device}  jax {jax.__version__}  dtype {args.dtype}  -> {out}")
    print(format_table(rows))
    return 0
