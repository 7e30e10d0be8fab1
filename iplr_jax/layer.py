"""`IPLRLayer`: a Flax NNX token-mixing layer built on the IPLR recurrence.

    S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t

Per head, the layer projects the input to q, k, v and to the low-rank pair (a, b), runs
`iplr_jax.chunk` over the sequence (or `iplr_jax.fused_recurrent` for one-token decode steps),
RMS-normalises each head's output, optionally gates it with SiLU, and projects back.

Stability by construction (docs/operator.md). The transition `I + b a^T` has one non-unit
eigenvalue, `1 + a . b`; every other direction is left untouched. The layer draws

    mode="iplr":   a = normalize(W_a x)  (|a| = 1),   b = lambda a,   lambda = -m sigmoid(w_l . x)
    mode="delta":  k = normalize(k),   a = -beta k,   b = k,   v <- beta v,   beta = m sigmoid(w_b . x)
    mode="linear": a = b = 0  (plain linear attention, S_t = S_{t-1} + k v^T; a baseline)

with m = 2 when `allow_neg_eigval` (the default) and m = 1 otherwise, so `1 + a . b` lies in
(-1, 1] (or [0, 1]): `I + b a^T` is symmetric with spectral norm <= 1 and the state can never
blow up, whatever the input. With m = 2 the eigenvalue may be negative, which lets the layer
flip a direction of its state (useful for state tracking).

Several devices: `sharding={"batch": "data"}` (data parallel), `{"batch": "data", "embed": "data"}`
(FSDP) or `{"batch": "data", "heads": "model"}` (heads split over a second axis) names the mesh
axes of the layer's three logical axes. Parameters carry the resulting partition specs
(`nnx.with_partitioning`, so `nnx.get_partition_spec` reads them and a layer built under
`jax.set_mesh(mesh)` is created sharded), and, under a mesh context, the activations are
constrained to batch (and head) sharding so `iplr_jax.chunk` runs on each device's own shard.

Decoding follows Flax's attention idiom: `layer.init_cache(batch_size)` creates `nnx.Cache`
variables holding the recurrent state and the causal-convolution tail, then
`layer(x, decode=True)` consumes any number of new tokens and updates them.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from iplr_jax.ops.chunk import chunk
from iplr_jax.ops.fused_recurrent import fused_recurrent

Mode = Literal["iplr", "delta", "linear"]
MODES = ("iplr", "delta", "linear")

# The layer's logical axes (IPLRLayer's `sharding` maps them to mesh axes):
#   "batch": the batch dimension of activations (x, q, k, v, a, b, outputs, decoding state);
#   "embed": the d_model dimension of every projection's kernel (FSDP shards it);
#   "heads": the H * K / H * V / H dimension of the projections and the heads of q, k, v, a, b.
LOGICAL_AXES = ("batch", "embed", "heads")
MeshAxes = str | tuple[str, ...] | None


def _resolve_sharding(sharding: Mapping[str, MeshAxes] | None) -> dict[str, MeshAxes] | None:
    if sharding is None:
        return None
    unknown = set(sharding) - set(LOGICAL_AXES)
    if unknown:
        raise ValueError(f"sharding: unknown logical axes {sorted(unknown)}; known: {LOGICAL_AXES}")
    out = {}
    for name in LOGICAL_AXES:
        axes = sharding.get(name)
        if isinstance(axes, list):
            axes = tuple(axes)
        if not (axes is None or isinstance(axes, str) or all(isinstance(a, str) for a in axes)):
            raise ValueError(f"sharding[{name!r}] must be a mesh axis name, a tuple of names or None")
        out[name] = axes
    return out


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / |x| over the last axis, computed in float32 and returned in x's dtype.

    `eps` only keeps 0 / 0 away; |result| <= 1 always, which is all stability needs.
    """
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class ShortConv(nnx.Module):
    """Causal depthwise 1-D convolution over time, followed by SiLU (as in fla's layers).

    `y[t, c] = silu(sum_i w[i, c] x[t - (W - 1) + i, c])`, `x` zero (or the cached tail)
    before the first token. Weight [W, channels], no bias.
    """

    def __init__(
        self, channels: int, size: int, *, dtype=None, param_dtype=jnp.float32, param_metadata=None,
        rngs: nnx.Rngs,
    ):
        # fan_in = W for a depthwise filter; the same scale as torch's Conv1d default
        init = jax.nn.initializers.uniform(scale=2.0 / size**0.5)
        w = init(rngs.params(), (size, channels), param_dtype) - 1.0 / size**0.5
        self.weight = nnx.Param(w.astype(param_dtype), **(param_metadata or {}))
        self.size = size
        self.channels = channels
        self.dtype = dtype

    def __call__(
        self, x: jax.Array, tail: jax.Array | None = None, channels: slice | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Applies the filter.

        Args:
          x: [B, T, channels] (or [B, T, len(channels)] with `channels`).
          tail: [B, W - 1, ...] like x, the W - 1 inputs before x[:, 0] (zeros if None).
          channels: apply only these channels' filters (the filter is depthwise, so a slice of
            the channels is computed exactly as in the whole).

        Returns:
          y [B, T, channels] and the new tail [B, W - 1, channels] (the last W - 1 inputs), in
          x's dtype.
        """
        B, T, C = x.shape
        W = self.size
        if tail is None:  # a pad keeps x's sharding (a zeros operand would be replicated)
            xp = jnp.pad(x, ((0, 0), (W - 1, 0), (0, 0)))
        else:
            xp = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # [B, W - 1 + T, C]
        dtype = self.dtype or x.dtype
        w = self.weight[...]
        if channels is not None:
            w = jax.lax.slice_in_dim(w, channels.start, channels.stop, axis=1)
        w = w.astype(dtype)
        xp_c = xp.astype(dtype)
        # W is tiny (e.g. 4): a sum of shifted slices is cheaper and simpler than lax.conv
        y = sum(w[i] * xp_c[:, i : i + T] for i in range(W))
        return jax.nn.silu(y), xp[:, T:]


class IPLRLayer(nnx.Module):
    """Multi-head IPLR token mixer: [B, T, d_model] -> [B, T, d_model].

    Args:
      d_model: model width.
      num_heads: number of heads H.
      head_dim: key / low-rank head size K (default d_model // num_heads).
      value_dim: value head size V (default head_dim).
      mode: "iplr" (learned low-rank pair), "delta" (delta rule) or "linear" (a = b = 0).
      conv_size: width of the causal depthwise convolution on q, k, v; 0, 1 or None disables
        it (q, k, v then pass through SiLU alone; a width-1 filter would be a per-channel scale).
      use_gate: multiply the normalised output by SiLU of an extra projection of x.
      chunk_size: chunk length of the chunked form (16, 32 or 64).
      implementation: passed to `iplr_jax.chunk` / `iplr_jax.fused_recurrent` (None: fastest).
      dtype: computation dtype of projections and of q, k, v, a, b (None: inferred from x /
        params). The recurrent state is always float32.
      param_dtype: dtype of the parameters.
      allow_neg_eigval: the transition's eigenvalue `1 + a . b` may reach (-1, 0) (lambda, beta
        range over (0, 2)); False restricts it to [0, 1].
      sharding: None (the default: no annotations, no constraints) or a mapping from the
        layer's logical axes to mesh axis names (a name, a tuple of names, or None for
        replicated; absent keys are replicated):
          "batch": batch dimension of the activations;
          "embed": the d_model dimension of every projection kernel;
          "heads": the heads (H * K, H * V, H) dimension of the projections and of q, k, v, a, b.
        `{"batch": "data"}` is data parallelism (parameters replicated), `{"batch": "data",
        "embed": "data"}` FSDP (each kernel split along d_model over the data axis, gathered
        where used), `{"batch": "data", "heads": "model"}` adds a head split.
        Every parameter is initialised through `nnx.with_partitioning` with its mesh axes:
        `nnx.get_partition_spec(nnx.state(layer))` gives the specs, and a layer built under
        `jax.set_mesh(mesh)` is created sharded (Flax's eager sharding). Under a mesh context
        (`jax.set_mesh`, Auto axes), `__call__` also constrains x, q, k, v, a, b and the output
        to those batch / head shardings, so the op runs on each device's own shard (no gather of
        activations); outside one, or inside `shard_map`, no constraint is applied.
      sequence_axis: context parallelism: call the layer inside `jax.shard_map` with x sharded
        over T along this mesh axis (parameters replicated). The convolution takes its
        `conv_size - 1` earlier inputs from the preceding device (a `ppermute` halo) and the
        operator runs as `chunk(..., sequence_axis=...)`, so the result equals the
        single-device layer. Not with `decode`.
      rngs: `nnx.Rngs` for parameter initialisation.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        value_dim: int | None = None,
        mode: Mode = "iplr",
        conv_size: int | None = 4,
        use_gate: bool = True,
        chunk_size: int = 64,
        implementation: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        allow_neg_eigval: bool = True,
        sharding: Mapping[str, MeshAxes] | None = None,
        sequence_axis: str | None = None,
        rngs: nnx.Rngs,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(
                    f"d_model={d_model} is not divisible by num_heads={num_heads}; pass head_dim"
                )
            head_dim = d_model // num_heads
        value_dim = head_dim if value_dim is None else value_dim
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim, self.value_dim = head_dim, value_dim
        self.mode = mode
        if conv_size is not None and (not isinstance(conv_size, numbers.Integral) or conv_size < 0):
            raise ValueError(f"conv_size must be a non-negative int or None, got {conv_size!r}")
        self.conv_size = conv_size if conv_size and conv_size > 1 else 0
        self.sequence_axis = sequence_axis
        self.use_gate = use_gate
        self.chunk_size = chunk_size
        self.implementation = implementation
        self.dtype, self.param_dtype = dtype, param_dtype
        self.max_eig = 2.0 if allow_neg_eigval else 1.0

        self.sharding = _resolve_sharding(sharding)

        H, K, V = num_heads, head_dim, value_dim
        ann = self._annotate
        kernel_init = nnx.initializers.lecun_normal()
        in_kernel = ann(kernel_init, "embed", "heads")  # [d_model, H * .]

        def lin(n_out, *, use_bias=False):
            return nnx.Linear(
                d_model, n_out, use_bias=use_bias, kernel_init=in_kernel,
                bias_init=ann(nnx.initializers.zeros_init(), "heads"),
                dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            )

        self.q_proj = lin(H * K)
        self.k_proj = lin(H * K)
        self.v_proj = lin(H * V)
        if mode == "iplr":
            self.a_proj = lin(H * K)
            self.lam_proj = lin(H, use_bias=True)
        elif mode == "delta":
            self.beta_proj = lin(H, use_bias=True)
        if self.conv_size:
            # replicated: W x channels is tiny, and q, k, v are convolved separately (each with
            # its slice of the filter), so their head sharding is kept
            self.conv = ShortConv(
                H * (2 * K + V), self.conv_size, dtype=dtype, param_dtype=param_dtype,
                param_metadata=self._metadata(None, None), rngs=rngs,
            )
        if use_gate:
            self.g_proj = lin(H * V)
        # RMSNorm weight, shared by heads
        self.o_norm = nnx.Param(jnp.ones((V,), param_dtype), **self._metadata(None))
        self.o_proj = nnx.Linear(
            H * V, d_model, use_bias=False, kernel_init=ann(kernel_init, "heads", "embed"),
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.state: nnx.Cache[jax.Array] | None = nnx.data(None)
        self.conv_state: nnx.Cache[jax.Array] | None = nnx.data(None)

    # -- sharding --------------------------------------------------------------------------------

    def _mesh_axes(self, *logical: str | None) -> tuple[MeshAxes, ...]:
        return tuple(None if name is None else self.sharding[name] for name in logical)

    def _metadata(self, *logical: str | None) -> dict:
        """Variable metadata giving a parameter with these logical axes its mesh axes."""
        return {} if self.sharding is None else {"out_sharding": self._mesh_axes(*logical)}

    def _annotate(self, init, *logical: str | None):
        """`init` wrapped by `nnx.with_partitioning` with the mesh axes of these logical axes."""
        if self.sharding is None:
            return init
        return nnx.with_partitioning(init, self._mesh_axes(*logical))

    def _constrain(self, x: jax.Array, *logical: str | None) -> jax.Array:
        """x constrained to the mesh axes of its logical axes, when a mesh context with those
        axes (all Auto) is set; otherwise (no sharding, no mesh, explicit or manual axes) x."""
        if self.sharding is None:
            return x
        spec = self._mesh_axes(*logical)
        used = {a for axes in spec if axes is not None for a in ((axes,) if isinstance(axes, str) else axes)}
        if not used:
            return x
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or not used <= set(mesh.axis_names):
            return x
        types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
        if any(types[a] != AxisType.Auto for a in used):
            return x
        return jax.lax.with_sharding_constraint(x, P(*spec))

    # -- decoding cache ------------------------------------------------------------------------

    def init_cache(self, batch_size: int) -> None:
        """Creates (or resets) the decoding cache for `batch_size` sequences.

        `state`: [B, H, K, V] float32, the recurrent state (zeros: nothing seen yet).
        `conv_state`: [B, conv_size - 1, H * (2K + V)] float32, the last pre-convolution q, k, v
        inputs (only with a convolution).
        """
        H, K, V = self.num_heads, self.head_dim, self.value_dim
        self.state = nnx.Cache(jnp.zeros((batch_size, H, K, V), jnp.float32))
        if self.conv_size:
            self.conv_state = nnx.Cache(
                jnp.zeros((batch_size, self.conv_size - 1, H * (2 * K + V)), jnp.float32)
            )

    # -- forward -------------------------------------------------------------------------------

    def features(
        self, x: jax.Array, conv_tail: jax.Array | None = None
    ) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
        """The operator's inputs for x.

        Args:
          x: [B, T, d_model].
          conv_tail: [B, conv_size - 1, H(2K + V)] cached convolution inputs (None: zeros).

        Returns:
          (q, k, v, a, b) with q, k, a, b [B, T, H, K] and v [B, T, H, V] in the computation
          dtype, and the new convolution tail (None without a convolution).
        """
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_dim, self.value_dim
        bhd = ("batch", None, "heads")
        qkv = [self._constrain(p(x), *bhd) for p in (self.q_proj, self.k_proj, self.v_proj)]
        new_tail = None
        if self.conv_size:
            # q, k and v each through its own channels of the depthwise filter (the same as
            # convolving their concatenation, without resharding head-sharded projections)
            bounds = (0, H * K, 2 * H * K, H * (2 * K + V))
            tails = [None] * 3
            if conv_tail is not None:
                tails = jnp.split(conv_tail, bounds[1:3], axis=-1)
            elif self.sequence_axis is not None:
                tails = [self._halo(u) for u in qkv]
            out = [
                self.conv(u, t, channels=slice(lo, hi))
                for u, t, lo, hi in zip(qkv, tails, bounds[:-1], bounds[1:], strict=True)
            ]
            qkv = [y for y, _ in out]
            new_tail = jnp.concatenate([t for _, t in out], axis=-1)
        else:
            qkv = [jax.nn.silu(u) for u in qkv]
        q, k, v = qkv
        q = l2_normalize(q.reshape(B, T, H, K))
        k = l2_normalize(k.reshape(B, T, H, K))
        v = v.reshape(B, T, H, V)
        if self.mode == "iplr":
            a = l2_normalize(self.a_proj(x).reshape(B, T, H, K))
            lam = -self.max_eig * jax.nn.sigmoid(self.lam_proj(x).astype(jnp.float32))
            b = (lam[..., None] * a.astype(jnp.float32)).astype(a.dtype)
        elif self.mode == "delta":
            beta = self.max_eig * jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32))[..., None]
            a = (-beta * k.astype(jnp.float32)).astype(k.dtype)
            b = k
            v = (beta * v.astype(jnp.float32)).astype(v.dtype)
        else:
            a = b = jnp.zeros_like(k)
        qkvab = tuple(self._constrain(u, "batch", None, "heads", None) for u in (q, k, v, a, b))
        return qkvab, new_tail

    def _halo(self, u: jax.Array) -> jax.Array:
        """The last conv_size - 1 rows of the preceding device's slice of T ([B, W - 1, C]);
        zeros on the first device, where the sequence starts."""
        W, axis = self.conv_size, self.sequence_axis
        if u.shape[1] < W - 1:
            raise ValueError(
                f"each device's slice of T must hold at least conv_size - 1 = {W - 1} tokens, "
                f"got {u.shape[1]}"
            )
        P = jax.lax.axis_size(axis) if hasattr(jax.lax, "axis_size") else jax.lax.psum(1, axis)
        return jax.lax.ppermute(u[:, u.shape[1] - (W - 1):], axis, [(i, i + 1) for i in range(P - 1)])

    def __call__(self, x: jax.Array, *, decode: bool = False) -> jax.Array:
        """Mixes tokens causally.

        Args:
          x: [B, T, d_model].
          decode: continue from the cache (`init_cache` first) and update it. T > 1 runs the
            chunked form from the cached state (prefill); T == 1 one recurrent step.

        Returns:
          [B, T, d_model] in the computation dtype.
        """
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [B, T, d_model={self.d_model}], got {x.shape}")
        B, T, _ = x.shape
        H, V = self.num_heads, self.value_dim
        x = self._constrain(x, "batch", None, None)
        h0 = tail = None
        if decode and self.sequence_axis is not None:
            raise ValueError("decode=True is not supported with sequence_axis (context parallelism)")
        if decode:
            if self.state is None:
                raise ValueError("decoding cache not initialised: call layer.init_cache(batch_size) first")
            h0 = self._constrain(self.state[...], "batch", "heads", None, None)
            if h0.shape[0] != B:
                raise ValueError(
                    f"x has batch {B} but the cache was made for batch {h0.shape[0]} (init_cache)"
                )
            tail = self.conv_state[...] if self.conv_size else None

        (q, k, v, a, b), new_tail = self.features(x, tail)
        if decode and T == 1:
            o, ht = fused_recurrent(
                q,
                k,
                v,
                a,
                b,
                initial_state=h0,
                output_final_state=True,
                implementation=self.implementation,
            )
        else:
            o, ht = chunk(
                q,
                k,
                v,
                a,
                b,
                initial_state=h0,
                output_final_state=decode,
                chunk_size=self.chunk_size,
                implementation=self.implementation,
                sequence_axis=self.sequence_axis,
            )
        if decode:
            self.state[...] = ht
            if self.conv_size:
                self.conv_state[...] = new_tail.astype(jnp.float32)

        # per-head RMS norm in float32, then the optional SiLU gate
        o32 = o.astype(jnp.float32)
        o32 = o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, axis=-1, keepdims=True) + 1e-5)
        o32 = o32 * self.o_norm[...].astype(jnp.float32)
        o32 = o32.reshape(B, T, H * V)
        if self.use_gate:
            o32 = o32 * jax.nn.silu(self.g_proj(x).astype(jnp.float32))
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        return self._constrain(self.o_proj(o32.astype(dtype)), "batch", None, None)
