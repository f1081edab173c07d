"""Dev-slice sweep for a model's preset: λ, clamp and critical layers, scored by CounterFact or zsRE Score.

    python benchmarks/tune_preset.py --model smollm2-135m --records 30 --layers 3-7 --layers 2-6 \
        --lambdas 500,2000,6000,15000 --clamps 3.0,0.75 [--set residual=stream] [--dataset zsre]

The null-space option (AlphaEdit's update, pmet/null_space.py) has its own grid, threshold × α, usually with the
records edited in sequential batches, the setting it is for (λ is not used by its solve):

    python benchmarks/tune_preset.py --records 100 --sequential-batches 20 \
        --null-space-thresholds 5e-3,2e-2,5e-2 --null-space-l2s 1,10,100 [--method memit]

Records: the first N dev-slice records of EasyEdit's counterfact-train.json, or with `--dataset zsre` of the zsRE
MEND-format file the results use (docs/EVALUATION.md "Slices"; never test-slice records). zsRE's Score is the
harmonic mean of its three token accuracies (docs/EVALUATION.md). All N requests are edited as one batch per
setting (or in consecutive batches of `--sequential-batches`, each on the model as the earlier ones left it),
evaluated without generation (efficacy, generalization, specificity, Score; ΔPPL: the mean perplexity change on the
drift text, docs/EVALUATION.md), and reverted. "stream
ratio"/"cos" compare the realised move of the layer-L residual stream with the intended one (StreamCheck). Target
vectors are cached, so settings that share L, clamp and the optimisation values (every λ, every layer range with the
same L; the first sequential batch of every null-space setting) optimise once.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pmet.config import PMETConfig, load_config, parse_overrides  # noqa: E402
from pmet.evaluation.data import load_eval_records  # noqa: E402
from pmet.evaluation.drift import drift_metrics, language_stats, text_chunks  # noqa: E402
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
    ap.add_argument("--sequential-batches", type=int, default=None, help="edit in consecutive batches of this size")
    ap.add_argument("--null-space-thresholds", default=None,
                    help="comma-separated null_space_threshold values: sweep the null-space option instead of λ")
    ap.add_argument("--null-space-l2s", default=None, help="comma-separated null_space_l2 (α) values (default: preset)")
    ap.add_argument("--drift-text", default=str(DATA / "wikitext/wikitext-2-raw/wiki.test.raw"), help="text for ΔPPL")
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
    drift = text_chunks(lm.tok, args.drift_text)
    drift0 = language_stats(lm.model, drift)
    print("| layers | clamp | λ | threshold | α | Score | efficacy | generalization | specificity | ΔPPL "
          "| stream ratio | cos | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cfg in settings(base, args):
        t = time.perf_counter()
        res = apply_method(args.method, lm.model, lm.tok, [r.request for r in recs], cfg, corpus=args.corpus,
                           progress=False, target_cache=True, sequential_batches=args.sequential_batches)
        try:
            s = summarize(evaluate_records(lm.model, lm.tok, recs, opts, reference=before))
            ppl = drift_metrics(drift0, language_stats(lm.model, drift))["perplexity_delta"]["mean"]
        finally:
            res.revert(lm.model)
        sc = res.stream_check  # ‖realised‖/‖intended‖ move of the layer-L stream (pmet.update.StreamCheck)
        ns = (f"{cfg.null_space_threshold:g} | {cfg.null_space_l2:g}" if cfg.null_space else "– | –")
        print(f"| {cfg.layers[0]}-{cfg.layers[-1]} | {cfg.clamp_norm_factor} | {cfg.mom2_update_weight:g} | {ns} | "
              f"{100 * s['score']['mean']:.1f} | {100 * s['efficacy']['mean']:.1f} | "
              f"{100 * s['generalization']['mean']:.1f} | {100 * s['specificity']['mean']:.1f} | {ppl:+.2f} | "
              f"{sc.get('ratio', float('nan')):.2f} | {sc.get('cosine', float('nan')):.2f} | "
              f"{time.perf_counter() - t:.0f} |", flush=True)


def settings(base: PMETConfig, args: argparse.Namespace) -> list[PMETConfig]:
    """The swept configs: layer ranges × clamps × λ, or × threshold × α with the null-space option."""
    ranges = [list(range(int(a), int(b) + 1)) for a, b in (r.split("-") for r in (args.layers or []))] \
        or [base.layers]
    clamps = [float(c) for c in args.clamps.split(",")] if args.clamps else [base.clamp_norm_factor]
    if args.null_space_thresholds is None:
        lams = [float(x) for x in args.lambdas.split(",")]
        return [base.replace(layers=lay, clamp_norm_factor=c, mom2_update_weight=lam)
                for lay, c, lam in itertools.product(ranges, clamps, lams)]
    thresholds = [float(x) for x in args.null_space_thresholds.split(",")]
    l2s = [float(x) for x in args.null_space_l2s.split(",")] if args.null_space_l2s else [base.null_space_l2]
    return [base.replace(layers=lay, clamp_norm_factor=c, null_space=True, null_space_threshold=th, null_space_l2=a)
            for lay, c, th, a in itertools.product(ranges, clamps, thresholds, l2s)]


if __name__ == "__main__":
    main()
