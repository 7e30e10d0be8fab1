"""Context parallelism: one sequence split over the devices of a mesh axis.

`chunk_cp` is `iplr_jax.chunk` for inputs whose time axis is sharded over a mesh axis; call it
inside `jax.shard_map` (other mesh axes may shard batch or heads at the same time; only the
named axis is communicated over). Two forms:

* on the kernels, for the default call without packing or gate and whole chunks per device,
  the per-slice functions that `chunk` also runs under plain `jit` with T sharded
  (ops/chunk.py `_fwd_shard_cp` / `_bwd_shard_cp`): a summary sweep per slice sharing the WY
  pass, `fold_entering` / `fold_exiting` below, the ordinary sweeps from the folded states
  (docs/architecture.md "Several devices");
* otherwise the composed form described next, built from public `chunk` calls alone (it is
  also where a non-finite input sends the kernels' form, since its flags keep NaN causal
  across devices).

Method
------
A segment of tokens is affine in the state it starts from,

    S_end = M S_start + h,    M = prod_t (I + b_t a_t^T)  (later tokens on the left),

(with a gate, M = prod_t (diag(exp(gk_t)) + b_t a_t^T): nothing below changes),

with `h` the state the segment reaches from a zero start. `chunk` produces both at once: run it
on the device's shard with `v` widened by K zero columns, `v' = [v | 0]`, and the initial state
`[0 | I_K]` ([K, V + K]). The state's columns evolve independently; with `v = 0` the K extra
columns just carry `I` through the transitions, so the final state is `[h | M]`. The same run's
output is `o' = [o_h | scale P_t^T q_t]` with `P_t` the product of the transitions up to token
t, so that once the state `C` entering the device is known, the exact output and final state
follow without a second pass:

    o_t = o_h,t + C^T (scale P_t^T q_t),    S_end = h + M C.

Exchange: every device contributes `[h | M]` (float32, [K, V + K] per sequence and head) and
the entering states are the exclusive prefix of the associative composition
`(M2, h2) o (M1, h1) = (M2 M1, M2 h1 + h2)`:
  * `exchange="allgather"`: one all-gather of the P summaries, then each device folds the
    ones before it, `C_{d+1} = M_d C_d + h_d` (P - 1 small matmuls, all local);
  * `exchange="scan"`: a Hillis-Steele scan with `ppermute`, log2(P) rounds of one summary
    each and one shift.
Either way the bytes exchanged per device do not depend on T. The fold runs in float32 (float64
for float64 inputs) at HIGHEST matmul precision: with no decay the norm of M need not shrink.
Without packing every batch row is one sequence spanning all devices: device 0 runs from
`[initial_state | 0]` (its summary has M = 0 and h = its end state, so `initial_state` enters
once), every later device from `[0 | I]`. The final state is the last device's, made
replicated over the axis by a `psum` of one-hot-masked values. M itself comes out of `chunk`'s
float32 state arithmetic (tf32 operands in the GPU sweep, like the state itself).

Gradients follow by composition: `chunk` is differentiable in all its inputs including
`initial_state`, and JAX transposes the collectives (the all-gather becomes a reduce-scatter
carrying dS summaries back to earlier devices, the ppermutes run backwards).

Packed sequences (`cu_seqlens`, B = 1): every device receives the same global offsets and its
own slice [t0, t1) of T. Local offsets are the global ones clipped to the slice, so sequences
that do not overlap it are empty there. Only one sequence can straddle the boundary t0 (start
before t0, end after it): it alone starts locally from `[0 | I]`; every other sequence starts
from `[initial_state[n] | 0]`, so its M part stays 0 and the formulas above leave it alone.
The summary a device passes on is the `[h | M]` row of the sequence straddling t1: if that
sequence also straddles t0 (it spans the device) it is the affine map of the whole device; if
it starts inside the device, its M is 0 and h is its state at t1, so the fold restarts there;
if no sequence straddles t1 the summary is zero. A sequence spanning three or more devices is
carried through the fold by the middle devices' M. A sequence's final state comes from the
device holding its last token (an empty sequence: the device its offset clips into, where it
keeps `initial_state[n]`).

Non-finite inputs (docs/numerics.md): each device's `chunk` returns NaN for a sequence from its
first bad token on (and for its final state). The folds turn a non-finite summary into a flag
and fold zeros in its place. The flag passes a device only if that device's summary carries its
entering state (`cont`). The combines then select NaN into the tokens and final state of the
sequence the bad state enters. Multiplying the NaN itself would reach other packed sequences
(`0 * NaN` at a restart, M = 0) and, in the backward, earlier tokens.

Cost
----
Per device, one `chunk` forward over its T / P tokens with V + K value columns instead of V
(for K = V about twice the work of a plain forward, less where the wy part dominates), plus a
[T/P, K] x [K, V] product for the output correction, and the exchange: P (allgather) or
log2(P) + 1 (scan) summaries of K (V + K) floats per sequence and head, and small KxK matmuls.
The backward is `chunk`'s backward on the widened run (again V + K columns) plus the
transposed exchange. With `combine="rerun"` the output instead comes from a second, ordinary
`chunk` from the entering state (the widened run's output unused): one more forward (and its
backward), but the output never passes through the widened run's output dtype, which matters
for 16-bit inputs (`o'` is rounded to v's dtype before the correction: bf16, 4 devices, output
error 2.2e-3 against `naive` (float32) with "linear", 1.6e-3 with "rerun", the same as
single-device `chunk`); `combine=None` picks "rerun" for 16-bit inputs and "linear" otherwise.
On an H200 at T = 256k, bf16, one device, "linear" measured slower than "rerun" (forward+backward
75.1 against 40.5 ms; benchmarks/NOTES.md), so the default stays "rerun" for 16-bit inputs.
Carrying I through the sweep costs K extra state columns; a kernel mode that multiplies the
per-chunk transitions `I + B^T W` ([K, K]) directly, as the issue suggests, would remove most
of that overhead.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import iplr_jax
from iplr_jax.inputs import Inputs, guarded_unless_finite, resolve_implementation
from iplr_jax.layout import sequence_ids
from iplr_jax.triton.config import ChunkConfig

__all__ = [
    "chunk_cp", "entering_state", "fold_entering", "fold_exiting", "packed_fold_entering",
    "packed_fold_exiting", "packed_slice",
]

_HI = jax.lax.Precision.HIGHEST
EXCHANGES = ("allgather", "scan")
COMBINES = ("linear", "rerun")


def _acc(*xs):
    return jnp.float64 if any(jnp.result_type(x) == jnp.float64 for x in xs) else jnp.float32


def _apply(m, c):
    """m [..., K, K] @ c [..., K, W] per leading index, HIGHEST precision."""
    return jnp.einsum("...kj,...jw->...kw", m, c, precision=_HI)


def _axis_size(axis_name) -> int:
    if hasattr(jax.lax, "axis_size"):
        return jax.lax.axis_size(axis_name)
    return jax.lax.psum(1, axis_name)  # a Python int inside shard_map


def _split_bad(x):
    """(x with every non-finite [K, W] state zeroed, [...] True where one was): a summary or an
    entering state marked bad by the NaN `chunk` gives a sequence with a non-finite input
    (docs/numerics.md "Non-finite inputs"). The folds carry it as a flag and compute on zeros:
    a NaN times a zero M (a sequence that restarts) would reach the next sequence, and the
    transposed products would send NaN gradients to earlier tokens."""
    bad = ~jnp.all(jnp.isfinite(x), axis=(-2, -1))
    return jnp.where(bad[..., None, None], 0, x), bad


def _fold_allgather(summary, axis_name, P, d, V, cont):
    """(the state entering device d, whether it is bad): the fold of the all-gathered
    summaries [h | M] of devices < d. cont[j]: device j's summary carries the state entering
    it (its M is the product of its transitions, not a restart)."""
    g = jax.lax.all_gather(summary, axis_name)  # [P, R, H, K, V + K]
    c = jnp.zeros_like(summary[..., :V])
    c_bad = jnp.zeros(summary.shape[:-2], bool)
    for j in range(P - 1):
        gj, gj_bad = _split_bad(g[j])
        nxt = _apply(gj[..., V:], c) + gj[..., :V]
        c = jnp.where(j < d, nxt, c)
        c_bad = jnp.where(j < d, gj_bad | (cont[j] & c_bad), c_bad)
    return c, c_bad


def _fold_scan(summary, axis_name, P, d, V, cont):
    """The same through a log-depth (Hillis-Steele) inclusive scan with ppermute, then a shift;
    a bad composition travels as NaN and is split off (`_split_bad`) where it is received."""
    x = summary  # [h | M] of the composition e_d o ... o e_{d - off + 1}
    dev = jnp.arange(P)
    off = 1
    while off < P:
        r = jax.lax.ppermute(x, axis_name, [(i, i + off) for i in range(P - off)])
        xs, x_bad = _split_bad(x)
        r, r_bad = _split_bad(r)
        # (M, h) o (Mr, hr) = (M Mr, M hr + h); devices d < off receive nothing (zeros). The
        # composition is bad where x is, or r is and x carries r's state through all its devices
        x_cont = jnp.all(jnp.where((dev > d - off) & (dev <= d), cont, True))
        y = _apply(xs[..., V:], r) + jnp.concatenate([xs[..., :V], jnp.zeros_like(xs[..., V:])], -1)
        y = jnp.where((x_bad | (x_cont & r_bad))[..., None, None], jnp.nan, y)
        x = jnp.where(d >= off, y, x)
        off *= 2
    # the inclusive prefix applied to a zero start is its h part; shift it by one device
    return _split_bad(jax.lax.ppermute(x[..., :V], axis_name, [(i, i + 1) for i in range(P - 1)]))


def fold_entering(summary, h0, *, axis_name):
    """The state entering this device's slice, [N, H, K, V] float32: h0 (replicated over
    `axis_name`) carried through the summaries [h | M] ([N, H, K, V + K]) of the devices
    before it, all-gathered: C_0 = h0, C_{j+1} = M_j C_j + h_j (every row one sequence). The
    kernels' T-sharded forward (ops/chunk.py) takes the summaries from a summary sweep."""
    return _carry(summary, h0, axis_name, backward=False)


