"""Segmented sweeps (`ChunkConfig.segment_chunks`, iplr_jax/segments.py): outputs, final states
and all six gradients against the float64 recurrence, with every sequence cut into segments;
the segment bookkeeping itself against a direct count; the rule."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CHUNK_IMPLS, GPU
from helpers import assert_grads, grads, make_inputs, reference, rel_err, tol

import iplr_jax
from iplr_jax import segments
from iplr_jax.triton.config import NUM_SMS, ChunkConfig, chunk_config

KERNELS = [i for i in CHUNK_IMPLS if i != "xla"]

CASES = {
    # name: (B, T, H, K, V, chunk_size, cu_seqlens lengths or None, segment_chunks)
    "rows_c16_seg3": (2, 100, 2, 32, 16, 16, None, 3),  # 7 chunks a row: 3 segments, T odd
    "rows_c32_K60_seg1": (1, 200, 1, 60, 20, 32, None, 1),  # one chunk per segment
    "rows_seg_divides": (2, 128, 1, 16, 32, 16, None, 4),  # row boundary on a cut
    "packed_c16_seg3": (1, 300, 2, 32, 32, 16, [70, 0, 130, 5, 95], 3),
    "packed_empty_last": (1, 160, 1, 16, 16, 16, [100, 60, 0], 2),
}


def _run(impl, case, rng):
    B, T, H, K, V, C, lens, seg = CASES[case]
    N = B if lens is None else len(lens)
    (q, k, v, a, b), h0 = make_inputs(rng, B, T, H, K, V, N=N)
    cu = None if lens is None else jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    fn = functools.partial(
        iplr_jax.chunk, cu_seqlens=cu, chunk_size=C, implementation=impl,
        config=ChunkConfig(segment_chunks=seg),
    )
    ref = functools.partial(reference, cu_seqlens=cu)
    return (q, k, v, a, b), h0, fn, ref


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("case", list(CASES))
def test_segmented_forward(rng, impl, case):
    x, h0, fn, ref = _run(impl, case, rng)
    o, ht = fn(*x, initial_state=h0, output_final_state=True)
    ro, rht = ref(*x, initial_state=h0, output_final_state=True)
    assert rel_err(o, ro) < tol(jnp.float32)
    assert rel_err(ht, rht) < tol(jnp.float32)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("case", ["rows_c16_seg3", "packed_c16_seg3", "packed_empty_last"])
def test_segmented_gradients(rng, impl, case):
    x, h0, fn, ref = _run(impl, case, rng)
    got = grads(fn, x, h0)
    want = grads(ref, x, h0)
    assert_grads(got, want, 5 * tol(jnp.float32), case)


@pytest.mark.parametrize("impl", KERNELS)
def test_segmented_bf16_equals_unsegmented(rng, impl):
    """bf16: the segmented forward and backward agree with the whole-sequence sweeps to bf16
    rounding (the fold runs in float32, the residuals are the same states). The sweeps' state
    products keep float32 operands here, so the final states agree to float32 rounding: with
    16-bit ones (`low_precision_state`) the two orders round differently, at bf16's level."""
    (q, k, v, a, b), h0 = make_inputs(rng, 1, 256, 2, 32, 32, dtype=jnp.bfloat16)
    x = (q, k, v, a, b)
    whole = functools.partial(iplr_jax.chunk, chunk_size=16, implementation=impl,
                              config=ChunkConfig(segment_chunks=0, low_precision_state=False))
    cut = functools.partial(iplr_jax.chunk, chunk_size=16, implementation=impl,
                            config=ChunkConfig(segment_chunks=3, low_precision_state=False))
    ow, hw = whole(*x, initial_state=h0, output_final_state=True)
    oc, hc = cut(*x, initial_state=h0, output_final_state=True)
    assert rel_err(oc, ow) < 1e-2 and rel_err(hc, hw) < 1e-3
    assert_grads(grads(cut, x, h0), grads(whole, x, h0), 2e-2)


