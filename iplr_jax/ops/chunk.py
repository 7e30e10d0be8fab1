"""`chunk`: IPLR in the chunked parallel form (training, prefill).

Validation and the choice of implementation, then either the jnp chunked form
(`reference.chunk.chunk_xla`, differentiated by autodiff) or a Pallas backend's kernels on the
chunk-aligned layout: forward `triton.chunk.chunk_fwd`, backward `triton.chunk_bwd.chunk_bwd`,
tied by a custom_vjp and partitioned over batch and heads (`_chunk_pallas`;
docs/architecture.md says where a second backend plugs in).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from iplr_jax import layout as lay
from iplr_jax.inputs import (
    Dims,
    Inputs,
    accum_dtype,
    check_inputs,
    default_scale,
    guard_nonfinite,
    guarded_unless_finite,
    initial_state_or_zeros,
    malformed_offsets,
    poison,
    resolve_implementation,
    static_scale,
)
from iplr_jax.reference.chunk import chunk_xla
from iplr_jax.sharding import (
    explicit_shards,
    like_inputs,
    match_vma,
    partitioned,
    partitioned_vjp,
    vma_of,
)
from iplr_jax.triton import chunk as triton_fwd
from iplr_jax.triton import chunk_bwd as triton_bwd
from iplr_jax.triton.config import ChunkConfig, chunk_config, default_f32_dots

# The Pallas path as functions of one shard's public-shaped arrays ([B, T, H, D] tokens, [N, H, K,
# V] states): `sharding.partitioned_vjp` runs them as the op's forward and backward, on every
# device's own batch / head shard under jit with sharded inputs, as they are inside shard_map
# or on one device (docs/architecture.md). So the layout, the padding and the kernel config
# follow the local shapes, and the residuals keep the batch as their leading dimension (free
# reshapes) so that they shard with it.
TOKENS, VALUES = "b t h k", "b t h v"
# chunk(precision=...) -> the jax.default_matmul_precision it runs under (the kernels' rule in
# triton/config.py and the xla path's einsums both follow it)
PRECISIONS = {"highest": "highest", "float32": "highest", "default": "default", "tf32": "tensorfloat32"}
RESIDUALS = ("b c h kp vp", "b l h vp", "b c h i j", "b l h kp")  # h, v_new, X, W
TOKENS_CP, VALUES_CP = "b (c s) h k", "b (c s) h v"  # T = c chunks of s tokens, c may shard
RESIDUALS_CP = ("b c h kp vp", "b (c s) h vp", "b c h i j", "b (c s) h kp")


def _local(q, v, cu, chunk_size, config, interpret, dtype, gated=False, context_parallel=False):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dims = Dims(B, T, H, K, V, B if cu is None else cu.shape[0] - 1)
    layout = lay.make_layout(dims, cu, chunk_size)
    Kp, Vp = lay.next_pow2(K), lay.next_pow2(V)
    config = chunk_config(
        config, N=dims.N, H=H, Kp=Kp, Vp=Vp, num_chunks=layout.num_chunks, dtype=dtype,
        interpret=interpret, gated=gated, context_parallel=context_parallel,
    )
    return dims, layout, Kp, Vp, config


def _gated_fwd_shard(q, k, v, a, b, gk, h0, *cu, residuals=False, **kw):
    """`_fwd_shard` with the gate: the gated kernels (docs/gate.md)."""
    return _fwd_shard(q, k, v, a, b, h0, *cu, gk=gk, residuals=residuals, **kw)


def _gated_kernels_bwd_shard(q, k, v, a, b, gk, h0, *rest, **kw):
    """`_bwd_shard` with the gate: the gated backward kernels (`ChunkConfig(bwd_kernels=True)`)."""
    return _bwd_shard(q, k, v, a, b, h0, *rest, gk=gk, **kw)


def _precision_now(config: ChunkConfig | None) -> ChunkConfig:
    """The config with the f32 dot precision read now: the per-shard functions are traced again
    when XLA partitions, outside the caller's `jax.default_matmul_precision` context."""
    config = config or ChunkConfig()
    if config.f32_dots is None:
        config = dataclasses.replace(config, f32_dots=default_f32_dots())
    return config


