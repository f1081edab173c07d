"""Every method on the real embedded model: PMET, MEMIT, ROME and FT-W each flip at least 4 of 5 CounterFact edits
(dev-slice records whose new target the model does not already prefer), and `pmet eval` end to end on 10 records."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pmet.cli import app
from pmet.config import load_config
from pmet.evaluation.data import load_eval_records
from pmet.evaluation.evaluate import EvalOptions, evaluate_records
from pmet.methods.apply import apply_method

pytestmark = pytest.mark.slow

CF = "counterfact_rome_subsets/counterfact_rome_format_subset.json"


@pytest.fixture(scope="module")
def unflipped(smol, data_dir):
    """Five dev-slice records with P(new) < P(true) on the rewrite prompt before any edit, and their results."""
    recs = load_eval_records(data_dir / CF, "counterfact", n=15, slice_="dev")
    res = evaluate_records(smol.model, smol.tok, recs, EvalOptions(generation=False))
    keep = [i for i, r in enumerate(res) if r["metrics"]["efficacy"] == [0.0]][:5]
    assert len(keep) == 5
    return [recs[i] for i in keep], [res[i] for i in keep]


# "small config": fewer optimisation steps than the presets where that still flips the edits
SMALL = {"pmet": {"v_num_grad_steps": 20}, "memit": {"v_num_grad_steps": 20}, "rome": {}, "ft": {}}


@pytest.mark.parametrize("method", ["pmet", "memit", "rome", "ft"])
def test_each_method_flips_edits(method, smol, smol_c0, unflipped):
    recs, before = unflipped
    cfg = load_config("smollm2-135m", method=method, **SMALL[method])
    base = {k: v.clone() for k, v in smol.model.state_dict().items()}
    res = apply_method(method, smol.model, smol.tok, [r.request for r in recs], cfg, c0=smol_c0, progress=False)
    try:
        after = evaluate_records(smol.model, smol.tok, recs, EvalOptions(generation=False), reference=before)
        flipped = sum(a["metrics"]["efficacy"] == [1.0] for a in after)
        assert flipped >= 4, f"{method}: {flipped}/5 edits flipped"
        edited = {w for w in base if not torch.equal(base[w], smol.model.state_dict()[w])}
        assert edited == {u.weight for u in res.updates}
        assert len(edited) == (len(cfg.layers) if method == "pmet" or method == "memit" else 1)
        if method == "memit":  # MEMIT's own stopping rule: loss < 0.05 or the budget, never the argmax/KL rule
            assert all(d.stop in ("loss", "budget") for d in res.targets.diagnostics)
    finally:
        res.revert(smol.model)
    assert all(torch.equal(base[k], v) for k, v in smol.model.state_dict().items())


def test_pmet_eval_end_to_end(data_dir, wiki_corpus, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--method", "pmet", "--data", str(data_dir / CF), "--slice", "dev", "--edits", "10",
            "--generation-prompts", "1", "--generation-length", "40", "--corpus", str(wiki_corpus),
            "--stats-tokens", "20000", "--out", str(out), "-q", "--set", "v_batch_size=5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "pmet" and summary["n"] == 10 and summary["dataset"] == "counterfact"
    assert summary["settings"] == {"v_batch_size": 5} and summary["config"]["v_batch_size"] == 5  # preset: 32
    for state in (summary["metrics"], summary["unedited"]["metrics"]):
        for key in ("efficacy", "generalization", "specificity"):
            assert 0.0 <= state[key]["mean"] <= 1.0 and state[key]["ci95"] >= 0.0 and state[key]["n"] == 10
        assert state["score"]["mean"] > 0 and state["fluency"]["mean"] > 100
        assert state["consistency"]["mean"] is None  # no reference texts given: not available
    assert summary["metrics"]["efficacy"]["mean"] > summary["unedited"]["metrics"]["efficacy"]["mean"]
    assert summary["unedited"]["metrics"]["easyedit_locality"]["mean"] == 1.0
    assert {"eval_unedited", "edit_targets", "edit_update", "eval_edited"} <= set(summary["timings"])
    assert len(summary["delta_norms"]) == 5
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 10
    rec = json.loads(lines[0])
    assert {"unedited", "edited", "request"} <= set(rec) and len(rec["edited"]["generations"]) == 1
    table = (out / "summary.md").read_text().splitlines()
    assert table[2].startswith("| unedited |") and table[3].startswith("| pmet |")
    assert (out / "metrics.png").stat().st_size > 0 and (out / "margins.png").stat().st_size > 0


def test_pmet_eval_wild_protocol_end_to_end(data_dir, wiki_corpus, tmp_path):
    """`pmet eval --protocol wild` on 5 records: both protocols in one summary, for the unedited model too; the
    unedited SmolLM2 almost never answers a counterfactual target on its own."""
    out = tmp_path / "wild"
    args = ["eval", "--method", "pmet", "--data", str(data_dir / CF), "--slice", "dev", "--edits", "5",
            "--no-generation", "--protocol", "wild", "--corpus", str(wiki_corpus), "--stats-tokens", "20000",
            "--out", str(out), "-q", "--set", "v_batch_size=5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    for state in (summary["metrics"], summary["unedited"]["metrics"]):
        for key in ("wild_efficacy", "wild_generalization", "wild_specificity", "efficacy"):
            assert 0.0 <= state[key]["mean"] <= 1.0 and state[key]["ci95"] >= 0.0 and state[key]["n"] == 5
        assert set(state["wild_by_context"]) == {"bare", "qa", "chat"}  # SmolLM2-Instruct has a chat template
        assert state["wild_by_context"]["bare"]["efficacy"] == state["wild_efficacy"]
    assert summary["unedited"]["metrics"]["wild_efficacy"]["mean"] <= 0.2
    assert summary["eval_options"]["wild"] is True
    rec = json.loads((out / "records.jsonl").read_text().splitlines()[0])
    assert len(rec["edited"]["wild"]["chat"]) == len(rec["unedited"]["wild"]["chat"]) > 2
    header = (out / "summary.md").read_text().splitlines()[0]
    assert "Wild eff." in header and "Efficacy" in header


def test_eval_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"case_id": 3, "requested_rewrite": {"prompt": "{} is in", "subject": "X",
                                                                    "target_new": {"str": ""},
                                                                    "target_true": {"str": "Paris"}}}]))
    result = CliRunner().invoke(app, ["eval", "--data", str(bad), "--slice", "all", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "record 1" in result.output and "target_new" in result.output
    assert not (tmp_path / "o").exists()
