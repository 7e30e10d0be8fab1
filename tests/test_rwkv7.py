"""`RWKV7TimeMix` against a float64 reference of the same equations (CPU), prefill + decode
against the full forward, and (GPU, with torch and fla installed) against fla's own
`RWKV7Attention` with the weights copied over."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err

from iplr_jax.rwkv7 import DECAY_SCALE, RWKV7TimeMix, load_fla_state_dict

D, HEAD = 32, 16  # two heads


def randomize(layer, seed=0, scale=0.3):
    """Every parameter random (the RWKV init zeroes o_proj and the LoRA down projections)."""
    state = nnx.state(layer, nnx.Param)
    leaves, tree = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(layer, jax.tree_util.tree_unflatten(tree, new))


def params64(layer):
    g = lambda p: jnp.asarray(p[...], jnp.float64)  # noqa: E731
    p = {f"x_{c}": g(getattr(layer, f"x_{c}")) for c in "rwkvag"}
    p |= dict(k_k=g(layer.k_k), k_a=g(layer.k_a), r_k=g(layer.r_k))
    for n in ("r_proj", "k_proj", "v_proj", "o_proj"):
        p[n] = g(getattr(layer, n).kernel)
    for n in ("w_lora", "a_lora", "v_lora", "g_lora"):
        m = getattr(layer, n)
        if m is not None:
            p[n] = (g(m.down.kernel), g(m.up.kernel), None if m.up.bias is None else g(m.up.bias))
    p["gn"] = (g(layer.g_norm_weight), g(layer.g_norm_bias))
    return p


def reference(p, x, v_first, *, H, K, layer_idx, eps):
    """The equations of fla's RWKV7Attention in float64, with the DPLR step written out."""
    x = jnp.asarray(x, jnp.float64)
    B, T, Dm = x.shape
    delta = jnp.concatenate([jnp.zeros((B, 1, Dm)), x[:, :-1]], 1) - x
    xr, xw, xk, xv, xa, xg = (x + delta * p[f"x_{c}"] for c in "rwkvag")

    def lora(name, y, act):
        down, up, bias = p[name]
        z = act(y @ down) @ up
        return z if bias is None else z + bias

    ident = lambda y: y  # noqa: E731
    r, k, v = xr @ p["r_proj"], xk @ p["k_proj"], xv @ p["v_proj"]
    w = -DECAY_SCALE * jax.nn.sigmoid(lora("w_lora", xw, jnp.tanh))
    if layer_idx == 0:
        v_first = v
    else:
        s = jax.nn.sigmoid(lora("v_lora", xv, ident))
        v = v + (jnp.asarray(v_first, jnp.float64) - v) * s
    a = jax.nn.sigmoid(lora("a_lora", xa, ident))
    g = lora("g_lora", xg, jax.nn.sigmoid)
    hd = lambda y: y.reshape(B, T, H, -1)  # noqa: E731
    kk = hd(k * p["k_k"])
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    k = k * (1 + (a - 1) * p["k_a"])
    r, w, k, a, v = hd(r), hd(w), hd(k), hd(a), hd(v)
    V = v.shape[-1]

    def step(S, t):
        rt, wt, kt, vt, kkt, at = (y[:, t] for y in (r, w, k, v, kk, a))
        aS = jnp.einsum("bhk,bhkv->bhv", -kkt, S)  # a = -kk reads the undecayed state
        S = jnp.exp(wt)[..., None] * S + kt[..., None] * vt[..., None, :]
        S = S + (kkt * at)[..., None] * aS[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", rt, S)

    _, o = jax.lax.scan(step, jnp.zeros((B, H, K, V)), jnp.arange(T))
    o = jnp.moveaxis(o, 0, 1)  # [B, T, H, V]
    mean = o.mean(-1, keepdims=True)
    var = ((o - mean) ** 2).mean(-1, keepdims=True)
    o = ((o - mean) / jnp.sqrt(var + eps)).reshape(B, T, -1) * p["gn"][0] + p["gn"][1]
    rk = jnp.sum(r * k * p["r_k"], -1, keepdims=True)
    o = (o + (rk * v).reshape(B, T, -1)) * g
    return o @ p["o_proj"], v_first


def _layer(layer_idx=0, seed=0, **kw):
    layer = RWKV7TimeMix(D, head_dim=HEAD, layer_idx=layer_idx, num_hidden_layers=4, chunk_size=16,
                         decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8,
                         rngs=nnx.Rngs(seed), **kw)
    randomize(layer, seed)
    return layer


@pytest.mark.usefixtures("on_cpu")  # float32 to rounding: no tf32 dots
@pytest.mark.parametrize("layer_idx", [0, 2])
def test_matches_float64_reference(layer_idx):
    """Outputs and the gradient w.r.t. the input (and v_first) against the float64 equations."""
    layer = _layer(layer_idx, implementation="xla")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 37, D), jnp.float32)
    vf = jax.random.normal(jax.random.PRNGKey(2), (2, 37, D), jnp.float32) if layer_idx else None
    p = params64(layer)
    ref = lambda x, vf: reference(p, x, vf, H=D // HEAD, K=HEAD, layer_idx=layer_idx, eps=HEAD * 1e-5)  # noqa: E731
    y, vfo = nnx.jit(lambda m, x, vf: m(x, vf))(layer, x, vf)
    ry, rvf = jax.jit(ref)(x, vf)
    assert rel_err(y, ry) < 1e-4 and rel_err(vfo, rvf) < 1e-5
    cot = jax.random.normal(jax.random.PRNGKey(3), y.shape, jnp.float32)
    argnums = (0, 1) if layer_idx else 0
    gx = nnx.jit(lambda m, x, vf: jax.grad(lambda x, vf: jnp.sum(m(x, vf)[0] * cot), argnums)(x, vf))(
        layer, x, vf
    )
    rg = jax.jit(jax.grad(lambda x, vf: jnp.sum(ref(x, vf)[0] * cot), argnums))(x, vf)
    for g, r in zip(jax.tree.leaves(gx), jax.tree.leaves(rg), strict=True):
        assert rel_err(g, r) < 1e-4


@pytest.mark.usefixtures("on_cpu")  # float32 to rounding: no tf32 dots
def test_prefill_then_decode_matches_full_forward():
    layer = _layer(1, seed=3, implementation="interpret")
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 24, D), jnp.float32)
    vf = jax.random.normal(jax.random.PRNGKey(5), (2, 24, D), jnp.float32)
    full, _ = layer(x, vf)
    layer.init_cache(2)
    outs = [layer(x[:, :13], vf[:, :13], decode=True)[0]]  # prefill (the gated chunk kernels)
    for t in range(13, 16):  # single steps (the gated fused kernels)
        outs.append(layer(x[:, t : t + 1], vf[:, t : t + 1], decode=True)[0])
    outs.append(layer(x[:, 16:], vf[:, 16:], decode=True)[0])  # chunk from the cached state
    assert rel_err(jnp.concatenate(outs, 1), full) < 1e-5


