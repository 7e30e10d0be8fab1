"""`fused_recurrent`: IPLR step by step (decoding, small memory).

Validation and the choice of implementation, then either the `lax.scan` recurrence
(`reference.naive`, differentiated by autodiff) or a Pallas backend's kernels
(`triton.fused_recurrent.fused_fwd` / `fused_bwd`), tied by a custom_vjp and partitioned over
batch and heads (`_fused_recurrent_pallas`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from iplr_jax import layout as lay
from iplr_jax.inputs import (
    Inputs,
    check_inputs,
    default_scale,
    guarded_unless_finite,
    initial_state_or_zeros,
    malformed_offsets,
    poison,
    resolve_implementation,
    static_scale,
)
from iplr_jax.reference.naive import naive
from iplr_jax.sharding import like_inputs, match_vma, partitioned_vjp
from iplr_jax.triton import fused_recurrent as triton_fused
from iplr_jax.triton.config import FusedRecurrentConfig, fused_recurrent_config

# The Pallas path as functions of one shard's public-shaped arrays, run by
# `sharding.partitioned_vjp` on every batch / head shard (see ops/chunk.py): the kernels' packed
# [B * T] rows, the padding and the config follow the local shapes; the one residual, V2, keeps
# the [B, T, H, Vp] shape.
TOKENS, VALUES = "b t h k", "b t h v"


def _prep(x: Inputs, h0, cu, config):
    """Packs [B, T] into one row of sequences (a free reshape) and pads heads to powers of two;
    with K, V already powers of two >= 16 and a float32 state nothing is copied."""
    B, T, H, K = x.q.shape
    V = x.v.shape[-1]
    N = h0.shape[0]
    Kp, Vp = lay.next_pow2(K), lay.next_pow2(V)
    cu = jnp.arange(B + 1, dtype=jnp.int32) * T if cu is None else cu.astype(jnp.int32)
    xp = x.map(lambda name, y: lay.pad_last(y.reshape(B * T, H, -1), Vp if name == "v" else Kp))
    config = fused_recurrent_config(config, pairs=N * H, Kp=Kp, Vp=Vp)
    return xp, lay.pad_state(h0.astype(jnp.float32), Kp, Vp), cu, config


def _split(args, gated):
    """(Inputs, h0, the rest) from the shard functions' positional arguments: q, k, v, a, b,
    the gate gk when `gated`, h0, then the optional offsets / residuals / cotangents."""
    n = 6 if gated else 5
    return Inputs(*args[:n]), args[n], args[n + 1:]


def _fwd_shard(*args, scale, config, interpret, residuals, gated=False):
    x, h0, cu = _split(args, gated)
    B, T, H, K = x.q.shape
    V = x.v.shape[-1]
    xp, h0p, cu, config = _prep(x, h0, cu[0] if cu else None, config)
    outs = triton_fused.fused_fwd(
        xp, h0p, cu, scale=scale, config=config, interpret=interpret, residuals=residuals
    )
    o, ht = outs[0][..., :V].reshape(B, T, H, V), outs[1][:, :, :K, :V]
    return (o, ht, outs[2].reshape(B, T, H, -1)) if residuals else (o, ht)


def _bwd_shard(*args, scale, config, interpret, gated=False):
    x, h0, rest = _split(args, gated)
    cu, (v2, do, dht) = (rest[0], rest[1:]) if len(rest) == 4 else (None, rest)
    B, T, H, K = x.q.shape
    V = x.v.shape[-1]
    xp, h0p, cu, config = _prep(x, h0, cu, config)
    Kp, Vp = xp.q.shape[-1], xp.v.shape[-1]
    dx, dh0 = triton_fused.fused_bwd(
        xp, h0p, cu, v2.reshape(B * T, H, Vp), lay.pad_last(do.reshape(B * T, H, V), Vp),
        lay.pad_state(dht.astype(jnp.float32), Kp, Vp), scale=scale, config=config,
        interpret=interpret,
    )
    back = dx.map(lambda name, g: g[..., : V if name == "v" else K].reshape(B, T, H, -1))
    return (*back.arrays(), dh0[:, :, :K, :V])


def _fused_recurrent_pallas(x: Inputs, *, scale, h0, cu_seqlens, config, interpret):
    """The kernels on every batch / head shard, tied by a custom_vjp (`sharding.partitioned_vjp`)."""
    q, scale = static_scale(x.q, scale)
    kw = dict(scale=scale, config=config, interpret=interpret)
    if x.gated:  # a static flag: without a gate the kernels are compiled as they always were
        kw["gated"] = True
    packed = cu_seqlens is not None
    state = ("n" if packed else "b") + " h k v"
    gate = [TOKENS] if x.gated else []  # gk [B, T, H, K] shards like k
    op = partitioned_vjp(
        functools.partial(_fwd_shard, residuals=False, **kw),
        functools.partial(_fwd_shard, residuals=True, **kw),
        functools.partial(_bwd_shard, **kw),
        in_specs=[TOKENS, TOKENS, VALUES, TOKENS, TOKENS, *gate, state] + (["m"] if packed else []),
        out_specs=[VALUES, state],
        res_specs=["b t h vp"],
        num_diff=6 + len(gate),
    )
    cu = (jnp.asarray(cu_seqlens, jnp.int32),) if packed else ()
    return op(*match_vma(*x._replace(q=q).arrays(), h0, *cu))


def fused_recurrent(
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
    implementation: str | None = None,
    config: FusedRecurrentConfig | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """IPLR attention step by step (decoding; any T, state kept in float32).

    Same arguments and results as `iplr_jax.chunk` (without `chunk_size`); the convention
    of fla's `fused_recurrent_iplr_delta_rule` (docs/operator.md), and with a gate `gk` that of
    `fused_recurrent_dplr_delta_rule`: `S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T`
    (docs/gate.md).

    Args:
      q, k, a, b: [B, T, H, K].
      v: [B, T, H, V].
      gk: optional log-decay [B, T, H, K] on the K rows of the state; None: IPLR, with the
        gate compiled out of the kernels.
      scale: output scale, default `K ** -0.5`; a number or a scalar array (may be traced).
      initial_state: [N, H, K, V].
      output_final_state: also return the state after each sequence's last token.
      cu_seqlens: int32 [N + 1] offsets of packed sequences in a batch of 1; may be traced.
      implementation: None (fastest available; "xla" for float64 inputs, which the float32
        kernels would round), "pallas", "xla" or "interpret".
      config: block sizes of the Pallas kernels (`iplr_jax.FusedRecurrentConfig`; fields left
        None follow the tuned rules); ignored by "xla".

    Returns:
      `o` [B, T, H, V] in v's dtype and the final state [N, H, K, V] float32 (float64 for
      float64 inputs; or None); a NaN / inf input makes o NaN from its token on, never before
      (docs/numerics.md "Non-finite inputs").
    """
    x = Inputs(q, k, v, a, b, gk)
    impl = resolve_implementation(implementation, x)
    dims = check_inputs(
        x, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, implementation=impl
    )
    if config is not None and not isinstance(config, FusedRecurrentConfig):
        raise ValueError(f"config must be an iplr_jax.FusedRecurrentConfig or None, got {config!r}")
    if config is not None and impl != "xla":  # its fields checked now, not inside a kernel's trace
        Kp, Vp = lay.next_pow2(dims.K), lay.next_pow2(dims.V)
        fused_recurrent_config(config, pairs=dims.N * dims.H, Kp=Kp, Vp=Vp)
    if impl == "xla":  # the scan, which guards traced offsets itself
        return naive(
            q, k, v, a, b, gk, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    bad, cu_seqlens = malformed_offsets(cu_seqlens, dims.T)
    scale = default_scale(scale, dims.K)
    traced_scale = not isinstance(scale, (int, float))

    def run(x, cu_seqlens, initial_state=None, *traced):
        s = traced[0] if traced else scale
        h0 = like_inputs(initial_state_or_zeros(initial_state, dims, jnp.float32), *x.arrays(), s)
        return _fused_recurrent_pallas(
            x, scale=s, h0=h0, cu_seqlens=cu_seqlens, config=config, interpret=impl == "interpret"
        )

    # NaN / inf stay causal (docs/numerics.md "Non-finite inputs"): the kernels run plain unless
    # an output comes out non-finite, then on sanitized inputs with poisoned outputs
    extra = (initial_state, scale) if traced_scale else (initial_state,)
    o, ht = guarded_unless_finite(run, x, cu_seqlens, dims, *extra)
    o, ht = poison(bad, o, ht)
    return o, (ht if output_final_state else None)
