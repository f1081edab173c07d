"""Token-level bookkeeping: where the subject's last token is, how a target is tokenized, padded batches.

Everything is built from token ids (prompt ids + target ids), never by decoding and re-tokenizing, so the
positions the loss reads are exactly the positions the target occupies.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """A tokenized prompt and the index of the subject's last token in it ("subject_last"; docs/REFERENCE.md,
    "Edit requests and tokens")."""

    ids: tuple[int, ...]
    subject_last: int


def fill(template: str, subject: str) -> tuple[str, int]:
    """Put `subject` in the template's single '{}' slot; returns the text and the subject's end offset."""
    start = template.index("{}")
    return template[:start] + subject + template[start + 2 :], start + len(subject)


def compose(context: str, prompt: str) -> str:
    """A context template ('{}' or 'Some text. {}') applied to a request prompt that has its own '{}'."""
    return context.replace("{}", prompt, 1)


def encode(tok: PreTrainedTokenizerBase, template: str, subject: str) -> Encoded:
    """Tokenize template-with-subject and locate the subject's last token.

    With a fast tokenizer the token containing the subject's last character is found from the offsets;
    otherwise the prefix ending at the subject is tokenized and its length used (MEMIT's approach).
    """
    text, end = fill(template, subject)
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        idx = max(
            (i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end),
            default=None,
        )
        if idx is not None:
            return Encoded(tuple(enc["input_ids"]), idx)
    ids = tok(text)["input_ids"]
    return Encoded(tuple(ids), len(tok(text[:end])["input_ids"]) - 1)


@lru_cache(maxsize=65536)
def _target_ids_cached(tok: PreTrainedTokenizerBase, target: str) -> tuple[int, ...]:
    anchor = "The"
    head = tok(anchor, add_special_tokens=False)["input_ids"]
    full = tok(f"{anchor} {target}", add_special_tokens=False)["input_ids"]
    if full[: len(head)] == head and len(full) > len(head):
        return tuple(full[len(head) :])
    return tuple(tok(" " + target, add_special_tokens=False)["input_ids"])


def target_ids(tok: PreTrainedTokenizerBase, target: str) -> tuple[int, ...]:
    """Token ids of a target as it continues a prompt: ' Paris' for byte-level BPE (REFERENCE.md), '▁Paris' for
    SentencePiece; never with special tokens. Found as tokens('The ' + target) minus tokens('The')."""
    target = target.strip()
    if not target:
        raise ValueError("empty target")
    return _target_ids_cached(tok, target)


Rows = list[tuple[int, ...]] | list[list[int]]


def pad_right(rows: Rows, pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask (positions stay absolute: index i is token i of the row)."""
    return _pad(rows, pad_id, device, left=False)


def pad_left(rows: Rows, pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask: every row's last token in the last column (sampling, and
    continuing rows from a KV cache); pass position ids (mask.cumsum(-1) - 1) to keep positions absolute."""
    return _pad(rows, pad_id, device, left=True)


def _pad(rows: Rows, pad_id: int, device: torch.device | str, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(list(r), dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def chunks(n: int, size: int) -> list[range]:
    """Consecutive index ranges of at most `size` covering range(n)."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]
