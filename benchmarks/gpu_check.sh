#!/usr/bin/env bash
# The whole GPU check in one call: install, probe, GPU tests, benchmark with fla-core side by side.
# Usage (device tool, carry .fla):  bash benchmarks/gpu_check.sh [pytest args...]
# Env: BENCH_ARGS (default: all sizes), SKIP_TESTS=1, SKIP_BENCH=1, PROFILE=1 (per-kernel times).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || python3 -m pip install -q --no-deps -e . >>"$OUT/install.log" 2>&1
python3 -m pip install -q --no-deps --target /tmp/fla .fla/*.whl >>"$OUT/install.log" 2>&1 && export PYTHONPATH=/tmp/fla
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, torch, triton; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'triton', triton.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -v --runslow --durations=15 -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.log" | grep -v PASSED | tail -40
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 -m iplr_jax bench ${BENCH_ARGS:-} --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
if [ -n "${PROFILE:-}" ]; then
  timeout ${PROFILE_TIMEOUT:-200} python3 benchmarks/profile_kernels.py 2>&1 | tee "$OUT/profile.log" | tail -25
fi
