"""The ops on several (simulated) devices: under `jit` with sharded inputs, inside
`shard_map` with `check_vma=True`, and with explicit-sharding meshes.

conftest.py splits the CPU into 8 devices before jax is imported. Every case compares the
outputs and all six gradients with the same op called on one device, and, under `jit`, checks
that the compiled program moves no data between devices (no all-gather / all-to-all; with
inputs sharded over heads or batch each device runs the kernels on its own shard).
Shapes are tiny: the interpreted kernels compile slowly, not run slowly. On a GPU machine too
every case runs on the CPU devices (the `on_cpu` fixture), one-device references included.
"""

from __future__ import annotations

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cpu_mesh, cuda_mesh
from jax import export
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import iplr_jax
import iplr_jax.inputs as inputs_module

pytestmark = pytest.mark.usefixtures("on_cpu")

B, T, H, K, V = 8, 12, 4, 16, 16  # T = 12: the chunk layout pads the last chunk
CHUNK = 16
COLLECTIVES = ("all-gather", "all-to-all")


def _mesh(shape, names=("x", "y"), types=AxisType.Auto):
    names = names[: len(shape)]
    return cpu_mesh(shape, names, axis_types=(types,) * len(shape))


def _inputs(seed=0, N=None, T_=T):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)  # noqa: E731
    q, k, a, b = (f(B if N is None else 1, T_, H, K) for _ in range(4))
    v = f(B if N is None else 1, T_, H, V)
    return q, k, v, a, b, f(B if N is None else N, H, K, V)


def _call(op, impl, **kw):
    fn = getattr(iplr_jax, op)
    if op != "naive":
        kw["implementation"] = impl
    if op == "chunk":
        kw["chunk_size"] = CHUNK
    return functools.partial(fn, **kw)


def _outputs_and_grads(call):
    """(o, ht, dq, dk, dv, da, db, dh0) of a loss on o and the final state."""

    def loss(q, k, v, a, b, h0):
        o, ht = call(q, k, v, a, b, initial_state=h0, output_final_state=True)
        return jnp.sum(o * o) + jnp.sum(jnp.sin(ht)), (o, ht)

    def f(*xs):
        (_, (o, ht)), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(*xs)
        return (o, ht, *grads)

    return f


