"""The benchmark scripts' one timer (`python benchmarks/<script>.py` puts this folder on sys.path)."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(f, *args, reps: int = 20, back_to_back: int = 5, sync=jax.block_until_ready) -> float:
    """Median milliseconds per call of `f(*args)` after one warm-up (compiling) call: each of
    `reps` samples runs `back_to_back` calls, then `sync(last output)`, so the sync is
    amortised (torch callers pass `sync=lambda _: torch.cuda.synchronize()`)."""
    sync(f(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(back_to_back):
            out = f(*args)
        sync(out)
        samples.append((time.perf_counter() - t0) / back_to_back * 1e3)
    return statistics.median(samples)
