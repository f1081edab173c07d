"""Generation-based ("wild") edit success: does the model, answering freely, state the new target?

Teacher forcing asks how probable the target is; here the model answers on its own. Every rewrite, paraphrase
and neighbourhood prompt is continued greedily for up to `wild_tokens` new tokens (no teacher forcing, no
truncation to the target's length; an end-of-sequence token ends it), in three contexts (CONTEXTS):

    bare   the prompt as it is
    qa     the prompt after a short instruction (QA_STATEMENT, or QA_QUESTION for a prompt ending in "?")
    chat   the same instruction as a user turn of the model's chat template (only when its tokenizer has one)

A continuation *states* a target when, both normalised (`normalise`), it begins with the target as whole words,
and *mentions* it when it contains the target as whole words anywhere. Per record (ROME/MEMIT's aggregation:
the mean over a record's prompts, then mean ± 95% CI over records):

    efficacy        the rewrite prompt's continuation states target_new
    generalization  fraction of paraphrase continuations that state target_new
    specificity     fraction of neighbourhood continuations that do NOT state target_new (the edit did not leak)
    *_mentions      the same with "mentions" in place of "states" (an answer that restates the prompt first)
    specificity_true  fraction of neighbourhood continuations that state the neighbour's own answer
                    (CounterFact: target_true; zsRE: the unrelated question's answer)

The bare context's values are `wild_efficacy`, `wild_generalization`, `wild_specificity` in summary.json; every
context's values are under `wild_by_context`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..sampling import eos_token_ids, sample

CONTEXTS = ("bare", "qa", "chat")
SCHEME = "wild2"  # names the contexts' texts and their batching in cache keys of answers: change it when they change
# A statement is continued after the instruction (SmolLM2 ends at once after "Sentence: ... Answer:"), a question
# is answered after "Answer:".
QA_STATEMENT = "Complete the sentence with the correct fact.\n{}"
QA_QUESTION = "Answer the question in a few words.\nQuestion: {}\nAnswer:"
CHAT_STATEMENT = "Complete the sentence with the correct fact, in a few words: {} ..."
CHAT_QUESTION = "Answer the question in a few words: {}"
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    """Lower case (Unicode casefold, NFKC), punctuation to spaces, the articles a/an/the dropped, whitespace
    collapsed (SQuAD's answer normalisation)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def states(continuation: str, target: str) -> bool:
    """The continuation begins with the target, as whole words ("Paris" does not state "Parisian")."""
    c, t = normalise(continuation), normalise(target) or target.strip().casefold()
    return bool(t) and (c == t or c.startswith(t + " "))


def mentions(continuation: str, target: str) -> bool:
    """The continuation contains the target as whole words, anywhere."""
    c, t = normalise(continuation), normalise(target) or target.strip().casefold()
    return bool(t) and f" {t} " in f" {c} "


def context_ids(tok: PreTrainedTokenizerBase, prompt: str, context: str) -> list[int] | None:
    """Token ids of `prompt` in `context` (None for "chat" when the tokenizer has no chat template)."""
    question = prompt.rstrip().endswith("?")
    if context == "bare":
        return tok(prompt)["input_ids"]
    if context == "qa":
        return tok((QA_QUESTION if question else QA_STATEMENT).format(prompt))["input_ids"]
    if not getattr(tok, "chat_template", None):
        return None
    turn = [{"role": "user", "content": (CHAT_QUESTION if question else CHAT_STATEMENT).format(prompt)}]
    text = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]], *,
           max_new_tokens: int, batch_size: int, progress: bool = False, desc: str = "wild") -> list[str]:
    """The greedy continuation of each prompt (token ids), decoded without special tokens: pmet.sampling with
    top-k = 1, prompts sorted by length and run `batch_size` at a time."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    eos = eos_token_ids(model, tok)
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        new = sample(model, [prompts[i] for i in idx], [max_new_tokens] * len(idx), [0] * len(idx), top_k=1,
                     eos_ids=eos, pad_id=tok.pad_token_id)
        for i, ids in zip(idx, new, strict=True):
            out[i] = tok.decode(ids, skip_special_tokens=True)
    return out
