"""`pmet edit`'s before/after report: for every request prompt, paraphrase and neighbourhood prompt, the top-1
next token and P(target_new) under teacher forcing (probe.py), and the model's own greedy answer with whether it
states target_new (the bare-prompt context of the wild protocol, evaluation/wild.py)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .probe import probe

ANSWER_TOKENS = 20  # new tokens per greedy answer
SHOWN = 28  # characters of an answer shown in the table


def measure(model: Any, tok: Any, requests: list, batch_size: int = 64) -> list[dict]:
    """Per request: its prompt's measurements and one check per paraphrase and neighbourhood prompt."""
    from .evaluation.wild import greedy, states

    prompts, where = [], []
    for i, r in enumerate(requests):
        prompts.append(r.text)
        where.append((i, "request", r.text))
        for kind, ps in (("paraphrase", r.paraphrase_prompts), ("neighborhood", r.neighborhood_prompts)):
            prompts += ps
            where += [(i, kind, p) for p in ps]
    targets = [requests[i].target_new for i, _, _ in where]
    probes = probe(model, tok, prompts, targets)
    answers = greedy(model, tok, [tok(p)["input_ids"] for p in prompts], max_new_tokens=ANSWER_TOKENS,
                     batch_size=batch_size)
    out: list[dict] = [{"request": None, "checks": []} for _ in requests]
    for (i, kind, p), pr, answer, target in zip(where, probes, answers, targets, strict=True):
        values = {**pr.to_dict(), "answer": answer, "states_new": states(answer, target)}
        if kind == "request":
            out[i]["request"] = values
        else:
            out[i]["checks"].append({"prompt": p, "kind": kind, **values})
    return out


def report_rows(reqs: list, before: list[dict], after: list[dict], diagnostics: list[dict]) -> list[dict]:
    """The report's rows: per request its prompt's measurements before and after, its checks, its diagnostics."""
    def kept(m: dict) -> dict:
        return {k: m[k] for k in ("top1", "p_target_new", "answer", "states_new")}

    return [{
        "subject": r.subject, "prompt": r.text, "target_new": r.target_new, "target_true": r.target_true,
        "before": b["request"], "after": a["request"],
        "checks": [{"prompt": cb["prompt"], "kind": cb["kind"], "before": kept(cb), "after": kept(ca)}
                   for cb, ca in zip(b["checks"], a["checks"], strict=True)],
        "diagnostics": d,
    } for r, b, a, d in zip(reqs, before, after, diagnostics, strict=True)]


def _answer(m: dict) -> str:
    text = " ".join(m["answer"].split())
    text = text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"
    return ("[green]" if m["states_new"] else "") + repr(text).replace("[", r"\[")


def table(rows: list[dict]) -> Table:
    """One row per request prompt, then one per paraphrase (↳ para) and neighbourhood prompt (↳ neigh)."""
    t = Table(title="PMET edit: before → after", show_lines=False)
    for col in ("#", "prompt", "target_new", "top-1 before", "P(new) before", "top-1 after", "P(new) after",
                "answer after (greedy)"):
        t.add_column(col, overflow="fold")
    for i, r in enumerate(rows, 1):
        changed = r["after"]["top1"] != r["before"]["top1"]
        t.add_row(str(i), r["prompt"], r["target_new"], repr(r["before"]["top1"]),
                  f"{r['before']['p_target_new']:.3f}", ("[green]" if changed else "") + repr(r["after"]["top1"]),
                  f"{r['after']['p_target_new']:.3f}", _answer(r["after"]))
        for c in r["checks"]:
            kind = "↳ para" if c["kind"] == "paraphrase" else "↳ neigh"
            kept = c["after"]["top1"] == c["before"]["top1"]
            style = "" if c["kind"] == "paraphrase" else ("[dim]" if kept else "[yellow]")
            t.add_row("", f"[dim]{kind}[/] {c['prompt']}", "", repr(c["before"]["top1"]),
                      f"{c['before']['p_target_new']:.3f}", style + repr(c["after"]["top1"]),
                      f"{c['after']['p_target_new']:.3f}", _answer(c["after"]))
        t.add_section()
    return t


def summary_line(rows: list[dict], result: Any) -> str:
    """What changed under both protocols, then where C0 came from and the timings."""
    flipped = sum(r["after"]["top1"] != r["before"]["top1"] for r in rows)
    neigh = [c for r in rows for c in r["checks"] if c["kind"] == "neighborhood"]
    para = [c for r in rows for c in r["checks"] if c["kind"] == "paraphrase"]

    def said(items: list[dict], when: str) -> int:
        return sum(x[when]["states_new"] for x in items)

    return (f"Teacher-forced: {flipped}/{len(rows)} request prompts changed their top-1; P(new) rose on "
            f"{sum(c['after']['p_target_new'] > c['before']['p_target_new'] for c in para)}/{len(para)} paraphrases; "
            f"{sum(c['after']['top1'] == c['before']['top1'] for c in neigh)}/{len(neigh)} neighbourhood prompts "
            f"kept their top-1.\nGreedy answers stating target_new (before → after): request prompts "
            f"{said(rows, 'before')} → {said(rows, 'after')}/{len(rows)}, paraphrases {said(para, 'before')} → "
            f"{said(para, 'after')}/{len(para)}, neighbourhood prompts {said(neigh, 'before')} → "
            f"{said(neigh, 'after')}/{len(neigh)}.\nC0 from {stats_line(result.stats)}. Timings (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))


def stats_line(stats: dict) -> str:
    """Where each component's C0 came from, in words."""
    parts = []
    for comp, info in stats.items():
        if isinstance(info, dict):
            kind = info.get("corpus_kind", "?")
            label = "text sampled from the model itself" if kind == "self" else info.get("corpus", "?")
            parts.append(f"{comp}: {label}, {info.get('n_tokens', '?')} tokens")
    return "; ".join(parts) or "given"
