"""Curves of sequential edits (pmet/evaluation/curve.py) on tiny random models (fast)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pmet.errors import ConfigError
from pmet.evaluation import curve as C
from pmet.evaluation import run as R
from pmet.evaluation.cli import _curve_spec
from pmet.evaluation.data import EvalRecord
from pmet.evaluation.evaluate import EvalOptions
from pmet.requests import make_request

from .test_engine import TEMPLATES, cfg_for, identity_c0
from .test_eval import die_in_the_edited_evaluation
from .tiny import SENTENCES, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

FACTS = [("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
         ("Toko Yasuda", "{} plays the", "piano keyboard", "guitar"),
         ("Autonomous University of Madrid", "{}, which is located in", "Rome", "Spain")]


def _records() -> list[EvalRecord]:
    return [EvalRecord(make_request(s, p, new, true, paraphrase_prompts=[f"Everyone knows that {s}"],
                                    neighborhood_prompts=[p.format("Léon Blum"), p.format("Michel Rocard")]),
                       i, "counterfact", "rome") for i, (s, p, new, true) in enumerate(FACTS)]


@pytest.fixture
def setup(tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("\n".join(SENTENCES * 300), encoding="utf-8")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    lm = SimpleNamespace(model=model, tok=tok, name="tiny-llama")
    kw = dict(opts=EvalOptions(generation=False, drift_text=str(text)), cache_dir=tmp_path / "cache",
              progress=False, context_templates=TEMPLATES, sequential_batches=1, c0=identity_c0(model, [1, 2]))
    return lm, kw


def test_sample_is_fixed_and_spread_over_the_run():
    assert C.sample_indices(10, 4) == [0, 2, 5, 7]
    assert C.sample_indices(3, 100) == [0, 1, 2]


def test_curve_points_agree_with_the_runs_own_evaluation(setup, tmp_path):
    """A point after every batch of 1: at 0 edits the unedited model's specificity and perplexity; after the
    last, the same efficacy, generalization, specificity (the sample is every record) and perplexity as the
    run's final evaluation; in between, efficacy over the records edited so far."""
    lm, kw = setup
    s = R.run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "a", curve=C.CurveSpec(every=1), **kw)
    curve = json.loads((tmp_path / "a" / "curve.json").read_text())
    assert (tmp_path / "a" / "curve.png").stat().st_size > 0
    assert [p["edits"] for p in curve["points"]] == [0, 1, 2, 3] and s["curve_points"] == 4
    first, last = curve["points"][0]["metrics"], curve["points"][-1]["metrics"]
    assert "efficacy" not in first
    for key in ("specificity", "perplexity"):
        assert first[key]["mean"] == pytest.approx(s["unedited"]["metrics"][key]["mean"], abs=1e-9)
    for key in ("efficacy", "generalization", "specificity", "efficacy_magnitude", "perplexity",
                "perplexity_delta", "top1_agreement"):
        assert last[key]["mean"] == pytest.approx(s["metrics"][key]["mean"], abs=1e-6), key
    assert [p["metrics"]["efficacy"]["n"] for p in curve["points"][1:]] == [1, 2, 3]
    assert curve["step_size"] == 1 and curve["neighbourhood_sample"] == [0, 1, 2]
    assert s["timings"]["curve"] > 0


def test_every_m_steps_and_the_last(setup, tmp_path):
    lm, kw = setup
    R.run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "a", curve=C.CurveSpec(every=2, sample=1), **kw)
    curve = json.loads((tmp_path / "a" / "curve.json").read_text())
    assert [p["edits"] for p in curve["points"]] == [0, 2, 3]
    assert [p["metrics"]["specificity"]["n"] for p in curve["points"]] == [1, 1, 1]


def test_a_resumed_run_keeps_the_points_measured_before_it_stopped(setup, tmp_path, monkeypatch):
    lm, kw = setup
    spec = C.CurveSpec(every=1)
    fresh = R.run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "fresh", curve=spec, **kw)
    real = die_in_the_edited_evaluation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        R.run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "a", curve=spec, **kw)
    [saved] = (tmp_path / "cache" / "sequential").glob("*.curve.json")
    monkeypatch.setattr(R, "evaluate_records", real)
    measured = []
    real_point = C.Curve._point
    monkeypatch.setattr(C.Curve, "_point", lambda self, *a: measured.append(a) or real_point(self, *a))
    resumed = R.run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "a", curve=spec, **kw)
    assert resumed["resumed_edits"] == 3 and measured == []  # every point came from the saved file
    assert not saved.exists() and not list((tmp_path / "cache" / "sequential").iterdir())
    got = json.loads((tmp_path / "a" / "curve.json").read_text())["points"]
    want = json.loads((tmp_path / "fresh" / "curve.json").read_text())["points"]
    assert got == want and fresh["curve_points"] == resumed["curve_points"] == 4


def test_curve_needs_a_sequential_edit():
    with pytest.raises(ConfigError, match="--curve-every needs a sequential edit"):
        _curve_spec(1, 100, "pmet", None, 10)
    with pytest.raises(ConfigError, match="needs a sequential edit"):
        _curve_spec(1, 100, "memit", 10, 10)
    assert _curve_spec(2, 5, "memit", 5, 10) == C.CurveSpec(every=2, sample=5)
    assert _curve_spec(1, 100, "rome", None, 10) == C.CurveSpec(every=1)
    assert _curve_spec(None, 100, "pmet", None, 10) is None
