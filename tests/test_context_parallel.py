"""Context parallelism (`iplr_jax.context_parallel.chunk_cp`) on simulated CPU devices.

Every case compares the sharded op inside `jax.shard_map` with the single-device
`iplr_jax.chunk` (same implementation) on the whole sequence: the output, the final states and
the gradients of a random linear functional of both w.r.t. q, k, v, a, b and the initial state.

Every implementation runs inside `shard_map` with the default `check_vma=True`.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CHUNK_IMPLS
from helpers import make_inputs, reference, rel_err
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import iplr_jax
from iplr_jax.context_parallel import chunk_cp

C = 16  # chunk size of every case
# float32 rounding (the fold reassociates the state's sums); on a GPU the kernels' float32
# products, interpreted or compiled, run as tf32 (docs/numerics.md)
TOL = 1e-4 if jax.default_backend() == "cpu" else 2e-3
# XLA's CPU backend at -O0 compiles these small programs about twice as fast; the tests are
# compile-bound (each case compiles a forward+backward of `chunk` or `chunk_cp`)
FAST = {"xla_backend_optimization_level": 0}


def _mesh(shape, names, gpu=False):
    """A mesh of simulated CPU devices, or with `gpu` of the machine's GPUs (compiled kernels)."""
    n = int(np.prod(shape))
    devices = jax.devices() if gpu else jax.devices("cpu")
    if len(devices) < n:
        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return Mesh(np.array(devices[:n]).reshape(shape), names)


def _loss(o, ht, seed=0):
    r = jax.random.normal(jax.random.PRNGKey(seed), o.shape, jnp.float32)
    out = jnp.sum(o.astype(jnp.float32) * r)
    if ht is not None:
        r2 = jax.random.normal(jax.random.PRNGKey(seed + 1), ht.shape, jnp.float32)
        out = out + jnp.sum(ht * r2)
    return out


def _run(fn, q, k, v, a, b, h0, cu):
    """(o, final, grads of q, k, v, a, b[, h0]) of fn(q, k, v, a, b, h0, cu), all under jit."""
    nargs = 5 if h0 is None else 6

    def loss(*xs):
        xs = list(xs) + [None] * (6 - len(xs))
        o, ht = fn(*xs, cu)
        return _loss(o, ht), (o, ht)

    g, (o, ht) = jax.jit(
        jax.grad(loss, argnums=tuple(range(nargs)), has_aux=True), compiler_options=FAST
    )(q, k, v, a, b, *([] if h0 is None else [h0]))
    return o, ht, g


def _reference(impl, inputs, h0, cu, final):
    def ref(q, k, v, a, b, h0, cu_):
        return iplr_jax.chunk(
            q, k, v, a, b, initial_state=h0, cu_seqlens=cu_, output_final_state=final,
            chunk_size=C, implementation=impl,
        )

    return _run(ref, *inputs, h0, None if cu is None else jnp.asarray(cu, jnp.int32))


def _check(impl, mesh, inputs, h0, *, cu=None, specs, final=True, cp_kw=None, cu_traced=True,
           want=None):
    """Compare chunk_cp inside shard_map over `mesh` with the single-device chunk (`want`, the
    `_reference` result, computed here when not given).

    specs: (spec of q/k/v/a/b, spec of the states) over `mesh`; T is sharded over "sp".
    """
    x_spec, s_spec = specs
    cp_kw = cp_kw or {}
    cu_arr = None if cu is None else jnp.asarray(cu, jnp.int32)

    def local(q, k, v, a, b, h0, cu_):
        if cu is not None and not cu_traced:
            cu_ = np.asarray(cu, np.int32)  # concrete offsets closed over: validated in Python
        return chunk_cp(
            q, k, v, a, b, axis_name="sp", initial_state=h0, cu_seqlens=cu_,
            output_final_state=final, chunk_size=C, implementation=impl, **cp_kw,
        )

    def sharded(q, k, v, a, b, h0, cu_):
        in_specs = (x_spec,) * 5 + (None if h0 is None else s_spec, None if cu_ is None else P())
        return jax.shard_map(
            local, mesh=mesh, in_specs=in_specs,
            out_specs=(x_spec, s_spec if final else None),
            check_vma=True,
        )(q, k, v, a, b, h0, cu_)

    o, ht, g = _run(sharded, *inputs, h0, cu_arr)
    o_r, ht_r, g_r = want if want is not None else _reference(impl, inputs, h0, cu, final)
    assert rel_err(o, o_r) < TOL, ("o", rel_err(o, o_r))
    if final:
        assert rel_err(ht, ht_r) < TOL, ("final", rel_err(ht, ht_r))
    else:
        assert ht is None
    assert len(g) == len(g_r) == (5 if h0 is None else 6)
    for name, x, y in zip("q k v a b h0".split(), g, g_r, strict=False):
        assert rel_err(x, y) < TOL, (f"d{name}", rel_err(x, y))


