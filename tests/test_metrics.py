"""pmet.evaluation.metrics on hand-made cases (no model): teacher-forced scoring, CounterFact comparisons,
n-gram entropy, TF-IDF consistency, aggregation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pmet.evaluation import metrics as M
from pmet.prompts import pad_right

V = 4


def _dist(*probs: float) -> torch.Tensor:
    """Logits whose log_softmax is exactly log(probs)."""
    return torch.tensor(probs, dtype=torch.float64).log()


@pytest.fixture
def batch():
    """Row 0: prompt [0, 1] + target [2, 3]; row 1: prompt [1, 2] + target [3], right-padded with 0 to width 4.

    Predicting positions (prompt_len + j - 1): row 0 -> 1, 2; row 1 -> 1. Every other position holds a decoy
    distribution that a prompt_len + j convention (or reading padding) would pick up instead.
    """
    ids, _ = pad_right([(0, 1, 2, 3), (1, 2, 3)], pad_id=0)
    logits = torch.zeros(2, 4, V, dtype=torch.float64)  # uniform decoys: P = 0.25 everywhere
    logits[0, 1] = _dist(0.1, 0.2, 0.4, 0.3)  # predicts row-0 target 2: P = 0.4, argmax 2 (hit)
    logits[0, 2] = _dist(0.1, 0.5, 0.1, 0.3)  # predicts row-0 target 3: P = 0.3, argmax 1 (miss)
    logits[1, 1] = _dist(0.2, 0.2, 0.2, 0.4)  # predicts row-1 target 3: P = 0.4, argmax 3 (hit)
    logits[1, 2] = _dist(0.8, 0.05, 0.05, 0.1)  # decoy at prompt_len + 0 for row 1: P(3) = 0.1, argmax 0
    logits[1, 3] = torch.tensor([50.0, -50.0, 7.0, 9.0], dtype=torch.float64)  # padding: must be ignored
    return logits, ids, torch.tensor([2, 2]), torch.tensor([2, 1])


def _reference_mean_logprob(logits, ids, prompt_lens, target_lens) -> list[float]:
    """ROME's `test_batch_prediction` loop, on explicit ids."""
    out = []
    for i in range(ids.shape[0]):
        p, n = int(prompt_lens[i]), int(target_lens[i])
        total = sum(torch.log_softmax(logits[i, p + j - 1].double(), -1)[ids[i, p + j]].item() for j in range(n))
        out.append(total / n)
    return out


def test_mean_logprob_exact_values(batch):
    got = M.mean_logprob_of_continuations(*batch)
    expected = torch.tensor([(math.log(0.4) + math.log(0.3)) / 2, math.log(0.4)])
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(M.sum_logprob_of_continuations(*batch),
                               torch.tensor([math.log(0.4) + math.log(0.3), math.log(0.4)]).float(), rtol=0, atol=1e-6)


def test_mean_logprob_uses_previous_position(batch):
    """With logits read at prompt_len + j (off by one) row 0 would give log(0.1*0.25)/2 and row 1 log(0.1)."""
    got = M.mean_logprob_of_continuations(*batch)
    wrong = torch.tensor([(math.log(0.1) + math.log(0.25)) / 2, math.log(0.1)]).float()
    assert not torch.allclose(got, wrong, atol=1e-3)
    logits, ids, prompt_lens, target_lens = batch
    shifted = torch.roll(logits, shifts=1, dims=1)  # what position p used to predict now sits at p + 1
    assert not torch.allclose(M.mean_logprob_of_continuations(shifted, ids, prompt_lens, target_lens), got, atol=1e-3)


def test_mean_logprob_ignores_padding_and_pad_ids(batch):
    logits, ids, prompt_lens, target_lens = batch
    ids2, logits2 = ids.clone(), logits.clone()
    ids2[1, 3] = 2
    logits2[1, 3] = torch.randn(V, dtype=torch.float64)
    torch.testing.assert_close(M.mean_logprob_of_continuations(logits2, ids2, prompt_lens, target_lens),
                               M.mean_logprob_of_continuations(logits, ids, prompt_lens, target_lens))


