"""The ops on several devices (docs/architecture.md, "Several devices"): generic helpers, no IPLR math.

Two situations:

1. Inside `jax.shard_map` (manual axes, `check_vma=True`): every value carries the set of
   manual mesh axes it varies over (its "vma"). A `pallas_call` must declare that set for its
   outputs (`shape_dtype`), and a `lax.scan` carry built from a constant must vary like the
   inputs it is combined with (`like_inputs`). `match_vma` makes a group of arrays vary alike
   before they enter a `custom_vjp`, so that its backward's cotangents match the primals (JAX
   transposes the cast into the `psum` the gradient of a replicated input needs).

2. Under plain `jit` with sharded inputs: a `pallas_call` is opaque to the partitioner, which
   would all-gather its operands. `partitioned(fn, in_specs, out_specs)` declares that `fn` is
   the same computation on every shard of its batch ("b") and head ("h") dimensions:
   - auto-sharded inputs (no sharding in the types): `jax.experimental.custom_partitioning`,
     with an einsum-like Shardy `sharding_rule` built from the specs (Shardy is the default
     partitioner on JAX 0.10 / 0.11) and the GSPMD callbacks as well (`jax_use_shardy_partitioner`
     off). The partition callback runs `fn` on the local shards; every dimension other than the
     batch and head ones (and a `sequence` factor, below) is asked for replicated;
   - explicitly sharded inputs (`AxisType.Explicit`, shardings in the types): `jax.shard_map`
     over the batch/head (and sequence) mesh axes, the other dimensions resharded to replicated;
   - inside `shard_map` already (all axes manual) or without any mesh: `fn` itself.
   `partitioned_vjp` composes three such ops (primal, forward with residuals, backward) into a
   `custom_vjp`, since `custom_partitioning` cannot be differentiated.
   `sharded_like` ties arrays to the sharding of others (for results of a `lax.cond`, which
   the partitioner may leave replicated).
   With `sequence=` a third factor may shard too (context parallelism under jit, issue 15):
   when it arrives sharded, `fn` runs on the local slices with `sequence_axes=` the mesh axes
   it is sharded over, and may communicate over them (the partition callback traces `fn` with
   those axes bound, so collectives lower as SPMD collectives).

Specs are strings of per-dimension factor names, one per array, e.g. "b t h k" for q and
"b h k v" for a state: "b" (batch, or sequences) and "h" (heads) shard, any other name is
replicated. Equal names must mean equal sizes (they form the Shardy rule). A dimension may be
a compound "(c s)" (size c * s, c major, Shardy's syntax); only its major factor shards, and
sizes of factors that never form a whole dimension come in `factor_sizes`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

SHARDED = ("b", "h")  # the factor names that may be sharded

# -- 1. varying manual axes (shard_map, check_vma=True) ------------------------------------------


def _vma(x) -> frozenset:
    try:
        aval = jax.typeof(x)
    except TypeError:
        return frozenset()
    mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # JAX 0.7 - 0.9


def vma_of(*xs) -> frozenset:
    """Union of the manual mesh axes the arrays `xs` vary over (None and Python numbers are
    skipped); empty outside `shard_map` and on JAX versions without varying-axis types."""
    out = frozenset()
    for x in xs:
        if x is not None and not isinstance(x, (int, float)):
            out |= _vma(x)
    return out


def _pvary(x, axes: tuple):
    if hasattr(jax.lax, "pcast"):  # JAX >= 0.8.2
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)


def _to_vma(x, vma: frozenset):
    missing = tuple(sorted(vma - _vma(x), key=str))
    return _pvary(x, missing) if missing else x


def like_inputs(x, *xs):
    """`x` made varying over every manual axis that `xs` vary over (a no-op outside shard_map)."""
    return _to_vma(x, vma_of(*xs))


def match_vma(*xs):
    """All of `xs` made varying over the union of their manual axes (None passes through)."""
    vma = vma_of(*xs)
    return tuple(None if x is None else _to_vma(x, vma) for x in xs)


def shape_dtype(shape, dtype, vma=frozenset()) -> jax.ShapeDtypeStruct:
    """`jax.ShapeDtypeStruct` for a `pallas_call` output that varies over the manual axes `vma`
    (`vma_of` the kernel's inputs). Inside `shard_map` the type must say so, even when empty."""
    vma = frozenset(vma)
    mat_type = getattr(jax.sharding, "ManualAxisType", None)
    if mat_type is not None:  # JAX >= 0.10
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat_type(varying=vma))
    try:  # JAX 0.7 - 0.9
        return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
    except TypeError:
        return jax.ShapeDtypeStruct(shape, dtype)


