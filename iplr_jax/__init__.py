"""iplr-jax: the IPLR (identity-plus-low-rank) generalized delta rule for JAX.

    S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t
"""

from iplr_jax.chunk import chunk
from iplr_jax.fused_recurrent import fused_recurrent
from iplr_jax.layer import IPLRLayer
from iplr_jax.naive import naive

__all__ = ["IPLRLayer", "chunk", "fused_recurrent", "naive"]
__version__ = "0.1.0"
