"""Backward kernels of the chunked form (DESIGN.md section 3): the reverse dS sweep, the
intra-chunk gradients, and the backward of the WY preprocessing."""

from __future__ import annotations


def chunk_bwd(q, k, v, a, b, h, v_new, cu_chunks, do, dht, *, scale, chunk_size, interpret):
    """Gradients of the chunked form on the aligned layout (see `chunk.chunk_fwd`).

    Args:
      q, k, a, b: [1, L, H, Kp]; v: [1, L, H, Vp] (input dtype), L = NC * chunk_size.
      h: [NC, H, Kp, Vp] state before each chunk (float32 or the input dtype).
      v_new: [1, L, H, Vp] float32, V2[t] = a_t^T S_{t-1}.
      cu_chunks: int32 [N + 1] chunk offsets of the sequences (may be traced).
      do: [1, L, H, Vp] cotangent of o; dht: [N, H, Kp, Vp] float32 cotangent of the final state.

    Returns:
      dq, dk, da, db [1, L, H, Kp] and dv [1, L, H, Vp] in the inputs' dtypes, and dh0
      [N, H, Kp, Vp] float32.
    """
    raise NotImplementedError("the Pallas chunk backward kernels are not built yet")
