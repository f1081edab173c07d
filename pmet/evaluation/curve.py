"""The curve of a sequential edit: the paper's metrics against the number of edits, measured while the edits are
applied (`pmet eval --sequential-batches K --curve-every M`; docs/EVALUATION.md, "Sequential editing").

A point is measured at 0 edits (the unedited model), after every M sequential steps (a step is one batch of K
requests, or one request of ROME/FT-W) and after the last step, on the model as edited so far:

    efficacy, generalization (and their magnitudes, EasyEdit accuracies)
        teacher-forced (evaluate.py), over the records edited so far: does the model still hold earlier edits?
    specificity (and its magnitude, EasyEdit locality)
        over the neighbourhood prompts of a fixed sample of `sample` records spread evenly over the run (the same
        prompts at every point, edited yet or not): what the edits so far cost unrelated facts
    perplexity, perplexity_delta, top1_agreement
        on the drift text (drift.py), against the unedited model; absent when drift is off or has no text

Generation (fluency) and the wild protocol are not measured at curve points; the run's final evaluation
(records.jsonl, summary.json) measures everything on all records. Points are also saved beside the run's
progress file, so that a resumed run keeps the points it measured before it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import atomic_write
from .data import EvalRecord
from .drift import drift_metrics, language_stats
from .evaluate import EvalOptions, evaluate_records
from .metrics import aggregate_records, harmonic_mean

SPECIFICITY = ("specificity", "easyedit_locality")  # metrics read on the neighbourhood sample


@dataclass(frozen=True)
class CurveSpec:
    """When and on what a curve is measured."""

    every: int  # sequential steps between points
    sample: int = 100  # records whose neighbourhood prompts measure specificity at every point


def sample_indices(n: int, size: int) -> list[int]:
    """`size` record indices spread evenly over 0..n-1 (all of them when size ≥ n)."""
    size = min(size, n)
    return sorted({(i * n) // size for i in range(size)})


def _edit_prompts(rec: EvalRecord) -> EvalRecord:
    """The record with only its rewrite and paraphrase prompts (what efficacy and generalization read)."""
    req = dataclasses.replace(rec.request, neighborhood_prompts=(), generation_prompts=())
    return dataclasses.replace(rec, request=req, locality_answers=(), portability=())


def _neighbour_prompts(rec: EvalRecord) -> EvalRecord:
    """The record with its neighbourhood prompts (and the rewrite prompt, which every record is scored on)."""
    req = dataclasses.replace(rec.request, paraphrase_prompts=(), generation_prompts=())
    return dataclasses.replace(rec, request=req, portability=())


def _is_specificity(metric: str) -> bool:
    return metric.startswith(SPECIFICITY)


class Curve:
    """Measures the points of one sequential run; call it with the number of requests edited so far after each
    step (methods/sequential.py's `after_step`)."""

    def __init__(self, lm: Any, records: list[EvalRecord], opts: EvalOptions, spec: CurveSpec, step_size: int,
                 unedited: list[dict[str, Any]], chunks: list[list[int]] | None,
                 unedited_drift: dict[str, list] | None, saved: Path | None = None, resumed: int = 0) -> None:
        self.lm, self.records, self.spec, self.step_size = lm, records, spec, step_size
        self.opts = dataclasses.replace(opts, generation=False, wild=False)
        self.unedited, self.chunks, self.unedited_drift = unedited, chunks, unedited_drift
        self.sample = sample_indices(len(records), spec.sample)
        self.saved, self.seconds = saved, 0.0
        self.key = {"spec": dataclasses.asdict(spec), "step_size": step_size,
                    "case_ids": [str(r.case_id) for r in records]}
        self.points = self._resumed(resumed) or [self._unedited_point()]

    def __call__(self, done: int) -> None:
        steps = math.ceil(done / self.step_size)
        if steps % self.spec.every == 0 or done == len(self.records):
            t = time.perf_counter()
            self.points.append(self._point(done, steps))
            self.seconds += time.perf_counter() - t
            self._save()

    def _unedited_point(self) -> dict[str, Any]:
        metrics = self._specificity([self.unedited[i] for i in self.sample])
        if self.unedited_drift is not None:
            metrics |= drift_metrics(self.unedited_drift, None)
        return {"edits": 0, "steps": 0, "metrics": metrics}

    def _point(self, done: int, steps: int) -> dict[str, Any]:
        """Efficacy/generalization over records[:done], specificity over the sample, drift: module docstring."""
        model, tok = self.lm.model, self.lm.tok
        so_far = [_edit_prompts(r) for r in self.records[:done]]
        sample = [_neighbour_prompts(self.records[i]) for i in self.sample]
        reference = self.unedited[:done] + [self.unedited[i] for i in self.sample]
        res = evaluate_records(model, tok, so_far + sample, self.opts, reference=reference)
        edits = aggregate_records([r["metrics"] for r in res[:done]])
        metrics = {k: v for k, v in edits.items() if not _is_specificity(k) and k != "score"}
        metrics |= self._specificity(res[done:])
        if self.unedited_drift is not None:  # measured only when there are drift chunks
            metrics |= drift_metrics(self.unedited_drift, language_stats(model, self.chunks))
        parts = [metrics.get(k, {}).get("mean") for k in ("efficacy", "generalization", "specificity")]
        if all(p is not None for p in parts):
            metrics["score"] = {"mean": harmonic_mean(parts)}
        return {"edits": done, "steps": steps, "metrics": metrics}

    @staticmethod
    def _specificity(results: list[dict[str, Any]]) -> dict[str, Any]:
        agg = aggregate_records([{k: v for k, v in r["metrics"].items() if _is_specificity(k)} for r in results])
        return {k: v for k, v in agg.items() if _is_specificity(k)}

    def _resumed(self, done: int) -> list[dict[str, Any]]:
        """The points saved by an interrupted run of the same curve, up to the `done` edits it resumes from."""
        if not done or self.saved is None or not self.saved.exists():
            return []
        try:
            saved = json.loads(self.saved.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return []
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            return []
        return [p for p in saved["points"] if p["edits"] <= done]

    def _save(self) -> None:
        if self.saved is not None:
            text = json.dumps({"key": self.key, "points": self.points})
            atomic_write(self.saved, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def to_dict(self, summary: dict[str, Any]) -> dict[str, Any]:
        """curve.json: the run's identity, what was measured when, and the points."""
        return {"method": summary["method"], "model": summary["model"], "dataset": summary["dataset"],
                "n": len(self.records), "step_size": self.step_size, "every_steps": self.spec.every,
                "neighbourhood_sample": [self.records[i].case_id for i in self.sample],
                "seconds": self.seconds, "points": self.points}


__all__ = ["Curve", "CurveSpec", "sample_indices"]
