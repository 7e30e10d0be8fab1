#!/usr/bin/env bash
# session-7 GPU check (2 GPUs): gated kernels, non-finite guard, RWKV-7 vs fla, timings
set -u; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps --target /tmp/fla .fla/*.whl >/dev/null 2>&1; export PYTHONPATH=$PWD:/tmp/fla
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
step() { local t=$1 name=$2; shift 2; echo "== $name"; timeout $t "$@" > $OUT/$name.log 2>&1; echo "rc=$?"; grep -v "^W1\|Warning\|warn(" $OUT/$name.log | tail -${TAILN:-12}; }
export CUDA_VISIBLE_DEVICES=0
TAILN=25 step 200 gate_tests python -m pytest -q -x -p no:cacheprovider -k "pallas or lowers or gpu" tests/test_gate.py tests/test_nonfinite.py tests/test_rwkv7.py -rs --durations=5
TAILN=14 step 100 gate_timing python benchmarks/gate_timing.py --sizes S1,S2 --reps 10
step 60 guard_cost python benchmarks/guard_cost.py --sizes S1,S2
step 40 b2 python -m iplr_jax bench --size 2,4096,16,128,128 --size 4,4096,16,128,128 --only "chunk pallas" --no-fla --reps 10
unset CUDA_VISIBLE_DEVICES
step 70 cp_mem python benchmarks/cp_breakdown.py --skip-times --ts 1048576,1572864,2097152
export CUDA_VISIBLE_DEVICES=0
step 80 precision python benchmarks/precision_check.py
