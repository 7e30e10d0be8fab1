"""Context parallelism under plain `jit` (issue 15, item 2): q, k, v, a, b sharded over T by a
`NamedSharding` make `chunk` run its kernels per slice of T, exchanging only the `[h | M]`
summaries (docs/architecture.md, "Several devices"; `ops/chunk.py`, `_fwd_shard_cp`).

Every case compares the output, the final state and all six gradients with the unsharded call
(float32 rounding), checks that they come back sharded like the inputs, and reads the compiled
forward and forward+backward. What is asserted about the HLO: every collective's array
(result, and operand where the op prints one) has one of the three shapes of the exchange,
  [P, B', H', K, V + K]  the all-gathered summaries (P the number of T shards, B' H' the local
                          batch and heads),
  [1, B', H', K, V + K]  one device's summary (the all-gather's operand; the reduce-scatter
                          that is its transpose in the backward),
  [B', H', K, V]          the final state's and the initial state's gradient's psum,
none of which a token array [B, T, H, *] or a per-chunk residual can take at these shapes; and
the forward has an all-gather (the exchange ran, rather than the gathered fallback). So no q,
k, v, a, b, output, residual or gradient crosses devices.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cpu_mesh, make_inputs, rel_err
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import iplr_jax

H, K, V, C = 4, 16, 16, 16
TOL = 1e-5
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _outputs_and_grads(impl, cu=None, config=None):
    def loss(q, k, v, a, b, h0):
        o, ht = iplr_jax.chunk(
            q, k, v, a, b, initial_state=h0, output_final_state=True, cu_seqlens=cu,
            chunk_size=C, implementation=impl, config=config,
        )
        return jnp.sum(o * o) + jnp.sum(jnp.sin(ht)), (o, ht)

    def f(*xs):
        (_, (o, ht)), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(*xs)
        return (o, ht, *grads)

    return f


def _forward(impl, config=None):
    def f(q, k, v, a, b, h0):
        return iplr_jax.chunk(
            q, k, v, a, b, initial_state=h0, output_final_state=True, chunk_size=C,
            implementation=impl, config=config,
        )

    return f


@functools.cache
def _case(B, T, packed=False):
    rng = np.random.default_rng(T + 1000 * B + packed)
    xs, h0 = make_inputs(rng, 1 if packed else B, T, H, K, V, N=3 if packed else None)
    return (*xs, h0)


@functools.cache
def _unsharded(impl, B, T, packed=False):
    """On the CPU like the meshes (a GPU would run the interpreted dots as tf32)."""
    cu = _packed_offsets(T) if packed else None
    xs = jax.device_put(_case(B, T, packed), jax.devices("cpu")[0])
    return jax.jit(_outputs_and_grads(impl, cu))(*xs)


def _packed_offsets(T):  # 3 sequences, one straddling the middle
    return jnp.asarray([0, 5, T // 2 + 3, T], jnp.int32)


def _shapes(text, op):
    """The array shapes printed in the result types (and operands) of every `op` in HLO text."""
    out = []
    for line in text.splitlines():
        m = re.search(rf"= (.+?) {op}(-start)?\(([^)]*)\)", line)
        if m:
            for dims in re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", m.group(1) + " " + m.group(3)):
                out.append(tuple(int(d) for d in dims.split(",") if d))
    return out


def _check_collectives(text, n_seq, b_loc, h_loc, what):
    # the summaries, their fold's result, the final state; the op's finiteness check (a scalar)
    # and its guard's [B, H] first non-finite token (docs/numerics.md "Non-finite inputs")
    allowed = {(n_seq, b_loc, h_loc, K, V + K), (1, b_loc, h_loc, K, V + K), (b_loc, h_loc, K, V),
               (b_loc, h_loc), ()}
    for op in COLLECTIVES:
        for shape in _shapes(text, op):
            assert shape in allowed, f"{what}: {op} of {shape} (allowed: {sorted(allowed)})"
    return len(_shapes(text, "all-gather"))


def _close(got, want, what):
    for name, g, w in zip(("o", "ht", "dq", "dk", "dv", "da", "db", "dh0"), got, want, strict=True):
        err = rel_err(np.asarray(g, np.float64), np.asarray(w, np.float64))
        assert err < TOL, f"{what}: {name} differs from the unsharded call by {err:.2e}"


def _put(mesh, tok, st, xs):
    shardings = [NamedSharding(mesh, tok)] * 5 + [NamedSharding(mesh, st)]
    return [jax.device_put(x, s) for x, s in zip(xs, shardings, strict=True)], shardings


def _run_and_check(impl, mesh, tok, st, B, T, what, config=None):
    """Compile the forward and forward+backward on sharded inputs; check numbers, shardings and
    collectives. Returns the gradient program's text."""
    xs, shardings = _put(mesh, tok, st, _case(B, T))
    n_of = lambda ax: int(np.prod([mesh.shape[a] for a in jax.tree.leaves(ax)]))  # noqa: E731
    tok4 = tuple(tok) + (None,) * (4 - len(tuple(tok)))
    n_seq, b_loc, h_loc = n_of(tok4[1]), B // n_of(tok4[0]), H // n_of(tok4[2])

    fwd = jax.jit(_forward(impl, config)).lower(*xs).compile()
    assert _check_collectives(fwd.as_text(), n_seq, b_loc, h_loc, f"{what} forward") >= 1
    o, ht = fwd(*xs)
    want = _unsharded(impl, B, T)
    _close((o, ht, *want[2:]), want, f"{what} forward")

    grad = jax.jit(_outputs_and_grads(impl, config=config)).lower(*xs).compile()
    _check_collectives(grad.as_text(), n_seq, b_loc, h_loc, f"{what} gradient")
    got = grad(*xs)
    _close(got, want, what)
    for g, s in zip(got, [shardings[2], shardings[5], *shardings], strict=True):
        assert g.sharding.is_equivalent_to(s, g.ndim), (what, g.sharding, s)


