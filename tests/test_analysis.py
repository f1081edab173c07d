"""`pmet analyze`: Figure 2 similarities (components) and Figure 4 norms (deltas), on tiny models and SmolLM2."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from pmet.analysis import FFN_ENTRY, component_similarity, cosine, jaccard, load_prompts, read_states
from pmet.analysis.cli import app as analyze_app
from pmet.analysis.components import topk_ids
from pmet.analysis.deltas import delta_norm_table
from pmet.arch import layout_of
from pmet.config import PMETConfig
from pmet.editor import edit
from pmet.errors import RequestError
from pmet.patch import EditResult
from pmet.prompts import pad_right
from pmet.requests import make_request

from .test_engine import REQUESTS, TEMPLATES, identity_c0
from .tiny import ARCHS, tiny_model, tiny_tokenizer

PROMPTS = [
    "The Eiffel Tower is located in",
    "Danielle Darrieux's mother tongue is",
    "Toko Yasuda plays the",
    "In 1999 the company moved its headquarters to London, the capital of",
    "Paris",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(tok, prompts):
    return pad_right([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)


def _d_model(model) -> int:
    return getattr(model.config, "hidden_size", None) or model.config.n_embd


# --- the similarity functions on hand-made cases ------------------------------------------------------------
def test_identical_states_give_one():
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(cosine(x, x), torch.ones(3, 5))
    ids = torch.stack([torch.randperm(100)[:10] for _ in range(6)])
    torch.testing.assert_close(jaccard(ids, ids), torch.ones(6))
    # the same state through the logit lens of a real (tiny) model: same top-k, Jaccard 1
    model = tiny_model("llama")
    lay = layout_of(model)
    h = torch.randn(4, _d_model(model))
    t = topk_ids(model, lay, torch.stack([h, h.clone()]), 20)
    assert t.shape == (2, 4, 20)
    torch.testing.assert_close(jaccard(t[0], t[1]), torch.ones(4))


def test_disjoint_and_hand_computed():
    a = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [5, 6, 7, 8]])
    b = torch.tensor([[4, 5, 6, 7], [3, 2, 9, 8], [8, 7, 6, 5]])
    # disjoint → 0; {2,3} shared of 6 → 2/6; same set in another order → 1
    torch.testing.assert_close(jaccard(a, b), torch.tensor([0.0, 2 / 6, 1.0]))
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 2.0], [1.0, 1.0, 0.0]])
    y = torch.tensor([[0.0, 3.0, 0.0], [2.0, 4.0, 4.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(cosine(x, y), torch.tensor([0.0, 1.0, 1 / math.sqrt(2)]))
    assert float(cosine(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0]))) == pytest.approx(-1.0)


def test_topk_jaccard_by_hand_through_a_lens():
    """A lens whose logits are the state itself: top-2 of (5,4,0,0,0) and (0,4,5,0,0) share 1 of 3 tokens."""
    model = tiny_model("llama")
    lay = layout_of(model)
    h1 = torch.zeros(_d_model(model))
    h2 = torch.zeros(_d_model(model))
    h1[[0, 1]] = torch.tensor([5.0, 4.0])
    h2[[1, 2]] = torch.tensor([4.0, 5.0])
    with torch.no_grad():
        model.get_submodule(lay.spec.unembed).weight.zero_()
        model.get_submodule(lay.spec.unembed).weight[: _d_model(model)] = torch.eye(_d_model(model))
        model.get_submodule(lay.spec.final_norm).weight.fill_(1.0)
    t = topk_ids(model, lay, torch.stack([h1, h2])[:, None], 2)
    assert set(t[0, 0].tolist()) == {0, 1} and set(t[1, 0].tolist()) == {1, 2}
    assert float(jaccard(t[0], t[1])) == pytest.approx(1 / 3)


# --- where the states are read ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_read_states_shapes_and_ffn_input(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    lay = layout_of(model)
    ids, mask = _batch(tok, PROMPTS)
    s = read_states(model, lay, ids, mask)
    for t in (s.h_in, s.attn, s.ffn_in, s.ffn_out):
        assert t.shape == (len(PROMPTS), 4, _d_model(model))
    if lay.parallel:
        assert s.ffn_in is s.h_in and "parallel" in s.ffn_entry
    else:
        # the residual state entering the FFN block is h^{l-1} + a^l (Gemma 3: after its post-attention norm)
        added = s.attn
        if lay.spec.post_norms:
            added = torch.stack([model.get_submodule(f"{lay.layer(l)}.{lay.spec.post_norms[0]}")(s.attn[:, l])
                                 for l in range(4)], 1)
        torch.testing.assert_close(s.ffn_in, s.h_in + added, rtol=1e-5, atol=1e-5)
        assert FFN_ENTRY[arch] in s.ffn_entry
    # h^{l} (input of layer l+1) = FFN input + m^l in sequential blocks, h^{l-1} + a^l + m^l in parallel ones
    nxt = s.h_in[:, 1:]
    ffn_in = s.h_in + s.attn if lay.parallel else s.ffn_in
    if not lay.spec.post_norms:
        torch.testing.assert_close(nxt, (ffn_in + s.ffn_out)[:, :-1], rtol=1e-4, atol=1e-4)


def test_llama_ffn_entry_by_hand_and_fallback(monkeypatch):
    """The mapped module (post_attention_layernorm's input) equals h^{l-1} + a^l, as does the fallback."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    lay = layout_of(model)
    ids, mask = _batch(tok, PROMPTS)
    mapped = read_states(model, lay, ids, mask)
    torch.testing.assert_close(mapped.ffn_in, mapped.h_in + mapped.attn, rtol=1e-6, atol=1e-6)
    monkeypatch.delitem(FFN_ENTRY, "llama")
    fallback = read_states(model, lay, ids, mask)
    assert "recomputed" in fallback.ffn_entry
    torch.testing.assert_close(fallback.ffn_in, mapped.ffn_in, rtol=1e-6, atol=1e-6)


def test_gemma_after_post_norms():
    """--after-post-norms reads the normalised contributions that Gemma 3 adds to the residual stream."""
    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    lay = layout_of(model)
    ids, mask = _batch(tok, PROMPTS)
    raw = read_states(model, lay, ids, mask)
    post = read_states(model, lay, ids, mask, after_post_norms=True)
    for l in range(4):
        layer = model.get_submodule(lay.layer(l))
        torch.testing.assert_close(post.attn[:, l], layer.post_attention_layernorm(raw.attn[:, l]))
        torch.testing.assert_close(post.ffn_out[:, l], layer.post_feedforward_layernorm(raw.ffn_out[:, l]))
    torch.testing.assert_close(post.ffn_in, post.h_in + post.attn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post.h_in[:, 1:], (post.ffn_in + post.ffn_out)[:, :-1], rtol=1e-4, atol=1e-4)
    stats = component_similarity(model, tok, PROMPTS, top_k=10, progress=False, after_post_norms=True)
    assert stats.summary()["after_post_norms"] and "AFTER" in stats.summary()["note"]
    # no effect on an architecture without output norms
    llama = component_similarity(tiny_model("llama"), tok, PROMPTS, top_k=10, progress=False, after_post_norms=True)
    assert not llama.summary()["after_post_norms"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj", "gemma3_text"])
def test_last_token_under_right_padding(arch):
    """Each row's states in a padded batch equal those of the prompt run alone."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    lay = layout_of(model)
    batch = read_states(model, lay, *_batch(tok, PROMPTS))
    for i, p in enumerate(PROMPTS):
        alone = read_states(model, lay, *_batch(tok, [p]))
        for name in ("h_in", "attn", "ffn_in", "ffn_out"):
            torch.testing.assert_close(getattr(batch, name)[i], getattr(alone, name)[0], rtol=1e-4, atol=1e-4)


# --- component_similarity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_component_similarity_shapes(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    stats = component_similarity(model, tok, PROMPTS, top_k=10, batch_size=2, progress=False)
    for a in (stats.mhsa_cosine, stats.mhsa_jaccard, stats.ffn_cosine, stats.ffn_jaccard):
        assert a.shape == (len(PROMPTS), 4)
    assert ((stats.mhsa_cosine >= -1 - 1e-5) & (stats.mhsa_cosine <= 1 + 1e-5)).all()
    assert ((stats.ffn_jaccard >= 0) & (stats.ffn_jaccard <= 1)).all()
    # Jaccard of two k-sets takes values i/(2k-i)
    allowed = {round(i / (20 - i), 5) for i in range(11)}
    assert {round(float(v), 5) for v in stats.mhsa_jaccard.ravel()} <= allowed
    s = stats.summary()
    assert set(s) >= {"layers", "mhsa", "ffn", "n_facts", "note", "top_k"}
    assert s["layers"] == [0, 1, 2, 3] and s["n_facts"] == len(PROMPTS)
    for comp in ("mhsa", "ffn"):
        for key in ("cosine", "jaccard"):
            assert len(s[comp][key]) == 4 and len(s[comp]["std"][key]) == 4
    assert ("parallel" in s["note"]) == (arch in ("gptj", "gpt_neox"))
    json.dumps(s)
    assert len(stats.csv_rows()) == 8


def test_component_similarity_rows_follow_prompts():
    """Prompts are length-sorted into batches internally; row i must still be prompt i."""
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    together = component_similarity(model, tok, PROMPTS, top_k=10, batch_size=3, progress=False)
    for i, p in enumerate(PROMPTS):
        alone = component_similarity(model, tok, [p], top_k=10, batch_size=1, progress=False)
        assert together.mhsa_cosine[i] == pytest.approx(alone.mhsa_cosine[0], abs=1e-4)
        assert together.ffn_cosine[i] == pytest.approx(alone.ffn_cosine[0], abs=1e-4)


def test_summary_is_mean_and_std_over_facts():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    stats = component_similarity(model, tok, PROMPTS, top_k=10, progress=False)
    s = stats.summary()
    assert s["ffn"]["cosine"][2] == pytest.approx(float(stats.ffn_cosine[:, 2].mean()), abs=1e-6)
    assert s["mhsa"]["std"]["jaccard"][1] == pytest.approx(float(stats.mhsa_jaccard[:, 1].std()), abs=1e-6)


# --- facts files --------------------------------------------------------------------------------------------
def test_load_prompts_formats(tmp_path):
    known = [{"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica",
              "template": "{} is located in the continent", "prediction": " of Antarctica",
              "prompt": "Vinson Massif is located in the continent of", "relation_id": "P30"},
             {"known_id": 1, "subject": "Beats Music", "attribute": "Apple", "template": "{} is owned by",
              "prediction": " Apple", "prompt": "Beats Music is owned by", "relation_id": "P127"}]
    (tmp_path / "known.json").write_text(json.dumps(known))
    assert load_prompts(tmp_path / "known.json") == [k["prompt"] for k in known]
    assert load_prompts(tmp_path / "known.json", limit=1) == [known[0]["prompt"]]
    (tmp_path / "p.jsonl").write_text('{"prompt": "A b c"}\n\n{"prompt": "D e"}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["A b c", "D e"]
    req = make_request("Kenya", "{} is a country in", "Asia")
    (tmp_path / "r.jsonl").write_text(json.dumps(req.to_dict()) + "\n")
    assert load_prompts(tmp_path / "r.jsonl") == ["Kenya is a country in"]
    (tmp_path / "p.txt").write_text("one prompt\n\n  two  \n")
    assert load_prompts(tmp_path / "p.txt") == ["one prompt", "two"]
    with pytest.raises(RequestError, match="file not found"):
        load_prompts(tmp_path / "missing.json")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{oops\n')
    with pytest.raises(RequestError, match="record 2"):
        load_prompts(tmp_path / "bad.jsonl")


def test_components_cli_bad_facts_is_one_line(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(analyze_app, ["components", "--facts", str(tmp_path / "nope.json"), "--out", str(out)])
    assert res.exit_code == 2
    assert "nope.json" in res.output and "file not found" in res.output
    assert not out.exists()


# --- deltas (Figure 4) --------------------------------------------------------------------------------------
def _patch(tmp_path, name, **cfg):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    base = dict(layers=[1, 2], v_num_grad_steps=4, v_lr=0.5, clamp_norm_factor=4.0, mom2_update_weight=1.0,
                kl_factor=0.5, v_batch_size=8)
    c0 = {**identity_c0(model, [1, 2]), **identity_c0(model, [1, 2], "attn")}
    res = edit(model, tok, REQUESTS[:2], PMETConfig(**{**base, **cfg}), c0=c0, context_templates=TEMPLATES,
               progress=False)
    res.save(tmp_path / name)
    return res


def test_deltas_cli(tmp_path):
    pmet = _patch(tmp_path, "pmet")
    even = _patch(tmp_path, "even", spread="even", update_modules=["ffn", "attn"])
    out = tmp_path / "fig4"
    args = ["deltas", str(tmp_path / "pmet"), str(tmp_path / "even" / "patch.safetensors"), "--out", str(out)]
    res = CliRunner().invoke(analyze_app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "deltas.json").read_text())
    rows = data["rows"]
    assert [(r["label"], r["component"], r["layer"]) for r in rows] == [
        ("pmet", "ffn", 1), ("pmet", "ffn", 2), ("even", "attn", 1), ("even", "attn", 2), ("even", "ffn", 1),
        ("even", "ffn", 2)]
    norms = {**{("pmet", k): v for k, v in pmet.delta_norms().items()},
             **{("even", k): v for k, v in even.delta_norms().items()}}
    for r in rows:
        assert r["norm"] == pytest.approx(norms[(r["label"], r["weight"])], rel=1e-6)
        assert r["norm"] > 0
    assert rows[0]["method"] == "PMET" and rows[2]["method"] == "PMET (w/ W_O^MHSA, even spread)"
    assert set(data["series"]) == {"pmet", "even (MHSA)", "even (FFN)"}
    with (out / "deltas.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (out / "deltas.png").read_bytes()[:8] == PNG_MAGIC
    assert "pmet" in res.output and "MHSA" in res.output and "FFN" in res.output
    # labels, and the function on EditResult objects
    res = CliRunner().invoke(analyze_app, ["deltas", str(tmp_path / "pmet"), str(tmp_path / "even"),
                                           "--labels", "PMET,even spread"])
    assert res.exit_code == 0 and "even spread" in res.output
    assert [r["label"] for r in delta_norm_table([pmet, pmet])][:1] == ["edit 1"]
    assert EditResult.load(tmp_path / "pmet").delta_norms() == pytest.approx(pmet.delta_norms())


def test_deltas_cli_errors(tmp_path):
    out = tmp_path / "fig4"
    res = CliRunner().invoke(analyze_app, ["deltas", str(tmp_path / "missing"), "--out", str(out)])
    assert res.exit_code == 2 and "file not found" in res.output
    (tmp_path / "junk.safetensors").write_bytes(b"not a patch")
    res = CliRunner().invoke(analyze_app, ["deltas", str(tmp_path / "junk.safetensors")])
    assert res.exit_code == 2 and "junk.safetensors" in res.output
    assert not out.exists()


# --- SmolLM2, end to end through the real entry point -----------------------------------------------------
@pytest.mark.slow
def test_components_cli_smollm2(tmp_path, data_dir, smol):
    out = tmp_path / "fig2"
    proc = subprocess.run(
        [sys.executable, "-m", "pmet.cli", "analyze", "components", "--model", "smollm2-135m", "--facts",
         str(data_dir / "rome" / "known_1000.json"), "--limit", "20", "--out", str(out), "--device", "cpu",
         "--quiet"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    s = json.loads((out / "components.json").read_text())
    n = smol.model.config.num_hidden_layers
    assert s["n_facts"] == 20 and s["layers"] == list(range(n)) and s["top_k"] == 50
    for comp in ("mhsa", "ffn"):
        assert len(s[comp]["cosine"]) == n and len(s[comp]["jaccard"]) == n
        assert all(-1 <= v <= 1 for v in s[comp]["cosine"])
        assert all(0 <= v <= 1 for v in s[comp]["jaccard"])
        assert all(v >= 0 for v in s[comp]["std"]["cosine"])
    assert "post_attention_layernorm" in s["note"]
    with (out / "components.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * n and {r["component"] for r in rows} == {"mhsa", "ffn"}
    png = (out / "components.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) < 200_000
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == [".pmet-outputs.json"]  # pmet's manifest, and no staging leftovers
