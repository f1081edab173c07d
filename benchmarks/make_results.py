"""Tables for docs/RESULTS.md from the run folders written by benchmarks/run_results.sh.

    python benchmarks/make_results.py RUNS_DIR

prints, for each (model, dataset, edits) group of runs, the Markdown results table (unedited model first), then
one table of stage timings and one of Δ norms per edited matrix. Every number comes from a summary.json.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pmet.evaluation.report import markdown_table  # noqa: E402

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
        print(markdown_table(runs_) + "\n")
        print("| method | " + " | ".join(s.removeprefix("edit_") for s in STAGES) + " | target stops |")
        print("| --- |" + " --- |" * (len(STAGES) + 1))
        for s in runs_:
            t = s["timings"]
            stops = ", ".join(f"{k} {v}" for k, v in sorted(s.get("target_stops", {}).items()))
            print(f"| {s['method']} | " + " | ".join(f"{t[k]:.0f} s" if k in t else "–" for k in STAGES)
                  + f" | {stops} |")
        print()
        print("| method | ‖Δ‖_F per edited matrix (layer: norm) |")
        print("| --- | --- |")
        for s in runs_:
            norms = ", ".join(f"{w.split('.')[2]}{'/attn' if 'attn' in w or 'o_proj' in w else ''}: {v:.2f}"
                              for w, v in s["delta_norms"].items())
            print(f"| {s['method']} | {norms} |")
        print()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