def _chunk_pallas_gated(x: Inputs, *, scale, h0, cu_seqlens, chunk_size, config, interpret):
    """With the gate: the gated kernels on every batch / head shard. Differentiated, by the
    config's `bwd_kernels` (on for Kp <= 128), the gated backward kernels from the forward's
    residuals (`sharding.partitioned_vjp`), or the jnp form's forward and VJP
    (`_kernels_or_jnp_vjp`)."""
    q, scale = static_scale(x.q, scale)
    config = _precision_now(config)
    kw = dict(scale=scale, chunk_size=chunk_size, config=config, interpret=interpret)
    packed = cu_seqlens is not None
    state = ("n" if packed else "b") + " h k v"
    primal = functools.partial(_gated_fwd_shard, **kw)
    Kp, Vp = lay.next_pow2(x.q.shape[-1]), lay.next_pow2(x.v.shape[-1])
    rule = chunk_config(  # only bwd_kernels is read: a rule of Kp and the gate
        config, N=1, H=1, Kp=Kp, Vp=Vp, num_chunks=1, dtype=x.q.dtype, interpret=interpret,
        gated=True,
    )
    in_specs = [TOKENS, TOKENS, VALUES, TOKENS, TOKENS, TOKENS, state] + (["m"] if packed else [])
    cu = (jnp.asarray(cu_seqlens, jnp.int32),) if packed else ()
    args = match_vma(*x._replace(q=q).arrays(), h0, *cu)
    if not rule.bwd_kernels:
        return _kernels_or_jnp_vjp(partitioned(primal, in_specs, [VALUES, state]), args, scale, chunk_size)
    op = partitioned_vjp(
        primal,
        functools.partial(_gated_fwd_shard, residuals=True, **kw),
        functools.partial(_gated_kernels_bwd_shard, **kw),
        in_specs=in_specs, out_specs=[VALUES, state], res_specs=RESIDUALS, num_diff=7,
    )
    return op(*args)


def _kernels_or_jnp_vjp(kernels, args, scale, chunk_size):
    """The gated kernels for a plain call; under differentiation the jnp form's forward and VJP
    instead (autodiff residuals), where the gated backward kernels do not run (Kp = 256, or
    `bwd_kernels=False`): kernels + the jnp form's recomputed VJP measured slower to train than
    the jnp form alone (benchmarks/NOTES.md, session 7; docs/gate.md)."""
    v_dtype = args[2].dtype

    def jnp_form(*a):
        o, final = _chunk_jnp(Inputs(*a[:6]), scale=scale, h0=a[6], cu_seqlens=a[7] if len(a) > 7 else None,
                              chunk_size=chunk_size)
        return o.astype(v_dtype), final.astype(jnp.float32)

    @jax.custom_vjp
    def op(*a):
        o, final = kernels(*a)
        return o.astype(v_dtype), final.astype(jnp.float32)

    def fwd(*a):
        outs, pull = jax.vjp(lambda *f: jnp_form(*f, *a[7:]), *a[:7])
        return outs, pull

    def bwd(pull, cts):
        return (*pull(cts), *([None] * (len(args) - 7)))

    op.defvjp(fwd, bwd)
    return op(*args)


def _fwd_shard(q, k, v, a, b, h0, *cu, scale, chunk_size, config, interpret, residuals, gk=None,
               sequence_axes=None, enter=None):
    """(o, ht) of one shard and, with `residuals`, (h, v_new, X, W) with the batch leading."""
    if sequence_axes is not None:
        return _fwd_shard_cp(q, k, v, a, b, h0, *cu, sequence_axes=sequence_axes, scale=scale,
                             chunk_size=chunk_size, config=config, interpret=interpret,
                             residuals=residuals)
    x = Inputs(q, k, v, a, b, gk)
    cu = cu[0] if cu else None
    dt = jnp.result_type(q, k, v, a, b)
    dims, layout, Kp, Vp, config = _local(q, v, cu, chunk_size, config, interpret, dt, x.gated,
                                          context_parallel=enter is not None)
    o, ht, res = triton_fwd.chunk_fwd(
        lay.align(x, layout, Kp, Vp), lay.pad_state(h0.astype(jnp.float32), Kp, Vp),
        layout.cu_chunks, scale=scale, chunk_size=chunk_size, config=config, interpret=interpret,
        residuals=residuals, enter=enter,
    )
    o, ht = lay.from_chunks(o, layout)[..., : dims.V], ht[:, :, : dims.K, : dims.V]
    if not residuals:
        return o, ht
    per_chunk = lambda y: y.reshape(dims.B, -1, *y.shape[1:])  # [NC, ...] -> [B, NC / B, ...]
    per_row = lambda y: y.reshape(dims.B, -1, *y.shape[2:])  # [1, L, ...] -> [B, L / B, ...]
    return o, ht, per_chunk(res.h), per_row(res.v_new), per_chunk(res.x), per_row(res.w)


