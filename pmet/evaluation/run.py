"""`pmet eval` as a function: evaluate the unedited model, edit with one method, evaluate again, write outputs.

Outputs in `out_dir` (each written atomically, and only after everything succeeded):
    records.jsonl   one line per record: the request, and for "unedited" and "edited" every scored prompt
                    (mean log-probabilities, token hits, argmax ids), the per-record metrics and the generations
    summary.json    {"method", "model", "dataset", "n", "metrics": {name: {"mean", "ci95", "n"}}, "unedited":
                    {...the same for the unedited model}, "timings": {...}, "delta_norms", "config", ...};
                    fractions in 0–1 except fluency (100 × entropy in bits, as ROME reports it)
    summary.md      the Markdown table (unedited model first)
    metrics.png, margins.png   plots (report.py)
    curve.json, curve.png      with a curve (curve.py): metrics measured during a sequential edit vs edits so far
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..cache import cache_root, digest, tensor_sha256
from ..config import PMETConfig
from ..fileio import Outputs, atomic_write
from ..methods import get_method
from ..methods.apply import apply_method
from ..methods.checkpoint import requests_digest, saved_edits
from ..sampling import SCHEME
from .curve import Curve, CurveSpec
from .data import EvalRecord
from .drift import default_text, drift_metrics, language_stats, text_chunks
from .evaluate import DRIFT_OPTIONS, EvalOptions, ReferenceTexts, evaluate_records, summarize
from .report import markdown_table, plot_curves, plot_margins, plot_metrics
from .wild import SCHEME as WILD_SCHEME


def _unedited_results(lm: Any, records: list[EvalRecord], opts: EvalOptions, references: ReferenceTexts | None,
                      cache_dir: str | os.PathLike | None, progress: bool, fp: str) -> list[dict[str, Any]]:
    """The unedited model's results, cached as JSON keyed by the model fingerprint, the records and the options
    (every run of a comparison evaluates the same unedited model on the same records). The drift options are not
    part of the key: drift is measured apart from the per-record results (language_stats)."""
    options = {k: v for k, v in asdict(opts).items() if k not in DRIFT_OPTIONS}
    key = digest({
        "fingerprint": fp,
        "records": [[r.case_id, r.request.to_dict(), r.locality_answers, r.portability] for r in records],
        "options": options, "sampling": SCHEME, "wild": WILD_SCHEME,
        "dtype": str(next(lm.model.parameters()).dtype),
    })
    path = cache_root(cache_dir) / "eval" / f"unedited-{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: recompute
    results = evaluate_records(lm.model, lm.tok, records, opts, references=references, progress=progress,
                               desc="unedited")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(results)))
    return results


def _progress_file(fp: str, method: str, config: PMETConfig, records: list[EvalRecord],
                   sequential_batches: int | None, context_templates: list[list[str]] | None, c0: dict | None,
                   corpus: str | None, cache_dir: str | os.PathLike | None) -> Path:
    """Where a sequential edit (ROME, FT-W, sequential batches) of these records keeps its progress: keyed by
    everything the edits depend on (the unedited model, method and its revision, config, requests, batch size,
    given templates and C0, C0 corpus)."""
    import torch

    def tensor_id(t: Any) -> str:
        t = torch.as_tensor(t)
        return f"{t.dtype}{tuple(t.shape)}{tensor_sha256(t)}"

    key = digest({
        "fingerprint": fp, "method": method, "revision": get_method(method).revision, "config": config.to_dict(),
        "templates": context_templates,
        "sequential_batches": None if get_method(method).sequential else sequential_batches,
        "c0": None if c0 is None else sorted((str(k), tensor_id(v)) for k, v in c0.items()), "corpus": corpus,
        "requests": requests_digest([r.request for r in records]),
    })
    return cache_root(cache_dir) / "sequential" / f"{method}-{key}.safetensors"


def drift_chunks(tok: Any, opts: EvalOptions) -> list[list[int]] | None:
    """The drift text's token chunks (drift.py), or None when drift is off or no text is at hand."""
    if not opts.drift:
        return None
    path = opts.drift_text or default_text()
    return text_chunks(tok, path) if path else None


def _not_measured(before: dict[str, Any], after: dict[str, Any], records: list[EvalRecord], opts: EvalOptions,
                  drift: list[dict[str, list]]) -> None:
    """Add the drift metrics, and say in the summaries what could not be measured, and why."""
    if drift:
        before.update(drift_metrics(drift[0], None))
        after.update(drift_metrics(drift[0], drift[1]))
    elif opts.drift:
        note = ("not available: WikiText-2's test split is not under $PMET_DATA_DIR (default ../shared/data); "
                "pass --drift-text FILE")
        for m in (before, after):
            m["perplexity_delta"] = {"mean": None, "ci95": None, "n": 0, "note": note}
    for m in (before, after):
        if records[0].dataset == "counterfact" and "consistency" not in m:
            m["consistency"] = {"mean": None, "ci95": None, "n": 0,
                                "note": "not available: needs --attribute-snippets and --tfidf-dir"}


def _diagnostics(result: Any) -> dict[str, float]:
    """Means over requests of what the target optimisation reached (empty for FT-W, which has no targets)."""
    diags = result.targets.diagnostics
    if result.targets.ffn is None or not diags:
        return {}
    n = len(diags)
    return {"prob": sum(d.prob for d in diags) / n, "steps": sum(d.steps for d in diags) / n,
            "delta_m_over_init": sum(d.delta_m_norm / d.init_m_norm for d in diags) / n}


