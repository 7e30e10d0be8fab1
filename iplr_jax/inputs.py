"""The contract every op shares: the input bundle, validation and the choice of implementation.

Every public op validates here, before any tracing, so a bad call fails with a `ValueError`
that names the argument, what it got and what it needs (docs/operator.md).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from iplr_jax import sharding

# "pallas": the Pallas kernels compiled for the GPU (today the Triton backend, iplr_jax/triton);
# "interpret": the same kernels through the Pallas interpreter (CPU testing); "xla": plain jnp.
IMPLEMENTATIONS = ("pallas", "xla", "interpret")
CHUNK_SIZES = (16, 32, 64)
# Largest key head size the Pallas kernels hold in one block (the state slab is [K, BV]).
MAX_KERNEL_HEAD_DIM = 256


class Inputs(NamedTuple):
    """The per-token inputs, bundled so that they travel together through every layer (a new
    input, such as a gate, is one field here rather than a change to every signature).

    q, k, a, b: [B, T, H, K]; v: [B, T, H, V] (or the chunk-aligned [1, L, H, Kp/Vp] inside the
    kernels' wrappers). gk: the optional DPLR gate, a log-decay [B, T, H, K] applied to the K
    rows of the state (`S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T`,
    docs/gate.md); None is IPLR, and every path then compiles exactly as without the field.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    a: jax.Array
    b: jax.Array
    gk: jax.Array | None = None

    @property
    def gated(self) -> bool:
        return self.gk is not None

    def arrays(self) -> tuple:
        """The inputs that are present: (q, k, v, a, b) and gk when gated."""
        return tuple(y for y in self if y is not None)

    def named(self) -> tuple:
        """(name, array) of the inputs that are present."""
        return tuple((n, y) for n, y in zip(self._fields, self, strict=True) if y is not None)

    def map(self, fn) -> Inputs:
        """`fn` applied to every input present (each field, by name: `fn(name, x)`); an absent
        gate stays None."""
        pairs = zip(self._fields, self, strict=True)
        return Inputs(*(None if x is None else fn(name, x) for name, x in pairs))


class Dims(NamedTuple):
    B: int  # batch (1 when packed)
    T: int  # tokens per batch row
    H: int  # heads
    K: int  # key / low-rank head size
    V: int  # value head size
    N: int  # number of sequences (B, or len(cu_seqlens) - 1 when packed)


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def check_arrays(x: Inputs) -> None:
    """Every input an array (a nested list or a scalar has no dtype to check or compute in)."""
    for name, y in x.named():
        if not (hasattr(y, "shape") and hasattr(y, "dtype")):
            raise TypeError(f"{name} must be an array (jax.Array or numpy), got {type(y).__name__}")


def resolve_implementation(implementation: str | None, x: Inputs) -> str:
    """`None` -> the fastest available: "pallas" on a GPU, "xla" elsewhere, and "xla" for
    float64 inputs everywhere (the kernels compute in float32, the xla path in float64)."""
    check_arrays(x)
    if implementation is None:
        if any(jnp.result_type(y) == jnp.float64 for y in x.arrays()):
            return "xla"
        return "pallas" if has_gpu() else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if implementation == "pallas" and not has_gpu():
        raise ValueError(
            'implementation="pallas" needs a GPU (the kernels use the Triton backend); '
            'use "xla" on CPU/TPU, or "interpret" to run the kernels through the Pallas interpreter'
        )
    return implementation


def shape_of(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def check_inputs(
    x: Inputs, *, scale=None, initial_state=None, cu_seqlens=None, chunk_size=None,
    implementation: str = "xla",
) -> Dims:
    """Validates the arguments shared by `naive`, `chunk` and `fused_recurrent`."""
    check_arrays(x)
    for name, y in x.named():
        if len(shape_of(y)) != 4:
            want = "[B, T, H, V]" if name == "v" else "[B, T, H, K]"
            raise ValueError(f"{name} must have shape {want}, got shape {shape_of(y)}")
        if not jnp.issubdtype(jnp.result_type(y), jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(y)}")
    B, T, H, K = shape_of(x.q)
    for name in ("k", "a", "b") + (("gk",) if x.gated else ()):
        if shape_of(getattr(x, name)) != (B, T, H, K):
            raise ValueError(
                f"{name} must have the shape of q, [B, T, H, K] = {(B, T, H, K)}, "
                f"got {shape_of(getattr(x, name))}"
            )
    if shape_of(x.v)[:3] != (B, T, H):
        raise ValueError(
            f"v must have shape [B, T, H, V] = ({B}, {T}, {H}, V) to match q, got {shape_of(x.v)}"
        )
    V = shape_of(x.v)[3]
    if min(K, V) < 1:
        raise ValueError(f"head sizes must be positive, got K={K} (q.shape[-1]) and V={V} (v.shape[-1])")
    if T < 1:
        raise ValueError(f"q must hold at least one token, got T={T} in q.shape={shape_of(x.q)}")
    if implementation in ("pallas", "interpret") and K > MAX_KERNEL_HEAD_DIM:
        raise ValueError(
            f"the Pallas kernels support K <= {MAX_KERNEL_HEAD_DIM}, got K={K} "
            f"(q.shape={shape_of(x.q)}); use implementation='xla' for larger heads"
        )
    if scale is not None:
        is_number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if not is_number:
            if not hasattr(scale, "dtype") or not jnp.issubdtype(jnp.result_type(scale), jnp.floating):
                raise ValueError(
                    f"scale must be a number or a floating-point scalar array (or None for "
                    f"K ** -0.5), got {scale!r}"
                )
            if shape_of(scale) != ():
                raise ValueError(f"scale must be a scalar, got shape {shape_of(scale)}")
    if chunk_size is not None and chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")

    N = B
    if cu_seqlens is not None:
        if isinstance(cu_seqlens, (list, tuple)):  # offsets typed in by hand
            cu_seqlens = np.asarray(cu_seqlens)
        if len(shape_of(cu_seqlens)) != 1 or shape_of(cu_seqlens)[0] < 2:
            raise ValueError(
                f"cu_seqlens must have shape [N + 1] with N >= 1, got shape {shape_of(cu_seqlens)}"
            )
        if not jnp.issubdtype(jnp.result_type(cu_seqlens), jnp.integer):
            raise ValueError(f"cu_seqlens must be integer offsets, got dtype {jnp.result_type(cu_seqlens)}")
        if B != 1:
            raise ValueError(
                f"with cu_seqlens the sequences are packed into a batch of 1: q must have shape "
                f"[1, T, H, K], got {shape_of(x.q)}"
            )
        N = shape_of(cu_seqlens)[0] - 1
        if not isinstance(cu_seqlens, jax.core.Tracer):
            cu = np.asarray(cu_seqlens)
            if cu[0] != 0 or cu[-1] != T or np.any(np.diff(cu) < 0):
                raise ValueError(
                    f"cu_seqlens must be non-decreasing offsets from 0 to T={T}, got {cu.tolist()}"
                )
    if initial_state is not None and not jnp.issubdtype(jnp.result_type(initial_state), jnp.floating):
        dtype = jnp.result_type(initial_state)
        raise ValueError(f"initial_state must be a floating-point array, got dtype {dtype}")
    if initial_state is not None and shape_of(initial_state) != (N, H, K, V):
        what = "N = len(cu_seqlens) - 1" if cu_seqlens is not None else "N = B"
        raise ValueError(
            f"initial_state must have shape [N, H, K, V] = {(N, H, K, V)} ({what}), "
            f"got {shape_of(initial_state)}"
        )
    return Dims(B, T, H, K, V, N)


def default_scale(scale, K: int):
    return K**-0.5 if scale is None else scale


def static_scale(q: jax.Array, scale) -> tuple[jax.Array, float]:
    """The kernels take `scale` as a Python float; a traced one (under jit) is folded into q."""
    try:
        return q, float(scale)
    except jax.errors.ConcretizationTypeError:
        return (q * scale).astype(q.dtype), 1.0


def accum_dtype(x: Inputs) -> jnp.dtype:
    """float32 accumulation, float64 when any input is float64 (the oracle)."""
    return jnp.float64 if any(jnp.result_type(y) == jnp.float64 for y in x.arrays()) else jnp.float32


def initial_state_or_zeros(initial_state, dims: Dims, dtype) -> jax.Array:
    """h0 [N, H, K, V] in `dtype`: the given state, or zeros."""
    if initial_state is None:
        return jnp.zeros((dims.N, dims.H, dims.K, dims.V), dtype)
    return jnp.asarray(initial_state, dtype)


def malformed_offsets(cu_seqlens, T: int):
    """For offsets traced under jit (which `check_inputs` cannot see): (bad, offsets) with `bad`
    a traced bool, True when they are not non-decreasing offsets from 0 to T, and offsets made
    safe to index with (non-decreasing, within [0, T]) so no kernel reads out of bounds.
    (None, cu_seqlens) when there is nothing to check.

    Every op then returns NaN for all outputs and final states (`poison`), never plausible
    numbers. Under `jax.experimental.checkify.checkify` the same condition is an error.
    """
    if cu_seqlens is None or not isinstance(cu_seqlens, jax.core.Tracer):
        return None, cu_seqlens
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    bad = (cu[0] != 0) | (cu[-1] != T) | jnp.any(cu[1:] < cu[:-1])
    checkify.debug_check(
        ~bad, f"cu_seqlens must be non-decreasing offsets from 0 to T={T}, got {{cu}}", cu=cu
    )
    safe = jnp.clip(jax.lax.cummax(cu), 0, T).at[0].set(0).at[-1].set(T)
    return bad, safe


def poison(bad, *arrays):
    """The arrays, or all-NaN arrays when the traced `bad` is True (None passes through)."""
    if bad is None:
        return arrays
    return tuple(None if y is None else jnp.where(bad, jnp.asarray(jnp.nan, y.dtype), y) for y in arrays)


class NonFinite(NamedTuple):
    """Where non-finite inputs poison the results (`guard_nonfinite`, docs/numerics.md
    "Non-finite inputs"): `tokens` [B, T, H] marks the outputs to set to NaN, `sequences`
    [N, H] the final states."""

    tokens: jax.Array
    sequences: jax.Array

    def poison(self, o, final):
        """(o, final) with NaN selected in where the flags say (select, not multiply: the
        cotangents of the poisoned entries are dropped, never multiplied by NaN)."""
        o = jnp.where(self.tokens[..., None], jnp.asarray(jnp.nan, o.dtype), o)
        final = jnp.where(self.sequences[..., None, None], jnp.asarray(jnp.nan, final.dtype), final)
        return o, final


def _nonfinite_rows(y) -> jax.Array:
    """[B, T, H]: True where a token's row (last dim) holds a NaN or inf."""
    return ~jnp.all(jnp.isfinite(y), axis=-1)


def guard_nonfinite(x: Inputs, cu_seqlens, dims: Dims) -> tuple[Inputs, NonFinite]:
    """Causality of non-finite inputs for every op and implementation (docs/numerics.md).

    A NaN / inf multiplied by a zero mask entry or a zero cotangent is NaN, so the chunked
    form's masked products (and every backward) would carry it to earlier tokens. Instead the
    op runs on inputs with the non-finite entries selected to 0, and `NonFinite.poison` selects
    NaN into the output of every token at or after a token whose k, v, a, b or gk holds one (in
    its own sequence and head; q only poisons its own token), and into the final state of such
    a sequence. `cu_seqlens`: the safe offsets of `malformed_offsets` (may be traced).

    Cost: an elementwise select per input (XLA fuses it into the producer), a reduction over
    the last dim, and a reduction over T of [B, T, H] flags (packed: a cumulative sum).
    """
    finite = lambda _, y: jnp.where(jnp.isfinite(y), y, 0)  # a weak 0 keeps y's dtype
    state = functools.reduce(
        jnp.logical_or, (_nonfinite_rows(y) for name, y in x.named() if name != "q")
    )
    if cu_seqlens is None:
        # the first bad token per row and head: a reduction over T, which partitions with T
        # sharded (context parallelism) where a cumulative sum over T would be gathered
        t = jnp.arange(dims.T, dtype=jnp.int32)[None, :, None]
        first = jnp.min(jnp.where(state, t, dims.T), axis=1)  # [B, H]
        tokens, sequences = t >= first[:, None], first < dims.T
    else:  # B = 1: count only the tokens of the token's own sequence
        from iplr_jax.layout import sequence_ids  # layout imports this module

        count = jnp.cumsum(state.astype(jnp.int32), axis=1)  # [1, T, H] state-bad tokens so far
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        upto = jnp.concatenate([jnp.zeros_like(count[0, :1]), count[0]])  # [T + 1, H], exclusive
        seq = sequence_ids(cu, jnp.arange(dims.T), dims.N)
        tokens = (count[0] - upto[cu[seq]] > 0)[None]
        sequences = upto[cu[1:]] - upto[cu[:-1]] > 0
    return x.map(finite), NonFinite(tokens | _nonfinite_rows(x.q), sequences)


def _branch(ok, fast, slow):
    """fast() if ok else slow(), thunks of the same structure, under one `lax.cond`: only the
    branch taken runs. (`benchmarks/guard_cost.py --forms select` times the alternative that
    runs fast() outside the cond; benchmarks/NOTES.md, session 13.)"""
    return jax.lax.cond(ok, fast, slow)


def guarded_unless_finite(run, x: Inputs, cu_seqlens, dims: Dims, *extra, guarded=None, axis_name=None):
    """`run(x, cu_seqlens, *extra) -> (o, final)` with `guard_nonfinite`'s semantics at the cost
    of a finiteness check of the outputs: a non-finite input always makes some output or final
    state non-finite, so when all of them are finite the plain run was exact and is kept; only
    otherwise the guarded run (sanitized inputs, poisoned outputs) is computed, under `lax.cond`.
    The backward follows the branch the forward took: the plain run's own VJP (no copies, no
    selects: the kernels' speed), or the guarded run's VJP, recomputed. `extra`: further arrays
    (initial state, a traced scale; None allowed) that `run` is differentiated in.
    `guarded`: a function of the same arguments to use instead of the sanitize-and-poison run
    (context parallelism: its own fold of bad-state flags). `axis_name`: inside `shard_map`,
    the mesh axes `run` communicates over; the branch is then chosen alike on all of them.
    """

    if guarded is None:

        def guarded(x, cu, *extra):
            x, nonfinite = guard_nonfinite(x, cu, dims)
            return nonfinite.poison(*run(x, cu, *extra))

    def finite(outs):
        ok = functools.reduce(jnp.logical_and, (jnp.all(jnp.isfinite(y)) for y in outs))
        if axis_name is None:
            return ok
        return jax.lax.pmin(ok.astype(jnp.int32), axis_name) > 0

    args = (x, cu_seqlens, *extra)
    leaves, tree = jax.tree.flatten(args)
    inexact = [jnp.issubdtype(jnp.result_type(y), jnp.inexact) for y in leaves]

    def call(fn, *ls):
        return fn(*jax.tree.unflatten(tree, ls))

    def chosen(ok, outs, ls):  # sharded like the plain run's (sharding.sharded_like says why)
        return sharding.sharded_like(_branch(ok, lambda: outs, lambda: call(guarded, *ls)), outs)

    @jax.custom_vjp
    def op(*ls):
        outs = call(run, *ls)
        return chosen(finite(outs), outs, ls)

    def fwd(*ls):
        outs, pull = jax.vjp(functools.partial(call, run), *ls)
        ok = finite(outs)
        return chosen(ok, outs, ls), (ls, pull, ok)

    def bwd(res, cts):
        ls, pull, ok = res

        def floats(grads):  # the cotangents of the float inputs (integer offsets get none)
            return [g for g, f in zip(grads, inexact, strict=True) if f]

        def slow():
            return floats(jax.vjp(functools.partial(call, guarded), *ls)[1](cts))

        grads = iter(sharding.sharded_like(_branch(ok, lambda: floats(pull(cts)), slow), floats(ls)))
        return tuple(next(grads) if f else None for f in inexact)

    op.defvjp(fwd, bwd)
    return op(*leaves)