IMPLS = ["xla", "interpret"]
SP = (P(None, "sp"), P())
# (devices, exchange, combine) per implementation: each device count also exercises another
# exchange; "rerun" (two chunk calls, the slowest to compile) once per implementation
CASES = [(2, "allgather", "linear"), (4, "scan", "linear"), (8, "allgather", "linear")]
RERUN = [(2, "allgather", "rerun"), (4, "scan", "linear"), (8, "allgather", "linear")]


@pytest.mark.parametrize("impl", IMPLS)
def test_cp_initial_state(rng, impl):
    """B = 2 sequences over 2, 4 and 8 devices (T per device 48, 24 and 12: the last two not
    multiples of the chunk), with an initial state and the final state."""
    inputs, h0 = make_inputs(rng, 2, 96, 2, 16, 8)
    want = _reference(impl, inputs, h0, None, True)
    for n_dev, exchange, combine in RERUN if impl == "xla" else CASES:
        _check(
            impl, _mesh((n_dev,), ("sp",)), inputs, h0, specs=SP, want=want,
            cp_kw=dict(exchange=exchange, combine=combine),
        )


# N = 8 packed sequences in T = 96, empty ones at 0, 30 and 96. Device boundaries at
# 48 (2 devices); 24, 48, 72 (4); 16, 32, ... (6); every 12 (8). [30, 61) straddles 48; with 8
# devices [7, 30) spans devices 0-2 and [30, 61) devices 2-5, [61, 72) lies inside device 5 and
# ends on a boundary, [72, 96) starts on one.
PACKED = [0, 0, 7, 30, 30, 61, 72, 96, 96]


@pytest.mark.parametrize("impl", IMPLS)
def test_cp_packed(rng, impl):
    """Packed sequences straddling device boundaries over 2, 4 and 8 devices; traced global
    offsets."""
    inputs, h0 = make_inputs(rng, 1, 96, 2, 16, 8, N=len(PACKED) - 1)
    want = _reference(impl, inputs, h0, PACKED, True)
    for n_dev, exchange, combine in RERUN if impl == "interpret" else CASES:
        _check(
            impl, _mesh((n_dev,), ("sp",)), inputs, h0, cu=PACKED, specs=SP, want=want,
            cp_kw=dict(exchange=exchange, combine=combine),
        )


def test_cp_packed_concrete_offsets_no_initial_state(rng):
    """cu_seqlens closed over (checked in Python) instead of traced; no initial state; the scan
    over 6 devices (not a power of two)."""
    inputs, _ = make_inputs(rng, 1, 96, 2, 16, 8, h0=False)
    _check(
        "xla", _mesh((6,), ("sp",)), inputs, None, cu=PACKED, specs=SP, cu_traced=False,
        cp_kw=dict(exchange="scan"),
    )


@pytest.mark.parametrize("impl,other", [("xla", "heads"), ("interpret", "batch")])
def test_cp_second_mesh_axis(rng, impl, other):
    """T over "sp" (4 devices) while a second axis (2 devices) shards heads (packed sequences,
    initial and final states) or batch (no initial state, no final state)."""
    if other == "heads":
        mesh = _mesh((2, 4), ("hp", "sp"))
        inputs, h0 = make_inputs(rng, 1, 96, 4, 16, 8, N=len(PACKED) - 1)
        _check(impl, mesh, inputs, h0, cu=PACKED, specs=(P(None, "sp", "hp"), P(None, "hp")))
    else:
        mesh = _mesh((2, 4), ("bp", "sp"))
        inputs, _ = make_inputs(rng, 2, 72, 2, 16, 16, h0=False)
        _check(impl, mesh, inputs, None, specs=(P("bp", "sp"), P("bp")), final=False)


