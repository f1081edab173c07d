"""Tables for docs/RESULTS.md from the run folders written by benchmarks/run_results.sh.

    python benchmarks/make_results.py RUNS_DIR
    python benchmarks/make_results.py --paired RUN_A RUN_B   # B − A on the records both runs edited
    python benchmarks/make_results.py --curves OUT.png RUN...  # sequential runs' curves (curve.json): one figure,
                                                             # and a table of the points; RUN=LABEL names a line
                                                             # (default: the run's method)
    python benchmarks/make_results.py --digest RUN OUT.json  # a run's summary, curve and per-record metrics in one
                                                             # small file, usable as RUN by --paired and --curves
    python benchmarks/make_results.py --by-batch RUN...      # sequential runs: the final metrics of each batch's
                                                             # records (how much of the early batches survives)

A run is a run folder, or the digest of one (docs/results/*.json: the long runs' folders are not kept).

prints, for each (model, dataset, edits) group of runs, the Markdown results table (unedited model first), then
one table of stage timings, one of Δ norms per edited matrix and one of paired differences against PMET (same
records, so the per-record differences give much tighter intervals than the two means' own), then a summary
of each causal trace (trace-*/trace.json from `pmet trace`). Every number comes from a summary.json or a trace.json.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pmet.evaluation.metrics import mean_ci95, record_means  # noqa: E402
from pmet.evaluation.report import cell, markdown_table  # noqa: E402

ORDER = ["ft", "rome", "memit", "pmet", "pmet+no-attn-delta", "pmet+update-attn", "pmet+even-spread"]
STAGES = ["edit_stats", "edit_targets", "edit_update", "eval_unedited", "eval_edited"]


def main(runs: Path) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in sorted(runs.glob("*/summary.json")):
        s = json.loads(path.read_text())
        s["_run"] = path.parent.name
        groups[(s["model"], s["dataset"], s["n"])].append(s)
    for (model, dataset, n), runs_ in groups.items():
        runs_.sort(key=lambda s: ORDER.index(s["method"]) if s["method"] in ORDER else len(ORDER))
        print(f"### {model}, {dataset}, {n} edits\n")
        methods = [r for r in runs_ if "+" not in r["method"]]
        ablations = [r for r in runs_ if r["method"] == "pmet" or "+" in r["method"]]
        print(markdown_table(methods) + "\n")
        if len(ablations) > 1:  # Table-3-like: PMET and its ablations
            print(f"Ablations (Table 3), {model}, {dataset}, {n} edits:\n")
            print(markdown_table(ablations) + "\n")
        print("| method | " + " | ".join(s.removeprefix("edit_") for s in STAGES) + " | target stops |")
        print("| --- |" + " --- |" * (len(STAGES) + 1))
        for s in runs_:
            t = s["timings"]
            stops = ", ".join(f"{k} {v}" for k, v in sorted(s.get("target_stops", {}).items()))
            resumed = f" (resumed after {s['resumed_edits']} edits)" if s.get("resumed_edits") else ""
            print(f"| {s['method']}{resumed} | " + " | ".join(f"{t[k]:.0f} s" if k in t else "–" for k in STAGES)
                  + f" | {stops} |")
        print()
        print("| method | ‖Δ‖_F per edited matrix (layer: norm) |")
        print("| --- | --- |")
        for s in runs_:
            norms = ", ".join(f"{w.split('.')[2]}{'/attn' if 'attn' in w or 'o_proj' in w else ''}: {v:.2f}"
                              for w, v in s["delta_norms"].items())
            print(f"| {s['method']} | {norms} |")
        print()
        checked = [s for s in runs_ if s.get("stream_check")]
        if checked:  # pmet.update.StreamCheck: the layer-L residual stream's realised vs intended move
            print("| method | ‖intended‖ | ‖realised‖ | ratio | median ratio | cosine |")
            print("| --- | --- | --- | --- | --- | --- |")
            for s in checked:
                c = s["stream_check"]
                med = f"{c['median_ratio']:.2f}" if "median_ratio" in c else "–"  # runs before it was recorded
                print(f"| {s['method']} | {c['intended_norm']:.2f} | {c['realised_norm']:.2f} | {c['ratio']:.2f} "
                      f"| {med} | {c['cosine']:.2f} |")
            print()
        paired(runs, runs_)
        if any("wild_efficacy" in r["metrics"] for r in runs_):
            protocols(runs_)
    for path in sorted(runs.glob("trace-*/trace.json")):
        trace(json.loads(path.read_text()), path.parent.name)


PAIRED = ["efficacy", "generalization", "specificity", "efficacy_magnitude"]
BOTH = [("efficacy", "Efficacy"), ("wild_efficacy", "Wild eff."), ("generalization", "Generalization"),
        ("wild_generalization", "Wild gen."), ("specificity", "Specificity"), ("wild_specificity", "Wild spe."),
        ("portability", "Portability"), ("wild_portability", "Wild port."), ("perplexity", "PPL"),
        ("perplexity_delta", "ΔPPL"), ("top1_agreement", "Top-1 agree")]
BY_CONTEXT = ["efficacy", "efficacy_mentions", "generalization", "generalization_mentions", "specificity",
              "specificity_true", "portability", "portability_mentions"]


def protocols(runs_: list[dict]) -> None:
    """Teacher-forced and free-answer (wild) metrics side by side, then the free answers by context."""
    from pmet.evaluation.report import cell

    rows = [("unedited", runs_[0]["unedited"]["metrics"])] + [(s["method"], s["metrics"]) for s in runs_]
    print("Both protocols (bare prompts; wild = the greedy answer states the target):\n")
    print("| method | " + " | ".join(name for _, name in BOTH) + " |")
    print("| --- |" + " --- |" * len(BOTH))
    for label, m in rows:
        print(f"| {label} | " + " | ".join(cell(k, m.get(k)) for k, _ in BOTH) + " |")
    print("\nFree answers by context (states; *_mentions: anywhere in the answer):\n")
    print("| method | context | " + " | ".join(BY_CONTEXT) + " |")
    print("| --- | --- |" + " --- |" * len(BY_CONTEXT))
    for label, m in rows:
        for ctx, values in m.get("wild_by_context", {}).items():
            print(f"| {label} | {ctx} | " + " | ".join(cell(k, values.get(k)) for k in BY_CONTEXT) + " |")
    print()


def _per_record(run_dir: Path) -> dict[int, dict[str, float]]:
    """case id -> the record's mean of each paired metric on the edited model (records.jsonl, or a digest)."""
    if run_dir.is_file():
        try:
            return {int(k): dict(v) for k, v in _part(run_dir, "per_record").items()}
        except (AttributeError, TypeError, ValueError) as e:
            _fail(f"{run_dir}: per_record is not case id -> metrics ({str(e).splitlines()[0]})")
    try:
        lines = (run_dir / "records.jsonl").read_text().splitlines()
    except OSError:
        _fail(f"{run_dir}: no records.jsonl (not a run folder or digest)")
    out = {}
    for n, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
            means = record_means(r["edited"]["metrics"], name=f"case {r['case_id']}")
            out[int(r["case_id"])] = {k: v for k, v in means.items() if k in PAIRED}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            why = f"no field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            _fail(f"{run_dir / 'records.jsonl'} line {n}: {why}")
    return out


