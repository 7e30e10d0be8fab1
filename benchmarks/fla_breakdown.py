"""fla-core's chunked IPLR forward, stage by stage, to set next to `profile_kernels.py`.

    python benchmarks/fla_breakdown.py [--sizes S1,S2,S3]     # GPU, fla-core importable

Times fla's three forward passes alone on the bench's inputs (bf16): the WY preprocessing
(`prepare_wy_repr_fwd`), the state sweep (`..._fwd_h`) and the output (`..._fwd_o`), then the
whole `chunk_iplr_delta_rule` forward. Where the gap to fla lies decides what to work on.
"""

from __future__ import annotations

import argparse

import numpy as np
import timing  # benchmarks/ is on sys.path: the script's folder


def median_ms(f, reps=20):
    import torch

    return timing.median_ms(f, reps=reps, sync=lambda _: torch.cuda.synchronize())


def _stages(label):
    import torch
    from fla.ops.generalized_delta_rule import chunk_iplr_delta_rule
    from fla.ops.generalized_delta_rule.iplr import chunk as fc
    from fla.ops.generalized_delta_rule.iplr.wy_fast import prepare_wy_repr_fwd

    from iplr_jax.bench import SIZES, _inputs

    x = _inputs(np.random.default_rng(0), **SIZES[label], decode=False)
    q, k, v, a, b = (torch.from_numpy(x[n]).cuda().to(torch.bfloat16) for n in "qkvab")
    scale = k.shape[-1] ** -0.5
    w, u, _ = prepare_wy_repr_fwd(a=a, b=b, k=k, v=v, cu_seqlens=None, chunk_size=64)
    h, v_new, _ = fc.chunk_generalized_iplr_delta_rule_fwd_h(k=k, v=v, w=w, u=u, b=b)
    return {
        "fla wy (prepare_wy_repr_fwd)": lambda: prepare_wy_repr_fwd(
            a=a, b=b, k=k, v=v, cu_seqlens=None, chunk_size=64),
        "fla state sweep (fwd_h)": lambda: fc.chunk_generalized_iplr_delta_rule_fwd_h(
            k=k, v=v, w=w, u=u, b=b),
        "fla output (fwd_o)": lambda: fc.chunk_generalized_iplr_delta_rule_fwd_o(
            q=q, k=k, v=v, v_new=v_new, b=b, h=h, scale=scale),
        "fla chunk forward total": lambda: chunk_iplr_delta_rule(q, k, v, a, b),
    }.items()


def main():
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="S1,S2,S3")
    args = p.parse_args()
    rows = []
    for label in args.sizes.split(","):
        with torch.no_grad():
            for name, f in _stages(label):
                rows.append((label, name, median_ms(f)))
                print(*rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, median ms")
    for label, name, ms in rows:
        print(f"{label:4} {name:30} {ms:8.3f}")


if __name__ == "__main__":
    main()
