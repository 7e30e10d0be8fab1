"""Tuning experiments in one process: each kernel configuration timed through the public op.

    python benchmarks/sweep_configs.py [--only REGEX] [--interpret]

WY kernel: its float32 16x16 block products on FMA units or as 3 tf32 / 3 or 6 bf16 matrix
products, with the diagonal blocks inverted by substitution or recursive doubling (the kernel's
time, the chunk forward's time and error); its warps. Fused recurrence: rows
loaded ahead of the step (`fused_recurrent.PREFETCH`) and the forward V-block / warps at S1-S3;
the decode step at S4 by V-block, next to an XLA copy of the state; the backward's V-block / warps
at S1-S2. The chunk forward with its output separate or fused into the sweep at S1-S3. The K = 200
backward in jnp or on the kernels. Prints one line per case.
(The first session's sweep, recorded in benchmarks/NOTES.md, also tried the chunk state sweep
with prefetching and bf16 state products; both were dropped.)
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


def with_config(fwd_config, bwd_config=None):
    """Patch the fused recurrence's forward / backward (BV, warps); None keeps the default."""
    default = _ORIG_CONFIG

    def cfg(Kp, Vp, backward, pairs=1):
        over = bwd_config if backward else fwd_config
        return default(Kp, Vp, backward, pairs) if over is None else over

    fr._config = cfg


_ORIG_CONFIG = fr._config


def output_mode_cases(impl, sizes):
    """The chunk forward and forward+backward, output separate or fused into the sweep
    (`chunk.FUSE_OUTPUT`, so that `_plan` also picks the matching warps)."""
    for label in ("S1", "S2", "S3"):
        dev, do, h0 = args_for(sizes[label], jnp.bfloat16)
        for fuse, mode in itertools.product((False, True), ("fwd", "fwd_bwd")):
            ck.FUSE_OUTPUT = fuse
            yield (
                f"{label} chunk {mode} fused={fuse}",
                partial(timed, iplr_jax.chunk, impl, dev, do, h0, mode),
            )
    ck.FUSE_OUTPUT = None


def fused_cases(impl, sizes):
    for label in ("S1", "S2", "S3"):
        dev, do, h0 = args_for(sizes[label], jnp.bfloat16)
        configs = [None, (16, 2), (32, 2), (32, 4)]
        for depth, cfg in itertools.product((1, 2), configs):
            fr.PREFETCH = depth
            with_config(cfg)
            name = f"{label} fused fwd prefetch={depth} config={cfg or 'auto'}"
            yield name, partial(timed, iplr_jax.fused_recurrent, impl, dev, do, h0, "fwd")
    fr.PREFETCH = 2
    with_config(None)
    for label in ("S1", "S2"):
        dev, do, h0 = args_for(sizes[label], jnp.bfloat16)
        for cfg in (None, (16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4)):
            with_config(None, cfg)
            name = f"{label} fused fwd+bwd bwd config={cfg or 'auto'}"
            yield name, partial(timed, iplr_jax.fused_recurrent, impl, dev, do, h0, "fwd_bwd")
    with_config(None)
    dev, do, h0 = args_for(sizes["S4"], jnp.bfloat16)
    # what one read and one write of the float32 state cost through XLA, in this process
    yield "S4 decode: XLA copy of the state (h0 + 1)", partial(median_ms, jax.jit(lambda s: s + 1), h0)
    for cfg in (None, (16, 4), (32, 8), (64, 4)):
        with_config(cfg)
        yield (
            f"S4 decode config={cfg or 'auto'}",
            partial(timed, iplr_jax.fused_recurrent, impl, dev, do, h0, "fwd"),
        )
    with_config(None)


def _inv_diag_blocks_doubling(lows):
    """A candidate for `wy_fast._inv_diag_blocks`: (I - L)^{-1} of each strictly lower L
    [16, 16] by recursive doubling instead of 15 substitution steps.

    With D_m the inverse of the block diagonal of I - L at block size m (D_1 = I), the block
    diagonal at size 2m is (I - L_d)(I - D_m L_m), L_m the part of L inside the 2m-blocks but
    outside the m-blocks; D_m L_m is nilpotent of order 2, so D_2m = D_m + D_m L_m D_m: three
    levels of two 16 x 16 dots (D_2 = I + L_1 needs none) instead of a chain of 15 steps of
    cross-lane reductions. On the H100 (2026-11-26, session 4) it lost with HIGHEST (FMA) dots
    and won only with 3-bf16 dots (WY at S2 0.44 -> 0.35 ms), and then a GPU test
    (`test_pallas_medium[None-bfloat16-64]`) did not finish in 200 s: not adopted."""
    wy = importlib.import_module("iplr_jax.wy_fast")
    r = jax.lax.broadcasted_iota(jnp.int32, (wy.SUB, wy.SUB), 0)
    c = jax.lax.broadcasted_iota(jnp.int32, (wy.SUB, wy.SUB), 1)
    eye = (r == c).astype(jnp.float32)
    # same 2m-block, different m-block; bit masks, since m is a power of two
    level = lambda low, m: wy._mask(((r & -2 * m) == (c & -2 * m)) & ((r & m) != (c & m)), low)
    out = []
    for low in lows:
        d = eye + level(low, 1)
        for m in (2, 4, 8):
            d = d + wy._dot(d, wy._dot(level(low, m), d, wy.X_PRECISION), wy.X_PRECISION)
        out.append(d)
    return out