def _interpret_lowering_without_vma_check() -> None:
    """Work around a JAX limitation (0.10.2, 0.11.x): `pallas_call(interpret=True)` inside
    `shard_map(check_vma=True)` re-traces the kernel body at lowering time with the varying
    types of its operands, and a `dot_general` of a kernel constant with a loaded value then
    fails ("Primitive dot_general requires varying manual axes to match"). The kernel itself is
    traced with the check off (pallas_call does that); this lowers interpreted calls the same
    way, from operand types without varying axes (the interpreter's loops then type-check).
    Only `interpret=True` calls are affected. Skipped if the JAX internals differ."""
    try:
        from jax._src import config as jax_config
        from jax._src import core
        from jax._src.interpreters import mlir
        from jax._src.pallas import pallas_call as pc

        entry = mlir._lowerings[pc.pallas_call_p]
        core.empty_mat  # noqa: B018
    except (ImportError, AttributeError, KeyError):
        return
    rule = entry.rule if hasattr(entry, "rule") else entry
    if getattr(rule, "_iplr_patched", False):
        return

    def plain(aval):
        update = getattr(aval, "update_manual_axis_type", None)
        return aval if update is None else update(core.empty_mat)

    def lowering(ctx, *args, **params):
        if params.get("interpret"):
            # per-device code: interpret it with plain (non-varying) types
            ctx = ctx.replace(
                avals_in=[plain(a) for a in ctx.avals_in],
                avals_out=None if ctx.avals_out is None else [plain(a) for a in ctx.avals_out],
            )
            with jax_config._check_vma(False):
                return rule(ctx, *args, **params)
        return rule(ctx, *args, **params)

    lowering._iplr_patched = True
    mlir.register_lowering(pc.pallas_call_p, lowering)


_interpret_lowering_without_vma_check()

# -- 2. partitioning over batch and heads (plain jit) ---------------------------------------------

# set while `fn` is traced for one shard by a partition callback: calls of `partitioned` ops made
# by that per-shard code run their own `fn` directly (they are per-device code already)
_PER_SHARD = contextvars.ContextVar("iplr_per_shard", default=False)


@contextlib.contextmanager
def _per_shard():
    token = _PER_SHARD.set(True)
    try:
        yield
    finally:
        _PER_SHARD.reset(token)


def _dims(spec: str) -> list[tuple[str, ...]]:
    """"b (c s) h k" -> [("b",), ("c", "s"), ("h",), ("k",)]."""
    return [tuple(d.strip("()").split()) for d in re.findall(r"\([^)]*\)|\S+", spec)]


def _factors(spec: str) -> list[str]:
    return [f for d in _dims(spec) for f in d]


def _axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def _pick_axes(mesh, specs, shapes, pspecs, shardable=SHARDED, factor_sizes=None) -> dict:
    """Mesh axes of each shardable factor: those of the first operand that shards a dimension
    led by the factor, kept only where they divide every such dimension (a compound's major
    factor: its size without the minor factors) and do not collide."""
    factor_sizes = factor_sizes or {}
    chosen = {}
    for f in shardable:
        for spec, ps in zip(specs, pspecs, strict=True):
            if ps is None:
                continue
            for i, d in enumerate(_dims(spec)):
                if d[0] == f and i < len(ps) and ps[i] is not None:
                    chosen[f] = ps[i]
                    break
            if f in chosen:
                break
    used = set()
    for f in shardable:
        axes = chosen.get(f)
        if axes is None:
            continue
        tup = axes if isinstance(axes, tuple) else (axes,)
        n = _axes_size(mesh, axes)
        ok = not (set(tup) & used)
        for spec, shp in zip(specs, shapes, strict=True):
            for i, d in enumerate(_dims(spec)):
                if f in d:
                    minor = int(np.prod([factor_sizes[g] for g in d[1:]]))
                    ok = ok and d[0] == f and shp[i] % (n * minor) == 0
        if ok:
            used |= set(tup)
        else:
            chosen[f] = None
    return chosen


def _pspec(spec: str, chosen: dict) -> P:
    return P(*(chosen.get(d[0]) for d in _dims(spec)))


