"""Command line: `iplr-jax demo|bench` (the console script) or `python -m iplr_jax demo|bench`."""

from __future__ import annotations

import argparse
import os
import sys

COMMANDS = ("demo", "bench")

USAGE = """usage: iplr-jax {demo,bench} [options]
       python -m iplr_jax {demo,bench} [options]

commands:
  demo   check the ops against the reference, then train a tiny IPLR model next to linear
         attention (2 to 3 minutes on 2 CPU cores; --quick: under a minute)
  bench  time every implementation available here (and fla-core when importable)

`iplr-jax COMMAND --help` describes a command's options.
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `PROG: error: MESSAGE (see PROG --help)` on stderr, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Runs a command; returns the exit code (0 ok, 2 for a usage error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] not in COMMANDS:
        what = f"unknown option {argv[0]!r}" if argv[0].startswith("-") else f"unknown command {argv[0]!r}"
        print(f"iplr-jax: error: {what}; expected one of: {', '.join(COMMANDS)} (see iplr-jax --help)",
              file=sys.stderr)
        return 2
    # JAX would otherwise take 75% of the GPU up front and leave nothing to torch (fla-core)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        if argv[0] == "demo":
            from iplr_jax.demo import main as command
        else:
            from iplr_jax.bench import main as command
        return command(argv[1:])
    except SystemExit as e:  # argparse: --help exits 0, a bad option exits 2 (message already on stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
