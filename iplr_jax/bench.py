"""`python -m iplr_jax bench`: time every implementation on the same inputs, in one process.

Times `chunk` and `fused_recurrent` for each implementation available here, and fla-core's
Triton kernels when `fla` and a CUDA torch import (`chunk_iplr_delta_rule` forward,
`chunk_dplr_delta_rule` with a zero decay gate, which computes the same function and has a
backward, `fused_recurrent_iplr_delta_rule`, and plain DeltaNet `chunk_delta_rule` for scale).
With `--gate`, the same ops with a real DPLR gate as well (ours and fla's DPLR kernels).
Medians of per-call times after warm-up, a table with ratios against the fastest entry of the
same size and mode and, on an H100 (the only device whose peak numbers are recorded here),
against the floor: the time to move the bytes or do the matrix work at the device's peak.
With `--out PATH` or `--save`, a JSON file with date, device, versions and every row.
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
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import iplr_jax
from iplr_jax.__main__ import ArgumentParser

# the benchmark sizes (README, "Status")
SIZES = {
    "S1": dict(B=8, T=2048, H=16, K=64, V=64),
    "S2": dict(B=4, T=4096, H=16, K=128, V=128),
    "S3": dict(B=1, T=32768, H=8, K=128, V=128),
    "S4": dict(B=64, T=1, H=16, K=128, V=128),  # decode: one token with a state
}
# peak numbers for the "x floor" column, by a substring of jax's device_kind: (bytes/s of a
# device-to-device copy, flop/s of a bf16 matmul), both measured on that device. Devices not
# listed get no floor column.
PEAKS = {
    "H100": (3.0e12, 700e12),
}
CHUNK = 64
# --sweep-t: the same 16384 tokens as ever longer sequences (attention's cost grows with T)
SWEEP_T = {
    f"T{T // 1024}K": dict(B=16384 // T, T=T, H=16, K=128, V=128) for T in (1024, 2048, 4096, 8192, 16384)
}
IMPLS = ("pallas", "xla", "interpret")
MODES = ("fwd", "fwd+bwd")
DEFAULT_OUT_DIR = os.path.join("benchmarks", "results")


def has_gpu() -> bool:
    return any(d.platform == "gpu" for d in jax.devices())


def device_peaks(device_kind: str) -> tuple[str, float, float] | None:
    """(name, peak bytes/s, peak flop/s) for a device kind such as "NVIDIA H100 80GB HBM3", else None."""
    for name, (bw, flops) in PEAKS.items():
        if name.lower() in device_kind.lower():
            return name, bw, flops
    return None


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
    # a real DPLR gate for the --gate rows: gk = -softplus(N(0, 1)) (docs/gate.md)
    gk = -np.logaddexp(0, rng.standard_normal((B, T, H, K), np.float32)).astype(np.float32)
    return dict(q=q, k=k, v=v, a=a, b=b, beta=beta[..., 0], do=do, h0=h0, gk=gk)


def floor_ms(B, T, H, K, V, mode, decode, itemsize, peak_bytes_per_s, peak_flops):
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
    return 1e3 * max(nbytes / peak_bytes_per_s, flops / peak_flops)


def _time_ms(call, sync, reps):
    """(median per-call ms, seconds of the first call): each sample runs the call n times back to
    back, then syncs; the first call includes compiling (and autotuning)."""
    t0 = time.perf_counter()
    sync(call())  # compile / autotune
    cold = time.perf_counter() - t0
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
    return statistics.median(samples), cold


# -- our implementations ------------------------------------------------------------------------


def _jax_cases(x, dtype, decode, impls, gate=False):
    dev = {k: None if v is None else jnp.asarray(v, dtype) for k, v in x.items()}
    h0 = None if x["h0"] is None else jnp.asarray(x["h0"], jnp.float32)
    ops = {}
    for impl in impls:
        if not decode:
            ops[("chunk", impl)] = functools.partial(iplr_jax.chunk, implementation=impl)
        if impl != "xla" or x["q"].shape[1] <= 2048:  # the xla recurrence is a lax.scan over T
            ops[("fused_recurrent", impl)] = functools.partial(iplr_jax.fused_recurrent, implementation=impl)
    if gate:  # the same ops with the gate as a sixth input (DPLR)
        ops = {**ops, **{(f"{op}+gk", impl): fn for (op, impl), fn in ops.items()}}
    for (op, impl), fn in ops.items():
        args = tuple(dev[n] for n in "qkvab") + ((dev["gk"],) if op.endswith("+gk") else ())
        run = lambda *a, fn=fn: fn(*a, initial_state=h0, output_final_state=decode)

        def fwd_bwd(*a, run=run):
            (o, ht), vjp = jax.vjp(run, *a)
            return vjp((dev["do"], jnp.zeros_like(ht) if ht is not None else None))

        yield op, impl, jax.jit(run), jax.jit(fwd_bwd), args
    if not decode and has_gpu() and x["q"].shape[-1] == x["v"].shape[-1]:
        yield from _attention_case(dev)


def _attention_case(dev):
    """What a JAX user would pick instead: causal flash attention through cuDNN on q, k, v."""

    def attn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def fwd_bwd(q, k, v):
        o, vjp = jax.vjp(attn, q, k, v)
        return vjp(dev["do"])

    yield "attention", "cudnn", jax.jit(attn), jax.jit(fwd_bwd), (dev["q"], dev["k"], dev["v"])


def _jax_peak_bytes(f, args):
    """Peak device memory of one compiled call: arguments + outputs + XLA temporaries."""
    try:
        m = f.lower(*args).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # memory_analysis is not available on every backend
        return None


# -- fla-core, when importable -------------------------------------------------------------------


def _fla_cases(x, dtype, decode, gate=False):
    try:
        import torch
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.generalized_delta_rule import (
            chunk_dplr_delta_rule,
            chunk_iplr_delta_rule,
            fused_recurrent_dplr_delta_rule,
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
        # its best user setting: chunk 64, which fla allows only with the caller's promise of a
        # safe gate (gk = 0 here)
        ops["fla-dplr64"] = lambda q, k, v, a, b: chunk_dplr_delta_rule(
            q, k, v, a, b, gk, chunk_size=64, safe_gate=True)[0]
        # DeltaNet on the same q, k, v: a special case of IPLR, the speed fla reaches with a scalar gate
        ops["fla-deltanet"] = lambda q, k, v, a, b: chunk_delta_rule(q, k, v, t["beta"])[0]
    if gate:
        real = t["gk"].float()  # fla takes the gate in float32 (its tests do)
        ops["fla-fused+gk"] = lambda q, k, v, a, b: fused_recurrent_dplr_delta_rule(
            q, k, v, a, b, real, initial_state=h0, output_final_state=decode)[0]
        if not decode:
            ops["fla-dplr+gk"] = lambda q, k, v, a, b: chunk_dplr_delta_rule(q, k, v, a, b, real)[0]
            # chunk 64 is fla's promise-based setting: a gate of -softplus(N(0, 1)) can go below
            # the bound it assumes (docs/gate.md), so this row is timing, not an accuracy claim
            ops["fla-dplr64+gk"] = lambda q, k, v, a, b: chunk_dplr_delta_rule(
                q, k, v, a, b, real, chunk_size=64, safe_gate=True)[0]
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


def run(sizes, modes, impls, dtype, reps, fla=True, progress=True, log=None, only=None, peaks=None,
        gate=False):
    """Times every case; `peaks` = (bytes/s, flop/s) adds floor_ms and x_floor to each row;
    `gate` adds the gated (DPLR) rows."""
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
        for op, impl, f_fwd, f_fb, args in _jax_cases(x, dtype, decode, impls, gate):
            for mode in modes:
                f = f_fwd if mode == "fwd" else f_fb
                cases.append((op, impl, mode, functools.partial(f, *args), jsync,
                              (lambda f=f, args=args: _jax_peak_bytes(f, args)) if mode != "fwd" else None))
        if fla:
            import_sync = None
            for name, f_fwd, f_fb in _fla_cases(x, dtype, decode, gate) or ():
                import torch

                import_sync = lambda _: torch.cuda.synchronize()  # noqa: E731
                for mode in modes:
                    f = f_fwd if mode == "fwd" else f_fb
                    if f is not None:
                        cases.append(("fla", name, mode, f, import_sync,
                                      (lambda f=f: _torch_peak_bytes(f)) if mode != "fwd" else None))
        if only:  # e.g. "S2 chunk|fla-dplr64": keep the cases whose "size op impl" matches
            cases = [c for c in cases if re.search(only, f"{label} {c[0]} {c[1]}")]
        it = tqdm(cases, desc=label, leave=False) if (tqdm and progress) else cases
        for op, impl, mode, call, sync, peak in it:
            row = dict(size=label, **dims, dtype=jnp.dtype(dtype).name, op=op, impl=impl, mode=mode)
            try:
                row["median_ms"], row["first_call_s"] = _time_ms(call, sync, reps)
                row["peak_bytes"] = peak() if (peak and label == "S2") else None
            except Exception as e:  # report, never hide: the table shows the error
                row["median_ms"] = None
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if peaks is not None:
                row["floor_ms"] = floor_ms(**dims, mode=mode, decode=decode, itemsize=itemsize,
                                           peak_bytes_per_s=peaks[0], peak_flops=peaks[1])
            rows.append(row)
            if log:  # one line per case as it finishes, so a run cut short still reports
                ms = row["median_ms"]
                log(f"{label} {op} {impl} {mode}: " + (f"{ms:.3f} ms" if ms is not None else row["error"]))
    for r in rows:
        group = [s["median_ms"] for s in rows if s["size"] == r["size"] and s["mode"] == r["mode"]
                 and s["median_ms"] is not None]
        if r["median_ms"] is not None:
            r["x_fastest"] = r["median_ms"] / min(group)
            if "floor_ms" in r:
                r["x_floor"] = r["median_ms"] / r["floor_ms"]
    return rows


def format_table(rows) -> str:
    """The results as text; the "x floor" column only when the rows carry it (known device peaks)."""
    floor = any("x_floor" in r for r in rows)
    head = f"{'size':4} {'op':18} {'impl':14} {'mode':8} {'median ms':>10} {'x fastest':>9} {'1st s':>6}"
    head += f" {'x floor':>8}" if floor else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["median_ms"] is None:
            lines.append(f"{r['size']:4} {r['op']:18} {r['impl']:14} {r['mode']:8} {r.get('error', '')}")
            continue
        mem = f"  peak {r['peak_bytes'] / 1e9:.2f} GB" if r.get("peak_bytes") else ""
        x_floor = f" {r['x_floor']:8.1f}" if floor else ""
        lines.append(
            f"{r['size']:4} {r['op']:18} {r['impl']:14} {r['mode']:8} {r['median_ms']:10.3f} "
            f"{r['x_fastest']:9.2f} {r.get('first_call_s', float('nan')):6.1f}{x_floor}{mem}"
        )
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------


def _size_names(text: str) -> dict:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s.upper() not in SIZES]
    if bad or not names:
        got = ", ".join(repr(s) for s in bad) if bad else repr(text)
        raise argparse.ArgumentTypeError(
            f"unknown size {got}; valid names: {', '.join(SIZES)} (comma-separated, e.g. S1,S2), "
            f"or give your own with --size B,T,H,K,V"
        )
    return {s.upper(): SIZES[s.upper()] for s in names}


def _custom_size(text: str) -> dict:
    parts = text.split(",")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) != 5 or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"expected B,T,H,K,V (five positive integers, e.g. 8,2048,16,64,64; T = 1 means decode), "
            f"got {text!r}"
        )
    return dict(zip("BTHKV", dims, strict=True))


def _choices(allowed):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"got {text!r}; expected a comma-separated list of {', '.join(allowed)}"
            )
        return items

    return parse


def main(argv=None) -> int:
    p = ArgumentParser(
        prog="iplr-jax bench",
        description="Time every implementation on the same inputs, in one process (fla-core too when "
        "importable). Prints a table; writes JSON only when asked (--out PATH or --save).",
    )
    p.add_argument("--sizes", type=_size_names, default=None, metavar="S1,S2,...",
                   help=f"comma-separated names among {', '.join(SIZES)} (default: all of them unless "
                   "--size is given); " + "; ".join(f"{n} = B{d['B']} T{d['T']} H{d['H']} K{d['K']} V{d['V']}"
                                                    for n, d in SIZES.items()))
    p.add_argument("--size", type=_custom_size, action="append", default=[], metavar="B,T,H,K,V",
                   help="a size of your own (T=1 means decode with a state); may repeat; alone, only "
                   "these sizes run")
    p.add_argument("--modes", type=_choices(MODES), default=list(MODES), metavar="MODES",
                   help=f"comma-separated, among {', '.join(MODES)} (default: both)")
    p.add_argument("--impls", type=_choices(IMPLS), default=None, metavar="IMPLS",
                   help=f"comma-separated, among {', '.join(IMPLS)} (default: pallas and xla on a GPU, "
                   "xla elsewhere)")
    p.add_argument("--sweep-t", action="store_true",
                   help="the crossover with attention: H16 K=V=128 and B*T = 16384 tokens at T = 1k..16k "
                   "(T1K..T16K), against cuDNN flash attention on a GPU")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=20, help="timing samples per case (default 20)")
    p.add_argument("--no-fla", action="store_true", help="skip fla-core even when importable")
    p.add_argument("--gate", action="store_true",
                   help="also the gated (DPLR) rows: chunk+gk, fused_recurrent+gk and fla's "
                   "DPLR kernels with a real gate gk = -softplus(N(0, 1))")
    p.add_argument("--only", default=None,
                   help='regex on "size op impl", e.g. "S2 chunk|fla-dplr64|cudnn"')
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", default=None, metavar="PATH", help="write the results as JSON to PATH")
    out.add_argument("--save", action="store_true",
                     help=f"write the results as JSON to {DEFAULT_OUT_DIR}/<date>-<device>.json")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"argument --reps: expected a positive integer, got {args.reps}")
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as e:
            p.error(f"argument --only: not a regular expression ({e}): {args.only!r}")

    sizes = dict(args.sizes) if args.sizes is not None else (
        {} if (args.size or args.sweep_t) else dict(SIZES))
    if args.sweep_t:
        sizes.update(SWEEP_T)
    for i, dims in enumerate(args.size):
        sizes[f"C{i + 1}"] = dims
    impls = args.impls or (["pallas", "xla"] if has_gpu() else ["xla"])
    dtype = jnp.dtype(args.dtype).type
    device = jax.devices()[0].device_kind
    known = device_peaks(device)
    if known:
        print(f"x floor: time over the floor at {known[0]} peaks ({known[1] / 1e12:.1f} TB/s copy, "
              f"{known[2] / 1e12:.0f} TFLOP/s bf16 matmul, measured on an {known[0]})", flush=True)
    else:
        print(f"no x floor column: peak numbers are recorded only for {', '.join(PEAKS)}, "
              f"not for this device ({device})", flush=True)
    rows = run(sizes, args.modes, impls, dtype, args.reps, fla=not args.no_fla,
               progress=False, log=functools.partial(print, flush=True), only=args.only,
               peaks=known[1:] if known else None, gate=args.gate)
    if not rows:
        print(f"no case matched --only {args.only!r} (it matches \"size op impl\", e.g. "
              f"\"S2 chunk pallas\")" if args.only else "no case to run", file=sys.stderr)
        return 1

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
    path = args.out
    if args.save:
        path = os.path.join(DEFAULT_OUT_DIR, f"{meta['date'][:10]}-{device.replace(' ', '_')}.json")
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(dict(**meta, results=rows), f, indent=1)
    print(f"{meta['date']}  {device}  jax {jax.__version__}  dtype {args.dtype}"
          + (f"  -> {path}" if path else "  (not saved: --out PATH or --save writes JSON)"))
    print(format_table(rows))
    return 0
