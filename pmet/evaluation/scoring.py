"""Teacher-forced scoring of (prompt, target) rows: the one forward pass all probability- and token-level
metrics are read from.

Each distinct prompt runs once: prompts are sorted by length, left-padded into batches and run with the KV cache;
the distribution at a prompt's last token predicts the first token of every target scored after it. Targets
longer than one token then run from the prompt's cached keys and values (`y_0 .. y_{n-2}` as input, predicting
`y_1 .. y_{n-1}`), so CounterFact's new and true targets share one pass over their prompt. The forward passes stop
at the final norm; the vocabulary projection is applied only at the positions that predict a target token, laid
out in the *compact* form the functions of `metrics.py` take: row b holds [x, y_0 .. y_{n-1}] with prompt length
1, and logits[b, j] is the distribution predicting y_j (ROME's `logits[i, prefix_len + j - 1]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..arch import ModelLayout, layout_of, unembed
from ..hooks import Trace
from ..prompts import pad_left, pad_right, target_ids
from ..sampling import cache_kwargs
from .metrics import mean_logprob_of_continuations, target_token_correct

Row = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass
class Scored:
    """Per row: mean per-token log-probability of the target, per-token argmax hits, and argmax token ids."""

    mean_logprob: list[float]
    hits: list[list[bool]]
    argmax: list[list[int]]


def encode_pair(tok: PreTrainedTokenizerBase, prompt: str, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Prompt ids (with the tokenizer's special tokens, as edits see them) and target continuation ids."""
    return tuple(tok(prompt)["input_ids"]), target_ids(tok, target)


def score_rows(model: PreTrainedModel, tok: PreTrainedTokenizerBase, rows: list[Row], *, batch_size: int = 64,
               progress: bool = False, desc: str = "scoring") -> Scored:
    """Score every (prompt ids, target ids) row; `batch_size` distinct prompts (with all their targets) per
    batch, prompts sorted by length."""
    layout = layout_of(model)
    n = len(rows)
    out = Scored([0.0] * n, [[] for _ in range(n)], [[] for _ in range(n)])
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(rows):
        by_prompt.setdefault(prompt, []).append(i)
    prompts = sorted(by_prompt, key=len)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    from tqdm.auto import tqdm

    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        members = [(p, i) for p, prompt in enumerate(batch) for i in by_prompt[prompt]]
        _score_batch(model, tok, layout, batch, [(p, rows[i][1]) for p, i in members], out, [i for _, i in members])
    return out


def _score_batch(model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout,
                 prompts: list[tuple[int, ...]], targets: list[tuple[int, tuple[int, ...]]], out: Scored,
                 where: list[int]) -> None:
    """Score `targets` ((prompt index in `prompts`, target ids) each) and write row `where[k]` of `out`."""
    device = next(model.parameters()).device
    ids, mask = pad_left(prompts, tok.pad_token_id, device)
    first, cache = _final_norm(model, layout, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), None)
    owner = torch.tensor([p for p, _ in targets], device=device)
    t_len = torch.tensor([len(t) for _, t in targets], device=device)
    width = int(t_len.max())
    # normed states predicting y_0 (the prompt's last position) and y_1.. (the target run after the prompt)
    states = first[:, -1][owner][:, None]
    if width > 1:
        cont, cont_mask = pad_right([t[:-1] for _, t in targets], tok.pad_token_id, device)
        cache.batch_select_indices(owner)
        pos = mask.sum(-1)[owner][:, None] + torch.arange(width - 1, device=device)
        later, _ = _final_norm(model, layout, cont, torch.cat([mask[owner], cont_mask], -1), pos, cache)
        states = torch.cat([states, later], dim=1)
    j = torch.arange(width, device=device)
    valid = j[None, :] < t_len[:, None]
    logits = unembed(model, layout, states[valid])
    compact = logits.new_zeros(len(targets), width, logits.shape[-1])
    compact[valid] = logits
    compact_ids = torch.zeros(len(targets), width + 1, dtype=torch.long, device=device)
    compact_ids[:, 1:] = pad_right([t for _, t in targets], 0, device)[0]
    ones = torch.ones_like(t_len)
    lp = mean_logprob_of_continuations(compact, compact_ids, ones, t_len)
    hit, _ = target_token_correct(compact, compact_ids, ones, t_len)
    am = compact.argmax(-1)
    for k, i in enumerate(where):
        m = int(t_len[k])
        out.mean_logprob[i] = float(lp[k])
        out.hits[i] = hit[k, :m].tolist()
        out.argmax[i] = am[k, :m].tolist()


def _final_norm(model: PreTrainedModel, layout: ModelLayout, ids: torch.Tensor, mask: torch.Tensor,
                pos: torch.Tensor, cache: DynamicCache | None) -> tuple[torch.Tensor, DynamicCache]:
    """The final norm's output at every position of `ids` (the forward stops there), and the KV cache it filled
    (a new one unless `cache` is given: then `ids` continue the sequences cached in it)."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    with torch.no_grad(), Trace(model, outputs=[layout.spec.final_norm], stop_after=layout.spec.final_norm) as tr:
        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
    return tr.outputs[layout.spec.final_norm], cache