def _close(got, want, what):
    for name, g, w in zip(("o", "ht", "dq", "dk", "dv", "da", "db", "dh0"), got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
        assert err < 1e-5, f"{what}: {name} differs from one device by {err:.2e}"


def _collectives(text):
    return {c: len(re.findall(rf"\b{c}(-start)?\(", text)) for c in COLLECTIVES}


@functools.cache
def _unsharded(op, impl, packed):
    xs, kw = _case_inputs(packed)
    return jax.jit(_outputs_and_grads(_call(op, impl, **kw)))(*xs)


CU = np.array([0, 5, 5, 20, 32], np.int32)  # 4 packed sequences, one empty, in T = 32


def _case_inputs(packed):
    if packed:
        return _inputs(1, N=len(CU) - 1, T_=int(CU[-1])), dict(cu_seqlens=jnp.asarray(CU))
    return _inputs(0), {}


# (op, impl, mesh shape, token spec): every op x implementation, each mesh shape, batch and
# head sharding, each alone and together.
JIT_CASES = [
    ("chunk", "interpret", (8,), P("x")),
    ("chunk", "interpret", (2, 4), P("x", None, "y")),
    ("chunk", "interpret", (4, 2), P(None, None, "y")),
    ("chunk", "xla", (2, 4), P("x", None, "y")),
    ("fused_recurrent", "interpret", (4, 2), P("x", None, "y")),
    ("fused_recurrent", "interpret", (2, 4), P(None, None, "y")),
    ("fused_recurrent", "xla", (8,), P("x")),
    ("naive", "xla", (4, 2), P("x", None, "y")),
]


def _state_spec(tok, packed=False):
    """The state shards like the tokens' batch (not when packed) and heads."""
    return P(None if packed else tok[0], tok[2] if len(tok) > 2 else None)


def _pad(spec, n=4):
    return tuple(spec) + (None,) * (n - len(spec))


@pytest.mark.parametrize("op, impl, shape, tok", JIT_CASES, ids=str)
def test_jit_sharded_inputs(op, impl, shape, tok):
    mesh = _mesh(shape)
    tok = P(*_pad(tok))
    xs, _ = _case_inputs(False)
    shardings = [NamedSharding(mesh, tok)] * 5 + [NamedSharding(mesh, _state_spec(tok))]
    xs = [jax.device_put(x, s) for x, s in zip(xs, shardings, strict=True)]
    compiled = jax.jit(_outputs_and_grads(_call(op, impl))).lower(*xs).compile()
    assert _collectives(compiled.as_text()) == dict.fromkeys(COLLECTIVES, 0)
    got = compiled(*xs)
    _close(got, _unsharded(op, impl, False), f"{op}/{impl} on {shape} {tok}")
    # outputs and gradients stay sharded like the inputs
    for g, s in zip(got, [shardings[2], shardings[5], *shardings], strict=True):
        assert g.sharding.is_equivalent_to(s, g.ndim), (g.sharding, s)


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_jit_packed_sequences_shard_heads(op):
    mesh = _mesh((2, 4))
    xs, kw = _case_inputs(True)
    tok, st = NamedSharding(mesh, P(None, None, "y")), NamedSharding(mesh, P(None, "y"))
    xs = [jax.device_put(x, tok) for x in xs[:5]] + [jax.device_put(xs[5], st)]
    compiled = jax.jit(_outputs_and_grads(_call(op, "interpret", **kw))).lower(*xs).compile()
    assert _collectives(compiled.as_text()) == dict.fromkeys(COLLECTIVES, 0)
    _close(compiled(*xs), _unsharded(op, "interpret", True), f"{op} packed")


def test_jit_sequence_sharded_is_correct():
    """Sharded over T with T = 12 not whole chunks: the gathered fallback (tests/test_cp_jit.py
    has the per-slice path), right."""
    mesh = _mesh((2, 4))
    xs, _ = _case_inputs(False)
    tok, st = NamedSharding(mesh, P("x", "y")), NamedSharding(mesh, P("x"))
    xs = [jax.device_put(x, tok) for x in xs[:5]] + [jax.device_put(xs[5], st)]
    got = jax.jit(_outputs_and_grads(_call("chunk", "interpret")))(*xs)
    _close(got, _unsharded("chunk", "interpret", False), "chunk sharded over T")


@pytest.mark.parametrize("op, impl", [("chunk", "interpret"), ("chunk", "xla"), ("fused_recurrent", "xla")])
def test_jit_explicit_sharding(op, impl):
    """Explicit-sharding types: the kernels run per shard through shard_map, and the jnp chunk
    form too (`sharding.explicit_shards`: the types reject its reshapes of sharded dims)."""
    mesh = _mesh((2, 4), types=AxisType.Explicit)
    xs, _ = _case_inputs(False)
    with jax.set_mesh(mesh):
        tok, st = NamedSharding(mesh, P("x", None, "y")), NamedSharding(mesh, P("x", "y"))
        xs = [jax.device_put(x, tok) for x in xs[:5]] + [jax.device_put(xs[5], st)]
        f = jax.jit(_outputs_and_grads(_call(op, impl)))
        compiled = f.lower(*xs).compile()
        got = compiled(*xs)
    assert _collectives(compiled.as_text()) == dict.fromkeys(COLLECTIVES, 0)
    _close(got, _unsharded(op, impl, False), "explicit mesh")
    assert got[0].sharding.is_equivalent_to(tok, 4), got[0].sharding


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_jit_explicit_mesh_replicated_inputs(op):
    """Replicated inputs under an explicit-sharding mesh: the kernels still run per device (the
    interpreted kernels outside shard_map fail JAX's sharding-type checks there)."""
    mesh = _mesh((2, 4), types=AxisType.Explicit)
    xs, _ = _case_inputs(False)
    with jax.set_mesh(mesh):
        xs = [jax.device_put(x, NamedSharding(mesh, P())) for x in xs]
        got = jax.jit(_outputs_and_grads(_call(op, "interpret")))(*xs)
    _close(got, _unsharded(op, "interpret", False), "explicit mesh, replicated")


# -- shard_map, check_vma=True ---------------------------------------------------------------------

SHMAP_CASES = [
    ("chunk", "interpret", (2, 4), P("x", None, "y")),
    ("chunk", "xla", (8,), P("x")),
    ("fused_recurrent", "interpret", (8,), P("x")),
    ("fused_recurrent", "xla", (4, 2), P(None, None, "y")),
    ("naive", "xla", (2, 4), P("x", None, "y")),
]


@pytest.mark.parametrize("op, impl, shape, tok", SHMAP_CASES, ids=str)
def test_shard_map(op, impl, shape, tok):
    """Per-device calls inside shard_map (default check_vma=True) with a traced, replicated
    scale, an initial state, the final state, and all gradients."""
    mesh = _mesh(shape)
    tok = P(*_pad(tok))
    st = _state_spec(tok)
    xs, _ = _case_inputs(False)
    call = _call(op, impl)

    def with_scale(*x):
        return _outputs_and_grads(functools.partial(call, scale=x[-1]))(*x[:-1])

    smap = jax.shard_map(
        with_scale, mesh=mesh, in_specs=(tok,) * 5 + (st, P()),
        out_specs=(tok, st) + (tok,) * 5 + (st,),
    )
    scale = jnp.float32(0.7)
    got = jax.jit(smap)(*xs, scale)
    want = jax.jit(with_scale)(*xs, scale)
    _close(got, want, f"shard_map {op}/{impl}")


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent", "naive"])
def test_shard_map_zero_initial_state(op):
    """No initial state: the zero state is a constant, the inputs vary over the mesh."""
    mesh = _mesh((8,))
    xs, _ = _case_inputs(False)
    call = _call(op, "interpret" if op != "naive" else "xla")
    f = lambda *x: call(*x)[0]  # noqa: E731
    got = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))(*xs[:5])
    np.testing.assert_allclose(got, jax.jit(f)(*xs[:5]), rtol=1e-5, atol=1e-6)


