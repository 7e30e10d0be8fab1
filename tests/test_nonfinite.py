"""Non-finite inputs stay causal (docs/numerics.md "Non-finite inputs"), in every op and
implementation and under context parallelism.

One call checks every input at once: head h holds a NaN / inf / -inf (by row and head) in input
`names[h]` at token T0, in the middle of a chunk; the last head is clean. Heads are independent
recurrences, so each head shows one input's behaviour: outputs before T0 (and of other
sequences, other heads) equal the float64 recurrence on the clean inputs; outputs from T0 to
the end of its sequence are NaN (for q only o_T0), and so is that sequence's final state; the
gradients of a random functional of every finite output and final state are finite and equal
the clean recurrence's, w.r.t. every input and the initial state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CHUNK_IMPLS, RECURRENT_IMPLS
from helpers import make_inputs, rel_err, up
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_gate import draw_gate

import iplr_jax
from iplr_jax.context_parallel import chunk_cp

FAST = {"xla_backend_optimization_level": 0}  # compile-bound on CPU (see test_gate.py)
T0 = 37  # the bad token: inside the chunk [32, 48) at chunk size 16, [0, 64) at 64
VALUES = (np.nan, np.inf, -np.inf)
TOL = 2e-3  # float32 against the float64 recurrence (tests/helpers.py `tol`)


def _inputs(rng, B, T, names, N=None, t0=T0, gated=True):
    """(clean inputs (with a softplus gate if `gated`), the same with the bad entries at t0, h0)."""
    H = len(names) + 1
    (q, k, v, a, b), h0 = make_inputs(rng, B, T, H, 16, 8, N=N)
    gk = jnp.asarray(draw_gate(rng, (B, T, H, 16), "softplus"), jnp.float32)
    clean = dict(q=q, k=k, v=v, a=a, b=b, gk=gk)
    bad = dict(clean)
    for h, name in enumerate(names):
        for row in range(B):
            bad[name] = bad[name].at[row, t0, h, (3 * h) % 8].set(VALUES[(h + row) % 3])
    if not gated:
        del clean["gk"], bad["gk"]
    return clean, bad, h0


def _expected(B, T, names, cu, t0):
    """Which outputs [B, T, H] and final states [N, H] must be NaN."""
    end = T if cu is None else min(c for c in cu if c > t0)
    tok = np.zeros((B, T, len(names) + 1), bool)
    fin = np.zeros((B if cu is None else len(cu) - 1, len(names) + 1), bool)
    for h, name in enumerate(names):
        if name == "q":
            tok[:, t0, h] = True
        else:
            tok[:, t0:end, h] = True
            fin[np.arange(B) if cu is None else np.searchsorted(cu, t0, side="right") - 1, h] = True
    return tok, fin


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST)
def _run(call, static_cu, x: dict, h0, cu, tok, fin):
    """(gradients w.r.t. the inputs in x and h0, (o, final)) of a random functional of the
    outputs and final states that must stay finite (tok, fin: those that need not), with the
    offsets traced (cu) or concrete (the tuple static_cu). Module-level, so that the reference
    compiles once per shape."""

    def loss(x, h0):
        o, ht = call(**x, initial_state=h0, cu_seqlens=cu if static_cu is None else np.asarray(static_cu))
        acc = jnp.promote_types(o.dtype, jnp.float32)
        r = jax.random.normal(jax.random.PRNGKey(0), o.shape, jnp.float32).astype(acc)
        r2 = jax.random.normal(jax.random.PRNGKey(1), ht.shape, jnp.float32).astype(acc)
        out = jnp.sum(jnp.where(tok[..., None], 0, o.astype(acc)) * r)
        return out + jnp.sum(jnp.where(fin[..., None, None], 0, ht.astype(acc)) * r2), (o, ht)

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, h0)


def _reference(*, initial_state, cu_seqlens, **x):
    """The float64 recurrence."""
    return iplr_jax.naive(
        **{n: up(y) for n, y in x.items()}, initial_state=up(initial_state), cu_seqlens=cu_seqlens,
        output_final_state=True,
    )


def _check(call, clean, bad, h0, names, cu=None, t0=T0, traced=True):
    B, T = clean["q"].shape[:2]
    tok, fin = _expected(B, T, names, cu, t0)
    args = (None if cu is None else jnp.asarray(cu, jnp.int32), tok, fin)
    static_cu = None if traced or cu is None else tuple(cu)
    (g, g_h0), (o, ht) = _run(call, static_cu, bad, h0, *args)
    (g_r, g_h0_r), (o_r, ht_r) = _run(_reference, static_cu, clean, h0, *args)
    o, ht = np.asarray(o, np.float64), np.asarray(ht, np.float64)
    np.testing.assert_array_equal(np.isnan(o), np.broadcast_to(tok[..., None], o.shape), "o NaN")
    np.testing.assert_array_equal(np.isnan(ht), np.broadcast_to(fin[..., None, None], ht.shape), "final NaN")
    assert rel_err(np.where(tok[..., None], 0, o), np.where(tok[..., None], 0, o_r)) < TOL
    assert rel_err(np.where(fin[..., None, None], 0, ht), np.where(fin[..., None, None], 0, ht_r)) < TOL
    for name in bad:
        assert rel_err(g[name], g_r[name]) < TOL, (f"d{name}", rel_err(g[name], g_r[name]))  # fails on NaN
    assert rel_err(g_h0, g_h0_r) < TOL, ("dh0", rel_err(g_h0, g_h0_r))


@functools.cache  # one callable per op: `_run` compiles once per op and shape
def _op(op, impl, chunk_size=16):
    fn = getattr(iplr_jax, op)
    kw = {} if op == "naive" else dict(implementation=impl)
    if op == "chunk":
        kw["chunk_size"] = chunk_size
    return lambda **x: fn(**x, output_final_state=True, **kw)


UNGATED, GATED = ("q", "k", "v", "a", "b"), ("q", "k", "v", "a", "b", "gk")
# the chunk kernels have no gate (gated chunk runs the xla form): their gated case is the xla one
OPS = (
    [("naive", None, True)]
    + [("chunk", i, i == "xla") for i in CHUNK_IMPLS]
    + [("fused_recurrent", i, True) for i in RECURRENT_IMPLS]
)


@pytest.mark.parametrize("op,impl,gated", OPS)
def test_causal(op, impl, gated, rng):
    """Two rows, T = 50 (not a multiple of the chunk), chunk 16."""
    names = GATED if gated else UNGATED
    clean, bad, h0 = _inputs(rng, 2, 50, names, gated=gated)
    _check(_op(op, impl), clean, bad, h0, names)


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "concrete"])
@pytest.mark.parametrize("op,impl,gated", OPS)
def test_causal_packed(op, impl, gated, traced, rng):
    """Packed sequences [0, 13), [13, 60), [60, 75), offsets traced or concrete: T0 is token 24
    of the middle one (the middle of its second chunk); the other two are untouched."""
    cu = [0, 13, 60, 75]
    names = GATED if gated else UNGATED
    clean, bad, h0 = _inputs(rng, 1, 75, names, N=3, gated=gated)
    _check(_op(op, impl), clean, bad, h0, names, cu=cu, traced=traced)


@pytest.mark.slow
@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_causal_chunk64(impl, rng):
    """Chunk 64: T0 in the middle of the first chunk."""
    clean, bad, h0 = _inputs(rng, 2, 50, UNGATED, gated=False)
    _check(_op("chunk", impl, chunk_size=64), clean, bad, h0, UNGATED)


@pytest.mark.parametrize("op,impl,gated", OPS)
def test_nan_initial_state(op, impl, gated, rng):
    """Left alone by the guard (docs/numerics.md): a NaN entry in one packed sequence's initial
    state reaches no other sequence, in the outputs, final states or gradients."""
    cu, names = [0, 13, 60, 75], GATED if gated else UNGATED
    clean, _, h0 = _inputs(rng, 1, 75, names, N=3, gated=gated)
    tok = np.zeros((1, 75, len(names) + 1), bool)
    tok[:, 13:60] = True  # the middle sequence is excluded from the functional
    fin = np.array([[False], [True], [False]]).repeat(len(names) + 1, 1)
    args = (jnp.asarray(cu, jnp.int32), tok, fin)
    (g, g_h0), (o, ht) = _run(_op(op, impl), None, clean, h0.at[1, 0, 2, 3].set(jnp.nan), *args)
    (g_r, g_h0_r), (o_r, ht_r) = _run(_reference, None, clean, h0, *args)
    other = ~tok[0, :, 0]
    assert rel_err(np.asarray(o)[:, other], np.asarray(o_r)[:, other]) < TOL
    assert rel_err(np.asarray(ht)[[0, 2]], np.asarray(ht_r)[[0, 2]]) < TOL
    for name in clean:
        assert rel_err(np.asarray(g[name])[:, other], np.asarray(g_r[name])[:, other]) < TOL, name
    assert rel_err(np.asarray(g_h0)[[0, 2]], np.asarray(g_h0_r)[[0, 2]]) < TOL


# -- context parallelism --------------------------------------------------------------------------

CP_T, CP_DEV = 64, 4  # 16 tokens per device


def _cp_call(exchange, combine, mesh):
    def local(q, k, v, a, b, h0, cu):
        return chunk_cp(
            q, k, v, a, b, axis_name="sp", initial_state=h0, output_final_state=True,
            cu_seqlens=cu, chunk_size=16, implementation="xla", exchange=exchange, combine=combine,
        )

    def call(q, k, v, a, b, initial_state, cu_seqlens):
        x = P(None, "sp")
        return jax.shard_map(
            local, mesh=mesh, in_specs=(x,) * 5 + (P(), None if cu_seqlens is None else P()),
            out_specs=(x, P()), check_vma=True,
        )(q, k, v, a, b, initial_state, cu_seqlens)

    return call


# packed: [5, 40) spans devices 0-2 and [40, 64) restarts inside device 2, so the fold must not
# carry the bad state past it (0 * NaN). A bad token at 9 (device 0) poisons later devices; one
# at 21 (device 1) must not reach device 0's gradients through the transposed combine.
CP_CASES = [
    ("allgather", "linear", False, 9), ("scan", "rerun", False, 9),
    ("allgather", "rerun", True, 9), ("scan", "linear", True, 9),
    ("allgather", "linear", True, 21), ("scan", "linear", False, 21),
]


@pytest.mark.parametrize("exchange,combine,packed,t0", CP_CASES)
def test_context_parallel(exchange, combine, packed, t0, rng):
    """4 devices: NaN from the bad token on, on later devices too, only for its own sequence
    (and head), its final state NaN, every other output and all gradients as without it."""
    cu = [0, 5, 40, 64] if packed else None
    clean, bad, h0 = _inputs(
        rng, 1 if packed else 2, CP_T, UNGATED, N=3 if packed else None, t0=t0, gated=False
    )
    call = _cp_call(exchange, combine, Mesh(np.array(jax.devices("cpu")[:CP_DEV]), ("sp",)))
    _check(call, clean, bad, h0, UNGATED, cu=cu, t0=t0)
