"""Before/after measurements of one prompt for `pmet edit`'s report: the greedy next token and P(target
continuation), read from the teacher-forced scorer every evaluation uses (evaluation/scoring.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .evaluation.scoring import encode_pair, score_rows


@dataclass(frozen=True)
class Probe:
    top1: str  # decoded greedy next token after the prompt
    p_target: float  # probability of the whole target continuation (product over its tokens)
    logp_mean: float  # mean per-token log-probability of the target (CounterFact's comparison)

    def to_dict(self) -> dict:
        return {"top1": self.top1, "p_target_new": self.p_target}


def probe(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], targets: list[str], *,
          batch_size: int = 64) -> list[Probe]:
    """For each (prompt, target): top-1 next token and P(target | prompt)."""
    rows = [encode_pair(tok, p, t) for p, t in zip(prompts, targets, strict=True)]
    scored = score_rows(model, tok, rows, batch_size=batch_size)
    return [Probe(tok.decode([am[0]]), math.exp(lp * len(t)), lp)
            for (_, t), lp, am in zip(rows, scored.mean_logprob, scored.argmax, strict=True)]