def test_cp_float64_matches_naive(rng):
    """float64 inputs (the xla path computes in float64): the packed forward over 8 devices
    equals the float64 recurrence to 1e-10, so the method itself adds no error beyond rounding."""
    inputs, h0 = make_inputs(rng, 1, 96, 2, 16, 8, N=len(PACKED) - 1, dtype=jnp.float64)
    cu = jnp.asarray(PACKED, jnp.int32)
    f = lambda q, k, v, a, b, h0, cu: chunk_cp(
        q, k, v, a, b, axis_name="sp", initial_state=h0, output_final_state=True, cu_seqlens=cu,
        chunk_size=C, implementation="xla",
    )
    o, ht = jax.jit(
        jax.shard_map(
            f, mesh=_mesh((8,), ("sp",)), in_specs=(P(None, "sp"),) * 5 + (P(), P()),
            out_specs=(P(None, "sp"), P()),
        ),
        compiler_options=FAST,
    )(*inputs, h0, cu)
    o_r, ht_r = reference(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.dtype == jnp.float64
    assert rel_err(o, o_r) < 1e-10 and rel_err(ht, ht_r) < 1e-10, (rel_err(o, o_r), rel_err(ht, ht_r))


COLLECTIVES = "all_gather|all_reduce|collective_permute|reduce_scatter|all_to_all"


def _collectives(T, exchange, packed):
    """The collectives of the lowered forward+backward over 4 devices: (op, operand types)."""
    mesh = _mesh((4,), ("sp",))
    H, K, V = 2, 16, 8
    N = len(PACKED) - 1 if packed else 1
    cu = jnp.asarray([0] + [x * T // 96 for x in PACKED[1:]], jnp.int32) if packed else None
    xs = [jax.ShapeDtypeStruct((1, T, H, K), jnp.float32)] * 5
    xs[2] = jax.ShapeDtypeStruct((1, T, H, V), jnp.float32)
    h0 = jax.ShapeDtypeStruct((N, H, K, V), jnp.float32)

    def fwd(q, k, v, a, b, h0):
        f = lambda q, k, v, a, b, h0, cu: chunk_cp(
            q, k, v, a, b, axis_name="sp", initial_state=h0, output_final_state=True,
            cu_seqlens=cu, chunk_size=C, implementation="xla", exchange=exchange,
        )
        return jax.shard_map(
            f, mesh=mesh, in_specs=(P(None, "sp"),) * 5 + (P(), None if cu is None else P()),
            out_specs=(P(None, "sp"), P()),
        )(q, k, v, a, b, h0, cu)

    def fwd_bwd(*args):
        return jax.grad(lambda *xs: _loss(*fwd(*xs)), argnums=tuple(range(6)))(*args)

    text = jax.jit(fwd_bwd).lower(*xs, h0).as_text()
    ops, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        m = re.search(rf'"stablehlo\.({COLLECTIVES})"', line)
        if m:  # the operand types follow on this line, or on the line closing the op's region
            j = i
            while "}> : (" not in lines[j] and not lines[j].strip().startswith("}) : ("):
                j += 1
            ops.append((m.group(1), lines[j].split(" : (", 1)[1].split(")")[0]))
    return sorted(ops)


@pytest.mark.parametrize("exchange,packed", [("allgather", True), ("scan", False)])
def test_cp_exchanged_bytes_independent_of_t(exchange, packed):
    """The collectives of the forward+backward (ops and operand shapes, from the lowered
    program) are the same at T = 96 and T = 384: nothing of size T crosses devices."""
    small, large = (_collectives(T, exchange, packed) for T in (96, 384))
    ops = {op for op, _ in small}
    assert ops >= ({"all_gather"} if exchange == "allgather" else {"collective_permute"}), small
    assert "all_reduce" in ops, small  # the final state's psum
    assert small == large


def test_cp_validation():
    mesh = _mesh((2,), ("sp",))
    x = jnp.zeros((1, 32, 1, 16))

    def call(**kw):
        f = lambda x: chunk_cp(x, x, x, x, x, axis_name="sp", implementation="xla", **kw)[0]
        return jax.shard_map(f, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))(x)

    with pytest.raises(ValueError, match="exchange"):
        call(exchange="ring")
    with pytest.raises(ValueError, match="combine"):
        call(combine="twice")
    with pytest.raises(ValueError, match="global non-decreasing offsets"):
        call(cu_seqlens=np.array([0, 10, 16], np.int32))  # the local T, not the global one
    with pytest.raises(ValueError, match="initial_state"):
        call(initial_state=jnp.zeros((2, 1, 16, 16)))


def test_chunk_sequence_axis(rng):
    """`iplr_jax.chunk(..., sequence_axis=...)` is the context-parallel op: packed sequences
    straddling the two devices' boundary, an initial state, the final states."""
    mesh = _mesh((2,), ("sp",))
    cu = np.array([0, 20, 40, 64], np.int32)
    inputs, h0 = make_inputs(rng, 1, 64, 2, 16, 16, N=3)

    def local(q, k, v, a, b, h0, cu_):
        return iplr_jax.chunk(q, k, v, a, b, initial_state=h0, cu_seqlens=cu_, output_final_state=True,
                              chunk_size=C, implementation="xla", sequence_axis="sp")

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "sp"),) * 5 + (P(), P()),
                              out_specs=(P(None, "sp"), P())))
    o, ht = f(*inputs, h0, jnp.asarray(cu))
    ro, rht = reference(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, ro) < 1e-4 and rel_err(ht, rht) < 1e-4