def _write_run(folder: Path, summary: dict[str, Any], records: list[EvalRecord], before: list[dict],
               after: list[dict], points: Curve | None) -> None:
    """The files of a run (the module docstring's list) into `folder`."""
    with open(folder / "records.jsonl", "w", encoding="utf-8") as f:
        for rec, b, a in zip(records, before, after, strict=True):
            f.write(json.dumps({"case_id": rec.case_id, "request": rec.request.to_dict(),
                                "unedited": b, "edited": a}) + "\n")
    (folder / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (folder / "summary.md").write_text(markdown_table([summary]) + "\n", encoding="utf-8")
    plot_metrics(summary, str(folder / "metrics.png"))
    plot_margins(records, before, after, summary["method"], str(folder / "margins.png"))
    if points is not None:
        curve_data = points.to_dict(summary)
        (folder / "curve.json").write_text(json.dumps(curve_data, indent=1), encoding="utf-8")
        plot_curves([curve_data], str(folder / "curve.png"))


def run_eval(lm: Any, records: list[EvalRecord], method: str, config: PMETConfig, out_dir: str | Path, *,
             label: str | None = None, opts: EvalOptions | None = None, sequential_batches: int | None = None,
             target_cache: bool = True, cache_dir: str | os.PathLike | None = None, corpus: str | None = None,
             c0: dict | None = None, context_templates: list[list[str]] | None = None,
             progress: bool = True, extra: dict[str, Any] | None = None, checkpoint: bool = True,
             outputs: Outputs | None = None, curve: CurveSpec | None = None) -> dict[str, Any]:
    """Evaluate, edit all `records` with `method`, evaluate again, write the outputs; returns the summary. The
    model is reverted to its original weights (bit-exact) before returning. With `checkpoint`, ROME, FT-W and
    sequential batches save their progress in the cache until the outputs are written, and a rerun of the same
    run resumes from it. `outputs` (the CLI's, with `out_dir` declared) applies the output rules of fileio; by
    default the outputs of an earlier run in `out_dir` are replaced, and other files there are kept. `curve`:
    measure the metrics during the edit too (curve.py)."""
    opts = opts or EvalOptions()
    out = Path(out_dir)
    if outputs is None:
        outputs = Outputs("pmet eval", force=True)
        outputs.folder(out, "out_dir")
    references = ReferenceTexts(opts.attribute_snippets, opts.tfidf_dir) \
        if opts.attribute_snippets and opts.tfidf_dir else None
    timings: dict[str, float] = {}

    from ..models import fingerprint

    t = time.perf_counter()
    fp = fingerprint(lm.model)  # of the unedited model: keys the unedited results and every cache of the edit
    before = _unedited_results(lm, records, opts, references, cache_dir, progress, fp)
    chunks = drift_chunks(lm.tok, opts)
    drift = [language_stats(lm.model, chunks)] if chunks else []
    timings["eval_unedited"] = time.perf_counter() - t

    sequential = get_method(method).sequential or bool(sequential_batches and sequential_batches < len(records))
    progress_file = _progress_file(fp, method, config, records, sequential_batches, context_templates, c0, corpus,
                                   cache_dir) if checkpoint and sequential else None
    resumed = saved_edits(progress_file) if progress_file else 0  # 0 when there is no file
    points = None
    if curve is not None:
        step = 1 if get_method(method).sequential else min(sequential_batches or len(records), len(records))
        points = Curve(lm, records, opts, curve, step, before, chunks, drift[0] if drift else None,
                       progress_file.with_suffix(".curve.json") if progress_file else None, resumed)
    t = time.perf_counter()
    result = apply_method(method, lm.model, lm.tok, [r.request for r in records], config,
                          sequential_batches=sequential_batches, c0=c0, context_templates=context_templates,
                          corpus=corpus, cache_dir=cache_dir, model_name=lm.name, progress=progress,
                          fingerprint=fp, target_cache=target_cache, checkpoint=progress_file, after_step=points)
    timings["edit_total"] = time.perf_counter() - t - (points.seconds if points else 0.0)
    if points is not None:
        timings["curve"] = points.seconds
    timings.update({f"edit_{k}": v for k, v in result.timings.items()})
    try:
        t = time.perf_counter()
        after = evaluate_records(lm.model, lm.tok, records, opts, reference=before, references=references,
                                 progress=progress, desc="edited")
        drift += [language_stats(lm.model, chunks)] if chunks else []
        timings["eval_edited"] = time.perf_counter() - t
    finally:
        result.revert(lm.model)

    metrics_before, metrics_after = summarize(before), summarize(after)
    _not_measured(metrics_before, metrics_after, records, opts, drift)
    summary = {
        "method": label or method, "base_method": method, "model": lm.name, "dataset": records[0].dataset,
        "data_format": records[0].data_format, "n": len(records), "sequential_batches": sequential_batches,
        "metrics": metrics_after, "unedited": {"metrics": metrics_before}, "timings": timings,
        "delta_norms": result.delta_norms(), "target_stops": dict(Counter(d.stop for d in result.targets.diagnostics)),
        "target_diagnostics": _diagnostics(result), "stream_check": result.stream_check,
        "config": config.to_dict(), "eval_options": asdict(opts), "case_ids": [r.case_id for r in records],
        "resumed_edits": resumed, "curve_points": len(points.points) if points else None, **(extra or {}),
    }
    outputs.write({out: lambda folder: _write_run(folder, summary, records, before, after, points)})
    if progress_file is not None:
        progress_file.unlink(missing_ok=True)
        progress_file.with_suffix(".curve.json").unlink(missing_ok=True)
    return summary
