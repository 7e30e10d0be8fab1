"""iplr-jax: the IPLR (identity-plus-low-rank) generalized delta rule for JAX.

    S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t

With a per-key log-decay `gk` the ops compute the gated (DPLR) form
`S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T` (docs/gate.md), which RWKV-7 runs on.

The ops (`chunk`, `fused_recurrent`, the reference `naive`), the Flax NNX layers, and the
configs of the Pallas kernels. docs/architecture.md maps the modules.
"""

from iplr_jax.layer import IPLRLayer
from iplr_jax.ops.chunk import chunk
from iplr_jax.ops.fused_recurrent import fused_recurrent
from iplr_jax.reference.naive import naive
from iplr_jax.rwkv7 import RWKV7TimeMix
from iplr_jax.triton.config import ChunkConfig, FusedRecurrentConfig

__all__ = [
    "ChunkConfig", "FusedRecurrentConfig", "IPLRLayer", "RWKV7TimeMix", "chunk", "fused_recurrent", "naive",
]
__version__ = "0.1.0"
