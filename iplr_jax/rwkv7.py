"""`RWKV7TimeMix`: RWKV-7's time mixing ("attention") as a Flax NNX layer on the DPLR ops.

The equations are those of fla's `fla.layers.rwkv7.RWKV7Attention` (flash-linear-attention),
so that weights copied from the torch module (`load_fla_state_dict`) give the same outputs:

    delta   = shift(x) - x                           (token shift; shift(x)_t = x_{t-1}, 0 or the
                                                      cached token before the first)
    x_c     = x + delta * mu_c        for c in r, w, k, v, a, g
    r = W_r x_r,   k = W_k x_k,   v = W_v x_v
    w       = -exp(-1/2) * sigmoid(lora_w(x_w))      (the log-decay gk, in (-0.607, 0))
    v       = lerp(v, v_first, sigmoid(lora_v(x_v)))  (layers > 0; layer 0 returns its v as v_first)
    a       = sigmoid(lora_a(x_a))                    (in-context learning rate)
    g       = lora_g(x_g)                             (output gate; sigmoid inside the LoRA)
    kk      = normalize_per_head(k * k_k)
    k       = k * (1 + (a - 1) * k_a)
    o, S    = DPLR(q=r, k, v, a=-kk, b=kk * a, gk=w, scale=1)
    o       = GroupNorm_per_head(o) (eps = head_dim * norm_eps)
    o       = W_o ((o + sum(r * k * r_k) v) * g)

with `lora(x) = B act(A x) (+ bias)` (tanh for w, none for a and v, sigmoid for g which has no
bias). Training and prefill run `iplr_jax.chunk(..., gk=w)`, one-token decode steps
`iplr_jax.fused_recurrent`, both from the cached state (`init_cache`, `decode=True`), like
`iplr_jax.IPLRLayer`. docs/gate.md describes the DPLR ops.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iplr_jax.ops.chunk import chunk
from iplr_jax.ops.fused_recurrent import fused_recurrent

DECAY_SCALE = 0.6065306597126334  # exp(-1/2): w = -DECAY_SCALE * sigmoid(...)
_ACTS = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, None: lambda x: x}


def _lora_rank(d_model: int, mult: float, factor: float = 1.0) -> int:
    return max(32, int(round((mult * d_model**0.5) * factor / 32) * 32))


def _orthogonal(gain: float):
    """An orthogonal initializer that draws in float32 whatever the parameter dtype (its QR step
    has no 16-bit kernel), then casts."""
    init = nnx.initializers.orthogonal(gain)
    return lambda key, shape, dtype=jnp.float32: init(key, shape, jnp.float32).astype(dtype)


class LoRA(nnx.Module):
    """x -> up(act(down(x))): fla's `LoRA` (down has no bias; up's bias optional)."""

    def __init__(self, d_in, d_out, rank, *, activation, bias=True, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        gain = math.sqrt(d_out / rank) if d_out > rank else 1.0
        self.down = nnx.Linear(d_in, rank, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.up = nnx.Linear(rank, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                             kernel_init=_orthogonal(0.1 * gain), rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        return self.up(_ACTS[self.activation](self.down(x)))


class RWKV7TimeMix(nnx.Module):
    """RWKV-7 time mixing: [B, T, d_model] (and v_first) -> ([B, T, d_model], v_first).

    Args (fla's names where they exist):
      d_model: hidden size (fla's `hidden_size`); the key size is d_model.
      head_dim: key head size K (default 64); or `num_heads`.
      value_dim: total value size (default d_model); V = value_dim / num_heads.
      decay_low_rank_dim, gate_low_rank_dim, a_low_rank_dim, v_low_rank_dim: LoRA ranks
        (default: fla's rules from d_model and head_dim).
      elementwise_affine: the group norm's weight and bias.
      norm_eps: the group norm's eps is head_dim * norm_eps (as fla).
      layer_idx, num_hidden_layers: layer 0 produces v_first and has no value LoRA; both steer
        the RWKV initialisation.
      chunk_size, implementation: passed to `iplr_jax.chunk` / `fused_recurrent`.
      dtype, param_dtype: computation and parameter dtypes (the state is float32).
    """

    def __init__(
        self,
        d_model: int,
        *,
        head_dim: int | None = 64,
        num_heads: int | None = None,
        value_dim: int | None = None,
        decay_low_rank_dim: int | None = None,
        gate_low_rank_dim: int | None = None,
        a_low_rank_dim: int | None = None,
        v_low_rank_dim: int | None = None,
        elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        layer_idx: int = 0,
        num_hidden_layers: int = 1,
        chunk_size: int = 64,
        implementation: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if head_dim is None and num_heads is None:
            raise ValueError("pass head_dim or num_heads")
        if head_dim is not None:
            num_heads = d_model // head_dim
        else:
            head_dim = d_model // num_heads
        if num_heads * head_dim != d_model:
            raise ValueError(f"d_model={d_model} is not num_heads x head_dim = {num_heads} x {head_dim}")
        value_dim = d_model if value_dim is None else value_dim
        if value_dim % num_heads:
            raise ValueError(f"value_dim={value_dim} is not divisible by num_heads={num_heads}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.value_dim, self.head_v_dim = value_dim, value_dim // num_heads
        self.layer_idx, self.num_hidden_layers = layer_idx, num_hidden_layers
        self.norm_eps, self.elementwise_affine = norm_eps, elementwise_affine
        self.chunk_size, self.implementation = chunk_size, implementation
        self.dtype, self.param_dtype = dtype, param_dtype
        factor = head_dim / 64
        ranks = dict(
            w=decay_low_rank_dim or _lora_rank(d_model, 2.5, factor),
            g=gate_low_rank_dim or _lora_rank(d_model, 5.0),
            a=a_low_rank_dim or _lora_rank(d_model, 2.5, factor),
            v=v_low_rank_dim or _lora_rank(d_model, 1.7, factor),
        )
        D, H, K = d_model, num_heads, head_dim
        init = self._rwkv_init()
        P = lambda x: nnx.Param(jnp.asarray(x, param_dtype))  # noqa: E731
        for c in "rwkvag":
            setattr(self, f"x_{c}", P(init[f"x_{c}"]))
        self.k_k = P(init["k_k"])
        self.k_a = P(np.full(D, 1.02))
        self.r_k = P(np.full((H, K), -0.04))

        def lin(d_in, d_out, gain=1.0):
            return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_orthogonal(gain), rngs=rngs)

        self.r_proj, self.k_proj, self.v_proj = lin(D, D), lin(D, D, 0.1), lin(D, value_dim)
        self.o_proj = nnx.Linear(value_dim, D, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=nnx.initializers.zeros, rngs=rngs)
        lora = lambda d_out, r, act, bias=True: LoRA(  # noqa: E731
            D, d_out, r, activation=act, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.w_lora = lora(D, ranks["w"], "tanh")
        self.w_lora.up.bias[...] = jnp.asarray(init["w_bias"], param_dtype)
        self.a_lora = lora(D, ranks["a"], None)
        self.a_lora.up.bias[...] = jnp.asarray(init["a_bias"], param_dtype)
        self.v_lora: LoRA | None = nnx.data(None)
        if layer_idx != 0:
            self.v_lora = lora(value_dim, ranks["v"], None)
            self.v_lora.up.bias[...] = jnp.asarray(np.resize(init["v_bias"], value_dim), param_dtype)
        self.g_lora = lora(value_dim, ranks["g"], "sigmoid", bias=False)
        if elementwise_affine:
            self.g_norm_weight = P(np.full(value_dim, ((layer_idx + 1) / num_hidden_layers) ** 0.7))
            self.g_norm_bias = P(np.zeros(value_dim))
        self.state: nnx.Cache[jax.Array] | None = nnx.data(None)
        self.shift_state: nnx.Cache[jax.Array] | None = nnx.data(None)

    def _rwkv_init(self) -> dict:
        """RWKV-7's position-dependent initial values (as fla's `_initialize_weights`)."""
        D, K, L, i = self.d_model, self.head_dim, self.num_hidden_layers, self.layer_idx
        r01 = i / max(L - 1, 1)
        r10 = 1.0 - i / L
        n = np.arange(D)
        ddd = n / D
        linear = n / (D - 1) - 0.5
        zig = ((n % K) - (K - 1) / 2) / ((K - 1) / 2)
        zig = zig * np.abs(zig)
        www = -6 + 6 * (n / (D - 1)) ** (1 + r01**0.3)
        p = lambda e: 1.0 - ddd ** (e * r10)  # noqa: E731
        return dict(
            x_r=p(0.2), x_w=p(0.9), x_k=p(0.7), x_v=p(0.7), x_a=p(0.9), x_g=p(0.2),
            k_k=0.71 - linear * 0.1, w_bias=www + 0.5 + zig * 2.5,
            a_bias=-0.19 + zig * 0.3 + linear * 0.4, v_bias=0.73 - linear * 0.4,
        )

    # -- decoding cache ------------------------------------------------------------------------

    def init_cache(self, batch_size: int) -> None:
        """`state` [B, H, K, V] float32 (the recurrent state) and `shift_state` [B, d_model]
        float32 (the last token seen, for the token shift)."""
        H, K, V = self.num_heads, self.head_dim, self.head_v_dim
        self.state = nnx.Cache(jnp.zeros((batch_size, H, K, V), jnp.float32))
        self.shift_state = nnx.Cache(jnp.zeros((batch_size, self.d_model), jnp.float32))

    # -- forward -------------------------------------------------------------------------------

    def features(
        self, x: jax.Array, v_first: jax.Array | None = None, shift: jax.Array | None = None
    ) -> tuple:
        """The DPLR inputs and what the output needs: (r, w, k, v, kk, a, g, v_first), r, w, k,
        kk, a [B, T, H, K], v [B, T, H, V], g [B, T, value_dim], v_first [B, T, value_dim]."""
        B, T, D = x.shape
        H, V = self.num_heads, self.head_v_dim
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        x = x.astype(dtype)
        prev = jnp.zeros((B, 1, D), dtype) if shift is None else shift[:, None].astype(dtype)
        delta = jnp.concatenate([prev, x[:, :-1]], axis=1) - x
        mix = lambda mu: x + delta * mu[...].astype(dtype)  # noqa: E731
        xr, xw, xk, xv, xa, xg = (mix(getattr(self, f"x_{c}")) for c in "rwkvag")
        r = self.r_proj(xr)
        w = -DECAY_SCALE * jax.nn.sigmoid(self.w_lora(xw).astype(jnp.float32))
        k = self.k_proj(xk)
        v = self.v_proj(xv)
        if self.layer_idx == 0:
            v_first = v
        else:
            if v_first is None:
                raise ValueError(f"layer {self.layer_idx} needs v_first (the first layer's values)")
            mixv = jax.nn.sigmoid(self.v_lora(xv).astype(jnp.float32))
            v32 = v.astype(jnp.float32)
            v = (v32 + (v_first.astype(jnp.float32) - v32) * mixv).astype(dtype)
        a = jax.nn.sigmoid(self.a_lora(xa).astype(jnp.float32))
        g = self.g_lora(xg)
        heads = lambda y: y.reshape(B, T, H, -1)  # noqa: E731
        k32 = k.astype(jnp.float32)
        kk = heads(k32 * self.k_k[...].astype(jnp.float32))
        kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)  # F.normalize
        k = k32 * (1 + (a - 1) * self.k_a[...].astype(jnp.float32))
        cast = lambda y: heads(y).astype(dtype)  # noqa: E731
        return (cast(r), cast(w), cast(k), v.reshape(B, T, H, V), kk.astype(dtype),
                cast(a), g, v_first)

    def __call__(
        self, x: jax.Array, v_first: jax.Array | None = None, *, decode: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """Mixes tokens causally.

        Args:
          x: [B, T, d_model].
          v_first: [B, T, value_dim], the first layer's values (layers > 0; layer 0 ignores it).
          decode: continue from the cache (`init_cache` first) and update it; T == 1 runs one
            fused recurrent step, T > 1 the chunked form from the cached state.

        Returns:
          (y [B, T, d_model] in the computation dtype, v_first).
        """
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [B, T, d_model={self.d_model}], got {x.shape}")
        B, T, _ = x.shape
        h0 = shift = None
        if decode:
            if self.state is None:
                raise ValueError("decoding cache not initialised: call layer.init_cache(batch_size) first")
            h0, shift = self.state[...], self.shift_state[...]
            if h0.shape[0] != B:
                raise ValueError(f"x has batch {B} but the cache was made for batch {h0.shape[0]}")
        r, w, k, v, kk, a, g, v_first = self.features(x, v_first, shift)
        args = (r, k, v, -kk, kk * a, w)
        kw = dict(scale=1.0, initial_state=h0, implementation=self.implementation)
        if decode and T == 1:
            o, ht = fused_recurrent(*args, output_final_state=True, **kw)
        else:
            o, ht = chunk(*args, output_final_state=decode, chunk_size=self.chunk_size, **kw)
        if decode:
            self.state[...] = ht
            self.shift_state[...] = x[:, -1].astype(jnp.float32)
        y = self.output(o, r, k, v, g)
        return y, v_first

    def output(self, o: jax.Array, r: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array) -> jax.Array:
        """Group norm per head, the (r . k r_k) v correction, the gate, the output projection."""
        B, T, H, V = o.shape
        dtype = self.dtype or jnp.result_type(g.dtype, self.param_dtype)
        o32 = o.astype(jnp.float32)
        mean = jnp.mean(o32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(o32 - mean), axis=-1, keepdims=True)
        o32 = ((o32 - mean) * jax.lax.rsqrt(var + self.head_dim * self.norm_eps)).reshape(B, T, H * V)
        if self.elementwise_affine:
            f32 = lambda p: p[...].astype(jnp.float32)  # noqa: E731
            o32 = o32 * f32(self.g_norm_weight) + f32(self.g_norm_bias)
        rk = jnp.sum(r.astype(jnp.float32) * k.astype(jnp.float32) * self.r_k[...].astype(jnp.float32),
                     axis=-1, keepdims=True)
        o32 = (o32 + (rk * v.astype(jnp.float32)).reshape(B, T, H * V)) * g.astype(jnp.float32)
        return self.o_proj(o32.astype(dtype))


def load_fla_state_dict(layer: RWKV7TimeMix, state_dict) -> None:
    """Copies the weights of fla's `RWKV7Attention` (its `state_dict()`, tensors or arrays,
    `fuse_norm=False` or True) into `layer`, in place. Linear weights are transposed (torch
    stores [out, in], flax [in, out])."""
    sd = {k: np.asarray(v.detach().float().cpu().numpy() if hasattr(v, "detach") else v)
          for k, v in state_dict.items()}

    def put(param, value):
        param[...] = jnp.asarray(np.reshape(value, param[...].shape), param[...].dtype)

    for c in "rwkvag":
        put(getattr(layer, f"x_{c}"), sd[f"x_{c}"])
    put(layer.k_k, sd["k_k"])
    put(layer.k_a, sd["k_a"])
    put(layer.r_k, sd["r_k"])
    for name in ("r_proj", "k_proj", "v_proj", "o_proj"):
        put(getattr(layer, name).kernel, sd[f"{name}.weight"].T)
    for name in ("w_lora", "a_lora", "v_lora", "g_lora"):
        mod = getattr(layer, name)
        if mod is None:
            continue
        put(mod.down.kernel, sd[f"{name}.lora.0.weight"].T)
        put(mod.up.kernel, sd[f"{name}.lora.2.weight"].T)
        if mod.up.bias is not None:
            put(mod.up.bias, sd[f"{name}.lora.2.bias"])
    if layer.elementwise_affine:
        put(layer.g_norm_weight, sd["g_norm.weight"])
        put(layer.g_norm_bias, sd["g_norm.bias"])