def _bwd_shard(q, k, v, a, b, h0, *rest, scale, chunk_size, config, interpret, gk=None,
               sequence_axes=None, exit=None):
    """Gradients of q, k, v, a, b (gk), h0 from one shard's inputs, residuals and (do, dht)."""
    if sequence_axes is not None:
        return _bwd_shard_cp(q, k, v, a, b, h0, *rest, sequence_axes=sequence_axes, scale=scale,
                             chunk_size=chunk_size, config=config, interpret=interpret)
    del h0  # the residuals hold the states
    cu, (h, v_new, xinv, w, do, dht) = (rest[0], rest[1:]) if len(rest) == 7 else (None, rest)
    x = Inputs(q, k, v, a, b, gk)
    dt = jnp.result_type(q, k, v, a, b)
    dims, layout, Kp, Vp, config = _local(q, v, cu, chunk_size, config, interpret, dt, x.gated,
                                          context_parallel=exit is not None)
    flat = lambda y: y.reshape(-1, *y.shape[2:])  # [B, NC / B, ...] -> [NC, ...]
    row = lambda y: y.reshape(1, -1, *y.shape[2:])  # [B, L / B, ...] -> [1, L, ...]
    res = triton_fwd.Residuals(flat(h), row(v_new), flat(xinv), row(w))
    dx, dh0 = triton_bwd.chunk_bwd(
        lay.align(x, layout, Kp, Vp), res, layout.cu_chunks,
        lay.pad_last(lay.to_chunks(do, layout), Vp), lay.pad_state(dht.astype(jnp.float32), Kp, Vp),
        scale=scale, chunk_size=chunk_size, config=config, interpret=interpret, exit=exit,
    )
    back = dx.map(lambda name, g: lay.from_chunks(g, layout)[..., : dims.V if name == "v" else dims.K])
    return (*back.arrays(), dh0[:, :, : dims.K, : dims.V])


# T sharded under jit (issue 15, docs/architecture.md "Several devices"). Forward: the kernels
# with a summary sweep of the slice ([h | M] from a zero start, sharing the WY pass), an
# all-gather of the summaries folded into the entering state (`context_parallel.fold_entering`)
# and the ordinary sweep from it; the final state is the last slice's. Backward, the mirror: a
# backward summary sweep ([g | M^T]), the all-gather folded right to left into the cotangent of
# the state leaving the slice (`fold_exiting`), the ordinary backward from it; dh0 is the first
# slice's. Per slice about one extra sweep each way; the residuals are the plain ones. Where the
# backward runs in jnp (Kp = 256) it differentiates `context_parallel.entering_state` instead.
def _enter(q, k, v, a, b, h0, *, axes, scale, chunk_size, config, interpret):
    from iplr_jax.context_parallel import entering_state

    return entering_state(
        q, k, v, a, b, h0, axis_name=axes, scale=scale, chunk_size=chunk_size, config=config,
        implementation="interpret" if interpret else "pallas",
    )


def _last_of(axes):
    return jax.lax.axis_index(axes) == jax.lax.psum(1, axes) - 1


def _fwd_shard_cp(q, k, v, a, b, h0, *cu, sequence_axes, residuals, **kw):
    from iplr_jax import context_parallel as cp

    if cu:  # packed (inside shard_map): the global offsets, local pieces of the sequences
        where = cp.packed_slice(cu[0], q.shape[1], sequence_axes)
        enter = functools.partial(cp.packed_fold_entering, where=where, axis_name=sequence_axes)
        o, ht, *res = _fwd_shard(q, k, v, a, b, h0, where.local, residuals=residuals, enter=enter, **kw)
        owned = where.owned[:, None, None, None]
    else:
        enter = functools.partial(cp.fold_entering, axis_name=sequence_axes)
        o, ht, *res = _fwd_shard(q, k, v, a, b, h0, residuals=residuals, enter=enter, **kw)
        owned = _last_of(sequence_axes)
    return (o, jax.lax.psum(jnp.where(owned, ht, 0), sequence_axes), *res)