def _carry(summary, c, axis_name, *, backward):
    """c carried through the all-gathered affine maps [h | M] ([..., K, V + K]) of the devices
    before this one (or, `backward`, after it, the maps' order reversed)."""
    V, P, d = c.shape[-1], _axis_size(axis_name), jax.lax.axis_index(axis_name)
    g = jax.lax.all_gather(summary, axis_name)
    for j in (range(P - 1, 0, -1) if backward else range(P - 1)):
        c = jnp.where(j > d if backward else j < d, _apply(g[j][..., V:], c) + g[j][..., :V], c)
    return c


def fold_exiting(summary, dht, *, axis_name):
    """The mirror of `fold_entering` for the backward: the cotangent of the state leaving this
    device's slice, dht (the final state's, replicated) carried right to left through the
    backward summaries [g | M^T] of the devices after it: D_{P-1} = dht, D_j = M_{j+1}^T
    D_{j+1} + g_{j+1}."""
    return _carry(summary, dht, axis_name, backward=True)


def entering_state(q, k, v, a, b, h0, *, axis_name, scale, chunk_size, implementation, config=None):
    """The state entering this device's slice of T, [B, H, K, V] in float32 (float64 for float64
    inputs): `h0` on the first device of `axis_name`, the fold of the earlier devices' summaries
    elsewhere (every batch row one sequence; no packing). A plain `chunk` from it gives this
    slice's output and end state; the jit path of `chunk` with T sharded (ops/chunk.py) runs
    that as its kernels' forward, keeping their residuals, and differentiates this function by
    recomputing it in the backward."""
    B, Tl, H, K = q.shape
    V = v.shape[-1]
    P = _axis_size(axis_name)
    d = jax.lax.axis_index(axis_name)
    acc = _acc(q, k, v, a, b)
    first = d == 0
    h0 = jnp.asarray(h0, acc)
    eye = jnp.broadcast_to(jnp.eye(K, dtype=acc), (B, H, K, K))
    s0_aug = jnp.concatenate([jnp.where(first, h0, 0), jnp.where(first, 0, eye)], axis=-1)
    v_aug = jnp.concatenate([v, jnp.zeros((B, Tl, H, K), v.dtype)], axis=-1)
    _, f_aug = iplr_jax.chunk(
        q, k, v_aug, a, b, initial_state=s0_aug, output_final_state=True, scale=scale,
        chunk_size=chunk_size, implementation=implementation, config=config,
    )
    # the inputs reach this point sanitized (chunk's guard, docs/numerics.md): never bad here
    c_in, _ = _fold_allgather(f_aug.astype(acc), axis_name, P, d, V, jnp.arange(P) > 0)
    return jnp.where(first, h0, c_in)


