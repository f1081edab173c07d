"""Evaluate a model (unedited or edited) on benchmark records: every prompt of every record scored in one set of
batched teacher-forced passes (scoring.py), generations sampled in batches with a KV cache (generation.py).

CounterFact (docs/REFERENCE.md, "Evaluation conventions"), per record:
    efficacy        P(new) > P(true) on the rewrite prompt        (P: mean per-token log-probability)
    generalization  the same on each paraphrase prompt
    specificity     P(true) > P(new) on each neighbourhood prompt
    *_magnitude     exp P(new) − exp P(true) (specificity: reversed), ROME's magnitude variants
    fluency         100 × weighted 2-/3-gram entropy of the generations (full-format records only)
    consistency     TF-IDF cosine of the generations to the reference texts (only with --tfidf-dir and
                    --attribute-snippets; otherwise not available)
    easyedit_*      EasyEdit's token-level accuracies: rewrite_acc / rephrase_acc = fraction of target_new tokens
                    that are the teacher-forced argmax on the rewrite / paraphrase prompts; locality = fraction of
                    neighbourhood-answer tokens whose argmax is the same as the unedited model's.
zsRE, per record (token-level accuracy under teacher forcing):
    efficacy, generalization   new-answer tokens that are the argmax on the question / its rephrasing
    specificity                unrelated-question answer tokens whose argmax equals the unedited model's own
                               argmax (REFERENCE.md: the model's own answer tokens are kept); 1 for the unedited model
    specificity_loc_ans        the argmax equals the dataset's answer tokens (loc_ans): MEMIT's code, and the
                               number the paper's zsRE table reports
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import EvalRecord
from .generation import generate
from .metrics import (
    efficacy_magnitude,
    efficacy_success,
    load_tfidf_stats,
    ngram_entropy,
    specificity_magnitude,
    specificity_success,
    tfidf_consistency,
)
from .scoring import encode_pair, score_rows

CORE = ("efficacy", "generalization", "specificity")
CPU_BATCH_SIZES = (64, 256)  # prompts per scoring pass, prompts per generation batch (measured: PERFORMANCE.md)


@dataclass
class EvalOptions:
    batch_size: int | None = None  # prompts per teacher-forced pass (None: CPU_BATCH_SIZES, or from a GPU's memory)
    generation: bool = True  # sample generations for fluency/consistency (full-format CounterFact only)
    generation_prompts: int | None = None  # generation prompts per record (None: all, ROME uses all 10)
    generation_length: int = 100  # tokens per generated text, prompt included (ROME max_out_len)
    generation_batch_size: int | None = None  # prompts sampled together (None: likewise)
    top_k: int = 5
    seed: int = 0
    tfidf_dir: str | None = None  # folder with ROME's idf.npy and tfidf_vocab.json
    attribute_snippets: str | None = None  # ROME's attribute_snippets.json
    wild: bool = False  # also the generation-based protocol (wild.py): greedy answers judged against the targets
    wild_tokens: int = 20  # new tokens per greedy answer
    drift: bool = True  # perplexity drift and top-1 agreement on held-out text (drift.py)
    drift_text: str | None = None  # its text file (None: WikiText-2's test split under $PMET_DATA_DIR)


DRIFT_OPTIONS = ("drift", "drift_text")  # measured apart from the per-record results (drift.py): not in their keys


class ReferenceTexts:
    """ROME's consistency references: attribute snippets per (relation, target id) and the TF-IDF statistics."""

    def __init__(self, snippets_path: str | Path, tfidf_dir: str | Path) -> None:
        import json

        self.idf, self.vocab = load_tfidf_stats(tfidf_dir)
        self.snips: dict[tuple[str, str], list[str]] = {}
        for el in json.loads(Path(snippets_path).read_text(encoding="utf-8")):
            key = (str(el["relation_id"]), str(el["target_id"]))
            self.snips.setdefault(key, []).extend(s["text"] for s in el["samples"])

    def consistency(self, record: EvalRecord, generations: Sequence[str]) -> float | None:
        texts = self.snips.get((str(record.relation_id), str(record.target_new_id)))
        if not texts or not generations:
            return None
        value = tfidf_consistency(generations, texts, self.idf, self.vocab)
        return None if np.isnan(value) else value