def _paired_cells(ref: dict[int, dict[str, float]], other: dict[int, dict[str, float]]) -> list[str]:
    cells = []
    for k in PAIRED:
        d = [other[c][k] - ref[c][k] for c in ref if c in other and k in other[c] and k in ref[c]]
        if not d:
            cells.append("–")
            continue
        m, h = mean_ci95(d)
        cells.append(f"{100 * m:+.1f} ± {100 * h:.1f}")
    return cells


def _name(run: Path) -> str:
    return run.stem if run.is_file() else run.name


def paired_runs(a: Path, b: Path) -> None:
    """B − A per record on the records both runs edited (e.g. the same method at 100 and at 947 edits)."""
    ref, other = _per_record(a), _per_record(b)
    shared = len(set(ref) & set(other))
    print(f"Paired differences {_name(b)} − {_name(a)} on the {shared} records both edited (×100, 95% interval):\n")
    print("| " + " | ".join(PAIRED) + " |")
    print("|" + " --- |" * len(PAIRED))
    print("| " + " | ".join(_paired_cells(ref, other)) + " |\n")


def paired(runs: Path, runs_: list[dict]) -> None:
    """Mean per-record difference (method − PMET) with a 95% interval, for every other run of the group."""
    base = next((s for s in runs_ if s["method"] == "pmet"), None)
    if base is None or len(runs_) < 2:
        return
    ref = _per_record(runs / base["_run"])
    print("Paired differences against PMET on the same records (method − PMET, ×100, 95% interval):\n")
    print("| method | " + " | ".join(PAIRED) + " |")
    print("| --- |" + " --- |" * len(PAIRED))
    for s in runs_:
        if s is base:
            continue
        cells = _paired_cells(ref, _per_record(runs / s["_run"]))
        print(f"| {s['method']} | " + " | ".join(cells) + " |")
    print()


def trace(t: dict, name: str) -> None:
    """Where each kind of restored state has its largest average indirect effect (AIE), per token group."""
    print(f"### Causal trace {name}: {t['model']}, {t['n_facts']} known facts, {t['samples']} noise samples, "
          f"window {t['window']}\n")
    print(f"Suggested critical layers: {t['suggested_layers'][0]}-{t['suggested_layers'][-1]}\n"
          if t.get("suggested_layers") else "")
    print("| restored | token group | peak layer | peak AIE | AIE by layer |")
    print("| --- | --- | --- | --- | --- |")
    for kind, rows in t["average_indirect_effect"].items():
        for group, curve in zip(t["groups"], rows, strict=True):
            if group not in ("last subject token", "last token"):
                continue
            vals = [v if v == v else float("-inf") for v in curve]  # NaN (no such token) sorts last
            peak = max(range(len(vals)), key=vals.__getitem__)
            print(f"| {kind} | {group} | {peak} | {curve[peak]:.3f} | "
                  + " ".join(f"{v:.2f}" for v in curve) + " |")
    print()


