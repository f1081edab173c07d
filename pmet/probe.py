"""Before/after measurements of one prompt: the greedy next token and P(target continuation).

Batched: one forward per batch of prompts (prompt ids + target ids, right-padded), stopped at the final norm,
with the unembedding applied only at the positions read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch import ModelLayout
from .hooks import Trace
from .prompts import chunks, pad_right, target_ids
from .targets import unembed


@dataclass(frozen=True)
class Probe:
    top1: str  # decoded greedy next token after the prompt
    p_target: float  # probability of the whole target continuation (product over its tokens)
    logp_mean: float  # mean per-token log-probability of the target (CounterFact's comparison, NOTES.md)

    def to_dict(self) -> dict:
        return {"top1": self.top1, "p_target_new": self.p_target}


@torch.no_grad()
def probe(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    prompts: list[str],
    targets: list[str],
    *,
    batch_size: int = 32,
) -> list[Probe]:
    """For each (prompt, target): top-1 next token and P(target | prompt)."""
    device = next(model.parameters()).device
    out: list[Probe] = []
    for r in chunks(len(prompts), batch_size):
        p_ids = [tok(prompts[i])["input_ids"] for i in r]
        t_ids = [list(target_ids(tok, targets[i])) for i in r]
        ids, mask = pad_right([p + t[:-1] for p, t in zip(p_ids, t_ids, strict=True)], tok.pad_token_id, device)
        with Trace(model, outputs=[layout.spec.final_norm], stop_after=layout.spec.final_norm) as tr:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        normed = tr.outputs[layout.spec.final_norm]
        row = torch.tensor([i for i, t in enumerate(t_ids) for _ in t], device=device)
        pos = torch.tensor([len(p) - 1 + j for p, t in zip(p_ids, t_ids, strict=True) for j in range(len(t))],
                           device=device)
        tgt = torch.tensor([x for t in t_ids for x in t], device=device)
        # final_norm is already applied: only the unembedding (and any softcapping) remains
        logits = unembed(model, layout, normed[row, pos])
        logp = torch.log_softmax(logits, -1)
        tok_logp = logp.gather(-1, tgt[:, None]).squeeze(-1)
        sums = torch.zeros(len(t_ids), device=device).index_add(0, row, tok_logp)
        first = torch.tensor([sum(len(t) for t in t_ids[:i]) for i in range(len(t_ids))], device=device)
        top1 = logits[first].argmax(-1).tolist()
        for i, t in enumerate(t_ids):
            out.append(Probe(tok.decode([top1[i]]), float(sums[i].exp()), float(sums[i]) / len(t)))
    return out