def _initial_state_grad(share, h0, axes):
    """dh0 from each slice's share (zero where h0 does not enter): summed over the slices,
    unless h0 was made varying over them (inside shard_map), whose transpose sums it."""
    return share if set(axes) <= vma_of(h0) else jax.lax.psum(share, axes)


def _bwd_shard_cp(q, k, v, a, b, h0, *rest, sequence_axes, **kw):
    from iplr_jax import context_parallel as cp

    cu, rest = (rest[:1], rest[1:]) if len(rest) == 7 else ((), rest)
    *res, do, dht = rest
    dt = jnp.result_type(q, k, v, a, b)
    if cu:
        where = cp.packed_slice(cu[0], q.shape[1], sequence_axes)
        exit = functools.partial(cp.packed_fold_exiting, where=where, axis_name=sequence_axes)
        *dx, dh0 = _bwd_shard(q, k, v, a, b, h0, where.local, *res, do, dht, exit=exit, **kw)
        return (*dx, _initial_state_grad(jnp.where(where.starts[:, None, None, None], dh0, 0), h0,
                                         sequence_axes))
    config = _local(q, v, None, kw["chunk_size"], kw["config"], kw["interpret"], dt)[-1]
    if config.bwd_kernels:
        exit = functools.partial(cp.fold_exiting, axis_name=sequence_axes)
        *dx, dh0 = _bwd_shard(q, k, v, a, b, h0, *res, do, dht, exit=exit, **kw)
        first = jax.lax.axis_index(sequence_axes) == 0  # h0 enters on slice 0
        return (*dx, _initial_state_grad(jnp.where(first, dh0, 0), h0, sequence_axes))
    # h0 made to vary like the slices (inside shard_map), so its pullback is this device's share
    s0, pull = jax.vjp(
        functools.partial(_enter, axes=sequence_axes, **kw), q, k, v, a, b, like_inputs(h0, q)
    )  # (Kp = 256, every row one sequence: packed calls with K or V > 128 take the composed form)
    dht = jnp.where(_last_of(sequence_axes), dht, 0)  # ht is the last slice's end state
    *dx, ds0 = _bwd_shard(q, k, v, a, b, s0, *res, do, dht, **kw)
    de = pull(ds0.astype(s0.dtype))
    f32 = jnp.float32
    grads = [(g.astype(f32) + e.astype(f32)).astype(g.dtype) for g, e in zip(dx, de, strict=False)]
    return (*grads, _initial_state_grad(de[5], h0, sequence_axes).astype(ds0.dtype))