def _spec_of(sharding, ndim):
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        return spec + (None,) * (ndim - len(spec))
    return None  # unknown (GSPMD-only) sharding: treat as replicated


def _bind_sequence(fn, sequence, chosen):
    """`fn` for the shards `chosen` describes: told the mesh axes of a sharded sequence factor."""
    axes = chosen.get(sequence) if sequence is not None else None
    if axes is None:
        return fn
    return functools.partial(fn, sequence_axes=axes if isinstance(axes, tuple) else (axes,))


def _custom_partitioned(fn, in_specs, out_specs, sequence=None, factor_sizes=None):
    from jax.experimental.custom_partitioning import custom_partitioning

    multiple = not isinstance(out_specs, str)
    outs = list(out_specs) if multiple else [out_specs]
    shardable = SHARDED + ((sequence,) if sequence is not None else ())

    def decide(mesh, arg_shapes):
        pspecs = [_spec_of(s.sharding, len(s.shape)) for s in arg_shapes]
        shapes = [s.shape for s in arg_shapes]
        return _pick_axes(mesh, in_specs, shapes, pspecs, shardable, factor_sizes)

    def out_shardings(mesh, chosen):
        sh = [NamedSharding(mesh, _pspec(s, chosen)) for s in outs]
        return tuple(sh) if multiple else sh[0]

    def infer(mesh, arg_shapes, result_shape):  # GSPMD
        return out_shardings(mesh, decide(mesh, arg_shapes))

    def partition(mesh, arg_shapes, result_shape):
        chosen = decide(mesh, arg_shapes)
        arg_sh = tuple(NamedSharding(mesh, _pspec(s, chosen)) for s in in_specs)
        local = _bind_sequence(fn, sequence, chosen)

        def lower(*xs):
            with _per_shard():
                return local(*xs)

        return mesh, lower, out_shardings(mesh, chosen), arg_sh

    def positional(*xs):  # custom_partitioning binds arguments by signature: positional only
        return fn(*xs)

    op = custom_partitioning(positional)
    replicated = []  # in order of first appearance (Shardy wants the factor indices sorted)
    whole = set()  # factors that form a whole dimension somewhere (Shardy infers their sizes)
    for s in (*in_specs, *outs):
        for d in _dims(s):
            whole |= {d[0]} if len(d) == 1 else set()
            for f in d:
                if f not in shardable and f not in replicated:
                    replicated.append(f)
    named = {f for s in (*in_specs, *outs) for f in _factors(s)}
    sizes = {f: n for f, n in (factor_sizes or {}).items() if f in named and f not in whole}
    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=", ".join(in_specs) + " -> " + ", ".join(outs),
        need_replication_factors=tuple(replicated),
        **sizes,
    )
    return op


def _explicit_mesh(xs):
    """The abstract mesh of the first input whose type carries an explicit-axis sharding."""
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    for x in xs:
        try:
            mesh = jax.typeof(x).sharding.mesh
        except (AttributeError, TypeError):
            continue
        if explicit is not None and not mesh.empty and explicit in tuple(mesh.axis_types):
            return mesh
    return None


def _manual_context() -> bool:
    try:
        mesh = jax.sharding.get_abstract_mesh()
    except AttributeError:
        return False
    manual = getattr(jax.sharding.AxisType, "Manual", None)
    return not mesh.empty and manual is not None and manual in tuple(mesh.axis_types)


def _via_shard_map(fn, in_specs, out_specs, mesh, xs, sequence=None, factor_sizes=None):
    explicit = jax.sharding.AxisType.Explicit
    pspecs = []
    for x in xs:
        s = jax.typeof(x).sharding
        pspecs.append(_spec_of(s, x.ndim) if s.mesh == mesh else (None,) * x.ndim)
    shardable = SHARDED + ((sequence,) if sequence is not None else ())
    chosen = _pick_axes(mesh, in_specs, [x.shape for x in xs], pspecs, shardable, factor_sizes)
    # only explicit axes can be named here; an Auto axis stays with the partitioner
    for f, axes in list(chosen.items()):
        tup = axes if isinstance(axes, tuple) else (axes,)
        if axes is not None and any(mesh._name_to_type[a] != explicit for a in tup):
            chosen[f] = None
    specs_in = [_pspec(s, chosen) for s in in_specs]
    xs = [jax.sharding.reshard(x, sp) for x, sp in zip(xs, specs_in, strict=True)]
    multiple = not isinstance(out_specs, str)
    specs_out = tuple(_pspec(s, chosen) for s in out_specs) if multiple else _pspec(out_specs, chosen)
    used = {a for v in chosen.values() if v is not None for a in (v if isinstance(v, tuple) else (v,))}
    # nothing sharded (replicated inputs): still one call per device, with manual axes, since
    # under an explicit mesh the interpreted kernels' updates fail JAX's sharding-type checks
    used = used or set(mesh.axis_names)
    return jax.shard_map(
        _bind_sequence(fn, sequence, chosen), mesh=mesh, in_specs=tuple(specs_in),
        out_specs=specs_out, axis_names=frozenset(used),
    )(*xs)


