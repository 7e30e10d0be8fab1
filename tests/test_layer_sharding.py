"""IPLRLayer in a sharded training step on simulated CPU devices (conftest.py makes 8).

A tiny layer (d_model 32, 4 heads of 8, T 32) and a squared-error loss; the step returns the
loss and the gradients of every parameter. Each sharded step (data parallel, FSDP, FSDP with a
head split) must give the loss and gradients of the same step on one device, and its compiled
program must move no activations between devices: no all-to-all, and every all-gather is one of
a parameter (FSDP gathers each kernel where it is used; the gradients come back
reduce-scattered). Parameter and activation shapes differ here (pieces of [32, 32], [32, 4],
[4, 96] against [B, T, ...] or [B * T, ...] with B * T / 4 = 64), so an all-gather's result
shape tells which it is. Every test here runs on the CPU devices, also on a GPU machine (the
`on_cpu` fixture: the one-device reference too).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import cpu_mesh
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from iplr_jax.layer import IPLRLayer

pytestmark = pytest.mark.usefixtures("on_cpu")

B, T, D, H = 8, 32, 32, 4

DP = {"batch": "data"}
FSDP = {"batch": "data", "embed": "data"}
FSDP_TP = {"batch": "data", "embed": "data", "heads": "model"}


def _layer(impl, sharding=None, mode="iplr"):
    return IPLRLayer(
        D, H, mode=mode, chunk_size=16, implementation=impl, sharding=sharding, rngs=nnx.Rngs(0)
    )


def _data():
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    return jax.random.normal(kx, (B, T, D), jnp.float32), jax.random.normal(ky, (B, T, D), jnp.float32)


def _step(graphdef):
    def step(params, x, y):
        def loss(params):
            return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

        return jax.value_and_grad(loss)(params)

    return step


@functools.cache
def _one_device(impl, mode):
    graphdef, params = nnx.split(_layer(impl, mode=mode))
    return jax.jit(_step(graphdef))(params, *_data())


def _collectives(text):
    """(kind, result shape) of every all-gather / all-to-all in an HLO module's text."""
    out = []
    for m in re.finditer(r"= \S+?\[([\d,]*)\]\S* (all-gather|all-to-all)(-start)?\(", text):
        out.append((m.group(2), tuple(int(d) for d in m.group(1).split(",") if d)))
    return out


