"""End to end on the real embedded model (SmolLM2-135M-Instruct): 10 counterfactual edits in ONE batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pmet.config import load_config
from pmet.editor import edit
from pmet.probe import probe
from pmet.prompts import target_ids
from pmet.requests import load_requests

pytestmark = pytest.mark.slow


def first_token(tok, target: str) -> str:
    return tok.decode(list(target_ids(tok, target))[:1])


def test_ten_counterfactual_edits_in_one_batch(smol, smol_c0, examples_path, tmp_path):
    model, tok = smol.model, smol.tok
    reqs = load_requests(examples_path)
    assert len(reqs) == 10
    cfg = load_config("smollm2-135m")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = probe(model, tok, [r.text for r in reqs], [r.target_new for r in reqs])
    assert all(b.top1 != first_token(tok, r.target_new) for b, r in zip(before, reqs, strict=True))
    neigh = [(p, r) for r in reqs for p in r.neighborhood_prompts]
    neigh_before = probe(model, tok, [p for p, _ in neigh], [r.target_new for _, r in neigh])

    result = edit(model, tok, reqs, cfg, c0=smol_c0, progress=False)

    after = probe(model, tok, [r.text for r in reqs], [r.target_new for r in reqs])
    flipped = [a.top1 == first_token(tok, r.target_new) for a, r in zip(after, reqs, strict=True)]
    assert all(flipped), f"not flipped: {[r.text for r, f in zip(reqs, flipped, strict=True) if not f]}"
    # paraphrases: P(new) > P(true) (mean per-token log-prob, the CounterFact comparison) on most of them
    para = [(p, r) for r in reqs for p in r.paraphrase_prompts]
    p_new = probe(model, tok, [p for p, _ in para], [r.target_new for _, r in para])
    p_true = probe(model, tok, [p for p, _ in para], [r.target_true for _, r in para])
    wins = sum(n.logp_mean > t.logp_mean for n, t in zip(p_new, p_true, strict=True))
    assert wins >= 0.7 * len(para), f"paraphrase success {wins}/{len(para)}"
    # unrelated prompts mostly keep their top-1
    neigh_after = probe(model, tok, [p for p, _ in neigh], [r.target_new for _, r in neigh])
    kept = sum(a.top1 == b.top1 for a, b in zip(neigh_after, neigh_before, strict=True))
    assert kept >= 0.7 * len(neigh), f"neighbourhood kept {kept}/{len(neigh)}"
    assert all(d.steps >= 1 for d in result.targets.diagnostics)

    # the edited model saved in save_pretrained format reloads with plain transformers
    out = tmp_path / "edited"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    plain = AutoModelForCausalLM.from_pretrained(out)
    plain_tok = AutoTokenizer.from_pretrained(out)
    enc = plain_tok(reqs[0].text, return_tensors="pt")
    with torch.no_grad():
        top = plain(**enc).logits[0, -1].argmax().item()
    assert plain_tok.decode([top]) == first_token(tok, reqs[0].target_new)

    # revert is bit-exact
    result.revert(model)
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())