def _cf_rows(tok: PreTrainedTokenizerBase, rec: EvalRecord) -> list[tuple[str, int, str, tuple, tuple]]:
    """(group, prompt index, which target, prompt ids, target ids) for every scored row of a CounterFact record."""
    r = rec.request
    out = []
    groups = (("rewrite", (r.text,)), ("paraphrase", r.paraphrase_prompts), ("neighborhood", r.neighborhood_prompts))
    for group, prompts in groups:
        for i, p in enumerate(prompts):
            for which, target in (("new", r.target_new), ("true", r.target_true)):
                out.append((group, i, which, *encode_pair(tok, p, target)))
    return out + _portability_rows(tok, rec)


def _portability_rows(tok: PreTrainedTokenizerBase, rec: EvalRecord) -> list[tuple[str, int, str, tuple, tuple]]:
    """The record's one-hop questions, each with the answer that follows from the new fact."""
    return [("portability", i, "port", *encode_pair(tok, q, a)) for i, (q, a) in enumerate(rec.portability)]


def _zsre_rows(tok: PreTrainedTokenizerBase, rec: EvalRecord) -> list[tuple[str, int, str, tuple, tuple]]:
    r = rec.request
    out = [("rewrite", 0, "new", *encode_pair(tok, r.text, r.target_new))]
    out += [("paraphrase", i, "new", *encode_pair(tok, p, r.target_new)) for i, p in enumerate(r.paraphrase_prompts)]
    out += [("neighborhood", i, "loc", *encode_pair(tok, p, a))
            for i, (p, a) in enumerate(zip(r.neighborhood_prompts, rec.locality_answers, strict=True))]
    return out + _portability_rows(tok, rec)


def evaluate_records(model: PreTrainedModel, tok: PreTrainedTokenizerBase, records: list[EvalRecord],
                     opts: EvalOptions, *, reference: list[dict[str, Any]] | None = None,
                     references: ReferenceTexts | None = None, progress: bool = False, desc: str = "eval"
                     ) -> list[dict[str, Any]]:
    """Per-record results of the model as it is now. `reference`: the unedited model's results on the same
    records (for EasyEdit locality and zsRE specificity, which compare argmax tokens with the unedited model's);
    None means this IS the unedited model."""
    opts = _sized(model, opts)
    make = _cf_rows if records[0].dataset == "counterfact" else _zsre_rows
    per_rec = [make(tok, rec) for rec in records]
    flat = [(k, row) for k, rows in enumerate(per_rec) for row in rows]
    scored = score_rows(model, tok, [(row[3], row[4]) for _, row in flat], batch_size=opts.batch_size,
                        progress=progress, desc=f"{desc}: scoring")
    results: list[dict[str, Any]] = [{"prompts": []} for _ in records]
    for n, (k, (group, i, which, _, _)) in enumerate(flat):
        results[k]["prompts"].append({
            "group": group, "index": i, "target": which, "mean_logprob": scored.mean_logprob[n],
            "hits": scored.hits[n], "argmax": scored.argmax[n],
        })
    for k, rec in enumerate(records):
        ref = reference[k] if reference is not None else None
        results[k]["metrics"] = (_cf_metrics if rec.dataset == "counterfact" else _zsre_metrics)(results[k], ref)
    if opts.generation and records[0].dataset == "counterfact":
        _add_generations(model, tok, records, results, opts, references, progress, desc)
    if opts.wild:
        _add_wild(model, tok, records, results, opts, progress, desc)
    return results


def _sized(model: PreTrainedModel, opts: EvalOptions) -> EvalOptions:
    """`opts` with batch sizes left at None filled in: CPU_BATCH_SIZES (fewer texts per sampling batch where their
    KV caches would exceed pmet.sizing.CPU_SAMPLING_BYTES), or on a GPU what its memory allows."""
    if opts.batch_size is not None and opts.generation_batch_size is not None:
        return opts
    from ..sizing import MAX_EVAL_ROWS, sampling_rows, scoring_prompts

    device = next(model.parameters()).device
    gpu = device.type == "cuda"
    score = scoring_prompts(model, device, max(opts.generation_length, 64)) if gpu else CPU_BATCH_SIZES[0]
    texts = sampling_rows(model, device, opts.generation_length, MAX_EVAL_ROWS if gpu else CPU_BATCH_SIZES[1])
    return dataclasses.replace(opts, batch_size=opts.batch_size or score,
                               generation_batch_size=opts.generation_batch_size or texts)


