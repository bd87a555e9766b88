#!/usr/bin/env bash
# One call on the GPU machine (bench/RESULTS.md gives each run's exact command):
#   bash bench/h200.sh TESTS DEADLINE SECTION...
# installs the carried wheels (.whl: diffusers, transformers 5.23, torchao, the worker's pure-Python needs),
# runs the gpu-marked tests when TESTS is "gpu" (every test file that has the marker), then
# `python -m bench SECTION... --deadline DEADLINE`. Logs, the JUnit report and bench.json go to $OUT.
set -uo pipefail
tests=$1 deadline=$2
shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm,clocks.max.sm --format=csv,noheader
started=$(date +%s)
if [ "$tests" = gpu ]; then
    files=$(grep -rlE "mark\.gpu|pytestmark = pytest\.mark\.gpu" tests --include='test_*.py' | sort)
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu --junitxml="$OUT/gpu-tests.xml" $files \
        > "$OUT/gpu-tests.log" 2>&1
    echo "gpu tests: exit $? in $(( $(date +%s) - started )) s"
    grep -E "passed|failed|error" "$OUT/gpu-tests.log" | tail -3
    grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | head -20
fi
left=$(( deadline - ($(date +%s) - started) ))
python3 -m bench "$@" --deadline "$left" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench: exit $? in $(( $(date +%s) - started )) s (deadline $left s)"
grep -E "^\[(row|check|error|skip)\]" "$OUT/bench.log" | cut -c1-300 | tail -60
sed -n '/^| work/,$p' "$OUT/bench.log" | cut -c1-260