def chunk_cp(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    gk: jax.Array | None = None,
    *,
    axis_name,
    scale: float | jax.Array | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | None = None,
    chunk_size: int = 64,
    implementation: str | None = None,
    exchange: str = "allgather",
    combine: str | None = None,
    config: ChunkConfig | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """`iplr_jax.chunk` on a sequence whose time axis is sharded over the mesh axis `axis_name`.

    Call inside `jax.shard_map` with q, k, v, a, b sharded over T along `axis_name` (each device
    holds a contiguous slice of T, device i of the axis the i-th slice, all slices the same
    length); other mesh axes may shard batch or heads. `iplr_jax.chunk(..., sequence_axis=...)`
    calls this with the default `exchange` and `combine`.

    Args:
      q, k, a, b: the local shards [B, T / P, H, K]; v: [B, T / P, H, V].
      gk: optional DPLR gate, the local shard [B, T / P, H, K] (docs/gate.md); the method is
        unchanged, since M is still the product of the segment's transitions
        `diag(exp(gk_t)) + b_t a_t^T` and the widened run carries it like any state.
      axis_name: the mesh axis T is sharded over (a name, or a tuple of names when T is sharded
        over several mesh axes at once, device order as in the PartitionSpec).
      scale: output scale, default K ** -0.5.
      initial_state: [N, H, K, V], replicated over `axis_name`: the state before each sequence's
        first token.
      output_final_state: also return the state after each sequence's last token, [N, H, K, V]
        float32, replicated over `axis_name`.
      cu_seqlens: int32 [N + 1] GLOBAL offsets of the packed sequences (B = 1), replicated over
        `axis_name`; may be traced. Sequences may straddle device boundaries or be empty.
      chunk_size, implementation, config: as for `chunk`.
      exchange: "allgather" (one all-gather, fold in P - 1 steps) or "scan" (log2 P ppermute
        rounds).
      combine: "linear" (the output and final state from the widened run, corrected with the
        entering state), "rerun" (a second plain `chunk` from the entering state), or None
        ("rerun" for 16-bit inputs, else "linear").

    Returns:
      The local shard of `o` [B, T / P, H, V] (v's dtype) and the final states (or None).
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    try:
        _axis_size(axis_name)
    except NameError as e:
        raise ValueError(
            f"sequence_axis {axis_name!r} is no mesh axis of an enclosing jax.shard_map: call "
            f"chunk(..., sequence_axis=...) inside a shard_map whose in_specs shard T over it"
        ) from e
    if _kernel_path(q, k, v, a, b, gk, cu_seqlens, chunk_size, implementation, exchange, combine):
        return _chunk_cp_kernels(
            q, k, v, a, b, axis_name=axis_name, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size, implementation=implementation,
            cu_seqlens=cu_seqlens, config=config,
        )
    return _chunk_cp_composed(
        q, k, v, a, b, gk, axis_name=axis_name, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        implementation=implementation, exchange=exchange, combine=combine, config=config,
    )


def _global_offsets(cu_seqlens, B, P, Tl):
    """The packed offsets as int32, checked where concrete: global, from 0 to P * Tl."""
    if B != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed into a batch of 1, got B={B}")
    if isinstance(cu_seqlens, (list, tuple)):
        cu_seqlens = np.asarray(cu_seqlens)
    if not isinstance(cu_seqlens, jax.core.Tracer):
        cu_np = np.asarray(cu_seqlens)
        if cu_np[0] != 0 or cu_np[-1] != P * Tl or np.any(np.diff(cu_np) < 0):
            raise ValueError(
                f"cu_seqlens must be global non-decreasing offsets from 0 to T={P * Tl} "
                f"({P} devices x {Tl} tokens), got {cu_np.tolist()}"
            )
    return jnp.asarray(cu_seqlens, jnp.int32)


class PackedSlice(NamedTuple):
    """Where the packed sequences (global offsets cu [N + 1]) meet this device's slice [t0, t1)
    of T: local offsets, and per sequence whether it enters from the left (straddles t0),
    leaves to the right (straddles t1), ends here (its final state is this device's; an empty
    sequence: the device its offset clips into) or starts here (its initial state enters
    here)."""

    local: jax.Array
    enters: jax.Array
    leaves: jax.Array
    owned: jax.Array
    starts: jax.Array


def packed_slice(cu, Tl: int, axis_name) -> PackedSlice:
    P, d = _axis_size(axis_name), jax.lax.axis_index(axis_name)
    t0, t1 = d * Tl, (d + 1) * Tl
    first, last = cu[:-1], cu[1:]
    owned = jnp.clip((last - 1) // Tl, 0, P - 1) == d
    starts = jnp.where(first == last, owned, (first >= t0) & (first < t1))
    return PackedSlice(jnp.clip(cu - t0, 0, Tl), (first < t0) & (last > t0), (first < t1) & (last > t1),
                       owned, starts)


def _one_crossing(x, crossing):
    """[N, ...] -> [...]: the row of the (at most one) sequence marked, zeros if none."""
    return jnp.sum(jnp.where(crossing[:, None, None, None], x, 0), axis=0)


def _packed_fold(summary, x, *, own, passes, axis_name, backward):
    """The packed fold, either way: pieces marked `own` continue a sequence from the device the
    fold comes from and take the carried value; the rest keep `x`. Each device passes on, for
    the piece marked `passes`, its map if that piece also continued, else its true value with a
    zero map (the fold restarts there). summary: [N, H, K, V + K]; x: [N, H, K, V]."""
    V = x.shape[-1]
    h, m = summary[..., :V], summary[..., V:]
    cont = own[:, None, None, None]
    passed = jnp.concatenate([jnp.where(cont, h, _apply(m, x) + h), jnp.where(cont, m, 0)], -1)
    c = _carry(_one_crossing(passed, passes), jnp.zeros_like(x[0]), axis_name, backward=backward)
    return jnp.where(cont, c[None], x)


def packed_fold_entering(summary, h0, *, where: PackedSlice, axis_name):
    """`fold_entering` for packed sequences: every sequence starts from its h0 except the one
    entering from the left, whose state comes from the all-gathered map each device passes on
    for the sequence leaving it: [h | M] if that sequence also entered it, else its true end
    state with M = 0 (the fold restarts there). summary, h0: [N, H, K, *] per local piece."""
    return _packed_fold(summary, h0, own=where.enters, passes=where.leaves, axis_name=axis_name,
                        backward=False)


def packed_fold_exiting(summary, dht, *, where: PackedSlice, axis_name):
    """The mirror for the backward: every local piece leaves with its dht except the sequence
    leaving to the right, whose cotangent comes from the all-gathered maps each device passes
    back for the sequence entering it: [g | M^T] if that sequence also leaves it, else its true
    start cotangent with M^T = 0."""
    return _packed_fold(summary, dht, own=where.leaves, passes=where.enters, axis_name=axis_name,
                        backward=True)


def _kernel_path(q, k, v, a, b, gk, cu_seqlens, chunk_size, implementation, exchange, combine) -> bool:
    """The kernels' own context parallelism (summary sweeps, `fold_entering` / `fold_exiting`
    and their packed forms) serves the default call on the kernels: no gate, whole chunks per
    device, the default exchange and combine, head sizes whose backward runs in kernels
    (K, V <= 128)."""
    if gk is not None or exchange != "allgather" or combine is not None:
        return False
    if q.ndim != 4 or q.shape[1] % chunk_size or max(q.shape[-1], v.shape[-1]) > 128:
        return False
    return resolve_implementation(implementation, Inputs(q, k, v, a, b)) in ("pallas", "interpret")


def _chunk_cp_kernels(q, k, v, a, b, *, axis_name, scale, initial_state, output_final_state,
                      chunk_size, implementation, cu_seqlens=None, config=None):
    """`chunk_cp` on the kernels: the per-slice forward and backward of `chunk` under jit with T
    sharded (ops/chunk.py), here inside the caller's shard_map. A non-finite input on any
    device takes every device to `_chunk_cp_composed` (its flags keep NaN causal across
    devices; docs/numerics.md), chosen alike over the axis."""
    from iplr_jax.ops.chunk import kernels_on_slices

    x = Inputs(q, k, v, a, b)
    impl = resolve_implementation(implementation, x)
    B, Tl, H, K = q.shape
    V = v.shape[-1]
    cu = None if cu_seqlens is None else _global_offsets(cu_seqlens, B, _axis_size(axis_name), Tl)
    N = B if cu is None else cu.shape[0] - 1
    if initial_state is not None and initial_state.shape != (N, H, K, V):
        raise ValueError(f"initial_state must have shape {(N, H, K, V)}, got {initial_state.shape}")
    scale = K**-0.5 if scale is None else scale
    # a traced scale enters the guard's custom_vjp as an argument, not closed over (as in `chunk`)
    extra = (initial_state,) if isinstance(scale, (int, float)) else (initial_state, scale)

    def run(x, cu, h0, *traced):
        h0 = jnp.zeros((N, H, K, V), jnp.float32) if h0 is None else h0.astype(jnp.float32)
        return kernels_on_slices(x, scale=traced[0] if traced else scale, h0=h0, cu_seqlens=cu,
                                 chunk_size=chunk_size, interpret=impl == "interpret", axes=axis_name,
                                 config=config)

    def composed(x, cu, h0, *traced):
        o, final = _chunk_cp_composed(
            *x.arrays(), None, axis_name=axis_name, scale=traced[0] if traced else scale,
            initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=chunk_size,
            implementation=impl, exchange="allgather", combine=None, config=config,
        )
        return o, final.astype(jnp.float32)

    o, final = guarded_unless_finite(run, x, cu, None, *extra, guarded=composed, axis_name=axis_name)
    return o.astype(v.dtype), (final if output_final_state else None)


def _chunk_cp_composed(
    q, k, v, a, b, gk, *, axis_name, scale, initial_state, output_final_state, cu_seqlens,
    chunk_size, implementation, exchange, combine, config=None,
):
    """`chunk_cp` from public `chunk` calls: the widened run and a combine (module docstring)."""
    if combine is None:
        combine = "rerun" if jnp.dtype(v.dtype).itemsize < 4 else "linear"
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES} or None, got {combine!r}")
    if q.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q and v must be [B, T, H, *] shards, got {q.shape} and {v.shape}")
    B, Tl, H, K = q.shape
    V = v.shape[-1]
    P = _axis_size(axis_name)
    d = jax.lax.axis_index(axis_name)
    acc = _acc(*(x for x in (q, k, v, a, b, gk) if x is not None))
    t0 = d * Tl
    kw = dict(scale=scale, chunk_size=chunk_size, implementation=implementation, config=config)

    if cu_seqlens is None:
        N = B
        # every row is one sequence spanning all devices
        straddle_in = jnp.broadcast_to(d > 0, (N,))
        lcu = cu = None
    else:
        cu = _global_offsets(cu_seqlens, B, P, Tl)
        N = cu.shape[0] - 1
        lcu = jnp.clip(cu - t0, 0, Tl)
        straddle_in = (cu[:-1] < t0) & (cu[1:] > t0)
    if initial_state is not None and initial_state.shape != (N, H, K, V):
        raise ValueError(f"initial_state must have shape {(N, H, K, V)}, got {initial_state.shape}")
    h0 = (
        jnp.zeros((N, H, K, V), acc) if initial_state is None else jnp.asarray(initial_state, acc)
    )

    # widened run: [v | 0], start [h0 | 0] (or [0 | I] for the sequence entering from the left)
    eye = jnp.broadcast_to(jnp.eye(K, dtype=acc), (N, H, K, K))
    sel = straddle_in[:, None, None, None]
    s0_aug = jnp.concatenate(
        [jnp.where(sel, 0, h0), jnp.where(sel, eye, 0)], axis=-1
    ).astype(acc)
    v_aug = jnp.concatenate([v, jnp.zeros((B, Tl, H, K), v.dtype)], axis=-1)
    o_aug, f_aug = iplr_jax.chunk(
        q, k, v_aug, a, b, gk, initial_state=s0_aug, output_final_state=True, cu_seqlens=lcu, **kw
    )
    f_aug = f_aug.astype(acc)  # [N, H, K, V + K] = [h | M] per sequence
    # a sequence with a non-finite input comes back NaN from its first bad token on (and its
    # final state): keep that as flags and compute on zeros, selecting NaN back in at the end
    # (docs/numerics.md "Non-finite inputs")
    o_bad = ~jnp.all(jnp.isfinite(o_aug), axis=-1)  # [B, Tl, H]
    o_aug = jnp.where(o_bad[..., None], 0, o_aug)
    f_safe, f_bad = _split_bad(f_aug)  # [N, H]

    # the summary passed to the next device: per row (non-packed), or the straddling sequence
    # (NaN if bad, `_split_bad`); cont[j]: device j's summary carries its entering state
    if cu_seqlens is None:
        summary = f_aug  # [B, H, K, V + K]
        cont = [j > 0 for j in range(P)]  # device 0 starts from initial_state: M = 0
        seq_in = jnp.ones((B, Tl), bool)  # tokens of the sequence entering from the left (d > 0)
    else:
        t1 = t0 + Tl
        out = (cu[:-1] < t1) & (cu[1:] > t1)
        summary = jnp.sum(jnp.where(out[:, None, None, None], f_aug, 0), axis=0, keepdims=True)
        cont = [jnp.any((cu[:-1] < j * Tl) & (cu[1:] > (j + 1) * Tl)) for j in range(P)]
        seq_in = straddle_in[sequence_ids(lcu, jnp.arange(Tl), N)][None]
    fold = _fold_allgather if exchange == "allgather" else _fold_scan
    c_in, c_bad = fold(summary, axis_name, P, d, V, jnp.asarray(cont))  # [R, H, K, V], [R, H]
    # a bad entering state (never on device 0): NaN for the tokens and final state it enters
    tok_bad = seq_in[..., None] & c_bad[:, None]  # [B, Tl, H]
    fin_bad = straddle_in[:, None] & c_bad  # [N, H]

    nan = jnp.asarray(jnp.nan, v.dtype)
    if combine == "linear":
        corr = jnp.einsum("bthk,bhkv->bthv", o_aug[..., V:].astype(acc), c_in, precision=_HI)
        o = (o_aug[..., :V].astype(acc) + corr).astype(v.dtype)
        o = jnp.where((o_bad | tok_bad)[..., None], nan, o)
        final = f_safe[..., :V] + _apply(f_safe[..., V:], c_in)  # c_in broadcasts over N if packed
        final = jnp.where((f_bad | fin_bad)[..., None, None], jnp.nan, final)
    else:
        s0 = jnp.where(sel, c_in, h0)
        o, final = iplr_jax.chunk(
            q, k, v, a, b, gk, initial_state=s0, output_final_state=output_final_state,
            cu_seqlens=lcu, **kw,
        )
        o = jnp.where(tok_bad[..., None], nan, o)
        if output_final_state:
            final = jnp.where(fin_bad[..., None, None], jnp.nan, final)
    if not output_final_state:
        return o, None

    # each sequence's final state from the device holding its last token
    if cu_seqlens is None:
        owner = jnp.broadcast_to(d == P - 1, (N,))
    else:
        owner = jnp.clip((cu[1:] - 1) // Tl, 0, P - 1) == d
    final = jax.lax.psum(jnp.where(owner[:, None, None, None], final, 0), axis_name)
    return o, final