def _by(result: Mapping[str, Any], group: str, target: str) -> list[dict[str, Any]]:
    return [p for p in result["prompts"] if p["group"] == group and p["target"] == target]


def _same_argmax(result: Mapping[str, Any], ref: Mapping[str, Any] | None, group: str, target: str) -> list[bool]:
    """Per token: does the argmax equal the unedited model's (all True for the unedited model itself)."""
    now = _by(result, group, target)
    before = _by(ref, group, target) if ref is not None else now
    return [a == b for p, q in zip(now, before, strict=True) for a, b in zip(p["argmax"], q["argmax"], strict=True)]


def _cf_metrics(result: Mapping[str, Any], ref: Mapping[str, Any] | None) -> dict[str, list[float]]:
    import torch

    out: dict[str, list[float]] = {}
    for group, metric in (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("neighborhood", "specificity")):
        new = torch.tensor([p["mean_logprob"] for p in _by(result, group, "new")], dtype=torch.float64)
        true = torch.tensor([p["mean_logprob"] for p in _by(result, group, "true")], dtype=torch.float64)
        if not len(new):
            continue
        if group == "neighborhood":
            out[metric] = specificity_success(new, true).double().tolist()
            out[f"{metric}_magnitude"] = specificity_magnitude(new, true).tolist()
        else:
            out[metric] = efficacy_success(new, true).double().tolist()
            out[f"{metric}_magnitude"] = efficacy_magnitude(new, true).tolist()
    out["easyedit_rewrite_acc"] = [float(h) for p in _by(result, "rewrite", "new") for h in p["hits"]]
    if _by(result, "paraphrase", "new"):
        out["easyedit_rephrase_acc"] = [float(h) for p in _by(result, "paraphrase", "new") for h in p["hits"]]
    if _by(result, "neighborhood", "true"):
        out["easyedit_locality"] = [float(x) for x in _same_argmax(result, ref, "neighborhood", "true")]
    return out | _portability(result)


def _portability(result: Mapping[str, Any]) -> dict[str, list[float]]:
    """EasyEdit's portability: the fraction of the one-hop answers' tokens that are the teacher-forced argmax."""
    hits = [float(h) for p in _by(result, "portability", "port") for h in p["hits"]]
    return {"portability": hits} if hits else {}


def _zsre_metrics(result: Mapping[str, Any], ref: Mapping[str, Any] | None) -> dict[str, list[float]]:
    out = {"efficacy": [float(h) for p in _by(result, "rewrite", "new") for h in p["hits"]]}
    if _by(result, "paraphrase", "new"):
        out["generalization"] = [float(h) for p in _by(result, "paraphrase", "new") for h in p["hits"]]
    if _by(result, "neighborhood", "loc"):
        out["specificity"] = [float(x) for x in _same_argmax(result, ref, "neighborhood", "loc")]
        out["specificity_loc_ans"] = [float(h) for p in _by(result, "neighborhood", "loc") for h in p["hits"]]
    return out | _portability(result)


def _add_generations(model, tok, records, results, opts, references, progress, desc) -> None:
    prompts, owner = [], []
    for k, rec in enumerate(records):
        gp = list(rec.request.generation_prompts)[: opts.generation_prompts]
        prompts += gp
        owner += [k] * len(gp)
    if not prompts:
        return
    texts = generate(model, tok, prompts, max_length=opts.generation_length, top_k=opts.top_k,
                     batch_size=opts.generation_batch_size, seed=opts.seed, progress=progress)
    per: dict[int, list[str]] = {}
    for k, t in zip(owner, texts, strict=True):
        per.setdefault(k, []).append(t)
    for k, gens in per.items():
        results[k]["generations"] = gens
        results[k]["metrics"]["fluency"] = [100.0 * ngram_entropy(gens)]
        if references is not None:
            c = references.consistency(records[k], gens)
            if c is not None:
                results[k]["metrics"]["consistency"] = [c]


