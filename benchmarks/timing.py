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


def grads(f, argnums=(0, 1, 2, 3, 4)):
    """The gradients of `sum(f(*args)**2)` (float32): a loss whose gradient needs the output,
    as a training loss does. With `sum(f(*args))` the cotangent is constant and XLA may drop
    the kernel that computes the output (benchmarks/NOTES.md, session 14)."""
    loss = lambda *x: jax.numpy.sum(jax.numpy.square(f(*x).astype(jax.numpy.float32)))  # noqa: E731
    return jax.grad(loss, argnums=argnums)


def device_profile(
    f, *args, calls: int = 3, top: int = 12, device: str = "/device:GPU:0", gaps: int = 0
) -> str:
    """What one call of `f(*args)` runs on `device`, from a `jax.profiler` trace of `calls`
    calls (after a warm-up): per trace line (streams, XLA modules) the busy milliseconds per
    call, then the `top` event names by time per call; with `gaps`, the device's idle time
    within calls (no stream busy, gaps under 2 ms) and the longest `gaps` of those gaps with
    the kernels either side. A text table."""
    import collections
    import glob
    import tempfile

    jax.block_until_ready(f(*args))
    folder = tempfile.mkdtemp()
    with jax.profiler.trace(folder):
        for _ in range(calls):
            jax.block_until_ready(f(*args))
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    plane = next((p for p in data.planes if p.name == device), None)
    if plane is None:
        return f"no {device} plane in the trace (planes: {[p.name for p in data.planes]})"
    rows, names = [], collections.Counter()
    for line in plane.lines:
        events = list(line.events)
        if not events:
            continue
        busy = sum(e.duration_ns for e in events) / calls / 1e6
        span = (max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)) / 1e6
        rows.append(f"  {line.name[:40]:40} busy {busy:9.3f} ms/call  events {len(events) // calls:5d}"
                    f"/call  span of all calls {span:9.3f} ms")
        if line.name.startswith("Stream"):
            for e in events:
                names[e.name[:90]] += e.duration_ns / calls / 1e6
    rows += [f"    {ms:9.3f} ms  {name}" for name, ms in names.most_common(top)]
    if gaps:
        events = sorted((e.start_ns, e.start_ns + e.duration_ns, e.name[:60]) for line in plane.lines
                         if line.name.startswith("Stream") for e in line.events)
        idle, end, last = [], events[0][1], events[0][2]
        for start, stop, name in events[1:]:
            if 0 < start - end < 2_000_000:
                idle.append((start - end, last, name))
            if stop > end:
                end, last = stop, name
        rows.append(f"  idle within calls {sum(g for g, *_ in idle) / calls / 1e6:.3f} ms/call "
                    f"in {len(idle) // calls} gaps/call; the longest:")
        longest = sorted(idle, reverse=True)[:gaps]
        rows += [f"    {g / 1e3:8.1f} us  after {a}  before {b}" for g, a, b in longest]
    return "\n".join(rows)
