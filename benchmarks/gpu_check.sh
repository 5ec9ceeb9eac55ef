#!/usr/bin/env bash
# The GPU checks of moelab in one run, for a session that is lent a CUDA machine (issue 12):
#   1. versions and the device;
#   2. the Triton routed-matmul tests on the GPU (outputs and gradients against the float64
#      loop, fp32/fp16/bf16, torch.compile(fullgraph=True), custom-op checks) and every other
#      test marked `gpu`;
#   3. `benchmarks/moe_layer.py --device cuda`: dense vs every backend (triton, grouped_mm,
#      loop, ...) on the coarse and fine shapes, bf16 and float32, in one run;
#   4. `benchmarks/train_throughput.py --device cuda`: tokens/s and MFU against the bf16 matmul
#      peak measured in the same run, at sequence 1024 with bf16 and torch.compile.
# Each part has its own time limit, so one that hangs cannot eat the others' time; the whole
# script stays under ~9 minutes. Results land in $OUT (the device tool's folder) or
# /tmp/gpu_check: logs, and RESULTS.md with the new `*_cuda` sections.
#
#   bash benchmarks/gpu_check.sh            # run from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, keep going
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

part versions 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(\"torch\", \
torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
part tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_triton_routed.py \
    tests/ops/test_backends.py -x
part moe_layer 180 "$PY" benchmarks/moe_layer.py --device cuda --threads 0 --repeats 20 \
    --write-results
part train_throughput 240 "$PY" benchmarks/train_throughput.py --device cuda --dtypes bfloat16 \
    --compile --steps 10 --warmup 3 --set train.seq_len=1024 --set train.batch_size=16 \
    --presets umoe-paper-base-dense,umoe-paper-base-ffnmoe,umoe-paper-base-umoe-att,umoe-paper-base-umoe
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