def _wild_prompts(rec: EvalRecord) -> list[tuple[str, int, str, str]]:
    """(group, index, prompt, the answer that counts as correct there) for every prompt the wild protocol asks:
    target_new on the rewrite and paraphrase prompts, the neighbour's own answer on neighbourhood prompts, the
    one-hop answer on portability questions."""
    r = rec.request
    own = rec.locality_answers if rec.dataset == "zsre" else (r.target_true,) * len(r.neighborhood_prompts)
    return ([("rewrite", 0, r.text, r.target_new)]
            + [("paraphrase", i, p, r.target_new) for i, p in enumerate(r.paraphrase_prompts)]
            + [("neighborhood", i, p, a) for i, (p, a) in enumerate(zip(r.neighborhood_prompts, own, strict=True))]
            + [("portability", i, q, a) for i, (q, a) in enumerate(rec.portability)])


def _add_wild(model, tok, records, results, opts, progress, desc) -> None:
    """Greedy answers to every prompt in every context (wild.py), stored per record with their per-record
    metrics `wild@<context>:<metric>` (and the bare context's as wild_efficacy, ...)."""
    from .wild import CONTEXTS, context_ids, greedy

    rows = [(k, ctx, q) for k, rec in enumerate(records) for ctx in CONTEXTS for q in _wild_prompts(rec)]
    ids = {(ctx, q[2]): context_ids(tok, q[2], ctx) for _, ctx, q in rows}
    rows = [row for row in rows if ids[(row[1], row[2][2])] is not None]  # no chat template: no chat context
    answers: dict[int, str] = {}
    for context in CONTEXTS:  # one context at a time, so that a batch shares its context's prefix (pmet.sampling)
        mine = [i for i, row in enumerate(rows) if row[1] == context]
        answers.update(zip(mine, greedy(model, tok, [ids[(context, rows[i][2][2])] for i in mine],
                                        max_new_tokens=opts.wild_tokens, batch_size=opts.generation_batch_size,
                                        progress=progress, desc=f"{desc}: wild, {context}"), strict=True))
    per: dict[tuple[int, str], list[tuple[tuple, str]]] = {}
    for i, (k, ctx, q) in enumerate(rows):
        per.setdefault((k, ctx), []).append((q, answers[i]))
    for (k, ctx), items in per.items():
        results[k].setdefault("wild", {})[ctx] = [{"group": q[0], "index": q[1], "answer": a} for q, a in items]
        metrics = _wild_metrics(records[k].request.target_new, items)
        results[k]["metrics"].update({f"wild@{ctx}:{m}": v for m, v in metrics.items()})
        if ctx == "bare":
            results[k]["metrics"].update({f"wild_{m}": metrics[m] for m in (*CORE, "portability") if m in metrics})


def _wild_metrics(target_new: str, items: list[tuple[tuple, str]]) -> dict[str, list[float]]:
    """Per-prompt values of one record in one context (wild.py's module docstring)."""
    from .wild import mentions, states

    out: dict[str, list[float]] = {}
    for (group, _, _, own), answer in items:
        metric = {"rewrite": "efficacy", "paraphrase": "generalization", "neighborhood": "specificity",
                  "portability": "portability"}[group]
        for suffix, judge in (("", states), ("_mentions", mentions)):
            said = judge(answer, own if group == "portability" else target_new)
            out.setdefault(metric + suffix, []).append(float(not said if group == "neighborhood" else said))
        if group == "neighborhood":
            out.setdefault("specificity_true", []).append(float(states(answer, own)))
    return out


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± 95% CI over records of each per-record metric (a record's value: the mean over its prompts or
    tokens, ROME/MEMIT summarize.py), plus Score = harmonic mean of efficacy, generalization, specificity; the
    wild protocol's per-context values nested under `wild_by_context`."""
    from .metrics import aggregate_records

    out: dict[str, Any] = aggregate_records([r["metrics"] for r in results])
    for key in [k for k in out if k.startswith("wild@")]:
        ctx, name = key.removeprefix("wild@").split(":", 1)
        out.setdefault("wild_by_context", {}).setdefault(ctx, {})[name] = out.pop(key)
    return out


__all__ = ["CORE", "EvalOptions", "ReferenceTexts", "evaluate_records", "summarize"]
