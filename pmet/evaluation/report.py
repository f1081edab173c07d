"""Tables and plots of evaluation summaries: one Markdown table with the unedited model as the first row, a bar
chart of the metrics with their 95% intervals, and the distribution of the rewrite-prompt margin."""

from __future__ import annotations

from typing import Any

# one-hop questions (records with a `portability` field), teacher-forced; then the generation-based protocol
# (wild.py, bare prompts, `--protocol wild`); each shown when a run has it
WILD = [("portability", "Portability"), ("wild_efficacy", "Wild eff."), ("wild_generalization", "Wild gen."),
        ("wild_specificity", "Wild spe."), ("wild_portability", "Wild port.")]
# what the edit costs the model on held-out text (drift.py); perplexities are not fractions
DRIFT = [("perplexity", "PPL"), ("perplexity_delta", "ΔPPL"), ("top1_agreement", "Top-1 agree")]
UNSCALED = ("fluency", "perplexity", "perplexity_delta")
CURVE_PANELS = ("efficacy", "generalization", "specificity", "perplexity")  # plot_curves, one panel each
COLUMNS = {
    "counterfact": [("score", "Score"), ("efficacy", "Efficacy"), ("generalization", "Generalization"),
                    ("specificity", "Specificity"), ("fluency", "Fluency"), ("consistency", "Consistency"),
                    ("efficacy_magnitude", "Eff. mag."), ("generalization_magnitude", "Gen. mag."),
                    ("specificity_magnitude", "Spe. mag."), ("easyedit_rewrite_acc", "EE rewrite acc"),
                    ("easyedit_rephrase_acc", "EE rephrase acc"), ("easyedit_locality", "EE locality"), *WILD, *DRIFT],
    "zsre": [("efficacy", "Efficacy"), ("generalization", "Generalization"), ("specificity", "Specificity"),
             ("specificity_loc_ans", "Specificity (loc_ans)"), *WILD, *DRIFT],
}


def cell(metric: str, value: dict[str, Any] | None) -> str:
    """A metric as the papers print it: ×100 for fractions (fluency is already ×100; perplexities are not
    fractions), ± the 95% CI."""
    if not value or value.get("mean") is None:
        return "n/a"
    scale = 1.0 if metric in UNSCALED else 100.0
    text = f"{value['mean'] * scale:.1f}"
    if value.get("ci95") is not None:
        text += f" ± {value['ci95'] * scale:.1f}"
    return text


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """One row per summary, preceded by the first summary's unedited model. Columns absent everywhere are left out."""
    if not summaries:
        raise ValueError("no summaries")
    dataset = summaries[0]["dataset"]
    rows = [("unedited", summaries[0]["unedited"]["metrics"])] + [(s["method"], s["metrics"]) for s in summaries]
    cols = [(k, name) for k, name in COLUMNS[dataset]
            if any(m.get(k) and m[k].get("mean") is not None for _, m in rows)]
    lines = ["| method | " + " | ".join(name for _, name in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    lines += ["| " + label + " | " + " | ".join(cell(k, m.get(k)) for k, _ in cols) + " |" for label, m in rows]
    return "\n".join(lines)


def plot_metrics(summary: dict[str, Any], path: str) -> None:
    """Grouped bars (unedited vs edited) of the fraction-valued metrics, with 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k, _ in COLUMNS[summary["dataset"]]
            if k not in UNSCALED and "magnitude" not in k and summary["metrics"].get(k, {}).get("mean") is not None]
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 4))
    for off, (label, m) in zip((-0.2, 0.2), (("unedited", summary["unedited"]["metrics"]),
                                             (summary["method"], summary["metrics"])), strict=True):
        means = [100 * (m.get(k, {}).get("mean") or 0) for k in keys]
        cis = [100 * (m.get(k, {}).get("ci95") or 0) for k in keys]
        ax.bar(x + off, means, 0.4, yerr=cis, capsize=3, label=label)
    ax.set_xticks(x, keys, rotation=30, ha="right")
    ax.set_ylabel("% (mean ± 95% CI over records)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{summary['model']} — {summary['dataset']}, {summary['n']} edits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def plot_margins(records: list, before: list[dict], after: list[dict], label: str, path: str) -> None:
    """Histogram of the rewrite prompt's margin, mean log P(new) − mean log P(true) (CounterFact), or of the
    per-record rewrite token accuracy (zsRE), before and after the edit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(results: list[dict]) -> list[float]:
        if records[0].dataset == "counterfact":
            out = []
            for r in results:
                lp = {p["target"]: p["mean_logprob"] for p in r["prompts"] if p["group"] == "rewrite"}
                out.append(lp["new"] - lp["true"])
            return out
        return [sum(r["metrics"]["efficacy"]) / len(r["metrics"]["efficacy"]) for r in results]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([values(before), values(after)], bins=30, label=["unedited", label])
    ax.set_xlabel("rewrite prompt: mean log P(new) − mean log P(true)" if records[0].dataset == "counterfact"
                  else "rewrite question: token accuracy of the new answer")
    ax.set_ylabel("records")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def plot_curves(curves: list[dict[str, Any]], path: str) -> None:
    """Efficacy, generalization, specificity (%, 95% CI bands) and perplexity (log scale) against the number of
    edits, one line per curve (curve.py's curve.json); panels without data in any curve are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in CURVE_PANELS
              if any(k in p["metrics"] for c in curves for p in c["points"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        scale = 1.0 if key in UNSCALED else 100.0
        for c in curves:
            pts = [(p["edits"], p["metrics"][key]) for p in c["points"] if key in p["metrics"]]
            x = [e for e, _ in pts]
            y = [scale * m["mean"] for _, m in pts]
            ax.plot(x, y, marker="o", markersize=3, label=c["method"])
            ci = [scale * (m.get("ci95") or 0.0) for _, m in pts]
            top = float("inf") if key in UNSCALED else 100.0  # a fraction's interval stops at 0 and 100%
            ax.fill_between(x, [max(0.0, a - b) for a, b in zip(y, ci, strict=True)],
                            [min(top, a + b) for a, b in zip(y, ci, strict=True)], alpha=0.15)
        ax.set_title(key)
        ax.set_xlabel("edits")
        ax.set_ylabel("perplexity (log scale)" if key == "perplexity" else "% (mean ± 95% CI)")
        if key == "perplexity":
            ax.set_yscale("log")  # a collapse multiplies it by 10–100
    axes[0][0].legend(fontsize=8)
    first = curves[0]
    fig.suptitle(f"{first['model']} — {first['dataset']}, sequential batches of {first['step_size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
