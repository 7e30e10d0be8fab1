"""Command line: `python -m iplr_jax demo` and `python -m iplr_jax bench`."""

from __future__ import annotations

import os
import sys

USAGE = """usage: python -m iplr_jax {demo,bench} [options]

  demo   check the ops against the reference, then train a tiny IPLR model (about 2 minutes on CPU)
  bench  time every implementation available here (and fla-core when importable)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("demo", "bench"):
        print(USAGE, file=sys.stderr if argv else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    # JAX would otherwise take 75% of the GPU up front and leave nothing to torch (fla-core)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if argv[0] == "demo":
        from iplr_jax.demo import main as demo
        return demo(argv[1:])
    from iplr_jax.bench import main as bench
    return bench(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