def test_mean_logprob_matches_reference_loop_on_random_batch():
    g = torch.Generator().manual_seed(0)
    prompts = [(5, 1, 7), (2,), (3, 3, 3, 3, 9)]
    targets = [(4, 4, 0), (8, 1), (6,)]
    ids, _ = pad_right([p + t for p, t in zip(prompts, targets, strict=True)], pad_id=11)
    logits = torch.randn(ids.shape[0], ids.shape[1], 12, generator=g)
    prompt_lens = torch.tensor([len(p) for p in prompts])
    target_lens = torch.tensor([len(t) for t in targets])
    got = M.mean_logprob_of_continuations(logits, ids, prompt_lens, target_lens)
    expected = torch.tensor(_reference_mean_logprob(logits, ids, prompt_lens, target_lens), dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_half_precision_logits_are_scored_in_float32(batch):
    logits, ids, prompt_lens, target_lens = batch
    got = M.mean_logprob_of_continuations(logits.half(), ids, prompt_lens, target_lens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, M.mean_logprob_of_continuations(*batch), rtol=0, atol=2e-3)


def test_bad_lengths_rejected(batch):
    logits, ids, _, _ = batch
    with pytest.raises(ValueError):
        M.mean_logprob_of_continuations(logits, ids, torch.tensor([0, 2]), torch.tensor([2, 1]))
    with pytest.raises(ValueError):
        M.mean_logprob_of_continuations(logits, ids, torch.tensor([2, 2]), torch.tensor([3, 1]))
    with pytest.raises(ValueError):
        M.mean_logprob_of_continuations(logits, ids, torch.tensor([2, 2]), torch.tensor([2, 0]))


def test_token_accuracy_and_exact_match(batch):
    torch.testing.assert_close(M.token_accuracy(*batch), torch.tensor([0.5, 1.0]))
    assert M.target_exact_match(*batch).tolist() == [False, True]
    hits, mask = M.target_token_correct(*batch)
    assert hits.tolist() == [[True, False], [True, False]]
    assert mask.tolist() == [[True, True], [True, False]]


def test_token_accuracy_is_off_by_one_sensitive(batch):
    """Read at prompt_len + j, the argmaxes would be 1, 0 (row 0) and 0 (row 1): accuracy [0, 0] instead."""
    logits, ids, prompt_lens, target_lens = batch
    shifted = torch.roll(logits, shifts=1, dims=1)
    torch.testing.assert_close(M.token_accuracy(shifted, ids, prompt_lens, target_lens), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(M.token_accuracy(*batch), torch.tensor([0.5, 1.0]))


def test_counterfact_comparisons_and_magnitudes():
    new = torch.tensor([-1.0, -2.0, -1.0])
    true = torch.tensor([-2.0, -1.0, -1.0])
    assert M.efficacy_success(new, true).tolist() == [True, False, False]
    assert M.specificity_success(new, true).tolist() == [False, True, False]  # ties fail both ways
    assert M.counterfact_prob_comparison(new, true).tolist() == [True, False, False]
    assert M.counterfact_prob_comparison(new, true, direction="true").tolist() == [False, True, False]
    with pytest.raises(ValueError):
        M.counterfact_prob_comparison(new, true, direction="up")
    e1, e2 = math.exp(-1), math.exp(-2)
    torch.testing.assert_close(M.efficacy_magnitude(new, true), torch.tensor([e1 - e2, e2 - e1, 0.0]))
    torch.testing.assert_close(M.specificity_magnitude(new, true), torch.tensor([e2 - e1, e1 - e2, 0.0]))


def test_word_tokenize():
    assert M.word_tokenize("Paris, France's capital.") == ["Paris", ",", "France", "'", "s", "capital", "."]


def test_ngram_entropy_hand_values():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # ab, ba, ab
    h3 = 1.0  # aba, bab
    assert M.ngram_entropies("a b a b") == pytest.approx([h2, h3])
    one = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert M.text_ngram_entropy("a b a b") == pytest.approx(one)
    assert M.text_ngram_entropy("a a a") == 0.0  # one 2-gram type, one 3-gram type
    assert M.text_ngram_entropy("a") == 0.0  # no n-grams at all
    assert M.ngram_entropy(["a b a b", "a a a"]) == pytest.approx(one / 2)
    assert M.fluency(["a b a b", "a a a"]) == pytest.approx(100 * one / 2)
    # ROME's mean of w_n * H_n, not Σ w H / Σ w, for non-default weights
    assert M.text_ngram_entropy("a b a b", ns=(2, 3), weights=(1.0, 1.0)) == pytest.approx((h2 + h3) / 2)
    assert M.text_ngram_entropy("a b a b", ns=(2,), weights=(2.0,)) == pytest.approx(2 * h2)
    with pytest.raises(ValueError):
        M.ngram_entropy([])


def test_harmonic_mean():
    assert M.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert M.harmonic_mean([1.0, 0.0, 0.7]) == 0.0
    with pytest.raises(ValueError):
        M.harmonic_mean([1.0, -0.5])
    with pytest.raises(ValueError):
        M.harmonic_mean([])


def test_mean_ci95():
    mean, ci = M.mean_ci95([0, 1, 0, 1])
    assert mean == 0.5
    assert ci == pytest.approx(1.96 * 0.5 / 2)  # population std 0.5 (ddof=0)
    assert M.mean_ci95(torch.tensor([0.0, 1.0, 0.0, 1.0])) == pytest.approx((0.5, 0.49))
    assert M.mean_ci95([True, False]) == pytest.approx((0.5, 1.96 * 0.5 / math.sqrt(2)))
    assert M.mean_ci95([3.0]) == (3.0, 0.0)


def test_aggregate_records_means_per_record_first():
    records = [
        {"efficacy": [True], "generalization": [True, False], "specificity": [True, True, True, False]},
        {"efficacy": [False], "generalization": [True, True, True], "specificity": [True, True]},
    ]
    out = M.aggregate_records(records)
    assert out["efficacy"] == pytest.approx({"mean": 0.5, "ci95": 1.96 * 0.5 / math.sqrt(2), "n": 2})
    # per-record means 0.5 and 1.0 (pooling the prompts would give 4/5)
    assert out["generalization"] == pytest.approx({"mean": 0.75, "ci95": 1.96 * 0.25 / math.sqrt(2), "n": 2})
    # per-record means 0.75 and 1.0 (pooling would give 5/6)
    assert out["specificity"] == pytest.approx({"mean": 0.875, "ci95": 1.96 * 0.125 / math.sqrt(2), "n": 2})
    assert out["score"]["mean"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.75 + 1 / 0.875))


def test_aggregate_records_missing_and_empty():
    out = M.aggregate_records([{"efficacy": [1.0], "fluency": [6.0]}, {"efficacy": [0.0]}])
    assert out["fluency"] == {"mean": 6.0, "ci95": 0.0, "n": 1}
    assert "score" not in out
    with pytest.raises(ValueError):
        M.aggregate_records([{"efficacy": []}])


VOCAB = {"paris": 0, "france": 1, "berlin": 2, "germany": 3, "a": 4}
IDF = np.array([1.0, 2.0, 1.5, 1.0, 5.0])


def test_tfidf_identical_and_disjoint():
    assert M.tfidf_similarity("Paris is in France", "Paris is in France", IDF, VOCAB) == pytest.approx(1.0)
    assert M.tfidf_similarity("Paris, France", "Berlin, Germany", IDF, VOCAB) == 0.0
    assert math.isnan(M.tfidf_similarity("Paris", "nothing known here", IDF, VOCAB))


def test_tfidf_hand_value_and_sklearn_tokenization():
    # counts [2, 1] * idf [1, 2] = [2, 2] against [1, 0]: cos = 2 / sqrt(8)
    assert M.tfidf_similarity("paris PARIS france", "Paris", IDF, VOCAB) == pytest.approx(2 / math.sqrt(8))
    # sklearn's default token_pattern drops 1-character words, so "a" never counts even though it is in the vocab
    np.testing.assert_allclose(M.tfidf_vector("a Paris a", IDF, VOCAB), M.tfidf_vector("Paris", IDF, VOCAB))
    np.testing.assert_allclose(np.linalg.norm(M.tfidf_vector("Paris France Berlin", IDF, VOCAB)), 1.0)


def test_tfidf_consistency_joins_texts(tmp_path):
    assert M.tfidf_consistency(["Paris", "France"], ["paris france"], IDF, VOCAB) == pytest.approx(1.0)
    np.save(tmp_path / "idf.npy", IDF)
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps(VOCAB))
    idf, vocab = M.load_tfidf_stats(tmp_path)
    np.testing.assert_array_equal(idf, IDF)
    assert vocab == VOCAB
