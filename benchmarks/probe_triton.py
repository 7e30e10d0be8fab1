"""Probe: does the Pallas Triton backend here lower what the kernels rely on?

A fori_loop whose bounds are loaded from an int32 ref, dynamic pl.ds slices, bf16 dots with
float32 accumulation, a float32 dot at HIGHEST precision, and iota masks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

C, K, V = 64, 128, 64


def kernel(cu_ref, x_ref, w_ref, o_ref, s_ref):
    n = pl.program_id(0)
    lo, hi = cu_ref[n], cu_ref[n + 1]
    w = w_ref[...]

    def body(c, s):
        x = x_ref[pl.ds(c * C, C), :]  # [C, K] bf16
        y = jnp.dot(x, w, preferred_element_type=jnp.float32)  # [C, V]
        r = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
        m = jnp.where(r > col, jnp.dot(x, x.T, preferred_element_type=jnp.float32), 0.0)
        y = y + jnp.dot(m, y, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        o_ref[pl.ds(c * C, C), :] = y.astype(o_ref.dtype)
        return s + jnp.sum(y, axis=0)

    s = jax.lax.fori_loop(lo, hi, body, jnp.zeros((V,), jnp.float32))
    s_ref[...] = s


def run(x, w, cu, interpret=False):
    N = cu.shape[0] - 1
    L = x.shape[0]
    return pl.pallas_call(
        kernel,
        grid=(N,),
        in_specs=[
            pl.BlockSpec((N + 1,), lambda n: (0,)),
            pl.BlockSpec((L, K), lambda n: (0, 0)),
            pl.BlockSpec((K, V), lambda n: (0, 0)),
        ],
        out_specs=[pl.BlockSpec((L, V), lambda n: (0, 0)), pl.BlockSpec((None, V), lambda n: (n, 0))],
        out_shape=[jax.ShapeDtypeStruct((L, V), jnp.float32), jax.ShapeDtypeStruct((N, V), jnp.float32)],
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(cu, x, w)


def ref(x, w, cu):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    o = np.zeros((x.shape[0], V))
    s = np.zeros((len(cu) - 1, V))
    for n in range(len(cu) - 1):
        for c in range(cu[n], cu[n + 1]):
            xc = x[c * C : (c + 1) * C]
            y = xc @ w
            y = y + np.tril(xc @ xc.T, -1) @ y
            o[c * C : (c + 1) * C] = y
            s[n] += y.sum(0)
    return o, s


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    cu = np.array([0, 3, 3, 7, 8], np.int32)
    x = jnp.asarray(rng.standard_normal((8 * C, K)) / 16, jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((K, V)) / 16, jnp.bfloat16)
    interpret = jax.default_backend() != "gpu"
    f = jax.jit(functools.partial(run, interpret=interpret))
    o, s = f(x, w, jnp.asarray(cu))
    ro, rs = ref(x, w, cu)
    eo = np.linalg.norm(np.asarray(o) - ro) / np.linalg.norm(ro)
    es = np.linalg.norm(np.asarray(s) - rs) / np.linalg.norm(rs)
    print(f"probe: jax {jax.__version__} backend {jax.default_backend()} rel err o {eo:.2e} s {es:.2e}")
    assert eo < 1e-2 and es < 1e-2
