"""Dev-slice sweep for a model's preset: λ, clamp and critical layers, scored by CounterFact or zsRE Score.

    python benchmarks/tune_preset.py --model smollm2-135m --records 30 --layers 3-7 --layers 2-6 \
        --lambdas 500,2000,6000,15000 --clamps 3.0,0.75 [--set residual=stream] [--dataset zsre]

Records: the first N dev-slice records of EasyEdit's counterfact-train.json, or with `--dataset zsre` of the zsRE
MEND-format file the results use (docs/EVALUATION.md "Slices"; never test-slice records). zsRE's Score is the
harmonic mean of its three token accuracies (docs/EVALUATION.md). All N requests are edited as one batch per
setting, evaluated without generation (efficacy, generalization, specificity, Score), and reverted. "stream
ratio"/"cos" compare the realised move of the layer-L residual stream with the intended one (StreamCheck). Target
vectors are cached, so settings that share L, clamp and the optimisation values (every λ, every layer range with the
same L) optimise once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pmet.config import load_config, parse_overrides  # noqa: E402
from pmet.evaluation.data import load_eval_records  # noqa: E402
from pmet.evaluation.evaluate import EvalOptions, evaluate_records, summarize  # noqa: E402
from pmet.methods.apply import apply_method  # noqa: E402
from pmet.models import load_model  # noqa: E402

DATA = Path(os.environ.get("PMET_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))  # bench_edit's
DEFAULT_DATA = {"counterfact": "counterfact_easyedit/counterfact-train.json",
                "zsre": "zsre/zsre_mend_eval_portability_gpt4.json"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", default=None, help="preset (default: the model's)")
    ap.add_argument("--dataset", default="counterfact", choices=["counterfact", "zsre"])
    ap.add_argument("--data", default=None, help="records file (default: the dataset's file under $PMET_DATA_DIR)")
    ap.add_argument("--corpus", default=str(DATA / "wikitext/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--records", type=int, default=30)
    ap.add_argument("--layers", action="append", default=None, help="a range like 3-7 (repeatable)")
    ap.add_argument("--lambdas", default="500,2000,6000,15000")
    ap.add_argument("--clamps", default=None, help="comma-separated clamp_norm_factor values (default: preset's)")
    ap.add_argument("--method", default="pmet")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="config override for every setting, e.g. residual=stream (repeatable)")
    args = ap.parse_args()

    lm = load_model(args.model)
    preset = args.config or lm.preset
    base = load_config(preset, method=args.method, settings=parse_overrides(args.set))
    data = args.data or DATA / DEFAULT_DATA[args.dataset]
    recs = load_eval_records(data, args.dataset, n=args.records, slice_="dev")
    opts = EvalOptions(generation=False)
    before = evaluate_records(lm.model, lm.tok, recs, opts)
    s0 = summarize(before)
    print(f"{len(recs)} {args.dataset} dev records (ids {recs[0].case_id}..{recs[-1].case_id}); unedited: "
          f"Score {100 * s0['score']['mean']:.1f}, efficacy {100 * s0['efficacy']['mean']:.1f}")
    ranges = [list(range(int(a), int(b) + 1)) for a, b in (r.split("-") for r in (args.layers or []))] \
        or [base.layers]
    clamps = [float(c) for c in args.clamps.split(",")] if args.clamps else [base.clamp_norm_factor]
    print("| layers | clamp | λ | Score | efficacy | generalization | specificity | stream ratio | cos | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for layers in ranges:
        for clamp in clamps:
            for lam in (float(x) for x in args.lambdas.split(",")):
                cfg = base.replace(layers=layers, clamp_norm_factor=clamp, mom2_update_weight=lam)
                t = time.perf_counter()
                res = apply_method(args.method, lm.model, lm.tok, [r.request for r in recs], cfg,
                                   corpus=args.corpus, progress=False, target_cache=True)
                try:
                    s = summarize(evaluate_records(lm.model, lm.tok, recs, opts, reference=before))
                finally:
                    res.revert(lm.model)
                sc = res.stream_check  # ‖realised‖/‖intended‖ move of the layer-L stream (pmet.update.StreamCheck)
                print(f"| {layers[0]}-{layers[-1]} | {clamp} | {lam:g} | {100 * s['score']['mean']:.1f} | "
                      f"{100 * s['efficacy']['mean']:.1f} | {100 * s['generalization']['mean']:.1f} | "
                      f"{100 * s['specificity']['mean']:.1f} | {sc.get('ratio', float('nan')):.2f} | "
                      f"{sc.get('cosine', float('nan')):.2f} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