def wy_precision_cases(impl, sizes):
    """The WY kernel's float32 16 x 16 products (`wy_fast.X_PRECISION`) on FMA units (HIGHEST,
    Triton's "ieee") or on the matrix units as 3 tf32 / 3 or 6 bf16 products, with either
    diagonal inverse: the WY kernel's time, the chunk forward's time and its relative error
    against the float32 chunked form at HIGHEST precision on the same bf16 inputs (for bf16 and
    for float32 kernel inputs: the second shows the products' own rounding)."""
    wy = importlib.import_module("iplr_jax.wy_fast")
    P = jax.lax.DotAlgorithmPreset
    default_inv, default_prec = wy._inv_diag_blocks, wy.X_PRECISION
    combos = [
        ("substitution", jax.lax.Precision.HIGHEST), ("substitution", P.TF32_TF32_F32_X3),
        ("substitution", P.BF16_BF16_F32_X3), ("substitution", P.BF16_BF16_F32_X6),
        ("doubling", P.TF32_TF32_F32_X3), ("doubling", P.BF16_BF16_F32_X3),
    ]
    for label in ("S1", "S2", "S3"):
        dev, do, h0 = args_for(sizes[label], jnp.bfloat16)
        B, T, H, K = dev[0].shape
        flat = [x.reshape(1, B * T, H, -1) for x in (dev[3], dev[4], dev[1], dev[2])]
        ref = {}  # computed once per size, and only when a chunk case runs

        for method, prec in combos:
            wy._inv_diag_blocks = default_inv if method == "substitution" else _inv_diag_blocks_doubling
            wy.X_PRECISION = prec
            f = jax.jit(partial(
                wy.wy_fwd, chunk_size=64, out_dtype=jnp.bfloat16, with_x=True,
                interpret=impl == "interpret",
            ))
            tag = f"{method} {getattr(prec, 'name', prec)}"
            yield f"{label} wy_fwd {tag}", partial(median_ms, f, *flat)

            def run(dev=dev, do=do, h0=h0, ref=ref):
                if not ref:
                    with jax.default_matmul_precision("highest"):
                        ref[0], _ = jax.jit(lambda *a: iplr_jax.chunk(*a, implementation="xla"))(
                            *(x.astype(jnp.float32) for x in dev)
                        )
                t_fwd = timed(iplr_jax.chunk, impl, dev, do, h0, "fwd")
                errs = []
                for dt in (jnp.bfloat16, jnp.float32):
                    o, _ = jax.jit(lambda *a: iplr_jax.chunk(*a, implementation=impl))(
                        *(x.astype(dt) for x in dev)
                    )
                    diff = o.astype(jnp.float32) - ref[0]
                    errs.append(float(jnp.linalg.norm(diff.ravel()) / jnp.linalg.norm(ref[0].ravel())))
                return f"{t_fwd:9.3f}  rel. error bf16 {errs[0]:.2e} f32 {errs[1]:.2e}"

            yield f"{label} chunk fwd wy {tag}", run
    wy._inv_diag_blocks, wy.X_PRECISION = default_inv, default_prec


