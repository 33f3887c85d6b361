#!/usr/bin/env bash
# GPU checks for qwen-deploy, for a machine with an NVIDIA GPU and onnxruntime-gpu importable
# (PYTHONPATH may point at a --target install of the wheel). Writes JSON under $OUT (default
# ./gpu-results): parity.json, prepare.json, ort.json, torch.json, report.json.
#
#   bash benchmarks/gpu.sh                  # every stage, in order
#   bash benchmarks/gpu.sh parity           # one or more stages: parity prepare ort torch report
#
# Rough times on an H100: parity ~2 min; prepare (15 GB random Fin-R1-shaped checkpoint + fp16
# export) ~5 min; ort (session load + 128 decode steps) ~3 min; torch ~2 min. Where one command
# may run at most 10 minutes, run `parity`, then `prepare`, then `ort torch report`.
# Environment: WORK (default /tmp/qd-gpu, reused between calls), ATTENTION (gqa), STEPS (128).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
WORK=${WORK:-/tmp/qd-gpu}
ATTENTION=${ATTENTION:-gqa}
STEPS=${STEPS:-128}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(parity prepare ort torch report)
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
python3 -c 'import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())' \
  > "$OUT/onnxruntime.txt" 2>&1 || true
for stage in "${stages[@]}"; do
  echo "== $stage" >&2
  start=$(date +%s)
  status=0
  python3 benchmarks/gpu_decode.py "$stage" --work "$WORK" --out "$OUT" \
    --attention "$ATTENTION" --steps "$STEPS" 2> "$OUT/$stage.log" || status=$?
  echo "== $stage: exit $status in $(( $(date +%s) - start )) s (log: $OUT/$stage.log)" >&2
  tail -n 40 "$OUT/$stage.log" >&2
done