def _chunk_pallas(x: Inputs, *, scale, h0, cu_seqlens, chunk_size, config, interpret, sequence_axes=None):
    """The kernels on every batch / head shard, tied by a custom_vjp (`sharding.partitioned_vjp`).
    `sequence_axes`: inside `shard_map`, the mesh axes T is sharded over (T a multiple of the
    chunk; `cu_seqlens` then the global offsets): the context-parallel per-slice functions."""
    q, scale = static_scale(x.q, scale)
    config = _precision_now(config)
    kw = dict(scale=scale, chunk_size=chunk_size, config=config, interpret=interpret)
    if sequence_axes is not None:
        axes = sequence_axes if isinstance(sequence_axes, (tuple, list)) else (sequence_axes,)
        kw["sequence_axes"] = tuple(axes)
    packed = cu_seqlens is not None
    state = ("n" if packed else "b") + " h k v"  # packed: one row, heads shard, offsets replicated
    # T may shard (context parallelism) when it is whole chunks: T = (c s), residuals per chunk
    # c, so a slice of T owns its chunks' residuals; otherwise a T-sharded input is gathered
    T = x.q.shape[1]
    seq = not packed and T % chunk_size == 0
    tok, val, res = (TOKENS_CP, VALUES_CP, RESIDUALS_CP) if seq else (TOKENS, VALUES, RESIDUALS)
    op = partitioned_vjp(
        functools.partial(_fwd_shard, residuals=False, **kw),
        functools.partial(_fwd_shard, residuals=True, **kw),
        functools.partial(_bwd_shard, **kw),
        in_specs=[tok, tok, val, tok, tok, state] + (["m"] if packed else []),
        out_specs=[val, state],
        res_specs=res,
        num_diff=6,
        sequence="c" if seq else None,
        factor_sizes=dict(c=T // chunk_size, s=chunk_size) if seq else None,
    )
    cu = (jnp.asarray(cu_seqlens, jnp.int32),) if packed else ()
    return op(*match_vma(*x._replace(q=q).arrays(), h0, *cu))


def kernels_on_slices(x: Inputs, *, scale, h0, cu_seqlens, chunk_size, interpret, axes, config=None):
    """Inside `shard_map` with T sharded over the mesh axes `axes`: the kernels' context
    parallelism on this device's slice (what `chunk` runs per slice under jit with T sharded),
    differentiable. `cu_seqlens`: the GLOBAL packed offsets, or None. Returns (o, final states
    replicated over `axes`). Used by `context_parallel.chunk_cp`."""
    return _chunk_pallas(x, scale=scale, h0=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                         config=config, interpret=interpret, sequence_axes=axes)


def _chunk_jnp(x: Inputs, *, scale, h0, cu_seqlens, chunk_size):
    """`chunk_xla` (gradients by autodiff); with explicitly sharded inputs on every batch / head
    shard (`sharding.explicit_shards`), since explicit sharding types reject its reshapes."""
    names = [n for n, y in zip(Inputs._fields, x, strict=True) if y is not None]
    packed = cu_seqlens is not None
    state = ("n" if packed else "b") + " h k v"
    specs = [VALUES if n == "v" else TOKENS for n in names] + [state, ""] + (["m"] if packed else [])

    def per_shard(*arrays):
        local = Inputs(**dict(zip(names, arrays, strict=False)))
        h0, scale, cu = arrays[len(names)], arrays[len(names) + 1], (arrays[-1] if packed else None)
        B, T, H, K = local.q.shape
        dims = Dims(B, T, H, K, local.v.shape[-1], B if cu is None else cu.shape[0] - 1)
        return chunk_xla(local, scale=scale, h0=h0, cu_seqlens=cu, chunk_size=chunk_size, dims=dims)

    op = explicit_shards(per_shard, specs, [VALUES, state])
    cu = (jnp.asarray(cu_seqlens, jnp.int32),) if packed else ()
    return op(*(getattr(x, n) for n in names), h0, jnp.asarray(scale, h0.dtype), *cu)


def chunk(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    gk: jax.Array | None = None,
    *,
    scale: float | jax.Array | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | None = None,
    chunk_size: int = 64,
    implementation: str | None = None,
    config: ChunkConfig | None = None,
    sequence_axis: str | tuple[str, ...] | None = None,
    precision: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """IPLR attention in the chunked parallel form (training, prefill).

    Computes `S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`, the
    convention of fla's `chunk_iplr_delta_rule` (docs/operator.md); with a gate `gk`, DPLR:
    `S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T`, the convention of fla's
    `chunk_dplr_delta_rule` (a_t reads the undecayed state; docs/gate.md).

    Args:
      q, k, a, b: [B, T, H, K].
      v: [B, T, H, V].
      gk: optional log-decay [B, T, H, K] on the K rows of the state (normally <= 0; any
        value down to -20 per step and below is safe at every chunk size; positive values, a
        growth, are computed exactly too); None: IPLR, compiled exactly as without a gate.
        With `gk`, "pallas" and "interpret" run the gated chunk kernels forward and, for
        K <= 128, backward; for K > 128 (or `config=ChunkConfig(bwd_kernels=False)`) the
        backward is the VJP of the jnp chunked form (docs/gate.md).
      scale: output scale, default `K ** -0.5`; a number or a scalar array (may be traced).
      initial_state: [N, H, K, V] state before the first token of each sequence.
      output_final_state: also return the state after each sequence's last token.
      cu_seqlens: int32 [N + 1] offsets of packed sequences in a batch of 1; may be traced.
      chunk_size: 16, 32 or 64.
      implementation: None (fastest available; "xla" for float64 inputs, which the float32
        kernels would round), "pallas", "xla" or "interpret".
      config: block sizes and choices of the Pallas kernels (`iplr_jax.ChunkConfig`; fields
        left None follow the tuned rules); ignored by "xla".
      sequence_axis: context parallelism: inside `jax.shard_map` with T sharded over this mesh
        axis, q, k, v, a, b are the local slices of T, `cu_seqlens` the global offsets and
        `initial_state` / the final state replicated over the axis
        (`iplr_jax.context_parallel.chunk_cp`, docs/chunked.md "Segments").
      precision: the precision of the products with float32 operands: None follows
        `jax.default_matmul_precision` (by default tf32 on a GPU: about 1e-3 relative error for
        float32 inputs), "highest" (or "float32") gives float32 accuracy at some speed,
        "default" (or "tf32") the fast path (docs/numerics.md).

    Returns:
      `o` [B, T, H, V] in v's dtype and the final state [N, H, K, V] float32 (float64 for
      float64 inputs; or None). A NaN or inf in an input makes o NaN from that token of its
      sequence on (q: that token only), never before, and gradients stay finite
      (docs/numerics.md "Non-finite inputs").
    """
    if precision is not None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)} or None, got {precision!r}")
        with jax.default_matmul_precision(PRECISIONS[precision]):
            return chunk(
                q, k, v, a, b, gk, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                implementation=implementation, config=config, sequence_axis=sequence_axis,
            )
    if sequence_axis is not None:
        from iplr_jax.context_parallel import chunk_cp

        return chunk_cp(
            q, k, v, a, b, gk, axis_name=sequence_axis, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
            implementation=implementation, config=config,
        )
    x = Inputs(q, k, v, a, b, gk)
    impl = resolve_implementation(implementation, x)
    dims = check_inputs(
        x, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        implementation=impl,
    )
    if config is not None and not isinstance(config, ChunkConfig):
        raise ValueError(f"config must be an iplr_jax.ChunkConfig or None, got {config!r}")
    if config is not None and impl != "xla":  # its fields checked now, not inside a kernel's trace
        chunk_config(config, N=dims.N, H=dims.H, Kp=lay.next_pow2(dims.K), Vp=lay.next_pow2(dims.V),
                     num_chunks=1, dtype=v.dtype, interpret=impl == "interpret", gated=x.gated)
    bad, cu_seqlens = malformed_offsets(cu_seqlens, dims.T)
    scale = default_scale(scale, dims.K)
    traced_scale = not isinstance(scale, (int, float))

    def run(x, cu_seqlens, initial_state=None, *traced):
        s = traced[0] if traced else scale
        # inside shard_map a zero state must vary over the mesh axes like the inputs it meets
        h0 = like_inputs(initial_state_or_zeros(initial_state, dims, accum_dtype(x)), *x.arrays(), s)
        if impl == "xla":
            o, final = _chunk_jnp(x, scale=s, h0=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
        elif x.gated:  # the gated kernels; backward: the jnp form's VJP or, opted in, kernels (docs/gate.md)
            o, final = _chunk_pallas_gated(
                x, scale=s, h0=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size, config=config,
                interpret=impl == "interpret",
            )
        else:
            o, final = _chunk_pallas(
                x, scale=s, h0=h0, cu_seqlens=cu_seqlens, chunk_size=chunk_size, config=config,
                interpret=impl == "interpret",
            )
        return o.astype(v.dtype), final

    # NaN / inf stay causal (docs/numerics.md "Non-finite inputs"): the jnp form always guards
    # (autodiff, any order); the kernels run plain unless an output comes out non-finite
    extra = (initial_state, scale) if traced_scale else (initial_state,)
    if impl == "xla":
        x, nonfinite = guard_nonfinite(x, cu_seqlens, dims)
        o, final = nonfinite.poison(*run(x, cu_seqlens, *extra))
    else:
        o, final = guarded_unless_finite(run, x, cu_seqlens, dims, *extra)
    o, final = poison(bad, o, final)
    return o, (final if output_final_state else None)