def _batchable(fn, op):
    """`op` (a custom_partitioning of `fn`) with a batching rule: under `vmap` (also a vmap that
    reaches it through `jit`, where the inputs are no batch tracers) `fn` itself is batched,
    since custom_partitioning has no batching rule (pallas_call has one)."""

    @jax.custom_batching.custom_vmap
    def call(*xs):
        return op(*xs)

    @call.def_vmap
    def rule(axis_size, in_batched, *xs):
        out = jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched))(*xs)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return call


def partitioned(
    fn: Callable, in_specs: Sequence[str], out_specs, *, sequence: str | None = None,
    factor_sizes: dict | None = None,
) -> Callable:
    """`fn(*arrays)` declared as the same computation on every batch ("b") / head ("h") shard.

    `in_specs`: one spec string per positional array argument; `out_specs`: one string, or a
    sequence of them for a tuple of outputs. `fn` must hold no traced values in its closure
    (pass them as arguments) and must compute from its arguments' shapes (it is traced again on
    the local shards). `sequence`: a factor that may shard as well, where `fn` then runs as
    `fn(*local_arrays, sequence_axes=<tuple of mesh axes>)` (its collectives over those axes are
    its own business); it must return the shapes and dtypes `fn(*local_arrays)` would.
    `factor_sizes`: sizes of factors used only inside compound dimensions.
    """
    in_specs = tuple(in_specs)
    out_specs = out_specs if isinstance(out_specs, str) else tuple(out_specs)

    def call(*xs):
        if len(xs) != len(in_specs):
            raise TypeError(f"expected {len(in_specs)} arrays, got {len(xs)}")
        if _PER_SHARD.get() or _manual_context() or vma_of(*xs):  # per-device code already
            return fn(*xs)
        mesh = _explicit_mesh(xs)
        if mesh is not None:
            return _via_shard_map(fn, in_specs, out_specs, mesh, xs, sequence, factor_sizes)
        op = _custom_partitioned(fn, in_specs, out_specs, sequence, factor_sizes)
        return _batchable(fn, op)(*xs)

    return call


def sharded_like(new, old):
    """`new` (a tree of arrays) sharded like `old` (a tree of the same structure and shapes)
    under auto-sharded `jit`, for the results of a `lax.cond`: the partitioner need not carry a
    sharding through the cond's branches, and with T sharded it made them replicated, each
    gradient all-gathered (JAX 0.11.2, 2 GPUs: 10 ms of a 32 ms step at T = 256k;
    benchmarks/NOTES.md, session 14). The pairs are tied by a custom_partitioning identity whose
    Shardy rule gives both operands one sharding (JAX's `shard_alike`, gone in 0.11). One
    device, per-device code, explicit sharding types and scalars need nothing: `new` itself."""
    leaves = jax.tree.leaves(old)
    one_device = jax.device_count() == 1 and len(jax.devices("cpu")) == 1  # (tests mesh CPUs)
    if (one_device or _PER_SHARD.get() or _manual_context() or vma_of(*leaves)
            or _explicit_mesh(leaves) is not None):
        return new
    return jax.tree.map(lambda n, o: _tie(np.ndim(o))(o, n) if np.ndim(o) else n, new, old)


