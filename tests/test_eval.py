"""Evaluation pipeline, baselines, target cache and causal tracing on tiny random models (fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pmet.arch import get_weight, layout_of
from pmet.config import PMETConfig, load_config
from pmet.editor import edit
from pmet.errors import ConfigError, RequestError
from pmet.evaluation import metrics as M
from pmet.evaluation.data import EvalRecord, in_dev_slice, load_eval_records
from pmet.evaluation.evaluate import EvalOptions, evaluate_records, summarize
from pmet.evaluation.report import markdown_table
from pmet.evaluation.scoring import score_rows
from pmet.methods.apply import apply_method
from pmet.methods.ft import edit_ft
from pmet.methods.rome import edit_rome, rank_one_delta
from pmet.patch import EditResult
from pmet.prompts import pad_right, target_ids
from pmet.requests import make_request
from pmet.target_cache import cached_targets

from .test_engine import REQUESTS, TEMPLATES, cfg_for, identity_c0
from .tiny import ARCHS, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(dataset="counterfact"):
    reqs = [
        make_request("Danielle Darrieux", "The mother tongue of {} is", "English", "French",
                     paraphrase_prompts=["Danielle Darrieux spoke the language"],
                     neighborhood_prompts=["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
                     generation_prompts=["Danielle Darrieux's mother tongue is"]),
        make_request("Toko Yasuda", "{} plays the", "piano keyboard", "guitar",
                     paraphrase_prompts=["Toko Yasuda is known for the"],
                     neighborhood_prompts=["Jimi Hendrix plays the"],
                     generation_prompts=["Toko Yasuda is incredible at"]),
    ]
    if dataset == "zsre":
        return [EvalRecord(r, i, "zsre", "mend", locality_answers=("the cat",) * len(r.neighborhood_prompts))
                for i, r in enumerate(reqs)]
    return [EvalRecord(r, i, "counterfact", "rome") for i, r in enumerate(reqs)]


@pytest.mark.parametrize("arch", ARCHS)
def test_score_rows_matches_full_logits_with_padding(arch):
    """Scoring each prompt once and its targets from the prompt's KV cache (left-padded batches, several targets
    per prompt, one- and multi-token targets) equals the metric functions on full right-padded forwards."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    rows = [(tuple(tok(p)["input_ids"]), target_ids(tok, t)) for p, t in
            [("The mother tongue of Danielle Darrieux is", "English"), ("Toko Yasuda plays the", "piano keyboard"),
             ("A", "the cat sat on"), ("Toko Yasuda plays the", "guitar"), ("A", "the dog"),
             ("The mother tongue of Danielle Darrieux is", "French and German")]]
    got = score_rows(model, tok, rows, batch_size=2)
    ids, mask = pad_right([p + t for p, t in rows], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    p_len = torch.tensor([len(p) for p, _ in rows])
    t_len = torch.tensor([len(t) for _, t in rows])
    want = M.mean_logprob_of_continuations(logits, ids, p_len, t_len)
    assert got.mean_logprob == pytest.approx(want.tolist(), abs=1e-4)
    hits, _ = M.target_token_correct(logits, ids, p_len, t_len)
    assert [h for h in got.hits] == [hits[i, : t_len[i]].tolist() for i in range(len(rows))]
    assert [len(a) for a in got.argmax] == t_len.tolist()


def test_unedited_model_keeps_its_own_answers():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    for dataset in ("counterfact", "zsre"):
        recs = _records(dataset)
        res = evaluate_records(model, tok, recs, EvalOptions(generation=False))
        summary = summarize(res)
        key = "easyedit_locality" if dataset == "counterfact" else "specificity"
        assert summary[key]["mean"] == 1.0  # compared with itself
        # a different model's argmax is not the same everywhere
        other = evaluate_records(tiny_model("gpt2", seed=3), tok, recs, EvalOptions(generation=False), reference=res)
        assert summarize(other)[key]["mean"] < 1.0
    cf = summarize(evaluate_records(model, tok, _records(), EvalOptions(generation=False)))
    assert {"efficacy", "generalization", "specificity", "score", "efficacy_magnitude"} <= set(cf)
    assert cf["score"]["mean"] == pytest.approx(M.harmonic_mean(
        [cf[k]["mean"] for k in ("efficacy", "generalization", "specificity")]))


def test_generation_is_seeded_and_batched():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    from pmet.evaluation.generation import generate

    prompts = ["The cat sat", "In 1999 the company moved to the", "A"]
    a = generate(model, tok, prompts, max_length=12, batch_size=2, seed=1)
    b = generate(model, tok, prompts, max_length=12, batch_size=2, seed=1)
    assert a == b and all(t.startswith(p) for t, p in zip(a, prompts, strict=True))
    assert any(len(t) > len(p) for t, p in zip(a, prompts, strict=True))


def test_slices_are_disjoint_and_fixed(tmp_path):
    recs = [{"case_id": i, "requested_rewrite": {"prompt": "{} is in", "subject": f"S{i}",
                                                 "target_new": {"str": "Rome", "id": "Q1"},
                                                 "target_true": {"str": "Paris", "id": "Q2"}},
             "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n"], "generation_prompts": []} for i in range(200)]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    dev = load_eval_records(path, "counterfact", slice_="dev")
    test = load_eval_records(path, "counterfact", slice_="test")
    assert {r.case_id for r in dev}.isdisjoint({r.case_id for r in test})
    assert len(dev) + len(test) == 200 and 0 < len(dev) < 30
    assert all(in_dev_slice(r.case_id) for r in dev)
    assert dev[0].relation_id is None and dev[0].target_new_id == "Q1"
    recs[5]["requested_rewrite"]["target_true"] = {"id": "Q2"}
    path.write_text(json.dumps(recs))
    with pytest.raises(RequestError, match=r"record 6: field 'requested_rewrite.target_true.str'"):
        load_eval_records(path, "counterfact", slice_="all")