def test_shard_map_replicated_state_gradient():
    """A replicated initial state: with check_vma its gradient is summed over the devices."""
    mesh = _mesh((8,))
    xs, _ = _case_inputs(False)
    call = _call("chunk", "interpret")
    h1 = xs[5][0]

    def loss(q, k, v, a, b, h1):
        o, ht = call(q, k, v, a, b, initial_state=jnp.broadcast_to(h1, (q.shape[0], *h1.shape)),
                     output_final_state=True)
        return jnp.sum(o * o) + jnp.sum(jnp.sin(ht))

    def per_device(*x):  # h1 does not vary over "x": its gradient comes back summed (psum)
        return jax.grad(loss, argnums=5)(*x)

    got = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("x"),) * 5 + (P(),),
                                out_specs=P()))(*xs[:5], h1)
    want = jax.jit(jax.grad(loss, argnums=5))(*xs[:5], h1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# -- the compiled kernels, lowered for CUDA ---------------------------------------------------------


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_pallas_lowers_in_shard_map_for_cuda(monkeypatch, op):
    monkeypatch.setattr(inputs_module, "has_gpu", lambda: True)
    mesh = cuda_mesh((2, 4), ("x", "y"))
    tok = P("x", None, "y")
    call = _call(op, "pallas")

    def per_device(*x):
        return _outputs_and_grads(call)(*x)

    smap = jax.shard_map(per_device, mesh=mesh, in_specs=(tok,) * 5 + (P("x", "y"),),
                         out_specs=(tok, P("x", "y")) + (tok,) * 5 + (P("x", "y"),))
    xs, _ = _case_inputs(False)
    exp = export.export(
        jax.jit(smap), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*(jax.ShapeDtypeStruct(x.shape, jnp.bfloat16 if i < 5 else x.dtype) for i, x in enumerate(xs)))
    assert exp.mlir_module().count("__gpu$xla.gpu.triton") >= 3


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_pallas_lowers_with_sharded_inputs_for_cuda(monkeypatch, op):
    """Under jit with sharded inputs the kernels sit inside the custom_partitioning ops (the
    partitioning itself runs in XLA's compiler, which needs the GPU)."""
    monkeypatch.setattr(inputs_module, "has_gpu", lambda: True)
    mesh = _mesh((2, 4))
    tok, st = NamedSharding(mesh, P("x", None, "y")), NamedSharding(mesh, P("x", "y"))
    xs, _ = _case_inputs(False)
    args = [jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=tok) for x in xs[:5]]
    args.append(jax.ShapeDtypeStruct(xs[5].shape, jnp.float32, sharding=st))
    # jax.export cannot serialize custom_partitioning (its partitioner is a Python callback):
    # lower for CUDA without exporting. The kernels themselves are lowered by the partition
    # callback, inside XLA's compiler (GPU only); test_pallas_lowers_in_shard_map_for_cuda
    # lowers the same per-shard functions for CUDA.
    traced = jax.jit(_outputs_and_grads(_call(op, "pallas"))).trace(*args)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    # the forward with residuals and the backward, and the guarded branches taken only for
    # non-finite outputs (inputs.guarded_unless_finite): its forward, its recomputed forward
    # with residuals and backward; then the guard's ties (sharding.sharded_like), one per
    # output (o, final state) and per gradient (q, k, v, a, b, initial state)
    ties = re.findall(r"op_sharding_rule<\(\[([a-z, ]+)\], \[\1\]\)->\(\[\1\]\)", text)
    assert len(ties) == 8, ties
    assert text.count("CustomSPMDPartitioning") == 5 + len(ties)
    assert "sdy.sharding_rule" in text


def test_sharded_like_ties_sharding():
    """`sharding.sharded_like(new, old)`: new's values with old's sharding (the guard's cond
    results otherwise came out replicated on GPUs), also under vmap; None leaves pass."""
    from iplr_jax.sharding import sharded_like

    mesh = _mesh((2, 4))
    spec = NamedSharding(mesh, P(None, "x", "y"))
    old = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 4))), spec)
    replicated = NamedSharding(mesh, P())

    def f(o):
        new = jax.lax.with_sharding_constraint(jnp.sin(o), replicated)
        return sharded_like((new, None), (o, None))[0]

    got = jax.jit(f)(old)
    np.testing.assert_array_equal(got, np.sin(np.asarray(old)))
    assert got.sharding.is_equivalent_to(spec, 3), got.sharding
    batched = jax.jit(jax.vmap(f))(old)
    np.testing.assert_array_equal(batched, got)


importlib.import_module("iplr_jax.sharding")  # the helpers import on their own


def test_vmap_still_works():
    """custom_partitioning has no batching rule: under vmap the kernels are called directly."""
    xs, _ = _case_inputs(False)
    f = lambda *x: _call("chunk", "interpret")(*x)[0]  # noqa: E731
    got = jax.jit(jax.vmap(f))(*(x[:, None] for x in xs[:5]))
    np.testing.assert_allclose(got[:, 0], jax.jit(f)(*xs[:5]), rtol=1e-5, atol=1e-6)
