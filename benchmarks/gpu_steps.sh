#!/usr/bin/env bash
# One device call as named steps, each with its own time limit and log under $OUT (the device
# tool's output folder), so that a step cut by its limit does not cost the others:
#   bash benchmarks/gpu_steps.sh "name:seconds:command" ...     (carry .fla for fla's wheels)
# e.g. "profile:150:python benchmarks/profile_kernels.py --sizes S3". TAILN lines of each log
# are echoed. (benchmarks/gpu_check.sh is the fixed full check: tests, bench, profile.)
# fla's Triton autotuning takes minutes per size; its results (*.autotune.json of a Triton
# cache, git-ignored .triton_autotune/, carried) are reused when present: save new ones with a
# step "save:10:cd /tmp/tc && find . -name '*.autotune.json' | tar czf \$OUT/autotune.tgz -T -".
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
pip install -q --no-deps --target /tmp/fla .fla/*.whl >>"$OUT/install.log" 2>&1
export PYTHONPATH=$PWD:/tmp/fla:$PWD/benchmarks
mkdir -p /tmp/tc && export TRITON_CACHE_DIR=/tmp/tc
[ -d .triton_autotune ] && cp -r .triton_autotune/. /tmp/tc/
nvidia-smi --query-gpu=name --format=csv,noheader
for step in "$@"; do
  name=${step%%:*}; rest=${step#*:}; secs=${rest%%:*}; cmd=${rest#*:}
  echo "=== $name ($secs s): $cmd"
  t0=$(date +%s)
  timeout "$secs" bash -c "$cmd" > "$OUT/$name.log" 2>&1; rc=$?
  echo "    rc=$rc in $(( $(date +%s) - t0 )) s"; tail -${TAILN:-25} "$OUT/$name.log"
done