# The benchmark file formats (load_eval_records on each, the zsRE MEND record as MEMIT builds it): test_eval_data.py


def test_rank_one_delta_maps_key_to_value():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    k, v = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    C0 = A @ A.T + torch.eye(4, dtype=torch.float64)
    delta = rank_one_delta(v, W @ k, k, C0)
    assert torch.allclose((W + delta) @ k, v, atol=1e-10)
    assert torch.linalg.matrix_rank(delta) == 1
    u = torch.linalg.solve(C0, k)
    assert torch.allclose(delta, torch.outer(v - W @ k, u) / (u @ k))


def test_rome_edits_one_layer_and_reverts_bit_exactly(tmp_path):
    model, tok = tiny_model("gptj"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = cfg_for(layers=[1], attn_delta=False, stop_rule="loss")
    res = edit_rome(model, tok, REQUESTS, cfg, c0=identity_c0(model, [1]), context_templates=TEMPLATES,
                    progress=False)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == [res.updates[0].weight]
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    res.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res.apply(model)
    assert all(torch.equal(edited[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights and a bias on the projection
def test_rome_maps_the_template_mean_key_to_v(arch):
    """ROME Eq. 2 with k* in every place: after the edit, the projection's output at k* (the mean key over all
    template rows) is the target v; the bare prompt's key is not what is mapped."""
    from pmet.keys import Site, key_rows, read_at_subject

    model, tok = tiny_model(arch), tiny_tokenizer()
    layout = layout_of(model)
    cfg = cfg_for(layers=[1], attn_delta=False, stop_rule="loss")
    name = layout.edited_module(1, "ffn")
    rows = key_rows(tok, REQUESTS[:1], TEMPLATES)
    sites = [Site(name, "in"), Site(layout.ffn_out(1), "out")]
    before = read_at_subject(model, rows, sites, pad_id=tok.pad_token_id)
    res = edit_rome(model, tok, REQUESTS[:1], cfg, c0=identity_c0(model, [1]), context_templates=TEMPLATES,
                    progress=False)
    after = read_at_subject(model, rows, sites, pad_id=tok.pad_token_id)
    assert torch.equal(after[sites[0]], before[sites[0]])  # the edited projection's inputs do not move
    v = res.targets.ffn[0]
    assert torch.allclose(after[sites[1]].mean(0), v, atol=1e-4 * float(v.norm()))
    assert not torch.allclose(after[sites[1]][0], v, atol=1e-2 * float(v.norm()))  # not the bare prompt's


def test_ft_respects_the_linf_constraint(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    name = layout_of(model).edited_module(1, "ffn")
    w0 = get_weight(model, name).clone()
    cfg = PMETConfig(layers=[1], ft_num_steps=10, ft_lr=1e-2, ft_norm_constraint=1e-3)
    res = edit_ft(model, tok, REQUESTS[:1], cfg, progress=False)
    change = (get_weight(model, name) - w0).abs()
    assert float(change.max()) <= 1e-3 + 1e-7
    assert float(change.max()) > 5e-4  # it moved, up to the bound
    assert not any(p.requires_grad for p in model.parameters())  # the model's frozen state is restored
    assert res.targets.ffn is None and len(res.diagnostics()) == 1  # FT-W has no target values
    res.revert(model)
    assert torch.equal(get_weight(model, name), w0)
    res.save(tmp_path)  # a patch without targets loads and applies like any other
    loaded = EditResult.load(tmp_path)
    assert loaded.targets.ffn is None and loaded.diagnostics() == res.diagnostics()
    loaded.apply(model)
    assert torch.equal(get_weight(model, name), w0 + res.updates[0].delta)


def test_target_cache_hits_and_keys(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    lay, cfg = layout_of(model), cfg_for()
    t1, hits1 = cached_targets(model, tok, lay, REQUESTS, TEMPLATES, cfg, fingerprint="fp", cache_dir=tmp_path)
    t2, hits2 = cached_targets(model, tok, lay, REQUESTS[1:], TEMPLATES, cfg, fingerprint="fp", cache_dir=tmp_path)
    assert (hits1, hits2) == (0, 2)
    assert torch.equal(t1.ffn[1:], t2.ffn) and torch.equal(t1.attn[1:], t2.attn)
    assert t2.diagnostics[0].steps == t1.diagnostics[1].steps
    # another config field the optimisation reads, or another model: no hit
    _, hits3 = cached_targets(model, tok, lay, REQUESTS, TEMPLATES, cfg.replace(v_lr=0.3), fingerprint="fp",
                              cache_dir=tmp_path)
    _, hits4 = cached_targets(model, tok, lay, REQUESTS, TEMPLATES, cfg, fingerprint="fp2", cache_dir=tmp_path)
    assert hits3 == hits4 == 0
    # the batch layout is not part of the key
    _, hits5 = cached_targets(model, tok, lay, REQUESTS, TEMPLATES, cfg.replace(v_batch_size=1), fingerprint="fp",
                              cache_dir=tmp_path)
    assert hits5 == 3


def test_sequential_batches_patch_is_exact():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = apply_method("pmet", model, tok, REQUESTS, cfg_for(), sequential_batches=2,
                       c0=identity_c0(model, [1, 2]), context_templates=TEMPLATES, progress=False)
    assert len(res.requests) == 3 and res.targets.ffn.shape[0] == 3
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    res.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res.apply(model)
    assert all(torch.equal(edited[k], v) for k, v in model.state_dict().items())
    # two batches differ from one batch of all three
    res.revert(model)
    edit(model, tok, REQUESTS, cfg_for(), c0=identity_c0(model, [1, 2]), context_templates=TEMPLATES, progress=False)
    assert any(not torch.equal(edited[k], v) for k, v in model.state_dict().items())


def test_method_presets():
    memit, rome, ft = (load_config("smollm2-135m", method=m) for m in ("memit", "rome", "ft"))
    assert (memit.target_site, memit.spread, memit.stop_rule, memit.attn_delta) == ("layer_output", "even", "loss",
                                                                                     False)
    assert len(rome.layers) == 1 and rome.stop_rule == "loss" and not rome.attn_delta and rome.clamp_norm_factor == 4
    assert len(ft.layers) == 1
    assert load_config("gpt-j-6b", method="memit").mom2_update_weight == 15000


@pytest.mark.parametrize("method", ["rome", "ft"])
def test_single_layer_baselines_refuse_several_layers(method):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = cfg_for(layers=[1, 2])
    with pytest.raises(ConfigError, match=f"'layers': {method} edits one layer.*methods.{method}.layers"):
        apply_method(method, model, tok, REQUESTS[:1], cfg, c0=identity_c0(model, [1, 2]),
                     context_templates=TEMPLATES)


def test_markdown_table_puts_unedited_first():
    summary = {"dataset": "counterfact", "method": "pmet", "model": "m", "n": 2,
               "metrics": {"efficacy": {"mean": 0.9, "ci95": 0.05}, "consistency": {"mean": None, "ci95": None},
                           "fluency": {"mean": 600.0, "ci95": 3.0}},
               "unedited": {"metrics": {"efficacy": {"mean": 0.2, "ci95": 0.1}, "fluency": {"mean": 610.0,
                                                                                             "ci95": 2.0}}}}
    lines = markdown_table([summary]).splitlines()
    assert lines[0] == "| method | Efficacy | Fluency |"  # consistency not available anywhere: left out
    assert lines[2] == "| unedited | 20.0 ± 10.0 | 610.0 ± 2.0 |"
    assert lines[3] == "| pmet | 90.0 ± 5.0 | 600.0 ± 3.0 |"


def test_causal_trace_restoring_everything_recovers_the_clean_run():
    from pmet import causal_trace as ct

    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt, subject = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"
    ids, b, e = ct.subject_token_range(tok, prompt, subject)
    assert tok.decode(ids[b:e]).strip() == subject
    tr = ct.trace_fact(model, tok, prompt, subject, noise=0.5, samples=3, window=4, batch_size=16)
    n = layout_of(model).n_layers
    assert tr.scores["hidden"].shape == (len(ids), n)
    # restoring the last token's output of the last layer gives back the clean prediction exactly
    assert tr.scores["hidden"][-1, -1] == pytest.approx(tr.clean, rel=1e-5)
    # tokens before the subject are not corrupted: restoring them changes nothing
    assert np.allclose(tr.scores["hidden"][:b], tr.corrupted, atol=1e-6)
    grouped = tr.grouped("ffn")
    assert grouped.shape == (6, n)
    mean = {"ffn": np.zeros((6, 6))}
    mean["ffn"][2] = [0, 1, 5, 5, 1, 0]
    assert ct.suggest_layers(mean, 2) == [2, 3]


def test_run_eval_writes_outputs_and_caches_the_unedited_model(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pmet.evaluation import run as R

    model, tok = tiny_model("llama"), tiny_tokenizer()
    lm = SimpleNamespace(model=model, tok=tok, name="tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real = R.evaluate_records

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "evaluate_records", counting)
    kw = dict(opts=EvalOptions(generation_length=12), cache_dir=tmp_path / "cache", progress=False,
              c0=identity_c0(model, [1, 2]), context_templates=TEMPLATES)
    s1 = R.run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "a", **kw)
    s2 = R.run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "b", **kw)
    assert calls == ["unedited", "edited", "edited"]  # the second run reads the unedited results from the cache
    drift_off = {**kw, "opts": EvalOptions(generation_length=12, drift=False)}
    R.run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "c", **drift_off)  # drift is not in the key
    longer = {**kw, "opts": EvalOptions(generation_length=13)}
    R.run_eval(lm, _records(), "pmet", cfg_for(), tmp_path / "d", **longer)  # the generation length is
    assert calls == ["unedited", "edited", "edited", "edited", "unedited", "edited"]
    assert s1["unedited"] == s2["unedited"] and s1["metrics"]["efficacy"] == s2["metrics"]["efficacy"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # reverted
    assert s1["metrics"]["consistency"]["mean"] is None and s1["metrics"]["fluency"]["n"] == 2
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".pmet-outputs.json", "margins.png", "metrics.png",
                                                                   "records.jsonl", "summary.json", "summary.md"]


@pytest.mark.parametrize("method", ["rome", "ft", "pmet-batches", "pmet-null-space-batches"])
def test_interrupted_sequential_edit_resumes_exactly(tmp_path, monkeypatch, method):
    """A ROME/FT-W run (or PMET in sequential batches of 1, also with the null-space option, whose later batches
    read the earlier batches' keys) killed after 2 of 3 edits, rerun with the same checkpoint, ends with the
    uninterrupted run's Δ, targets and diagnostics, bit for bit, redoing only the third."""
    from pmet import editor as editor_mod
    from pmet.methods import checkpoint as C
    from pmet.methods import ft as ft_mod
    from pmet.methods import rome as rome_mod

    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = method.endswith("-batches")
    layers = [1, 2] if batches else [1]
    cfg = {"rome": cfg_for(layers=[1], attn_delta=False, stop_rule="loss"), "pmet-batches": cfg_for(),
           "pmet-null-space-batches": cfg_for(null_space=True, null_space_l2=0.5),
           "ft": PMETConfig(layers=[1], ft_num_steps=5, ft_lr=1e-2, ft_norm_constraint=1e-3)}[method]
    name = method.removesuffix("-batches").removesuffix("-null-space")
    c0 = identity_c0(model, layers)
    if cfg.null_space:  # every eigenvalue below the threshold: P = I, and the earlier keys decide the update
        c0 = {k: v * 1e-3 for k, v in c0.items()}
    kw = dict(c0=c0, context_templates=TEMPLATES, progress=False, sequential_batches=1 if batches else None)
    # count the work: target optimisations (ROME, PMET), FT-W's forward passes
    mod, fn = {"rome": (rome_mod, "compute_targets"), "ft": (ft_mod, "_target_nll"),
               "pmet": (editor_mod, "compute_targets")}[name]
    real_work, work = getattr(mod, fn), []
    monkeypatch.setattr(mod, fn, lambda *a, **k: work.append(1) or real_work(*a, **k))
    ref = apply_method(name, model, tok, REQUESTS, cfg, **kw)
    ref.revert(model)
    work_all = len(work)

    monkeypatch.setattr(C, "SAVE_EVERY_S", 0.0)
    real_save = C.SequentialCheckpoint.save

    def killed_after_two(self, model_, names, state, final=False):
        real_save(self, model_, names, state, final=final)
        if state.done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(C.SequentialCheckpoint, "save", killed_after_two)
    ckpt = tmp_path / "progress.safetensors"
    with pytest.raises(KeyboardInterrupt):
        apply_method(name, model, tok, REQUESTS, cfg, checkpoint=ckpt, **kw)
    assert C.saved_edits(ckpt) == 2
    model.load_state_dict(before)  # a fresh process: the unedited model again

    monkeypatch.setattr(C.SequentialCheckpoint, "save", real_save)
    work.clear()
    res = apply_method(name, model, tok, REQUESTS, cfg, checkpoint=ckpt, **kw)
    assert [u.weight for u in res.updates] == [u.weight for u in ref.updates]
    assert all(torch.equal(a.delta, b.delta) for a, b in zip(res.updates, ref.updates, strict=True))
    assert res.diagnostics() == ref.diagnostics()
    if method == "ft":  # FT-W has no target values
        assert res.targets.ffn is None and ref.targets.ffn is None
    else:
        assert torch.equal(res.targets.ffn, ref.targets.ffn)
    assert 0 < len(work) < work_all  # only the third edit was redone
    if method != "ft":
        assert len(work) == 1
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    res.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res.apply(model)  # the resumed run's patch is as exact as any
    assert all(torch.equal(edited[k], v) for k, v in model.state_dict().items())
    res.revert(model)
    # the same file offered to other requests is not resumed from
    assert C.SequentialCheckpoint(ckpt, REQUESTS[::-1]).resume(model).done == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def die_in_the_edited_evaluation(monkeypatch) -> object:
    """Make run_eval's evaluation of the edited model raise KeyboardInterrupt (a run killed after its edit);
    returns the real evaluate_records, to put back."""
    from pmet.evaluation import run as R

    real = R.evaluate_records

    def dies(*args, **kwargs):
        if kwargs.get("desc") == "edited":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "evaluate_records", dies)
    return real


@pytest.mark.parametrize("method, batches", [("ft", None), ("pmet", 1)])
def test_run_eval_resumes_a_sequential_edit_and_removes_its_checkpoint(tmp_path, monkeypatch, method, batches):
    from types import SimpleNamespace

    from pmet.evaluation import run as R

    model, tok = tiny_model("llama"), tiny_tokenizer()
    lm = SimpleNamespace(model=model, tok=tok, name="tiny-llama")
    cfg = PMETConfig(layers=[1], ft_num_steps=5, ft_lr=1e-2, ft_norm_constraint=1e-3) if method == "ft" else cfg_for()
    kw = dict(opts=EvalOptions(generation=False), cache_dir=tmp_path / "cache", progress=False,
              context_templates=TEMPLATES, sequential_batches=batches, c0=identity_c0(model, cfg.layers))
    real = die_in_the_edited_evaluation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        R.run_eval(lm, _records(), method, cfg, tmp_path / "a", **kw)
    assert not (tmp_path / "a").exists()
    [ckpt] = (tmp_path / "cache" / "sequential").iterdir()
    monkeypatch.setattr(R, "evaluate_records", real)
    resumed = R.run_eval(lm, _records(), method, cfg, tmp_path / "a", **kw)
    assert resumed["resumed_edits"] == len(_records()) and not ckpt.exists()
    fresh = R.run_eval(lm, _records(), method, cfg, tmp_path / "b", **kw)
    assert fresh["resumed_edits"] == 0
    assert resumed["delta_norms"] == fresh["delta_norms"] and resumed["metrics"] == fresh["metrics"]


def test_progress_file_changes_with_the_method_revision(monkeypatch, tmp_path):
    """Progress saved by an older computation of a method (its record's revision) is never resumed by a newer one."""
    from pmet.evaluation import run as R

    cfg = PMETConfig(layers=[1])
    args = ("fp", "rome", cfg, _records(), None, TEMPLATES, None, None, tmp_path)
    before = R._progress_file(*args)
    import dataclasses

    from pmet import methods

    monkeypatch.setitem(methods.METHODS, "rome", dataclasses.replace(methods.METHODS["rome"], revision=3))
    assert R._progress_file(*args) != before
    assert R._progress_file("fp", "ft", cfg, _records(), None, TEMPLATES, None, None, tmp_path) != before
