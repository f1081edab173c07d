"""Teacher-forced scoring of (prompt, target) rows in length-sorted batches: the one forward pass all
probability- and token-level metrics are read from.

Each row is prompt ids followed by target ids, right-padded. The forward pass stops at the final norm; the
vocabulary projection is applied only at the positions that predict a target token, and those logits are laid
out in the *compact* form the functions of `metrics.py` take: row b holds [x, y_0 .. y_{n-1}] with prompt length 1,
and logits[b, j] is the distribution predicting y_j (ROME's `logits[i, prefix_len + j - 1]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..arch import layout_of
from ..hooks import Trace
from ..prompts import pad_right, target_ids
from ..targets import unembed
from .metrics import mean_logprob_of_continuations, target_token_correct


@dataclass
class Scored:
    """Per row: mean per-token log-probability of the target, per-token argmax hits, and argmax token ids."""

    mean_logprob: list[float]
    hits: list[list[bool]]
    argmax: list[list[int]]


def encode_pair(tok: PreTrainedTokenizerBase, prompt: str, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Prompt ids (with the tokenizer's special tokens, as edits see them) and target continuation ids."""
    return tuple(tok(prompt)["input_ids"]), target_ids(tok, target)


def score_rows(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
               rows: list[tuple[tuple[int, ...], tuple[int, ...]]], *, batch_size: int = 64,
               progress: bool = False, desc: str = "scoring") -> Scored:
    """Score every (prompt ids, target ids) row; batches are formed from rows sorted by length."""
    layout = layout_of(model)
    device = next(model.parameters()).device
    n = len(rows)
    mean_lp: list[float] = [0.0] * n
    hits: list[list[bool]] = [[] for _ in range(n)]
    argmax: list[list[int]] = [[] for _ in range(n)]
    order = sorted(range(n), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    from tqdm.auto import tqdm

    for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        full = [rows[i][0] + rows[i][1] for i in idx]
        ids, mask = pad_right(full, tok.pad_token_id, device)
        p_len = torch.tensor([len(rows[i][0]) for i in idx], device=device)
        t_len = torch.tensor([len(rows[i][1]) for i in idx], device=device)
        width = int(t_len.max())
        j = torch.arange(width, device=device)
        valid = j[None, :] < t_len[:, None]
        pred_pos = torch.where(valid, p_len[:, None] + j[None, :] - 1, torch.zeros_like(j)[None, :])
        with torch.no_grad():
            with Trace(model, outputs=[layout.spec.final_norm], stop_after=layout.spec.final_norm) as tr:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            h = tr.outputs[layout.spec.final_norm]
            b = torch.arange(len(idx), device=device)[:, None].expand_as(pred_pos)
            logits = unembed(model, layout, h[b[valid], pred_pos[valid]])
        compact = logits.new_zeros(len(idx), width, logits.shape[-1])
        compact[valid] = logits
        compact_ids = torch.zeros(len(idx), width + 1, dtype=torch.long, device=device)
        tgt = torch.where(valid, ids.gather(1, (p_len[:, None] + j[None, :]).clamp(max=ids.shape[1] - 1)), 0)
        compact_ids[:, 1:] = tgt
        ones = torch.ones_like(p_len)
        lp = mean_logprob_of_continuations(compact, compact_ids, ones, t_len)
        hit, _ = target_token_correct(compact, compact_ids, ones, t_len)
        am = compact.argmax(-1)
        for k, i in enumerate(idx):
            m = int(t_len[k])
            mean_lp[i] = float(lp[k])
            hits[i] = hit[k, :m].tolist()
            argmax[i] = am[k, :m].tolist()
    return Scored(mean_lp, hits, argmax)
