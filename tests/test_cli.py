"""The `pmet` command as a user runs it: bad input gives one line and no output; edit/apply/revert round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import STATS_TOKENS


def run_pmet(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmet.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=1200)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


GOOD = {"subject": "Kenya", "prompt": "{} is a country in", "target_new": "Asia", "target_true": "Africa"}


@pytest.mark.parametrize(
    "content, needles",
    [
        (json.dumps(GOOD) + "\n{not json\n", ["record 2", "malformed JSON"]),
        (json.dumps({k: v for k, v in GOOD.items() if k != "target_new"}) + "\n", ["record 1", "target_new"]),
        (json.dumps({**GOOD, "prompt": "The capital city is"}) + "\n", ["record 1", "'prompt'", "not found"]),
        (json.dumps({**GOOD, "target_new": "  "}) + "\n", ["record 1", "'target_new'"]),
    ],
    ids=["malformed-json", "missing-field", "subject-not-found", "empty-target"],
)
def test_bad_requests_give_one_line_and_no_output(tmp_path, content, needles):
    req = tmp_path / "reqs.jsonl"
    req.write_text(content)
    report, out = tmp_path / "report.json", tmp_path / "out"
    proc = run_pmet("edit", "--requests", str(req), "--report", str(report), "--out", str(out))
    assert_one_line_error(proc, str(req), *needles)
    assert not report.exists() and not out.exists()


def test_unknown_model(tmp_path, examples_path):
    report = tmp_path / "report.json"
    proc = run_pmet("edit", "--model", "no-such/model-xyz", "--requests", str(examples_path), "--report",
                    str(report))
    assert_one_line_error(proc, "cannot load model 'no-such/model-xyz'")
    assert not report.exists()


def test_bad_set_item_fails_before_loading_anything(tmp_path, examples_path):
    out = tmp_path / "out"
    proc = run_pmet("eval", "--data", str(tmp_path / "not-read.json"), "--out", str(out), "--set", "speed=fast")
    assert_one_line_error(proc, "--set 'speed=fast'", "unknown config field 'speed'")
    proc = run_pmet("edit", "--requests", str(examples_path), "--out", str(out), "--set", "layers")
    assert_one_line_error(proc, "--set 'layers'", "expected FIELD=VALUE")
    assert not out.exists()


@pytest.mark.slow
def test_unreadable_corpus(tmp_path, examples_path, smol):
    report = tmp_path / "report.json"
    proc = run_pmet("edit", "--requests", str(examples_path), "--corpus", str(tmp_path / "missing.txt"),
                    "--report", str(report), "--limit", "1")
    assert_one_line_error(proc, "missing.txt")
    assert not report.exists()
    proc = run_pmet("stats", "--corpus", str(tmp_path / "missing.txt"), "--tokens", "100")
    assert_one_line_error(proc, "missing.txt")


@pytest.mark.slow
def test_edit_apply_revert_round_trip(tmp_path, examples_path, wiki_corpus, smol):
    reqs = tmp_path / "two.jsonl"
    reqs.write_text("".join(ln + "\n" for ln in examples_path.read_text().splitlines()[:2]))
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("layers: [3, 4, 5, 6, 7]\nv_num_grad_steps: 8\nv_lr: 0.5\nclamp_norm_factor: 1.5\n"
                   "mom2_update_weight: 6000\nkl_factor: 0.0625\n")
    out, report = tmp_path / "out", tmp_path / "report.json"
    proc = run_pmet("edit", "--requests", str(reqs), "--config", str(cfg), "--corpus", str(wiki_corpus),
                    "--stats-tokens", str(STATS_TOKENS), "--report", str(report), "--out", str(out),
                    "--save-model", "--quiet")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert set(data) >= {"model", "config", "timings", "requests"}
    r0 = data["requests"][0]
    assert set(r0) >= {"subject", "prompt", "target_new", "before", "after", "checks"}
    assert set(r0["before"]) == {"top1", "p_target_new", "answer", "states_new"}
    assert 0 <= r0["after"]["p_target_new"] <= 1
    from pmet.evaluation.wild import states  # both protocols per prompt: the greedy answer and its verdict

    for m in [r0["before"], r0["after"], *(c[w] for c in r0["checks"] for w in ("before", "after"))]:
        assert m["states_new"] == states(m["answer"], r0["target_new"])
    assert "Greedy answers stating target_new" in proc.stdout
    assert {c["kind"] for c in r0["checks"]} == {"paraphrase", "neighborhood"}
    assert r0["after"]["p_target_new"] > r0["before"]["p_target_new"]
    assert (out / "patch.safetensors").exists() and (out / "model" / "config.json").exists()

    # apply the patch to the base model: same bits as the model the edit saved
    applied = tmp_path / "applied"
    proc = run_pmet("apply", str(out), "--model", "smollm2-135m", "--out", str(applied))
    assert proc.returncode == 0, proc.stderr
    edited_w = load_file(str(out / "model" / "model.safetensors"))
    applied_w = load_file(str(applied / "model.safetensors"))
    assert edited_w.keys() == applied_w.keys()
    assert all(torch.equal(edited_w[k], applied_w[k]) for k in edited_w)

    # applying it again to the edited model is refused
    proc = run_pmet("apply", str(out), "--model", str(applied), "--out", str(tmp_path / "twice"))
    assert_one_line_error(proc, "already edited")
    assert not (tmp_path / "twice").exists()

    # revert restores the base weights bit-exactly
    reverted = tmp_path / "reverted"
    proc = run_pmet("revert", str(out), "--model", str(applied), "--out", str(reverted))
    assert proc.returncode == 0, proc.stderr
    rev_w = load_file(str(reverted / "model.safetensors"))
    base = smol.model.state_dict()
    assert all(torch.equal(rev_w[k], base[k]) for k in rev_w)
    assert not (reverted / "README.md").exists()  # the base model again: no edited-model card

    # the patch is compact (< 1 MB) and says what it holds without a model; the saved model carries a card
    assert (out / "patch.safetensors").stat().st_size < 1_000_000
    proc = run_pmet("show", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "compact" in proc.stdout and proc.stdout.count("factors, rank 2") == 5
    card = (out / "model" / "README.md").read_text()
    assert "not the original smollm2-135m" in card and r0["subject"] in card

    # the edited model as a GGUF file, read back by transformers' own GGUF loader: the edited weights exactly
    proc = run_pmet("export", str(out), "--model", "smollm2-135m", "--gguf", str(tmp_path / "edited.gguf"))
    assert proc.returncode == 0, proc.stderr
    import gguf
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="edited.gguf").state_dict()
    assert all(torch.equal(back[k], edited_w[k]) for k in edited_w)
    edits = gguf.GGUFReader(str(tmp_path / "edited.gguf")).get_field("pmet.edits").contents()
    assert [e["new"] for e in json.loads(edits)] == [r["target_new"] for r in data["requests"]]