def kp256_bwd_cases(impl, sizes):
    """K = 200 forward+backward with the backward in jnp (the default above Kp 128) or on the
    kernels (`chunk_bwd.KERNEL_MAX_KP = 256`), bf16 and float32. On the H100 the float32 kernels
    asked for 384 KB of shared memory (227 KB there); bf16 has not been tried. Prints the time,
    or the failure, and the kernels' largest gradient error against the jnp backward's."""
    cb = importlib.import_module("iplr_jax.chunk_bwd")
    size = dict(B=1, T=8192, H=8, K=200, V=200) if impl == "pallas" else dict(B=1, T=128, H=1, K=200, V=40)
    for dt in (jnp.bfloat16, jnp.float32):
        dev, do, h0 = args_for(size, dt)

        def grads(dev, do, h0):  # a new function per call: jit caches by function
            run = lambda *x: iplr_jax.chunk(*x, initial_state=h0, implementation=impl)[0]
            return jax.jit(lambda *a: jax.vjp(run, *a)[1](do))(*dev)

        def run(dev=dev, do=do, h0=h0):
            cb.KERNEL_MAX_KP = 128
            g_jnp = grads(dev, do, h0)
            t_jnp = timed(iplr_jax.chunk, impl, dev, do, h0, "fwd_bwd")
            cb.KERNEL_MAX_KP = 256
            try:
                g = grads(dev, do, h0)
                t = timed(iplr_jax.chunk, impl, dev, do, h0, "fwd_bwd")
            finally:
                cb.KERNEL_MAX_KP = 128
            err = max(
                float(jnp.linalg.norm((x - r).astype(jnp.float32)) / jnp.linalg.norm(r.astype(jnp.float32)))
                for x, r in zip(g, g_jnp, strict=True)
            )
            return f"jnp backward {t_jnp:8.3f}  kernels {t:8.3f}  max rel. diff of grads {err:.1e}"

        yield f"kp256 bwd B{size['B']} T{size['T']} H{size['H']} K200 {jnp.dtype(dt).name}", run


def wy_args(size):
    """a, b, k, v of a bench size on the flat [1, B * T, H, D] layout `wy_fast.wy_fwd` takes."""
    (q, k, v, a, b), _, _ = args_for(size, jnp.bfloat16)
    B, T, H, _ = q.shape
    return [x.reshape(1, B * T, H, -1) for x in (a, b, k, v)]


def wy_warps_cases(impl, sizes):
    """The WY kernel alone, by warps: its substitution reduces over 16 x 16 tiles, which stay
    inside one warp only with few warps; its [16, Kp] products want more."""
    wy = importlib.import_module("iplr_jax.wy_fast")
    default = wy._warps
    for label in ("S1", "S2"):
        flat = wy_args(sizes[label])
        for warps, with_x in itertools.product((1, 2, 4, 8), (False, True)):
            wy._warps = lambda Kp, w=warps: w
            f = jax.jit(
                partial(
                    wy.wy_fwd,
                    chunk_size=64,
                    out_dtype=jnp.bfloat16,
                    with_x=with_x,
                    interpret=impl == "interpret",
                )
            )
            yield f"{label} wy_fwd warps={warps} with_x={with_x}", partial(median_ms, f, *flat)
    wy._warps = default


