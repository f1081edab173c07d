"""Evaluation of edits: the ROME/MEMIT CounterFact and zsRE metrics (docs/REFERENCE.md, "Evaluation conventions")."""

from __future__ import annotations

from typing import Any

__all__ = [
    "aggregate_records",
    "counterfact_prob_comparison",
    "efficacy_magnitude",
    "efficacy_success",
    "fluency",
    "harmonic_mean",
    "load_tfidf_stats",
    "mean_ci95",
    "mean_logprob_of_continuations",
    "ngram_entropy",
    "specificity_magnitude",
    "specificity_success",
    "sum_logprob_of_continuations",
    "target_exact_match",
    "target_token_correct",
    "target_token_logprobs",
    "text_ngram_entropy",
    "tfidf_consistency",
    "tfidf_similarity",
    "tfidf_vector",
    "token_accuracy",
    "word_tokenize",
]


def __getattr__(name: str) -> Any:
    """The metric functions, imported from .metrics on first use (the CLI starts without torch)."""
    if name not in __all__:
        raise AttributeError(f"module 'pmet.evaluation' has no attribute {name!r}")
    from . import metrics

    return getattr(metrics, name)
