"""Perplexity drift and top-1 agreement on held-out text (pmet/evaluation/drift.py)."""

from __future__ import annotations

import math

import pytest
import torch

from pmet.errors import ConfigError
from pmet.evaluation.drift import drift_metrics, language_stats, text_chunks

from .tiny import SENTENCES, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text("\n".join(SENTENCES * 300), encoding="utf-8")
    return path


def test_chunks_are_consecutive_tokens_of_the_text(text, tmp_path):
    tok = tiny_tokenizer()
    rows = text_chunks(tok, text, chunks=3, length=10)
    ids = tok(text.read_text()[:2000], add_special_tokens=False)["input_ids"]
    assert rows == [ids[0:10], ids[10:20], ids[20:30]]  # the tiny tokenizer adds no BOS
    with pytest.raises(ConfigError, match="fewer than the 300000 needed"):
        text_chunks(tok, text, chunks=3000, length=100)
    with pytest.raises(ConfigError, match="cannot read"):
        text_chunks(tok, tmp_path / "missing.txt")


def test_language_stats_and_drift_by_hand(text):
    """NLL and argmax per chunk equal a one-chunk-at-a-time computation; an unchanged model has zero drift and
    full agreement; a perturbed one has neither."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = text_chunks(tok, text, chunks=10, length=12)  # two forward batches (BATCH = 8)
    stats = language_stats(model, rows)
    for row, nll, am in zip(rows, stats["nll"], stats["argmax"], strict=True):
        logits = model(input_ids=torch.tensor([row])).logits[0, :-1].float()
        want = -torch.log_softmax(logits, -1)[torch.arange(len(row) - 1), torch.tensor(row[1:])].mean()
        assert nll == pytest.approx(float(want), rel=1e-5)
        assert am == logits.argmax(-1).tolist()
    same = drift_metrics(stats, stats)
    assert same["perplexity_delta"]["mean"] == 0.0 and same["top1_agreement"]["mean"] == 1.0
    assert same["perplexity"]["mean"] == pytest.approx(math.exp(sum(stats["nll"]) / 10))
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    moved = drift_metrics(stats, language_stats(model, rows))
    assert moved["top1_agreement"]["mean"] < 1.0 and moved["perplexity_delta"]["mean"] != 0.0
    assert moved["perplexity_delta"]["ci95"] > 0 and moved["perplexity_delta"]["n"] == 10


def test_run_eval_reports_drift_or_says_why_not(text, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pmet.evaluation.evaluate import EvalOptions
    from pmet.evaluation.report import markdown_table
    from pmet.evaluation.run import run_eval

    from .test_engine import TEMPLATES, cfg_for, identity_c0
    from .test_eval import _records

    model, tok = tiny_model("llama"), tiny_tokenizer()
    lm = SimpleNamespace(model=model, tok=tok, name="tiny-llama")
    kw = dict(cache_dir=tmp_path / "cache", progress=False, context_templates=TEMPLATES,
              c0=identity_c0(model, [1, 2]))
    s = run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "a",
                 opts=EvalOptions(generation=False, drift_text=str(text)), **kw)
    u, e = s["unedited"]["metrics"], s["metrics"]
    assert u["perplexity_delta"]["mean"] == 0.0 and u["top1_agreement"]["mean"] == 1.0
    assert e["perplexity"]["mean"] == pytest.approx(u["perplexity"]["mean"] + e["perplexity_delta"]["mean"],
                                                    rel=0.2)  # the mean of per-chunk differences, roughly
    assert e["top1_agreement"]["n"] == 32 and 0 < e["top1_agreement"]["mean"] <= 1
    assert "ΔPPL" in markdown_table([s]).splitlines()[0]
    monkeypatch.setenv("PMET_DATA_DIR", str(tmp_path / "no-data"))
    s = run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "b", opts=EvalOptions(generation=False), **kw)
    assert s["metrics"]["perplexity_delta"]["mean"] is None and "--drift-text" in s["metrics"]["perplexity_delta"][
        "note"]
    s = run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "c", opts=EvalOptions(generation=False, drift=False),
                 **kw)
    assert "perplexity_delta" not in s["metrics"]