@functools.cache
def _tie(ndim: int):
    """(old, new) -> new, sharded like old: both operands and the result share every factor."""
    from jax.experimental.custom_partitioning import custom_partitioning

    def second(old, new):
        return new

    def like_old(mesh, arg_shapes, result_shape=None):
        sharding = arg_shapes[0].sharding
        return sharding if isinstance(sharding, NamedSharding) else NamedSharding(mesh, P())

    def partition(mesh, arg_shapes, result_shape):
        sharding = like_old(mesh, arg_shapes)
        return mesh, second, sharding, (sharding, sharding)

    op = custom_partitioning(second)
    dims = " ".join(f"d{i}" for i in range(ndim))
    op.def_partition(partition=partition, infer_sharding_from_operands=like_old,
                     sharding_rule=f"{dims}, {dims} -> {dims}")
    return _batchable(second, op)


def explicit_shards(fn: Callable, in_specs: Sequence[str], out_specs) -> Callable:
    """`fn(*arrays)` on every batch / head shard when the inputs carry explicit-axis shardings
    (`jax.shard_map`, differentiable), else `fn` itself: for jnp paths, which the partitioner
    handles under auto sharding but whose reshapes explicit sharding types reject."""
    in_specs = tuple(in_specs)
    out_specs = out_specs if isinstance(out_specs, str) else tuple(out_specs)

    def call(*xs):
        mesh = None if _manual_context() or vma_of(*xs) else _explicit_mesh(xs)
        return fn(*xs) if mesh is None else _via_shard_map(fn, in_specs, out_specs, mesh, xs)

    return call


def _cotangent_like(g, x):
    """g in x's dtype and, with explicit sharding types, x's sharding (a custom_vjp's cotangent
    must have its primal's type: e.g. a replicated state's gradient comes back batch-sharded)."""
    g = g.astype(x.dtype)
    try:
        want, got = jax.typeof(x).sharding, jax.typeof(g).sharding
    except (AttributeError, TypeError):
        return g
    if _explicit_mesh([x]) is None or want.spec == got.spec:
        return g
    return jax.sharding.reshard(g, want.spec)


SECOND_ORDER = (
    "second-order derivatives (grad of grad, jax.hessian, jvp of grad) are not implemented for "
    "the Pallas kernels' backward: use implementation='xla', whose autodiff has them"
)


def _first_order_only(op: Callable) -> Callable:
    """`op` unchanged, but differentiating it (inside `partitioned_vjp`'s rules: a second-order
    derivative) raises a clear error instead of JAX's missing rule for custom_partitioning."""
    wrapped = jax.custom_jvp(lambda *xs: op(*xs))

    @wrapped.defjvp
    def _jvp(primals, tangents):
        raise NotImplementedError(SECOND_ORDER)

    return wrapped


def partitioned_vjp(
    primal: Callable, fwd: Callable, bwd: Callable, *, in_specs: Sequence[str],
    out_specs: Sequence[str], res_specs: Sequence[str], num_diff: int,
    sequence: str | None = None, factor_sizes: dict | None = None,
) -> Callable:
    """A differentiable `f(*args) -> tuple(outs)` from three per-shard functions:

      primal(*args) -> outs;  fwd(*args) -> (*outs, *res);
      bwd(*args, *res, *cts) -> gradients of the first `num_diff` args (the rest get none).

    Each runs as its own `partitioned` op, so the forward, the residuals and the backward all
    stay on their batch / head (and `sequence`) shards: the residual specs must let the
    sequence factor shard them alike (the three ops decide from the same input shardings).
    """
    in_specs, out_specs, res_specs = tuple(in_specs), tuple(out_specs), tuple(res_specs)
    n_out = len(out_specs)
    kw = dict(sequence=sequence, factor_sizes=factor_sizes)
    p_primal = _first_order_only(partitioned(primal, in_specs, out_specs, **kw))
    p_fwd = _first_order_only(partitioned(fwd, in_specs, out_specs + res_specs, **kw))
    p_bwd = _first_order_only(partitioned(bwd, in_specs + res_specs + out_specs, in_specs[:num_diff], **kw))

    @jax.custom_vjp
    def f(*args):
        return tuple(p_primal(*args))

    def f_fwd(*args):
        outs = p_fwd(*args)
        return tuple(outs[:n_out]), (args, tuple(outs[n_out:]))

    def f_bwd(saved, cts):
        args, res = saved
        grads = p_bwd(*args, *res, *cts)
        grads = [_cotangent_like(g, x) for g, x in zip(grads, args, strict=False)]
        return (*grads, *([None] * (len(args) - num_diff)))

    f.defvjp(f_fwd, f_bwd)
    return f