KERNEL_IMPLS = [i for i in CHUNK_IMPLS if i != "xla"]


def _kernel_path_taken(mesh, inputs, h0):
    """Whether the default `chunk_cp` call lowers to the kernels' summary sweeps."""
    def local(q, k, v, a, b, h0):
        return chunk_cp(q, k, v, a, b, axis_name="sp", initial_state=h0, output_final_state=True,
                        chunk_size=C, implementation="interpret")

    f = jax.shard_map(local, mesh=mesh, in_specs=SP[:1] * 5 + SP[1:], out_specs=(SP[0], SP[1]))
    return "iplr_chunk_summary_fwd" in str(jax.make_jaxpr(f)(*inputs, h0))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("n_dev,final,with_h0", [(2, True, True), (4, False, False)])
def test_cp_kernels_default(rng, n_dev, final, with_h0, impl):
    """The default call on the kernels (no packing, whole chunks per device) runs the kernels'
    own context parallelism (summary sweeps and all-gathered folds, forward and backward):
    equal to the single-device kernels, all six gradients, on 2 and 4 devices (compiled too
    on a machine with that many GPUs)."""
    inputs, h0 = make_inputs(rng, 2, 128, 2, 16, 8, h0=with_h0)
    mesh = _mesh((n_dev,), ("sp",), gpu=impl == "pallas")
    if with_h0:
        assert _kernel_path_taken(mesh, inputs, h0)
    _check(impl, mesh, inputs, h0, specs=SP, final=final)


@pytest.mark.parametrize("packed", [False, True])
def test_cp_kernels_nonfinite(rng, packed):
    """A NaN in k on device 0 under the kernels' path: every device takes the composed path
    together, so the NaN stays causal across the boundary: that head's outputs are NaN from
    the bad token to the end of its sequence (on device 1 too), other tokens and the other
    head are exact. Packed: the sequence [10, 40) holds it; [40, 64) is untouched."""
    (q, k, v, a, b), h0 = make_inputs(rng, 1, 64, 2, 16, 8, N=3 if packed else 1)
    cu = jnp.asarray([0, 10, 40, 64] if packed else [0, 64], jnp.int32)
    k = k.at[0, 20, 1, 3].set(jnp.nan)
    mesh = _mesh((2,), ("sp",))

    def local(q, k, v, a, b, h0, cu):
        return chunk_cp(q, k, v, a, b, axis_name="sp", initial_state=h0, output_final_state=True,
                        chunk_size=C, implementation="interpret", cu_seqlens=cu if packed else None)

    specs = SP[:1] * 5 + SP[1:] + (P(),)
    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(SP[0], SP[1])))
    o, ht = f(q, k, v, a, b, h0, cu)
    clean = k.at[0, 20, 1, 3].set(0.0)
    ro, _ = iplr_jax.chunk(q, clean, v, a, b, initial_state=h0, chunk_size=C, implementation="interpret",
                           cu_seqlens=cu if packed else None)
    o, end = np.asarray(o), (40 if packed else 64)
    assert np.all(np.isnan(o[0, 20:end, 1])) and np.all(np.isnan(np.asarray(ht)[1 if packed else 0, 1]))
    assert rel_err(o[0, :20, 1], ro[0, :20, 1]) < TOL and rel_err(o[0, :, 0], ro[0, :, 0]) < TOL
    if packed:
        assert rel_err(o[0, 40:, 1], ro[0, 40:, 1]) < TOL
    g = jax.grad(lambda q: jnp.sum(jnp.nan_to_num(f(q, k, v, a, b, h0, cu)[0][:, :20])))(q)
    assert np.all(np.isfinite(np.asarray(g)))