def test_split_bookkeeping():
    """Every segment lies inside one sequence and is at most segment_chunks long; first / last
    find each sequence's end segments; starts marks exactly the first segment of a sequence."""
    cu_chunks = np.array([0, 5, 5, 12, 12, 13, 20])
    segs = segments.split(jnp.asarray(cu_chunks), 24, 4)
    cu = np.asarray(segs.cu)
    assert cu[0] == 0 and cu[-1] == 20 and np.all(np.diff(cu) >= 0)
    assert set(cu_chunks) <= set(cu.tolist())
    for s in range(len(cu) - 1):
        lo, hi = cu[s], cu[s + 1]
        assert hi - lo <= 4
        if hi > lo:
            n = np.searchsorted(cu_chunks[1:], lo, side="right")
            assert cu_chunks[n] <= lo and hi <= cu_chunks[n + 1]
            assert int(segs.seq[s]) == n
            assert bool(segs.starts[s]) == (lo == cu_chunks[n])
    for n in range(len(cu_chunks) - 1):
        empty = cu_chunks[n] == cu_chunks[n + 1]
        assert bool(segs.empty[n]) == empty
        if not empty:
            lo, hi = int(segs.first[n]), int(segs.last[n])
            assert cu[lo] == cu_chunks[n] and cu[lo + 1] > cu[lo]
            assert cu[hi + 1] == cu_chunks[n + 1] and cu[hi + 1] > cu[hi]


