"""What the target stage (Eq. 10) replays per rewriting row, by dataset: the shapes that set its cost.

For the first N test-slice records of CounterFact and zsRE, tokenized as the target stage tokenizes them (the
prompt with its subject filled, the new target's tokens), prints the mean prompt length, tokens after the
subject's last token, target tokens, and the positions the suffix replay recomputes at every Adam step for a
row cut at its own subject (subject's last token to the last input position; a context prefix adds none).
It also prints the positions actually replayed per request and Adam step, padding included, from the engine's own
row plan and pass split (pmet.targets) under the model's preset, batches of `v_batch_size` requests; the context
templates only shift a row, so N copies of the bare prompt stand in for them.
From those it estimates the forward GFLOP per request and Adam step: 2 × the weights of layers L..N-1 per replayed
position, plus 2 × d × vocabulary per position scored through the vocabulary projection (each target token of
each rewriting row, and the KL row); attention scores over these short rows and the norms are left out. The
weights are frozen, so the backward (input gradients only) costs about one forward more, for both parts alike.
With `--runs DIR...` it also prints, from each run's summary.json, the mean Adam steps per target and the target
stage's seconds per request, so a rate difference between datasets can be split into steps and positions.

    python benchmarks/row_shapes.py [--model smollm2-135m] [--n 1000] [--preset DATASET=PRESET] [--runs RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from pmet.arch import layout_of
from pmet.config import load_config
from pmet.context import flat
from pmet.errors import PmetError
from pmet.evaluation.data import load_eval_records
from pmet.models import load_model
from pmet.prompts import encode, target_ids
from pmet.targets import replayed_positions

DATA = Path(os.environ.get("PMET_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
SETS = {
    "counterfact": "counterfact_rome_subsets/counterfact_rome_format_subset.json",
    "zsre": "zsre/zsre_mend_eval_portability_gpt4.json",
}


def stand_in_templates(cfg) -> list[list[str]]:
    """As many bare-prompt templates as the preset's context templates (the bare prompt and one per start word):
    a context prefix only shifts a row, so it leaves the replayed and scored positions unchanged."""
    return [["{}"] * (1 + len(cfg.context_template_starts))]


def replayed(tok, requests: list, cfg) -> float:
    """Positions the suffix replay recomputes per request and Adam step (passes' rows × widest row, summed)."""
    templates = stand_in_templates(cfg)
    batches = range(0, len(requests), cfg.v_batch_size)
    return sum(replayed_positions(tok, requests[s : s + cfg.v_batch_size], templates, cfg, torch.device("cpu"))
               for s in batches) / len(requests)


def flop_weights(model, cfg) -> tuple[int, int]:
    """(weights of the matrices of layers L..N-1, d × vocabulary): the multiply-adds per replayed position and per
    position scored through the vocabulary projection."""
    layers = model.get_submodule(layout_of(model).spec.layers)
    replay = sum(p.numel() for layer in layers[cfg.L :] for p in layer.parameters() if p.dim() == 2)
    return replay, model.config.hidden_size * model.config.vocab_size


def shapes(model, tok, dataset: str, n: int, cfg) -> dict[str, float]:
    """Mean token counts of the rewriting rows of the first `n` test records of `dataset`, and the estimated
    forward GFLOP per request and Adam step."""
    recs = load_eval_records(DATA / SETS[dataset], dataset, n=n)
    prompt, after, target, suffix = [], [], [], []
    for rec in recs:
        r = rec.request
        e = encode(tok, r.prompt, r.subject)
        t = len(target_ids(tok, r.target_new))
        prompt.append(len(e.ids))
        after.append(len(e.ids) - 1 - e.subject_last)
        target.append(t)
        suffix.append(len(e.ids) - e.subject_last + t - 1)  # input positions s .. end (last target token not fed)
    mean = statistics.mean
    rows = len(flat(stand_in_templates(cfg)))  # rewriting rows per request
    scored = rows * mean(target) + 1  # positions through the vocabulary projection per request, the KL row included
    positions = replayed(tok, [r.request for r in recs], cfg)
    w_replay, w_vocab = flop_weights(model, cfg)
    return {"records": len(recs), "prompt": mean(prompt), "after_subject": mean(after), "target": mean(target),
            "suffix_positions": mean(suffix), "replayed": positions, "scored": scored,
            "gflop": 2 * (positions * w_replay + scored * w_vocab) / 1e9}


def run_rate(folder: Path) -> str:
    """Mean Adam steps per target and target-stage seconds per request of one evaluation run."""
    path = folder / "summary.json"
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
        steps = s["target_diagnostics"].get("steps")
        if steps is None:
            return f"{folder.name}: no target stage"
        rate = s["timings"]["edit_targets"] / s["n"]
    except (OSError, ValueError) as e:
        raise PmetError(f"{path}: cannot read: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise PmetError(f"{path}: not a pmet eval summary (field {e})") from None
    return f"{folder.name}: n={s['n']}, mean steps {steps:.1f}, targets {rate:.2f} s/request"


def _preset_arg(text: str) -> tuple[str, str]:
    dataset, sep, preset = text.partition("=")
    if not sep or dataset not in SETS or not preset:
        raise argparse.ArgumentTypeError(f"expected DATASET=PRESET with DATASET one of {', '.join(SETS)}")
    return dataset, preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--preset", action="append", default=[], metavar="DATASET=PRESET", type=_preset_arg,
                    help="preset whose batch and pass sizes to use (default: the model's preset for both)")
    ap.add_argument("--runs", nargs="*", type=Path, default=[])
    a = ap.parse_args()
    try:
        report(a)
    except PmetError as e:
        print(f"row_shapes.py: {e}", file=sys.stderr)
        sys.exit(2)


def report(a: argparse.Namespace) -> None:
    lm = load_model(a.model, device="cpu")
    presets = {ds: lm.preset or a.model for ds in SETS} | dict(a.preset)
    configs = {ds: load_config(presets[ds]) for ds in SETS}  # bad input fails before any line is printed
    rates = [run_rate(folder) for folder in a.runs]
    print("dataset      records  prompt  after-subject  target  suffix/row  replayed/request/step  "
          "scored/request/step  GFLOP/request/step  preset")
    for ds in SETS:
        r = shapes(lm.model, lm.tok, ds, a.n, configs[ds])
        print(f"{ds:<12} {r['records']:>7}  {r['prompt']:6.2f}  {r['after_subject']:13.2f}  {r['target']:6.2f}  "
              f"{r['suffix_positions']:10.2f}  {r['replayed']:21.1f}  {r['scored']:19.1f}  {r['gflop']:18.2f}  "
              f"{presets[ds]}")
    print("\n".join(rates))


if __name__ == "__main__":
    main()