def _wy_reference(flat, rows):
    """W, U in float64 (numpy) for the first `rows` rows of the flat [1, L, H, D] a, b, k, v."""
    a, b, k, v = (np.asarray(t[0, :rows].astype(jnp.float32), np.float64) for t in flat)
    C, H = 64, a.shape[1]
    ch = lambda t: t.reshape(rows // C, C, H, -1).transpose(0, 2, 1, 3)
    a, b, k, v = map(ch, (a, b, k, v))
    X = np.linalg.inv(np.eye(C) - np.tril(a @ b.swapaxes(-1, -2), -1))
    return X @ a, X @ np.tril(a @ k.swapaxes(-1, -2), -1) @ v


def wy_error_cases(impl, sizes):
    """The WY kernel alone with its float32 block products at HIGHEST or as 3 tf32 products:
    time, and W and U (float32 out) against float64 on the first 64 chunks. (The fifth session
    also tried U = X (L V) instead of (X L) V: no faster with 3 tf32 products, S2 0.372 against
    0.373 ms, and U's error 3.5e-4 against 2.1e-4.)"""
    wy = importlib.import_module("iplr_jax.wy_fast")
    default_prec = wy.X_PRECISION
    for label in ("S1", "S2"):
        flat = wy_args(sizes[label])
        _, L, H, _ = flat[0].shape
        rows = min(64 * 64, L)
        ref = _wy_reference(flat, rows)
        for prec in (jax.lax.Precision.HIGHEST, jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3):
            wy.X_PRECISION = prec
            kw = dict(chunk_size=64, interpret=impl == "interpret")
            f = jax.jit(partial(wy.wy_fwd, out_dtype=jnp.bfloat16, **kw))

            def run(f=f, flat=flat, ref=ref, rows=rows, kw=kw, H=H):
                t = median_ms(f, *flat)
                w, u = jax.jit(partial(wy.wy_fwd, **kw))(*flat)
                ch = lambda t_: np.asarray(t_[0, :rows], np.float64).reshape(rows // 64, 64, H, -1)
                err = [
                    np.linalg.norm(ch(g).transpose(0, 2, 1, 3) - r) / np.linalg.norm(r)
                    for g, r in zip((w, u), ref, strict=True)
                ]
                return f"{t:8.3f}  W, U (f32 out) vs float64 {err[0]:.1e} {err[1]:.1e}"

            yield f"{label} wy_fwd {getattr(prec, 'name', prec)}", run
    wy.X_PRECISION = default_prec


def output_kernel_cases(impl, sizes):
    """The chunk output kernel alone by (V-block, warps), with incl(Q B^T) V2 in float32 (tf32)
    or in the inputs' dtype (`low_v2`, fla's choice), v_new read as float32 or bf16; the largest
    relative difference of the output from the default configuration's."""
    for label in ("S1", "S2", "S3"):
        (q, k, v, a, b), _, _ = args_for(sizes[label], jnp.bfloat16)
        B, T, H, K = q.shape
        V, N = v.shape[-1], B
        h0 = jnp.zeros((B, H, K, V), jnp.float32)
        flat = [x.reshape(1, B * T, H, -1) for x in (q, k, v, a, b)]
        cu = jnp.arange(N + 1, dtype=jnp.int32) * (T // 64)
        kw = dict(scale=K**-0.5, chunk_size=64, interpret=impl == "interpret")
        _, _, res = jax.jit(partial(ck.chunk_fwd, **kw))(*flat, h0, cu)
        qf, kf, vf, _, bf = flat
        base = {}
        for bv, warps, low, vn16 in (
            (64, None, False, False), (64, 8, False, False), (128, 8, False, False), (128, 4, False, False),
            (32, 4, False, False), (64, None, True, False), (64, None, True, True),
            (128, 8, True, True), (128, 4, True, True),
        ):
            if bv > V:
                continue
            vn = res.v_new.astype(jnp.bfloat16) if vn16 else res.v_new
            f = jax.jit(partial(ck.output_fwd, block_v=bv, warps=warps, low_v2=low, **kw))

            def run(f=f, args=(qf, kf, bf, vf, vn, res.h), base=base):
                t = median_ms(f, *args)
                o = f(*args).astype(jnp.float32)
                if not base:
                    base[0] = o
                d = float(jnp.linalg.norm((o - base[0]).ravel()) / jnp.linalg.norm(base[0].ravel()))
                return f"{t:8.3f}  rel. diff from the first {d:.1e}"

            yield f"{label} output kernel BV={bv} warps={warps or 'auto'} low_v2={low} v_new bf16={vn16}", run


def low_precision_error(impl, sizes):
    """Relative error of the bf16 chunk forward against the float32 chunked form at HIGHEST
    precision on the same (bf16-rounded) inputs, with the WY block products at HIGHEST or as 3
    tf32 products (`wy_fast.X_PRECISION`) and the output's incl(Q B^T) V2 at float32 or bf16
    (`chunk.LOW_PRECISION_V2`)."""
    wy = importlib.import_module("iplr_jax.wy_fast")
    default_prec, default_low = wy.X_PRECISION, ck.LOW_PRECISION_V2
    rel = lambda x, r: float(jnp.linalg.norm((x.astype(jnp.float32) - r).ravel()) / jnp.linalg.norm(r))
    for label in ("S2", "S3"):
        dev, _, _ = args_for(sizes[label], jnp.bfloat16)
        f32 = [x.astype(jnp.float32) for x in dev]
        with jax.default_matmul_precision("highest"):
            ref, _ = jax.jit(lambda *a: iplr_jax.chunk(*a, implementation="xla"))(*f32)
        for prec, low in ((jax.lax.Precision.HIGHEST, False), (default_prec, False), (default_prec, True)):
            wy.X_PRECISION, ck.LOW_PRECISION_V2 = prec, low
            o, _ = jax.jit(lambda *a: iplr_jax.chunk(*a, implementation=impl))(*dev)
            tag = f"wy {getattr(prec, 'name', prec)} low_v2={low}"
            yield f"{label} chunk fwd {tag}: rel. error {rel(o, ref):.2e}"
    wy.X_PRECISION, ck.LOW_PRECISION_V2 = default_prec, default_low


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
    if re.search(args.only, "rel. error"):
        for line in low_precision_error(impl, sizes):
            print(line, flush=True)
    for name, run in itertools.chain(
        wy_error_cases(impl, sizes), output_kernel_cases(impl, sizes),
        wy_precision_cases(impl, sizes), output_mode_cases(impl, sizes), kp256_bwd_cases(impl, sizes),
        wy_warps_cases(impl, sizes),
        fused_cases(impl, sizes),
    ):
        if re.search(args.only, name):
            try:
                r = run()
                print(f"{name:62} {r:9.3f}" if isinstance(r, float) else f"{name:50} {r}", flush=True)
            except Exception as e:  # a configuration that does not compile: say so, go on
                print(f"{name:62}   failed: {type(e).__name__}: {str(e)[:120]}", flush=True)


if __name__ == "__main__":
    main()
