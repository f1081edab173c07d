"""Batched sampling for the generation metrics (fluency, consistency).

ROME's `generate_fast`: top-k sampling with k = 5 from the full softmax, one sample per prompt, until the text
(prompt included) is `max_length` tokens long. Prompts are sorted by length and sampled in batches by
`pmet.sampling.sample` (KV cache); each prompt gets max_length − (its own length) new tokens, as in ROME. Prompt
i's random draws come from seed · 1,000,003 + i, so a text does not depend on the batch it was sampled in.
Sampling stops at the model's end-of-sequence token (ROME's loop does not), which matters for chat-tuned models.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..sampling import eos_token_ids, sample


def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], *, max_length: int = 100,
             top_k: int = 5, batch_size: int = 64, seed: int = 0, progress: bool = False) -> list[str]:
    """One sampled continuation per prompt; returns prompt + continuation text, in the order of `prompts`."""
    encoded = [tok(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    eos = eos_token_ids(model, tok)
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        new = sample(model, [encoded[i] for i in idx], [max(1, max_length - len(encoded[i])) for i in idx],
                     [seed * 1_000_003 + i for i in idx], top_k=top_k, eos_ids=eos, pad_id=tok.pad_token_id)
        for i, ids in zip(idx, new, strict=True):
            out[i] = prompts[i] + tok.decode(ids, skip_special_tokens=True)
    return out