def test_rule_and_explicit_segments():
    """Off by default on one device (measured slower on an H100, benchmarks/NOTES.md), on for a
    context-parallel slice at small N * H; an explicit value is kept, and the sweeps' V-blocks
    then count the segments as chains (wider blocks)."""
    rule = functools.partial(chunk_config, Kp=128, Vp=128, dtype=jnp.bfloat16, interpret=False)
    assert rule(None, N=1, H=8, num_chunks=512).segment_chunks == 0
    whole = rule(None, N=1, H=8, num_chunks=512)
    cut = rule(ChunkConfig(segment_chunks=32), N=1, H=8, num_chunks=512)
    assert cut.segment_chunks == 32
    assert cut.state_block_v > whole.state_block_v and cut.bwd_sweep_block_v > whole.bwd_sweep_block_v
    assert cut.state_block_v * 8 * (512 // 32) >= NUM_SMS * 16
    # a context-parallel slice: segments for about NUM_SMS / 2 chains where N * H gives fewer
    cp = functools.partial(rule, None, context_parallel=True)
    assert cp(N=1, H=16, num_chunks=2048).segment_chunks == 2048 // (NUM_SMS // 32)
    assert cp(N=1, H=16, num_chunks=2048, gated=True).segment_chunks == 0
    assert cp(N=8, H=16, num_chunks=2048).segment_chunks == 0
    with pytest.raises(ValueError, match="segment_chunks"):
        chunk_config(ChunkConfig(segment_chunks=-1), N=1, H=1, Kp=16, Vp=16, num_chunks=4,
                     dtype=jnp.float32, interpret=True)


@pytest.mark.parametrize("impl", KERNELS)
def test_segments_jit_traced_offsets(rng, impl):
    """Traced cu_seqlens under jit: the segment count is static, the cuts follow the values."""
    x, h0, fn, ref = _run(impl, "packed_c16_seg3", rng)
    lens = CASES["packed_c16_seg3"][6]
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    f = jax.jit(lambda cu, *x: iplr_jax.chunk(
        *x, cu_seqlens=cu, chunk_size=16, implementation=impl, initial_state=h0,
        output_final_state=True, config=ChunkConfig(segment_chunks=3)))
    o, ht = f(cu, *x)
    ro, rht = reference(*x, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, ro) < tol(jnp.float32) and rel_err(ht, rht) < tol(jnp.float32)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("lens", [None, (32, 0, 80, 16)], ids=["rows", "packed_empty"])
def test_sequence_summaries(rng, lens, impl):
    """The sequences' summaries composed from their segments' (`segments.sequence_summaries`,
    what a context-parallel slice exchanges) against the float64 recurrence: per sequence,
    [h | M] with h the state reached from zero and M the product of the transitions
    (I + b a^T); [g | M^T] with g the gradient of <o, do> with respect to the initial state.
    Segments of 2 chunks: rows of 3 chunks straddle a cut; packed, one sequence empty and one
    of 5 chunks over three segments."""
    from iplr_jax.triton import chunk as ck
    from iplr_jax.triton import chunk_bwd as cb
    from iplr_jax.triton.wy_fast import wy_fwd

    C, H, K, V, scale = 16, 2, 16, 32, 0.4
    B, T = (2, 48) if lens is None else (1, sum(lens))
    (q, k, v, a, b), _ = make_inputs(rng, B, T, H, K, V)
    do = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    offs = np.arange(B + 1) * T if lens is None else np.concatenate([[0], np.cumsum(lens)])
    flat = lambda x: x.reshape(1, B * T, H, x.shape[-1])  # noqa: E731
    q, k, v, a, b, do = map(flat, (q, k, v, a, b, do))
    cu_chunks = jnp.asarray(offs // C, jnp.int32)
    interpret = impl == "interpret"
    config = chunk_config(ChunkConfig(segment_chunks=2), N=len(offs) - 1, H=H, Kp=K, Vp=V,
                          num_chunks=B * T // C, dtype=jnp.float32, interpret=interpret)
    w, u = wy_fwd(a, b, k, v, chunk_size=C, config=config, interpret=interpret)
    segs = segments.split(cu_chunks, B * T // C, 2)
    zeros = jnp.zeros((segs.seq.shape[0], H, K, V), jnp.float32)
    kw = dict(chunk_size=C, scale=scale, config=config, interpret=interpret, summary=True)
    (fwd,) = ck._state_pass(w, u, k, b, v, segs.cu, zeros, q=None, gc=None, low_v2=False, **kw)
    (bwd,) = cb._sweep(q, b, w, do, zeros, segs.cu, dt=jnp.float32, **kw)
    fwd = segments.sequence_summaries(fwd, segs, cu_chunks)
    bwd = segments.sequence_summaries(bwd, segs, cu_chunks, reverse=True)
    f64 = lambda x: np.asarray(x[0], np.float64)  # noqa: E731
    q, k, v, a, b, do = map(f64, (q, k, v, a, b, do))
    for n in range(len(offs) - 1):
        # the float64 recurrence from S = 0 and the product P of the transitions so far:
        # h = S_end, M = P_end, g = d<o, do>/dS0 = sum_t scale P_t^T q_t do_t^T
        h, m, g = np.zeros((H, K, V)), np.broadcast_to(np.eye(K), (H, K, K)), np.zeros((H, K, V))
        for t in range(int(offs[n]), int(offs[n + 1])):
            step = np.eye(K) + b[t][:, :, None] * a[t][:, None, :]  # [H, K, K]
            h = step @ h + k[t][:, :, None] * v[t][:, None, :]
            m = step @ m
            g = g + scale * np.swapaxes(m, -1, -2) @ (q[t][:, :, None] * do[t][:, None, :])
        eps = 1e-5 if interpret and not GPU else tol(jnp.float32)  # tf32 products on a GPU, interpreted too
        assert rel_err(fwd[n, ..., V:], m) < eps and rel_err(bwd[n, ..., V:], np.swapaxes(m, -1, -2)) < eps
        if offs[n + 1] == offs[n]:
            assert not np.any(fwd[n, ..., :V]) and not np.any(bwd[n, ..., :V])
        else:
            assert rel_err(fwd[n, ..., :V], h) < eps and rel_err(bwd[n, ..., :V], g) < eps


@pytest.mark.parametrize("ns", [1, 5, 20])
@pytest.mark.parametrize("sequential", [0, 64])
def test_affine_prefix_loop_and_scan(rng, monkeypatch, ns, sequential):
    """The fold of affine maps x_s = m_s x_{s-1} + c_s (x_0 = c_0) behind the segments' entering
    states and summaries, as a loop (up to `SEQUENTIAL_PREFIX` segments) and as a log-depth
    scan, against the float64 recurrence."""
    monkeypatch.setattr(segments, "SEQUENTIAL_PREFIX", sequential)
    m = rng.standard_normal((ns, 2, 8, 8)) / 3
    c = rng.standard_normal((ns, 2, 8, 5))
    want = [c[0]]
    for s in range(1, ns):
        want.append(np.einsum("hij,hjw->hiw", m[s], want[-1]) + c[s])
    got = segments._affine_prefix(jnp.asarray(m, jnp.float32), jnp.asarray(c, jnp.float32))
    assert got.shape == c.shape
    assert rel_err(got, np.stack(want)) < 1e-5