def _mesh(shape, types=AxisType.Auto):
    names = ("x", "y")[: len(shape)]
    return cpu_mesh(shape, names, axis_types=(types,) * len(shape))


# (mesh shape, token spec, state spec, B, T): T over one axis (2 or 4 devices) or both (8), with
# batch or heads over the other; T / P a multiple of the chunk (else the gathered fallback)
CASES = [
    pytest.param((2,), P(None, "x"), P(), 2, 64, id="T2"),
    pytest.param((2, 4), P("x", "y"), P("x"), 2, 128, id="B2-T4"),
    pytest.param((4,), P(None, "x"), P(), 2, 64, id="T4", marks=pytest.mark.slow),
    pytest.param((2, 4), P(None, "y", "x"), P(None, "x"), 2, 128, id="T4-H2", marks=pytest.mark.slow),
    pytest.param((2, 4), P("y", "x"), P("y"), 4, 64, id="B4-T2", marks=pytest.mark.slow),
    pytest.param((2, 4), P(None, ("x", "y")), P(), 2, 128, id="T8", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("shape, tok, st, B, T", CASES)
def test_jit_sequence_sharded(shape, tok, st, B, T):
    _run_and_check("interpret", _mesh(shape), tok, st, B, T, f"{shape} {tok}")


@pytest.mark.slow
@pytest.mark.parametrize("segment_chunks", [None, 0], ids=["segments", "whole"])
def test_jit_sequence_sharded_segments(monkeypatch, segment_chunks):
    """A slice's summary from its segments' (the rule at small batch, `segments.
    sequence_summaries`, counted as it traces) or from one summary sweep of the whole slice
    (`segment_chunks=0`): the same numbers, shardings and collectives. 4 devices over T,
    batch over the other axis, 2 chunks a slice."""
    from iplr_jax import segments

    traced = []
    fn = segments.sequence_summaries
    monkeypatch.setattr(segments, "sequence_summaries", lambda *a, **kw: traced.append(1) or fn(*a, **kw))
    config = iplr_jax.ChunkConfig(segment_chunks=segment_chunks)
    _run_and_check("interpret", _mesh((2, 4)), P("x", "y"), P("x"), 2, 128, "segments", config=config)
    assert bool(traced) == (segment_chunks is None), traced


@pytest.mark.slow
def test_jit_sequence_sharded_jnp_backward(monkeypatch, rng):
    """K = 130 (Kp = 256): the slices' forward on the kernels with segments (counted), the
    backward in jnp by differentiating `context_parallel.entering_state`; output, final state
    and all six gradients equal the unsharded call's. 2 devices over T."""
    from iplr_jax import segments

    traced = []
    fn = segments.sequence_summaries
    monkeypatch.setattr(segments, "sequence_summaries", lambda *a, **kw: traced.append(1) or fn(*a, **kw))
    xs, h0 = make_inputs(rng, 1, 64, 1, 130, 20)
    f = jax.jit(_outputs_and_grads("interpret"))
    want = f(*xs, h0)
    mesh = _mesh((2,))
    sharded = [jax.device_put(x, NamedSharding(mesh, P(None, "x"))) for x in xs]
    got = f(*sharded, jax.device_put(h0, NamedSharding(mesh, P())))
    _close(got, want, "K = 130")
    assert traced, "the forward did not take the segmented context-parallel path"


def test_jit_sequence_sharded_explicit_mesh():
    """Explicitly sharded inputs (`AxisType.Explicit`): the same per-slice functions inside the
    shard_map that `sharding.partitioned` builds; T over "x" while "y" splits the heads."""
    mesh = _mesh((2, 4), AxisType.Explicit)
    _case(2, 64), _unsharded("interpret", 2, 64)  # cached outside the mesh context (plain arrays)
    with jax.set_mesh(mesh):
        _run_and_check("interpret", mesh, P(None, "x", "y"), P(None, "y"), 2, 64, "explicit")


@pytest.mark.parametrize(
    "impl, T, packed",
    [
        pytest.param("interpret", 48, False, id="T48-interpret", marks=pytest.mark.slow),
        pytest.param("interpret", 64, True, id="packed-interpret", marks=pytest.mark.slow),
        pytest.param("xla", 64, False, id="xla", marks=pytest.mark.slow),
    ],
)
def test_jit_sequence_sharded_fallback(impl, T, packed):
    """Where the per-slice path does not apply (T / P not a multiple of the chunk: 24 tokens per
    device here; packed sequences; the "xla" implementation) a T-sharded input is gathered:
    right, not fast."""
    B = 2
    mesh = _mesh((2,))
    cu = _packed_offsets(T) if packed else None
    xs, _ = _put(mesh, P(None, "x"), P(), _case(B, T, packed))
    got = jax.jit(_outputs_and_grads(impl, cu))(*xs)
    _close(got, _unsharded(impl, B, T, packed), f"fallback {impl} T={T} packed={packed}")


def test_pallas_lowers_with_sequence_sharded_inputs_for_cuda(monkeypatch):
    """"pallas" takes the same ops as "interpret": lowered for CUDA (no GPU needed), the two ops
    of the gradient carry the Shardy rule with T as the compound (c s), so the partitioner may
    keep T sharded (the partition callback itself runs inside XLA's GPU compiler)."""
    import iplr_jax.inputs as inputs_module

    monkeypatch.setattr(inputs_module, "has_gpu", lambda: True)
    mesh = _mesh((2, 4))
    tok, st = NamedSharding(mesh, P("x", "y")), NamedSharding(mesh, P("x"))
    args = [jax.ShapeDtypeStruct((2, 64, H, K), jnp.bfloat16, sharding=tok) for _ in range(5)]
    args.append(jax.ShapeDtypeStruct((2, H, K, V), jnp.float32, sharding=st))
    traced = jax.jit(_outputs_and_grads("pallas")).trace(*args)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    rules = re.findall(r"sdy\.op_sharding_rule<\(\[i, jk, l, m\]", text)
    # forward with residuals and backward, and the guarded branches (inputs.guarded_unless_finite),
    # then the guard's 8 ties of outputs and gradients to the plain run's shardings
    # (sharding.sharded_like; tests/test_sharding.py counts them)
    n = text.count("CustomSPMDPartitioning")
    assert n == 5 + 8 and len(rules) == 5, (n, len(rules))