# packed, T = 128 over 4 devices of 32 tokens: [7, 30) inside device 0, [30, 90) spans devices
# 0-2, [90, 96) ends inside device 2, [96, 128) starts on a boundary; empty at 0, 30 and 128
PACKED_KERNELS = [0, 0, 7, 30, 30, 90, 96, 128, 128]


@pytest.mark.parametrize("n_dev", [2, 4])
def test_cp_kernels_packed(rng, n_dev):
    """Packed sequences on the kernels' path (the default call, whole chunks per device): local
    pieces swept from their own h0 or the folded state, each final state from the device that
    holds its end, each h0's gradient from the device it enters on."""
    cu = np.asarray(PACKED_KERNELS, np.int32)
    inputs, h0 = make_inputs(rng, 1, 128, 2, 16, 8, N=len(cu) - 1)
    mesh = _mesh((n_dev,), ("sp",))

    def local(q, k, v, a, b, h0, cu_):
        return chunk_cp(q, k, v, a, b, axis_name="sp", initial_state=h0, cu_seqlens=cu_,
                        output_final_state=True, chunk_size=C, implementation="interpret")

    f = jax.shard_map(local, mesh=mesh, in_specs=SP[:1] * 5 + SP[1:] + (P(),), out_specs=(SP[0], SP[1]))
    assert "iplr_chunk_summary_fwd" in str(jax.make_jaxpr(f)(*inputs, h0, jnp.asarray(cu)))
    _check("interpret", mesh, inputs, h0, cu=cu, specs=SP)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_cp_kernels_traced_scale_and_config(rng, impl, monkeypatch):
    """A traced scale, differentiated (dscale summed over the devices), and a `config` through
    `chunk(..., sequence_axis=...)` to the kernels' context parallelism."""
    import iplr_jax.ops.chunk as chunk_module

    seen = []
    fn = chunk_module._chunk_pallas
    spy = lambda *a, **kw: seen.append(kw["config"]) or fn(*a, **kw)  # noqa: E731
    monkeypatch.setattr(chunk_module, "_chunk_pallas", spy)
    config = iplr_jax.ChunkConfig(bwd_kernels=False)  # the jnp backward of the slices
    inputs, _ = make_inputs(rng, 1, 64, 2, 16, 8, h0=False)
    mesh = _mesh((2,), ("sp",), gpu=impl == "pallas")

    def call(scale, q, k, v, a, b, *, axis=None):
        return iplr_jax.chunk(q, k, v, a, b, scale=scale, chunk_size=C, implementation=impl,
                              config=config, sequence_axis=axis)[0]

    def sharded(scale, *xs):
        return jax.shard_map(functools.partial(call, axis="sp"), mesh=mesh,
                             in_specs=(P(),) + SP[:1] * 5, out_specs=SP[0])(scale, *xs)

    def grads(f):
        loss = lambda *xs: _loss(f(*xs), None)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(jnp.float32(0.3), *inputs)

    got, (gs, gq) = grads(sharded)
    assert seen and all(c.bwd_kernels is False for c in seen), seen
    want, (ws, wq) = grads(call)
    assert rel_err(got, want) < TOL and rel_err(gq, wq) < TOL and rel_err(gs, ws) < TOL
