"""A candidate for the WY preprocessing in two kernels (fla's split), to time against `wy_fwd`.

    python benchmarks/wy_split.py --check      # interpreter, against wy_fwd and float64 (CPU)
    python benchmarks/wy_split.py              # on the GPU: the variants at S1-S3, ~2 min

`wy_fast.wy_fwd` does everything for a chunk in one program on 2 warps: the inverse wants few
warps (its substitution reduces across 16 x 16 tiles), the [C, Kp] products want more, and at
Kp = 128 the program spills (`triton_stats.py`). Here:

1. `_x_kernel` (2 warps): X = (I - strict(A B^T))^{-1} blockwise as in `wy_fwd`, written to HBM
   (the backward reads X anyway when the forward keeps residuals).
2. `_wu_kernel` (`WU_WARPS`): W = X A, P = X strict(A K^T), U = P V as whole-chunk dots.

The price is a round trip of X (4 C bytes per token and head: 67 MB at S2, about 0.05 ms) and a
second read of A. Not measured yet (benchmarks/NOTES.md, "Next GPU session").
"""

from __future__ import annotations

import argparse
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

wy = importlib.import_module("iplr_jax.wy_fast")
_F32 = jnp.float32
WU_WARPS = 8  # `_wu_kernel`'s warps
# P = X strict(A K^T) as one 64 x 64 x 64 float32 product: at HIGHEST (FMA) the W/U kernel spills
# on 4 and 8 warps (`triton_stats.py`); as three tf32 products (about float32 accuracy, on the
# matrix units) it does not. The CPU has no tf32: the interpreter uses HIGHEST.
P_PRECISION = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _x_kernel(a_ref, b_ref, x_ref):
    C = a_ref.shape[0]
    nb = C // wy.SUB
    r = jax.lax.broadcasted_iota(jnp.int32, (wy.SUB, wy.SUB), 0)
    strict = r > jax.lax.broadcasted_iota(jnp.int32, (wy.SUB, wy.SUB), 1)
    rows = lambda ref, i: ref[pl.ds(i * wy.SUB, wy.SUB), :]
    m = {}
    for i in range(nb):
        a_i = rows(a_ref, i)
        for j in range(i + 1):
            m[i, j] = wy._input_dot_nt(a_i, rows(b_ref, j))
        m[i, i] = wy._mask(strict, m[i, i])
    wy._store_lower(x_ref, wy._inverse_blocks(m, nb), nb)