CURVE_COLUMNS = [("efficacy", "Eff."), ("generalization", "Gen."), ("specificity", "Spe."), ("score", "Score"),
                 ("perplexity", "PPL"), ("top1_agreement", "Top-1 agree")]


def _labelled(arg: str) -> tuple[Path, str | None]:
    """RUN or RUN=LABEL (a path that exists as given is never split)."""
    if "=" in arg and not Path(arg).exists():
        run, label = arg.split("=", 1)
        return Path(run), label
    return Path(arg), None


def curves(png: Path, runs: list[str]) -> None:
    """One figure of the runs' curves (report.plot_curves; written atomically, never over an existing file) and
    one Markdown table: a row per run and point."""
    from pmet.evaluation.report import plot_curves
    from pmet.fileio import atomic_write

    _new_file(png)
    loaded = []
    for run, label in map(_labelled, runs):
        c = _part(run, "curve")
        loaded.append({**c, "method": label or c["method"]})
    atomic_write(png, lambda tmp: plot_curves(loaded, tmp))
    print("| method | edits | " + " | ".join(name for _, name in CURVE_COLUMNS) + " |")
    print("| --- | --- |" + " --- |" * len(CURVE_COLUMNS))
    for c in loaded:
        for p in c["points"]:
            cells = [cell(k, p["metrics"].get(k)) for k, _ in CURVE_COLUMNS]
            print(f"| {c['method']} | {p['edits']} | " + " | ".join(cells) + " |")


def _fail(why: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2."""
    print(f"error: {why}", file=sys.stderr)
    sys.exit(2)


def _new_file(out: Path) -> None:
    """An output path must not exist yet (this script never replaces a file)."""
    if out.exists():
        _fail(f"{out} exists: give a new file")


def _part(run: Path, name: str) -> dict:
    """A run's summary or curve: `name`.json in a run folder, the `name` entry of a digest (also its
    per_record); one line and exit 2 when the run has none."""
    try:
        return json.loads(run.read_text())[name] if run.is_file() else json.loads((run / f"{name}.json").read_text())
    except (OSError, KeyError, json.JSONDecodeError):
        _fail(f"{run}: no {name} (not a run folder or digest with one)")


def by_batch(runs_: list[Path]) -> None:
    """Per sequential batch (in edit order), the mean ± 95% interval of its records' final metrics."""
    summaries = [_part(run, "summary") for run in runs_]
    for run, s in zip(runs_, summaries, strict=True):
        if not s.get("sequential_batches"):
            _fail(f"{run}: not a run in sequential batches")
    print("| method | batch | records | " + " | ".join(PAIRED[:3]) + " |")
    print("| --- | --- | --- |" + " --- |" * 3)
    for run, s in zip(runs_, summaries, strict=True):
        per, ids, size = _per_record(run), s["case_ids"], s["sequential_batches"]
        for b, start in enumerate(range(0, len(ids), size), 1):
            batch = [per[c] for c in ids[start:start + size] if c in per]
            cells = [cell(k, dict(zip(("mean", "ci95"), mean_ci95([r[k] for r in batch]), strict=True)))
                     for k in PAIRED[:3]]
            print(f"| {s['method']} | {b} | {len(batch)} | " + " | ".join(cells) + " |")


def digest(run_dir: Path, out: Path) -> None:
    """One JSON file with the run's summary.json, curve.json (if any) and per-record paired metrics; written
    atomically, never over an existing file."""
    from pmet.fileio import atomic_write, json_writer

    if not (run_dir / "summary.json").is_file():
        _fail(f"{run_dir}: no summary.json (not a run folder)")
    _new_file(out)
    kept = {"run": run_dir.name, "summary": json.loads((run_dir / "summary.json").read_text()),
            "per_record": {str(c): {k: round(v, 6) for k, v in m.items()} for c, m in _per_record(run_dir).items()}}
    if (run_dir / "curve.json").exists():
        kept["curve"] = json.loads((run_dir / "curve.json").read_text())
    atomic_write(out, json_writer(kept))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--curves"] and len(sys.argv) >= 4:
        curves(Path(sys.argv[2]), sys.argv[3:])
    elif sys.argv[1:2] == ["--digest"] and len(sys.argv) == 4:
        digest(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["--by-batch"] and len(sys.argv) >= 3:
        by_batch([Path(a) for a in sys.argv[2:]])
    elif sys.argv[1:2] == ["--paired"] and len(sys.argv) == 4:
        paired_runs(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main(Path(sys.argv[1]))
