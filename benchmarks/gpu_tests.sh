#!/usr/bin/env bash
# The test suite on a GPU machine within one device call: groups of test files run as parallel
# pytest processes (the suite is compile-bound; serially it takes longer than a call may run).
#   bash benchmarks/gpu_tests.sh SECONDS "GPU:pytest args" ...
# e.g. "0:tests/test_gate.py" "0,1:--runslow -k 'pallas or gpu' tests/test_cp_jit.py" (the args are
# shell words: quote inside the group; GPU may list several). Each group's log
# (one line per test, -v) is $OUT/tests_<n>.log; its failures and last line are echoed.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
secs=$1; shift
pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
[ -d .fla ] && pip install -q --no-deps --target /tmp/fla .fla/*.whl >>"$OUT/install.log" 2>&1
export PYTHONPATH=$PWD:/tmp/fla TRITON_CACHE_DIR=/tmp/tc
mkdir -p /tmp/tc && [ -d .triton_autotune ] && cp -r .triton_autotune/. /tmp/tc/
n=0
for group in "$@"; do
  n=$((n + 1))
  eval "args=(${group#*:})"
  CUDA_VISIBLE_DEVICES=${group%%:*} timeout "$secs" python -m pytest -v -rfE -p no:cacheprovider \
    "${args[@]}" >"$OUT/tests_$n.log" 2>&1 &
done
wait
for i in $(seq 1 $n); do
  echo "=== group $i: ${!i:-}"
  grep -E "(FAILED|ERROR)( |$)" "$OUT/tests_$i.log" | grep "::" | sort -u | head -20
  tail -1 "$OUT/tests_$i.log"
done
