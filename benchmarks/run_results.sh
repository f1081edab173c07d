#!/usr/bin/env bash
# Regenerates the runs behind docs/RESULTS.md: `bash benchmarks/run_results.sh N OUT [GROUP...]`, then
# `python benchmarks/make_results.py OUT > docs/RESULTS-tables.md`. N = edits per run (100 in RESULTS.md),
# OUT = a folder for the run outputs (records.jsonl, summary.json, ...). Groups: smollm2 shared-ablations
# stream-tuned zsre zsre-preset trace no-attn-delta gemma gemma-preimage (default: these, in that order; the shared
# ablations, and our stream-residual deviation, reuse PMET's cached targets), and wild (the portability file: give
# it its own OUT, its runs have the same model, dataset and size as the smollm2 group's), and sequential (lifelong
# editing curves; its own OUT too, SEQ_BATCH and CURVE_SAMPLE from the environment). Each run evaluates the
# unedited model first, edits, evaluates again.
# Settings shared by every run: the test slice, C0 from WikiText-2 validation text (the preset's token count),
# fluency from 2 generation prompts per record (ROME uses all 10; 2 keeps a 100-edit run within minutes on CPU).
# EVAL_ARGS from the environment is added to every run (e.g. EVAL_ARGS="--set null_space_l2=10"); ONLY=NAME skips
# every `pmet eval` run but the one of that folder name; PMET is the command that runs pmet (default `pmet`).
set -euo pipefail
N=${1:?edits per run}; OUT=${2:?output folder}; shift 2
GROUPS_=${*:-smollm2 shared-ablations zsre zsre-preset trace no-attn-delta gemma gemma-preimage}
DATA=${PMET_DATA_DIR:-../shared/data}
CF=$DATA/counterfact_rome_subsets/counterfact_rome_format_subset.json
PORT=$DATA/counterfact_rome_subsets/counterfact_portability_gpt4.json
ZSRE=$DATA/zsre/zsre_mend_eval_portability_gpt4.json
read -ra EXTRA <<< "${EVAL_ARGS:-}"
COMMON=(--edits "$N" --slice test --corpus "$DATA/wikitext/wikitext-2-raw/wiki.valid.raw" --generation-prompts 2 -q
        "${EXTRA[@]}")
run() {  # name, then pmet eval arguments
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [ "$name" != "$ONLY" ]; then return; fi
  if [ -f "$OUT/$name/summary.json" ]; then echo "skip $name (done)"; return; fi
  echo "=== $name: $(date -u +%H:%M:%S)"
  ${PMET:-pmet} eval "${COMMON[@]}" --out "$OUT/$name" "$@"
}
for g in $GROUPS_; do
  case $g in
    smollm2)
      for m in pmet memit rome ft; do run "smollm2-cf$N-$m" --model smollm2-135m --method $m --data "$CF"; done ;;
    shared-ablations)
      for a in even-spread update-attn stream-residual; do
        run "smollm2-cf$N-pmet+$a" --model smollm2-135m --method pmet --ablation $a --data "$CF"; done ;;
    no-attn-delta)
      run "smollm2-cf$N-pmet+no-attn-delta" --model smollm2-135m --method pmet --ablation no-attn-delta --data "$CF" ;;
    trace)  # 10 known facts, 3 noise samples (ROME: 1000 facts, 10 samples): 11.5 min on a 2-core CPU
      [ -f "$OUT/trace-smollm2/trace.json" ] || ${PMET:-pmet} trace --model smollm2-135m \
        --facts "$DATA/rome/known_1000.json" --n 10 --samples 3 --out "$OUT/trace-smollm2" -q
      # the same on Gemma-3-270M: 21 min (its known facts have longer prompts)
      [ -f "$OUT/trace-gemma3/trace.json" ] || ${PMET:-pmet} trace --model gemma3-270m \
        --facts "$DATA/rome/known_1000.json" --n 10 --samples 3 --out "$OUT/trace-gemma3" -q ;;
    stream-tuned)  # our residual=stream deviation at its own dev-best values (docs/PRESETS.md): clamp 3.0, λ 5000
      run "smollm2-cf$N-pmet+stream-residual-tuned" --model smollm2-135m --method pmet --data "$CF" \
        --set residual=stream --set clamp_norm_factor=3.0 --set mom2_update_weight=5000 \
        --label "pmet+stream-residual(tuned)" ;;
    zsre)
      for m in pmet memit; do run "smollm2-zsre$N-$m" --model smollm2-135m --method $m --dataset zsre --data "$ZSRE"; done ;;
    zsre-preset)  # PMET with SmolLM2's zsRE preset (docs/PRESETS.md; MEMIT's values there are the CounterFact ones)
      run "smollm2-zsre$N-pmet+zsre-preset" --model smollm2-135m --method pmet --dataset zsre --data "$ZSRE" \
        --config smollm2-135m-zsre --label "pmet (zsRE preset)" ;;
    gemma)
      for m in pmet memit ft rome; do run "gemma3-cf$N-$m" --model gemma3-270m --method $m --data "$CF"; done ;;
    gemma-preimage)  # MEMIT with our post-norm deviation (docs/METHOD.md) at its own dev-best values (layers 2-5,
      # λ 500; docs/PRESETS.md), the preset's MEMIT values otherwise
      run "gemma3-cf$N-memit+post-norm-preimage" --model gemma3-270m --method memit --data "$CF" \
        --set post_norm_residual=preimage --set "layers=[2, 3, 4, 5]" --set mom2_update_weight=500 \
        --label "memit+post-norm-preimage" ;;
    wild)  # both protocols, one-hop portability and perplexity drift on the portability file's test slice
      for m in pmet memit rome; do
        run "smollm2-port$N-$m" --model smollm2-135m --method $m --data "$PORT" --protocol wild --no-generation \
          --drift-text "$DATA/wikitext/wikitext-2-raw/wiki.test.raw"; done ;;
    sequential)  # lifelong editing: the N edits in sequential batches of SEQ_BATCH (default 100), a curve point
      # after every batch (specificity on CURVE_SAMPLE records' neighbourhoods, default 100), with and without the
      # null-space projection (MEMIT + null space = AlphaEdit's update)
      for m in pmet memit; do for ns in "" --null-space; do
        run "smollm2-seq$N-$m${ns:++null-space}" --model smollm2-135m --method $m --data "$CF" \
          --sequential-batches "${SEQ_BATCH:-100}" --curve-every 1 --curve-sample "${CURVE_SAMPLE:-100}" $ns \
          --drift-text "$DATA/wikitext/wikitext-2-raw/wiki.test.raw"; done; done ;;
    *) echo "unknown group $g" >&2; exit 2 ;;
  esac
done
echo "=== done: $(date -u +%H:%M:%S)"
