"""Top-k sampling with a KV cache: the one sampler behind the fluency generations (evaluation) and the 'self'
statistics corpus (C0 without a text corpus).

ROME's `generate_fast` samples from the full softmax restricted to its k largest entries, at temperature 1.
Here the draw is made among the k largest logits only (their softmax is that restricted distribution), so a
step costs k random numbers per row instead of one per vocabulary entry; only the last position's logits are
computed (`logits_to_keep=1`). Rows are left-padded so every row's next token sits in the last column; each row
has its own budget of new tokens and stops at an end-of-sequence token, and finished rows leave the batch.

A prefix that every prompt of the batch shares (e.g. a chat template's system turn) of at least MIN_SHARED tokens
is run once and its KV cache repeated for every row; the rows' own tokens follow it after their padding (positions
and mask as if unshared). Same tokens as without sharing, float rounding aside.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .prompts import pad_left

SCHEME = "rows1"  # names this sampler in cache keys of sampled outputs: change it when the samples change
DROP_FRACTION = 8  # finished rows leave the batch once they are ≥ 1/8 of it (each drop copies the KV cache)
MIN_SHARED = 8  # a common prompt prefix this long or longer is computed once for the batch


def eos_token_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> list[int]:
    """The model's end-of-sequence ids (its generation config may list several), else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = tok.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def cache_kwargs(model: PreTrainedModel, cache: object) -> dict[str, object]:
    """The KV cache as the model's forward takes it (`cache`; `past_key_values` before transformers 5.24)."""
    return {_cache_arg(type(model)): cache}


@functools.cache
def _cache_arg(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def row_uniforms(seeds: Sequence[int], steps: int, device: torch.device) -> torch.Tensor:
    """(rows, steps) uniform numbers, row r drawn from its own generator seeded with seeds[r]: a row's sample
    depends on its seed alone, not on the batch it is drawn in."""
    u = [torch.rand(steps, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    return torch.stack(u).to(device)


def draw_top_k(logits: torch.Tensor, k: int, u: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits) restricted to its k largest entries (temperature 1), by inverting
    that distribution's CDF at the row's uniform number u."""
    vals, idx = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
    cdf = torch.softmax(vals.double(), dim=-1).cumsum(-1)
    choice = (cdf < u[:, None]).sum(-1, keepdim=True).clamp(max=vals.shape[-1] - 1)
    return idx.gather(-1, choice).squeeze(-1)


def sample(model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
           seeds: Sequence[int], *, top_k: int, eos_ids: Sequence[int], pad_id: int) -> list[list[int]]:
    """New token ids for each prompt (at most `max_new_tokens[i]`, ending at the first end-of-sequence token,
    which is kept), prompt i's random draws seeded by seeds[i]. All prompts run as one batch."""
    device = next(model.parameters()).device
    n = len(prompts)
    out: list[list[int]] = [[] for _ in range(n)]
    budget = torch.as_tensor(list(max_new_tokens), device=device)
    rows = torch.arange(n, device=device)  # prompt index of each live batch row
    new_tokens = int(budget.max()) if n else 0
    shared = _shareable(model, prompts, new_tokens)  # the prefix's positions come first, then each row's padding
    ids, mask = pad_left([p[shared:] for p in prompts], pad_id, device)
    mask = torch.cat([mask.new_ones(n, shared), mask], -1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    eos = torch.as_tensor(list(eos_ids), device=device)
    live = budget > 0
    u = row_uniforms(seeds, new_tokens, device)
    step, cache, tokens = 0, DynamicCache(config=model.config), []  # filled in place by each forward
    with torch.no_grad():
        if shared:  # the shared prefix once, its keys/values repeated for every row
            model(input_ids=torch.tensor([list(prompts[0][:shared])], device=device), use_cache=True,
                  logits_to_keep=1, **cache_kwargs(model, cache))
            cache.batch_repeat_interleave(n)
        while bool(live.any()):
            if int((~live).sum()) * DROP_FRACTION >= len(live):  # drop finished rows
                keep = live.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                ids, mask, pos, rows, budget, u = ids[keep], mask[keep], pos[keep], rows[keep], budget[keep], u[keep]
                live = live[keep]
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                           **cache_kwargs(model, cache)).logits
            nxt = draw_top_k(logits[:, -1], top_k, u[:, step])
            nxt = torch.where(live, nxt, pad_id)
            tokens.append(torch.stack([rows, nxt, live.long()], -1))
            step += 1
            live = live & ~torch.isin(nxt, eos) & (budget > step)
            ids, pos = nxt[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    if not tokens:
        return out
    steps = torch.cat(tokens)  # (prompt index, token, live) per row and step, in step order
    steps = steps[steps[:, 2] == 1]
    steps = steps[torch.sort(steps[:, 0], stable=True).indices]
    counts = torch.bincount(steps[:, 0], minlength=n).tolist()
    for r, chunk in enumerate(steps[:, 1].cpu().split(counts)):
        out[r] = chunk.tolist()
    return out


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one token of its own."""
    if not prompts:
        return 0
    common = os.path.commonprefix([list(p) for p in prompts])  # compares the smallest and largest prompt only
    return max(min(len(common), min(map(len, prompts)) - 1), 0)


def _shareable(model: PreTrainedModel, prompts: Sequence[Sequence[int]], new_tokens: int) -> int:
    """The shared prefix's length when it is worth running once (≥ MIN_SHARED tokens, ≥ 2 prompts), else 0; also 0
    when a sliding window shorter than prompt + new tokens would see a row's padding where unshared it would not."""
    shared = shared_prefix(prompts) if len(prompts) > 1 else 0
    window = getattr(model.config, "sliding_window", None) or 0
    if shared < MIN_SHARED or (window and max(map(len, prompts)) + new_tokens > window):
        return 0
    return shared