def _parameter_pieces(shapes, n):
    """Every shape a piece of a parameter (or of its gradient) can have: each dimension divided
    by a divisor of the device count, possibly transposed."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    out = set()
    for shape in shapes:
        pieces = {()}
        for dim in shape:
            pieces = {p + (dim // d,) for p in pieces for d in divisors if dim % d == 0}
        out |= pieces | {p[::-1] for p in pieces}
    return out


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


CASES = [
    ("xla", (4,), DP, "iplr"),
    ("xla", (2, 2), FSDP_TP, "iplr"),
    ("interpret", (4,), DP, "iplr"),
    ("interpret", (2, 2), FSDP, "iplr"),
]


@pytest.mark.parametrize("impl, shape, sharding, mode", CASES, ids=str)
def test_sharded_training_step(impl, shape, sharding, mode):
    names = ("data", "model")[: len(shape)]
    mesh = cpu_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
    with jax.set_mesh(mesh):
        layer = _layer(impl, sharding, mode)  # created sharded (Flax eager sharding)
        graphdef, params = nnx.split(layer)
        specs = nnx.get_partition_spec(params)
        param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        tokens = NamedSharding(mesh, P("data"))
        x, y = (jax.device_put(u, tokens) for u in _data())
        step = jax.jit(_step(graphdef), out_shardings=(NamedSharding(mesh, P()), param_shardings))
        compiled = step.lower(params, x, y).compile()
        loss, grads = compiled(params, x, y)

    # parameters are sharded as annotated, gradients like their parameters
    leaves = (jax.tree.leaves(t) for t in (params, grads, param_shardings))
    for p, g, s in zip(*leaves, strict=True):
        assert p.sharding.is_equivalent_to(s, p.ndim), (p.sharding, s)
        assert g.sharding.is_equivalent_to(s, g.ndim), (g.sharding, s)

    # no activation crosses devices: the only all-gathers are FSDP's parameter gathers
    param_shapes = _parameter_pieces([p.shape for p in jax.tree.leaves(params)], mesh.size)
    moved = _collectives(compiled.as_text())
    assert not [c for c in moved if c[0] == "all-to-all"], moved
    gathered = [s for kind, s in moved if kind == "all-gather"]
    assert all(s in param_shapes for s in gathered), f"activation all-gathers: {gathered}"
    if sharding.get("embed") is None:
        assert not gathered, gathered  # data parallel: nothing gathered at all
    else:
        assert gathered  # FSDP does gather the kernels

    want_loss, want_grads = _one_device(impl, mode)
    assert _rel(loss, want_loss) < 1e-5
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        err = _rel(g, flat_want[path])
        assert err < 1e-5, f"{jax.tree_util.keystr(path)}: gradient differs from one device by {err:.2e}"


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_explicit_mesh_training_step(impl):
    """Data parallel on an explicit-sharding mesh (shardings in the types, no constraints): the
    same loss and gradients as one device, and nothing gathered or exchanged but gradients."""
    mesh = cpu_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        graphdef, params = nnx.split(_layer(impl, DP))
        x, y = (jax.device_put(u, NamedSharding(mesh, P("data"))) for u in _data())
        compiled = jax.jit(_step(graphdef)).lower(params, x, y).compile()
        loss, grads = compiled(params, x, y)
    assert not _collectives(compiled.as_text())
    want_loss, want_grads = _one_device(impl, "iplr")
    assert _rel(loss, want_loss) < 1e-5
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert _rel(g, w) < 1e-5


def test_partition_specs():
    """The annotations Flax reads: kernels [d_model, H * .] are (embed, heads), o_proj's the
    reverse, the rest replicated; no sharding argument means no annotation."""
    mesh = cpu_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        specs = nnx.get_partition_spec(nnx.state(_layer("xla", FSDP_TP)))
    assert specs["q_proj"]["kernel"].get_value() == P("data", "model")
    assert specs["lam_proj"]["bias"].get_value() == P("model")
    assert specs["o_proj"]["kernel"].get_value() == P("model", "data")
    assert specs["conv"]["weight"].get_value() == P(None, None)
    assert specs["o_norm"].get_value() == P(None)
    plain = nnx.get_partition_spec(nnx.state(_layer("xla")))
    assert plain["q_proj"]["kernel"].get_value() == P()
    with pytest.raises(ValueError, match="unknown logical axes"):
        _layer("xla", {"sequence": "data"})


def test_no_mesh_context_is_unconstrained():
    """Sharding constraints apply only under a mesh context; shard_map (manual axes) and plain
    calls run the layer unchanged."""
    mesh = cpu_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        layer = _layer("xla", DP)
    graphdef, params = nnx.split(layer)
    x, _ = _data()
    want = _layer("xla")(x)
    per_device = lambda params, x: nnx.merge(graphdef, params)(x)  # noqa: E731
    smap = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    got = jax.jit(smap)(params, x)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_layer_context_parallel(impl):
    """The layer with x sharded over T inside shard_map (the convolution's halo from the
    preceding device, chunk with sequence_axis) equals the single-device layer: output and the
    gradients of the input and of every parameter."""
    from helpers import rel_err

    mesh = cpu_mesh((4,), ("sp",), axis_types=(AxisType.Auto,))
    kw = dict(num_heads=2, chunk_size=16, implementation=impl)
    one = IPLRLayer(32, **kw, rngs=nnx.Rngs(0))
    cp = IPLRLayer(32, sequence_axis="sp", **kw, rngs=nnx.Rngs(0))
    g1, p1 = nnx.split(one)
    g4, p4 = nnx.split(cp)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 48, 32), jnp.float32)  # 12 tokens per device

    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)  # a fixed functional

    def loss(graphdef, params, x, w=w):
        y = nnx.merge(graphdef, params)(x)
        return jnp.sum(y * w), y

    def sharded(params, x):
        def local(params, x, w):
            return jax.lax.psum(loss(g4, params, x, w)[0], "sp")

        specs = (P(), P(None, "sp"), P(None, "sp"))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(params, x, w)

    grad1 = jax.value_and_grad(lambda p, x: loss(g1, p, x), argnums=(0, 1), has_aux=True)
    (l1, _), (dp1, dx1) = grad1(p1, x)
    l4, (dp4, dx4) = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(p4, x)
    assert abs(float(l4) - float(l1)) < 1e-4 * abs(float(l1))
    assert rel_err(dx4, dx1) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(dp4), jax.tree_util.tree_leaves(dp1), strict=True):
        assert rel_err(a, b) < 1e-5


def test_demo_model_data_parallel():
    """The demo's TinyLM with `sharding={"batch": "data"}`: a data-parallel loss and gradient on 4
    devices equal the single-device ones, with no all-gather or all-to-all."""
    from helpers import rel_err

    from iplr_jax.demo import TinyLM, loss_and_accuracy

    mesh = cpu_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 16, (8, 32)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 16, (8, 32)), jnp.int32)
    mask = jnp.ones((8, 32), jnp.float32)

    def grads(model, *batch):
        g, s = nnx.split(model)
        f = lambda s, *b: loss_and_accuracy(nnx.merge(g, s), *b)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(f)), s

    ref_model = TinyLM(16, d_model=32, num_layers=1, rngs=nnx.Rngs(0))
    step, state = grads(ref_model)
    l1, g1 = step(state, tokens, targets, mask)
    with jax.set_mesh(mesh):
        model = TinyLM(16, d_model=32, num_layers=1, sharding={"batch": "data"}, rngs=nnx.Rngs(0))
        step4, state4 = grads(model)
        batch = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (tokens, targets, mask)]
        l4, g4 = step4(state4, *batch)
        hlo = step4.lower(state4, *batch).compile().as_text()
    assert abs(float(l4) - float(l1)) < 1e-5 * abs(float(l1))
    for a, b in zip(jax.tree_util.tree_leaves(g4), jax.tree_util.tree_leaves(g1), strict=True):
        assert rel_err(a, b) < 1e-5
    assert not re.search(r"\b(all-gather|all-to-all)(-start)?\(", hlo)
