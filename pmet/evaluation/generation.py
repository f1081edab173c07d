"""Batched sampling with a KV cache for the generation metrics (fluency, consistency).

ROME's `generate_fast`: top-k sampling with k = 5 from the full softmax, one sample per prompt, until the text
(prompt included) is `max_length` tokens long. Here prompts are sorted by length and left-padded into batches,
and `model.generate` (KV cache) samples every batch; each batch generates max_length − (its longest prompt)
new tokens, so short prompts in a batch with long ones get slightly fewer tokens than in ROME. Sampling
stops at the model's end-of-sequence token (ROME's loop does not), which matters for chat-tuned models.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], *, max_length: int = 100,
             top_k: int = 5, batch_size: int = 32, seed: int = 0, progress: bool = False) -> list[str]:
    """One sampled continuation per prompt; returns prompt + continuation text, in the order of `prompts`."""
    device = next(model.parameters()).device
    encoded = [tok(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every row's last prompt token is at the same position
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]) :] = 1
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        config = GenerationConfig(  # explicit, so a model's own sampling defaults do not leak in
            do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0, max_new_tokens=max(1, max_length - width),
            pad_token_id=tok.pad_token_id, eos_token_id=model.generation_config.eos_token_id, use_cache=True,
        )
        with torch.no_grad():
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for r, i in enumerate(idx):
            text_ids = seqs[r, width:].tolist()
            out[i] = prompts[i] + tok.decode(text_ids, skip_special_tokens=True)
    return out
