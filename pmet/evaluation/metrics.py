"""Edit-quality metrics, computed exactly as ROME/MEMIT do (docs/REFERENCE.md, "Evaluation conventions").

Token conventions follow pmet.prompts: each row of `input_ids` is prompt ids followed by target ids (the target
tokenized as a continuation, `target_ids`), right-padded (`pad_right`), so positions are absolute. Target token j
of a row sits at position prompt_len + j and is predicted by the logits at position prompt_len + j - 1 (ROME's
`test_batch_prediction`: `logits[i, prefix_lens[i] + j - 1, :]`).

Reference code: kmeng01/rome and kmeng01/memit, experiments/py/eval_utils_counterfact.py,
experiments/py/eval_utils_zsre.py, experiments/summarize.py, dsets/tfidf_stats.py.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
"""Word tokenizer for the n-gram entropy: words and single punctuation marks (stands in for nltk.word_tokenize)."""

SKLEARN_TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")
"""scikit-learn's default `TfidfVectorizer` token_pattern, which ROME's TF-IDF vectorizer uses."""

GENERATION_NS: tuple[int, ...] = (2, 3)
GENERATION_WEIGHTS: tuple[float, ...] = (2 / 3, 4 / 3)


# --- teacher-forced target scoring ---------------------------------------------------------------------------


def _target_positions(input_ids: Tensor, prompt_lens: Tensor, target_lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row and target index j < max(target_lens): (predicting position prompt_len + j - 1, target id, valid mask).

    Padded slots (j >= target_len) point at position 0 / token 1 and are masked out.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    prompt_lens = prompt_lens.to(device=input_ids.device, dtype=torch.long)
    target_lens = target_lens.to(device=input_ids.device, dtype=torch.long)
    if prompt_lens.shape != (input_ids.shape[0],) or target_lens.shape != prompt_lens.shape:
        raise ValueError("prompt_lens and target_lens must be [B] with B = input_ids.shape[0]")
    if bool((prompt_lens < 1).any()) or bool((target_lens < 1).any()):
        raise ValueError("every row needs a prompt of at least 1 token and a target of at least 1 token")
    if bool((prompt_lens + target_lens > input_ids.shape[1]).any()):
        raise ValueError("prompt_len + target_len exceeds the row width")
    width = int(target_lens.max()) if target_lens.numel() else 0
    j = torch.arange(width, device=input_ids.device)
    mask = j[None, :] < target_lens[:, None]
    tok_pos = torch.where(mask, prompt_lens[:, None] + j[None, :], torch.ones_like(j)[None, :])
    return tok_pos - 1, input_ids.gather(1, tok_pos), mask


def _logits_at(logits: Tensor, positions: Tensor) -> Tensor:
    """logits[b, positions[b, j], :] as a [B, L, V] tensor."""
    index = positions[:, :, None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, index)


def target_token_logprobs(logits: Tensor, input_ids: Tensor, prompt_lens: Tensor, target_lens: Tensor
                          ) -> tuple[Tensor, Tensor]:
    """Log-probabilities log P(y_j | prompt, y_<j) of the target tokens, [B, L] (float32, 0 where masked), and the
    [B, L] mask of real target tokens. y_j is read at prompt_len + j, its distribution at prompt_len + j - 1."""
    pred_pos, targets, mask = _target_positions(input_ids, prompt_lens, target_lens)
    logp = torch.log_softmax(_logits_at(logits, pred_pos).float(), dim=-1)
    token_logp = logp.gather(2, targets[:, :, None]).squeeze(2)
    return token_logp.masked_fill(~mask, 0.0), mask


def sum_logprob_of_continuations(logits: Tensor, input_ids: Tensor, prompt_lens: Tensor, target_lens: Tensor
                                 ) -> Tensor:
    """Σ_j log P(y_j | prompt, y_<j) per row, [B]: the log-probability of the whole target continuation."""
    token_logp, _ = target_token_logprobs(logits, input_ids, prompt_lens, target_lens)
    return token_logp.sum(1)


def mean_logprob_of_continuations(logits: Tensor, input_ids: Tensor, prompt_lens: Tensor, target_lens: Tensor
                                  ) -> Tensor:
    """(1/|y|) Σ_j log P(y_j | prompt, y_<j) per row, [B]: the CounterFact "probability" (REFERENCE.md: mean per-token
    log-probability of the whole target continuation; ROME's `test_batch_prediction` stores its negative)."""
    token_logp, mask = target_token_logprobs(logits, input_ids, prompt_lens, target_lens)
    return token_logp.sum(1) / mask.sum(1)


def target_token_correct(logits: Tensor, input_ids: Tensor, prompt_lens: Tensor, target_lens: Tensor
                         ) -> tuple[Tensor, Tensor]:
    """Teacher-forced argmax hits, [B, L] bool (False where masked), and the [B, L] mask of real target tokens."""
    pred_pos, targets, mask = _target_positions(input_ids, prompt_lens, target_lens)
    hits = _logits_at(logits, pred_pos).argmax(-1) == targets
    return hits & mask, mask


def token_accuracy(logits: Tensor, input_ids: Tensor, prompt_lens: Tensor, target_lens: Tensor) -> Tensor:
    """zsRE token-level accuracy under teacher forcing (REFERENCE.md, zsRE; ROME/MEMIT `eval_utils_zsre`): the
    fraction of target tokens that are the argmax at their position, [B] float32."""
    hits, mask = target_token_correct(logits, input_ids, prompt_lens, target_lens)
    return hits.sum(1).float() / mask.sum(1).float()


def target_exact_match(logits: Tensor, input_ids: Tensor, prompt_lens: Tensor, target_lens: Tensor) -> Tensor:
    """Whether every target token is the teacher-forced argmax, [B] bool (ROME CounterFact `*_prompts_correct`)."""
    hits, mask = target_token_correct(logits, input_ids, prompt_lens, target_lens)
    return (hits | ~mask).all(1)


# --- CounterFact probability comparisons ---------------------------------------------------------------------


def counterfact_prob_comparison(logp_new: Tensor, logp_true: Tensor, direction: str = "new") -> Tensor:
    """CounterFact success per prompt, bool: P(new) > P(true) for direction "new" (efficacy, generalisation),
    P(true) > P(new) for direction "true" (specificity). P is the mean per-token log-probability of the target
    (REFERENCE.md), compared strictly as in ROME/MEMIT `summarize.py` (ties fail both ways)."""
    if direction == "new":
        return logp_new > logp_true
    if direction == "true":
        return logp_true > logp_new
    raise ValueError(f"direction must be 'new' or 'true', got {direction!r}")


def efficacy_success(logp_new: Tensor, logp_true: Tensor) -> Tensor:
    """Efficacy / generalisation success: P(new) > P(true) (paper Eq. 14-15; REFERENCE.md, CounterFact)."""
    return counterfact_prob_comparison(logp_new, logp_true, "new")


def specificity_success(logp_new: Tensor, logp_true: Tensor) -> Tensor:
    """Specificity success on neighbourhood prompts: P(true) > P(new) (paper Eq. 16; REFERENCE.md, CounterFact)."""
    return counterfact_prob_comparison(logp_new, logp_true, "true")


def efficacy_magnitude(logp_new: Tensor, logp_true: Tensor) -> Tensor:
    """ROME's efficacy/generalisation magnitude: exp(mean logp_new) - exp(mean logp_true)
    (`summarize.py`: `np.exp(-x["target_new"]) - np.exp(-x["target_true"])` on mean NLLs)."""
    return logp_new.exp() - logp_true.exp()


def specificity_magnitude(logp_new: Tensor, logp_true: Tensor) -> Tensor:
    """ROME's neighbourhood (specificity) magnitude: exp(mean logp_true) - exp(mean logp_new)."""
    return logp_true.exp() - logp_new.exp()


# --- generation: n-gram entropy (fluency) ----------------------------------------------------------------------


def word_tokenize(text: str) -> list[str]:
    """Words and single punctuation marks, regex `\\w+|[^\\w\\s]`. ROME uses nltk.word_tokenize (not available here);
    the two agree on plain words and punctuation but split contractions differently ("don't": nltk gives
    "do", "n't"; this gives "don", "'", "t"), so entropies can differ slightly from ROME's on such text."""
    return WORD_PATTERN.findall(text)


def ngram_entropies(text: str, ns: Sequence[int] = GENERATION_NS) -> list[float]:
    """Entropy in bits, H_n = -Σ p log2 p, of the frequency distribution of the text's word n-grams, for each n
    (ROME `compute_n_gram_entropy`: nltk.FreqDist over nltk.ngrams; 0 when the text has fewer than n words)."""
    tokens = word_tokenize(text)
    out = []
    for n in ns:
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        counts = np.fromiter(grams.values(), dtype=np.float64)
        p = counts / counts.sum() if counts.size else counts
        out.append(0.0 - float((p * np.log2(p)).sum()))
    return out


def text_ngram_entropy(text: str, ns: Sequence[int] = GENERATION_NS,
                       weights: Sequence[float] = GENERATION_WEIGHTS) -> float:
    """ROME `compute_n_gram_entropy` (agg="arith"): mean over n of w_n * H_n, i.e. Σ w_n H_n / len(ns) (equal to
    Σ w_n H_n / Σ w_n for the default weights 2/3, 4/3, which sum to 2)."""
    if len(ns) != len(weights) or not ns:
        raise ValueError("ns and weights must be non-empty and of the same length")
    return float(np.mean(np.asarray(ngram_entropies(text, ns)) * np.asarray(weights, dtype=np.float64)))


def ngram_entropy(texts: Sequence[str], ns: Sequence[int] = GENERATION_NS,
                  weights: Sequence[float] = GENERATION_WEIGHTS) -> float:
    """ROME `n_gram_entropy(gen_texts, agg="arith")`: the mean over texts of `text_ngram_entropy` (REFERENCE.md:
    generation entropy, weights 2/3 and 4/3 on 2- and 3-gram entropies in bits, word tokens; see `word_tokenize`)."""
    if not texts:
        raise ValueError("no texts")
    return float(np.mean([text_ngram_entropy(t, ns, weights) for t in texts]))


def fluency(texts: Sequence[str]) -> float:
    """CounterFact fluency as reported (REFERENCE.md: generation entropy ×100; summarize.py scales by 100)."""
    return 100.0 * ngram_entropy(texts)


# --- generation: TF-IDF consistency ----------------------------------------------------------------------------


def load_tfidf_stats(data_dir: str | Path) -> tuple[np.ndarray, dict[str, int]]:
    """ROME's TF-IDF statistics from `data_dir`: (idf.npy, tfidf_vocab.json) as written by ROME's
    `dsets/tfidf_stats.py` (a `TfidfVectorizer` fitted on the attribute snippets). Not shipped with pmet."""
    data_dir = Path(data_dir)
    idf = np.load(data_dir / "idf.npy")
    with open(data_dir / "tfidf_vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    return idf, {str(k): int(v) for k, v in vocab.items()}


def tfidf_vector(text: str, idf: np.ndarray, vocab: Mapping[str, int]) -> np.ndarray:
    """scikit-learn `TfidfVectorizer().transform` with a fixed vocabulary and idf, in numpy: lowercase, tokens by
    the default token_pattern `(?u)\\b\\w\\w+\\b` (words of 2+ characters), raw term counts of in-vocabulary tokens,
    times idf, l2-normalised (a zero vector stays zero)."""
    idf = np.asarray(idf, dtype=np.float64)
    ids = [vocab[t] for t in SKLEARN_TOKEN_PATTERN.findall(text.lower()) if t in vocab]
    counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=idf.shape[0]).astype(np.float64)
    if counts.shape[0] != idf.shape[0]:
        raise ValueError("vocab has indices beyond the idf vector")
    vec = counts * idf
    norm = np.linalg.norm(vec)
    return vec / norm if norm > 0 else vec


def tfidf_similarity(text_a: str, text_b: str, idf: np.ndarray, vocab: Mapping[str, int]) -> float:
    """ROME `tfidf_similarity`: cosine of the two TF-IDF vectors; NaN when either has no in-vocabulary token
    (ROME divides by a zero norm there)."""
    a, b = tfidf_vector(text_a, idf, vocab), tfidf_vector(text_b, idf, vocab)
    if not a.any() or not b.any():
        return math.nan
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def tfidf_consistency(gen_texts: Sequence[str], reference_texts: Sequence[str], idf: np.ndarray,
                      vocab: Mapping[str, int]) -> float:
    """CounterFact consistency (ROME `test_generation` "reference_score"): TF-IDF cosine between the record's
    generations joined by spaces and its reference texts (attribute snippets of the relation and new target) joined
    by spaces. Needs ROME's idf.npy / tfidf_vocab.json (`load_tfidf_stats`). Reported ×100 (REFERENCE.md)."""
    return tfidf_similarity(" ".join(gen_texts), " ".join(reference_texts), idf, vocab)


# --- aggregation ---------------------------------------------------------------------------------------------


def harmonic_mean(values: Sequence[float]) -> float:
    """n / Σ 1/x (scipy.stats.hmean, as MEMIT's Score = hmean(efficacy, generalisation, specificity)); 0 if any
    value is 0."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values")
    if any(x < 0 for x in xs):
        raise ValueError("harmonic mean needs non-negative values")
    if any(x == 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def mean_ci95(values: Sequence[float] | Tensor | np.ndarray) -> tuple[float, float]:
    """(mean, 1.96 · std / sqrt(n)) with the population std (ddof=0): ROME/MEMIT `summarize.py` keep
    (np.mean(x), np.std(x)) per metric, and the 95% interval is the normal approximation from that std."""
    if isinstance(values, Tensor):
        values = values.detach().double().cpu().numpy()
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("no values")
    return float(x.mean()), float(1.96 * x.std() / math.sqrt(x.size))


def record_means(record: Mapping[str, Sequence[bool | float]], name: str = "record") -> dict[str, float]:
    """A record's value for each metric: the mean of its per-prompt values (ROME/MEMIT `summarize.py`)."""
    out = {}
    for key, vals in record.items():
        if len(vals) == 0:
            raise ValueError(f"{name} has no values for {key!r}")
        out[key] = float(np.mean(np.asarray(vals, dtype=np.float64)))
    return out


def aggregate_records(per_record: Sequence[Mapping[str, Sequence[bool | float]]]) -> dict[str, dict[str, float]]:
    """CounterFact/zsRE aggregation (ROME/MEMIT `summarize.py`): each record's value for a metric is the mean of its
    per-prompt values (efficacy: its rewrite prompt; generalisation: its paraphrases; specificity: its neighbourhood
    prompts; for zsRE pass per-token hits, which summarize.py pools per record), then mean ± 95% CI over the records
    that have that metric. Returns {metric: {"mean", "ci95", "n"}}, plus {"score": {"mean"}}, the harmonic mean of
    the efficacy, generalisation and specificity means when all three are present (REFERENCE.md: Score). Values are
    fractions; the papers report them ×100."""
    per_metric: dict[str, list[float]] = {}
    for i, record in enumerate(per_record):
        for key, value in record_means(record, name=f"record {i}").items():
            per_metric.setdefault(key, []).append(value)
    out: dict[str, dict[str, float]] = {}
    for key, means in per_metric.items():
        mean, ci = mean_ci95(means)
        out[key] = {"mean": mean, "ci95": ci, "n": len(means)}
    parts = ("efficacy", "generalization", "specificity")
    if all(k in out for k in parts):
        out["score"] = {"mean": harmonic_mean([out[k]["mean"] for k in parts])}
    return out