def test_bf16_and_errors():
    layer = _layer(0, dtype=jnp.bfloat16)
    y, vf = layer(jnp.ones((1, 5, D), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 5, D) and vf.shape == (1, 5, D)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    with pytest.raises(ValueError, match="v_first"):
        _layer(1)(jnp.ones((1, 5, D)))
    with pytest.raises(ValueError, match="init_cache"):
        _layer(0)(jnp.ones((1, 5, D)), decode=True)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_default_init_is_finite(param_dtype):
    """fla's initialisation (orthogonal kernels drawn in float32 for any parameter dtype)."""
    layer = RWKV7TimeMix(64, head_dim=32, layer_idx=1, num_hidden_layers=3, param_dtype=param_dtype,
                         rngs=nnx.Rngs(0))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(layer, nnx.Param))} == {jnp.dtype(param_dtype)}
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 20, 64))
    y, _ = layer(x, x)
    assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y, np.float32)))


# -- against fla (GPU) ---------------------------------------------------------------------------

_MISSING = [m for m in ("torch", "fla", "einops") if importlib.util.find_spec(m) is None]


@pytest.mark.gpu
@pytest.mark.skipif(
    bool(_MISSING), reason=f"needs {', '.join(_MISSING)} (pip install flash-linear-attention)"
)
@pytest.mark.parametrize("layer_idx", [0, 1])
def test_matches_fla_rwkv7_attention(layer_idx):
    """fla's RWKV7Attention (bf16, chunk mode) with random weights copied into RWKV7TimeMix: the
    same output and the same gradient w.r.t. the input, within bf16 tolerance."""
    import torch
    from fla.layers.rwkv7 import RWKV7Attention

    torch.manual_seed(0)
    Dm, Hd, B, T = 512, 64, 2, 256
    ref = RWKV7Attention(hidden_size=Dm, head_dim=Hd, layer_idx=layer_idx, num_hidden_layers=4).cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = ref.to(torch.bfloat16).train()
    layer = RWKV7TimeMix(
        Dm, head_dim=Hd, layer_idx=layer_idx, num_hidden_layers=4, dtype=jnp.bfloat16,
        decay_low_rank_dim=ref.decay_low_rank_dim, gate_low_rank_dim=ref.gate_low_rank_dim,
        a_low_rank_dim=ref.a_low_rank_dim, v_low_rank_dim=ref.v_low_rank_dim, rngs=nnx.Rngs(0),
    )
    load_fla_state_dict(layer, ref.state_dict())

    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, Dm)).astype(np.float32)
    vf = rng.standard_normal((B, T, Dm)).astype(np.float32)
    cot = rng.standard_normal((B, T, Dm)).astype(np.float32)
    tx = torch.tensor(x, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    tvf = torch.tensor(vf, device="cuda", dtype=torch.bfloat16)
    out, _, _, _ = ref(tx, v_first=None if layer_idx == 0 else tvf)
    (out.float() * torch.tensor(cot, device="cuda")).sum().backward()
    want_y, want_g = out.float().detach().cpu().numpy(), tx.grad.float().cpu().numpy()

    jx, jvf = jnp.asarray(x, jnp.bfloat16), jnp.asarray(vf, jnp.bfloat16)
    vfa = None if layer_idx == 0 else jvf

    def loss(x):
        y, _ = layer(x, vfa)
        return jnp.sum(y.astype(jnp.float32) * cot), y

    g, y = jax.grad(loss, has_aux=True)(jx)
    ey, eg = rel_err(np.asarray(y, np.float32), want_y), rel_err(np.asarray(g, np.float32), want_g)
    print(f"RWKV7TimeMix vs fla RWKV7Attention (layer {layer_idx}, bf16): output {ey:.2e}, dx {eg:.2e}")
    assert ey < 2e-2 and eg < 5e-2, (ey, eg)
