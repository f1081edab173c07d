"""Speed of the evaluation's stages and of the 'self' statistics corpus, each against its baseline in the same
process, on the same prompts:

1. generation for fluency: `pmet.sampling` (top-k drawn among the k largest logits, per-prompt budgets, finished
   rows leave the batch; the CPU default batch) vs `model.generate` in batches of 32 (pmet's earlier code);
2. the 'self' C0 corpus: the same sampler sized to the tokens asked for vs `model.generate` in batches of 32;
3. teacher-forced scoring: each prompt once and its targets from its KV cache vs one padded row per
   (prompt, target) pair (pmet's earlier code);
4. `--parts wild`: the wild protocol's greedy answers, one context at a time: a batch's shared prefix (the chat
   template's system turn, the instruction) run once vs every row run whole (pmet's earlier code), and how many
   answers agree.

    python benchmarks/bench_eval.py [--records 32] [--self-tokens 8000] [--parts generation,self,scoring,wild]

Prints tokens or rows per second and the ratios; record them in docs/PERFORMANCE.md with the machine.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from pmet import sampling
from pmet.arch import layout_of, unembed
from pmet.corpus import SELF_NEW_TOKENS, SELF_STARTS, SELF_TOP_K, iter_corpus_texts
from pmet.evaluation.data import load_eval_records
from pmet.evaluation.evaluate import CPU_BATCH_SIZES, _cf_rows, _wild_prompts
from pmet.evaluation.generation import generate
from pmet.evaluation.scoring import score_rows
from pmet.evaluation.wild import CONTEXTS, context_ids, greedy
from pmet.hooks import Trace
from pmet.models import load_model
from pmet.prompts import pad_left, pad_right

DATA = Path(os.environ.get("PMET_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def hf_generate(model, tok, prompts: list[list[int]], top_k: int, *, max_length: int = 0, new_tokens: int = 0,
                batch: int = 32) -> int:
    """Baseline: `model.generate` on length-sorted, left-padded batches, each to `max_length` tokens (prompt
    included, counted from the batch's longest prompt) or by `new_tokens`; returns the number of new tokens."""
    total = 0
    order = sorted(prompts, key=len)
    for s in range(0, len(order), batch):
        rows = order[s : s + batch]
        ids, mask = pad_left(rows, tok.pad_token_id)
        cfg = GenerationConfig(do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0,
                               max_new_tokens=new_tokens or max(1, max_length - ids.shape[1]),
                               pad_token_id=tok.pad_token_id, eos_token_id=model.generation_config.eos_token_id)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        new = out[:, ids.shape[1]:]
        total += int((new != tok.pad_token_id).sum())
    return total


def old_scoring(model, rows, batch_size: int = 64) -> None:
    """Baseline: every (prompt, target) row as one right-padded sequence up to the final norm, the vocabulary
    projection at the target positions only."""
    layout = layout_of(model)
    order = sorted(rows, key=lambda r: len(r[0]) + len(r[1]))
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        ids, mask = pad_right([p + t for p, t in batch], 0)
        with torch.no_grad():
            with Trace(model, outputs=[layout.spec.final_norm], stop_after=layout.spec.final_norm) as tr:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            h = tr.outputs[layout.spec.final_norm]
            at = [(b, len(p) + j - 1) for b, (p, t) in enumerate(batch) for j in range(len(t))]
            unembed(model, layout, h[[b for b, _ in at], [i for _, i in at]]).log_softmax(-1)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--self-tokens", type=int, default=8000)
    ap.add_argument("--parts", default="generation,self,scoring", help="comma-separated parts to run")
    args = ap.parse_args()
    lm = load_model("smollm2-135m", device="cpu")
    model, tok = lm.model, lm.tok
    records = load_eval_records(DATA / "counterfact_rome_subsets" / "counterfact_rome_format_subset.json",
                                "counterfact", n=args.records, slice_="test")
    print(f"SmolLM2-135M, cpu, {torch.get_num_threads()} threads, {len(records)} CounterFact test records")

    parts = args.parts.split(",")
    if "generation" in parts:
        compare_generation(model, tok, records)
    if "self" in parts:
        compare_self_corpus(model, tok, args.self_tokens)
    if "scoring" in parts:
        compare_scoring(model, tok, records)
    if "wild" in parts:
        compare_wild(model, tok, records)


def compare_generation(model, tok, records) -> None:
    prompts = [p for r in records for p in list(r.request.generation_prompts)[:2]]
    encoded = [tok(p)["input_ids"] for p in prompts]
    base_tokens, t_base = timed(lambda: hf_generate(model, tok, encoded, 5, max_length=100))
    texts, t_new = timed(lambda: generate(model, tok, prompts, max_length=100, batch_size=CPU_BATCH_SIZES[1]))
    new_tokens = sum(len(tok(t)["input_ids"]) - len(e) for t, e in zip(texts, encoded, strict=True))
    r_base, r_new = base_tokens / t_base, new_tokens / t_new
    print(f"generation, {len(prompts)} prompts to 100 tokens: model.generate x32 {base_tokens} tokens in "
          f"{t_base:.1f} s ({r_base:.0f} tok/s); pmet.sampling x{CPU_BATCH_SIZES[1]} {new_tokens} tokens in "
          f"{t_new:.1f} s ({r_new:.0f} tok/s); x{r_new / r_base:.2f} tokens per second")


def compare_self_corpus(model, tok, n_tokens: int) -> None:
    starts = [tok(w)["input_ids"] for w in SELF_STARTS]
    n_rows = max(1, n_tokens // SELF_NEW_TOKENS)
    base_tokens, t_base = timed(lambda: hf_generate(model, tok, [starts[i % 12] for i in range(n_rows)],
                                                    SELF_TOP_K, new_tokens=SELF_NEW_TOKENS))

    def self_corpus() -> int:
        got = 0
        for text in iter_corpus_texts("self", model, tok, n_tokens=n_tokens):
            got += len(tok(text)["input_ids"])
            if got >= n_tokens:
                return got
        return got

    new_tokens, t_new = timed(self_corpus)
    r_base, r_new = base_tokens / t_base, new_tokens / t_new
    print(f"self corpus, {n_tokens} tokens: model.generate x32 {r_base:.0f} tok/s; pmet.sampling "
          f"{r_new:.0f} tok/s; x{r_new / r_base:.2f}")


def compare_scoring(model, tok, records) -> None:
    rows = [(row[3], row[4]) for rec in records for row in _cf_rows(tok, rec)]
    _, t_base = timed(lambda: old_scoring(model, rows))
    _, t_new = timed(lambda: score_rows(model, tok, rows, batch_size=CPU_BATCH_SIZES[0]))
    print(f"scoring, {len(rows)} rows ({len({p for p, _ in rows})} distinct prompts): one row per pair "
          f"{t_base:.1f} s; shared prompts {t_new:.1f} s; x{t_base / t_new:.2f}")


def compare_wild(model, tok, records) -> None:
    for context in CONTEXTS:
        prompts = [context_ids(tok, q[2], context) for rec in records for q in _wild_prompts(rec)]
        if prompts[0] is None:
            continue

        whole, t_whole = timed(lambda p=prompts: _greedy_sharing(model, tok, p, 10**9))
        shared, t_shared = timed(lambda p=prompts: _greedy_sharing(model, tok, p, sampling.MIN_SHARED))
        same = sum(a == b for a, b in zip(whole, shared, strict=True))
        print(f"wild answers, {context}, {len(prompts)} prompts: every row whole {t_whole:.1f} s; shared prefix "
              f"{t_shared:.1f} s; x{t_whole / t_shared:.2f}; {same}/{len(prompts)} answers identical")


def _greedy_sharing(model, tok, prompts: list[list[int]], min_shared: int) -> list[str]:
    """The wild protocol's greedy answers with prefixes shared from `min_shared` tokens on (10**9: never)."""
    keep, sampling.MIN_SHARED = sampling.MIN_SHARED, min_shared
    try:
        return greedy(model, tok, prompts, max_new_tokens=20, batch_size=CPU_BATCH_SIZES[1])
    finally:
        sampling.MIN_SHARED = keep


if __name__ == "__main__":
    main()
