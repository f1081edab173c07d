#!/usr/bin/env bash
# The GPU measurements of docs/PERFORMANCE.md, in one script sized for a short lease of one GPU:
#   bash benchmarks/gpu_run.sh OUT        (EDITS, SIZING_REQUESTS, REPLAY_REQUESTS shrink it for a dry run)
# 1. suffix vs full replay, 32 requests (bench_edit.py --only-replay);
# 2. batches sized from free memory (batch_sizing: auto) vs the preset's fixed ones, and the bfloat16 replay,
#    on 256 requests (bench_edit.py --only-variants);
# 3. PMET on all 947 CounterFact test records end to end (pmet eval), with `nvidia-smi dmon` sampling the
#    GPU's utilisation every second into OUT/dmon.txt (both runs);
# 4. the same with the target optimisation's replay in bfloat16 (the unedited evaluation comes from the cache),
#    for the paired metric cost (make_results.py --paired).
# OUT gets the benchmark logs, each run's summary.json and its records.jsonl.gz.
set -uo pipefail
OUT=${1:?output folder}; mkdir -p "$OUT"
RUNS=$(mktemp -d)
DATA=${PMET_DATA_DIR:-../shared/data}
CF=$DATA/counterfact_rome_subsets/counterfact_rome_format_subset.json
WIKI=$DATA/wikitext/wikitext-2-raw/wiki.valid.raw
export PYTHONUNBUFFERED=1
stamp() { echo "=== $1: $(date -u +%H:%M:%S)"; }
has_gpu() { command -v nvidia-smi >/dev/null; }
has_gpu && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
stamp replay
python3 benchmarks/bench_edit.py --requests "${REPLAY_REQUESTS:-32}" --only-replay 2>&1 | grep -v -i warn \
  | tee "$OUT/bench_replay.txt"
stamp sizing
python3 benchmarks/bench_edit.py --requests "${SIZING_REQUESTS:-256}" --only-variants --variant "batch_sizing=fixed" \
  --variant "v_compute_dtype=bfloat16" 2>&1 | grep -v -i warn | tee "$OUT/bench_sizing.txt"
EVAL=(--model smollm2-135m --method pmet --data "$CF" --edits "${EDITS:-1000}" --slice test --corpus "$WIKI"
      --generation-prompts 2 -q)
for run in pmet pmet-bf16; do
  stamp "$run"
  extra=(); [ "$run" = pmet-bf16 ] && extra=(--v-dtype bfloat16 --label pmet-bf16)
  has_gpu && { echo "# $run" >> "$OUT/dmon.txt"; nvidia-smi dmon -s um -d 1 >> "$OUT/dmon.txt" 2>&1 & }
  python3 -m pmet.cli eval "${EVAL[@]}" "${extra[@]}" --out "$RUNS/$run" 2>&1 | grep -v -i warn | tail -8
  has_gpu && kill %1
  cp "$RUNS/$run/summary.json" "$OUT/$run.summary.json" && gzip -c "$RUNS/$run/records.jsonl" > "$OUT/$run.records.jsonl.gz"
done
stamp done