def _wu_kernel(x_ref, a_ref, k_ref, v_ref, w_ref, u_ref, *, block_v, p_precision):
    C = a_ref.shape[0]
    x, a = x_ref[...], a_ref[...]
    w_ref[...] = wy._dot(x, a.astype(_F32)).astype(w_ref.dtype)
    strict = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0) > jax.lax.broadcasted_iota(
        jnp.int32, (C, C), 1
    )
    p = wy._dot(x, wy._mask(strict, wy._input_dot_nt(a, k_ref[...])), p_precision)
    for vb in range(v_ref.shape[-1] // block_v):
        cols = pl.ds(vb * block_v, block_v)
        u_ref[:, cols] = wy._dot(p, v_ref[:, cols].astype(_F32)).astype(u_ref.dtype)


def wy_fwd_split(a, b, k, v, *, chunk_size, out_dtype=None, with_x=False, interpret=False):
    """Same arguments and results as `wy_fast.wy_fwd`."""
    _, L, H, Kp = a.shape
    Vp = v.shape[-1]
    C = chunk_size
    out_dtype = _F32 if out_dtype is None else out_dtype
    kspec = pl.BlockSpec((None, C, None, Kp), lambda c, h: (0, c, h, 0))
    vspec = pl.BlockSpec((None, C, None, Vp), lambda c, h: (0, c, h, 0))
    xspec = pl.BlockSpec((None, None, C, C), lambda c, h: (c, h, 0, 0))
    x = pl.pallas_call(
        _x_kernel,
        grid=(L // C, H),
        in_specs=[kspec, kspec],
        out_specs=xspec,
        out_shape=jax.ShapeDtypeStruct((L // C, H, C, C), _F32),
        compiler_params=pltr.CompilerParams(num_warps=2, num_stages=1),
        interpret=interpret,
        name="iplr_wy_x",
    )(a, b)
    w, u = pl.pallas_call(
        functools.partial(
            _wu_kernel, block_v=min(Vp, 64), p_precision=wy.X_PRECISION if interpret else P_PRECISION
        ),
        grid=(L // C, H),
        in_specs=[xspec, kspec, kspec, vspec],
        out_specs=[kspec, vspec],
        out_shape=[
            jax.ShapeDtypeStruct((1, L, H, Kp), out_dtype),
            jax.ShapeDtypeStruct((1, L, H, Vp), out_dtype),
        ],
        compiler_params=pltr.CompilerParams(num_warps=WU_WARPS, num_stages=1),
        interpret=interpret,
        name="iplr_wy_wu",
    )(x, a, k, v)
    return (w, u, x) if with_x else (w, u)


def check():
    """Interpreter: the split against `wy_fwd` (float32 inputs) and X against float64."""
    rng = np.random.default_rng(0)
    for C, Kp, Vp in ((16, 32, 16), (32, 64, 128), (64, 128, 64)):
        L, H = 2 * C, 2
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
        a = unit(rng.standard_normal((1, L, H, Kp)))
        b = -rng.uniform(0.05, 1.95, (1, L, H, 1)) * a
        k = unit(rng.standard_normal((1, L, H, Kp)))
        v = rng.standard_normal((1, L, H, Vp))
        args = [jnp.asarray(t, _F32) for t in (a, b, k, v)]
        ref = wy.wy_fwd(*args, chunk_size=C, with_x=True, interpret=True)
        got = wy_fwd_split(*args, chunk_size=C, with_x=True, interpret=True)
        for name, g, r in zip("WUX", got, ref, strict=True):
            err = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
            assert err < 1e-5, (C, Kp, Vp, name, err)
        A, B = (np.asarray(t, np.float64)[0].reshape(L // C, C, H, -1).transpose(0, 2, 1, 3) for t in (a, b))
        X = np.linalg.inv(np.eye(C) - np.tril(A @ B.swapaxes(-1, -2), -1))
        err = np.linalg.norm(np.asarray(got[2], np.float64) - X) / np.linalg.norm(X)
        assert err < 1e-5, (C, Kp, Vp, "X vs float64", err)
        print(f"C {C} Kp {Kp} Vp {Vp}: split == wy_fwd, X vs float64 {err:.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="interpreter check on CPU, then exit")
    if p.parse_args().check:
        return check()
    from profile_kernels import median_ms
    from sweep_configs import args_for, timed

    import iplr_jax
    from iplr_jax.bench import SIZES

    ck = importlib.import_module("iplr_jax.chunk")
    global WU_WARPS, P_PRECISION
    variants = [  # (name, wy function, W/U warps, P precision)
        ("one kernel", wy.wy_fwd, None, None),
        ("split 8w HIGHEST", wy_fwd_split, 8, jax.lax.Precision.HIGHEST),
        ("split 4w tf32x3", wy_fwd_split, 4, P_PRECISION),
        ("split 8w tf32x3", wy_fwd_split, 8, P_PRECISION),
    ]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, median ms", flush=True)
    for label in ("S1", "S2", "S3"):
        dev, do, h0 = args_for(SIZES[label], jnp.bfloat16)
        B, T, H, _ = dev[0].shape
        flat = [t.reshape(1, B * T, H, -1) for t in (dev[3], dev[4], dev[1], dev[2])]
        ref = None
        for name, fn, warps, prec in variants:
            WU_WARPS, P_PRECISION = warps or WU_WARPS, prec or P_PRECISION
            f = jax.jit(functools.partial(fn, chunk_size=64, out_dtype=jnp.bfloat16, with_x=True))
            line = f"{label} {name:17} wy {median_ms(f, *flat):7.3f}"
            # W and U in float32 against the one-kernel version on the same inputs
            wu = jax.jit(functools.partial(fn, chunk_size=64))(*flat)
            if ref is None:
                ref = wu
            else:
                rel = lambda g, r: float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
                errs = [rel(g, r) for g, r in zip(wu, ref, strict=True)]
                line += f"  W, U vs one kernel {errs[0]:.1e} {errs[1]:.1e}"
            ck.wy_fwd = fn
            modes = ("fwd", "fwd_bwd") if label == "S2" else ("fwd",)
            for mode in modes:
                line += f"  chunk {mode} {timed(iplr_jax.chunk, 'pallas', dev, do, h0, mode):7.3f}"
            ck.wy_fwd = wy.wy_fwd
            print(line, flush=True)

if __name__ == "__main__":
    main()
