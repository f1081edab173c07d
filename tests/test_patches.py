"""Compact (low-rank) patches, patch chains, `pmet show` and the model card, on tiny random models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pmet.cache import tensor_sha256
from pmet.card import card_metadata, card_text
from pmet.editor import edit
from pmet.errors import PatchError
from pmet.patch import EditResult, apply_chain, revert_chain
from pmet.patch_info import describe
from pmet.requests import make_request
from pmet.update import factor_product, low_rank_pays, solve_factors

from .test_engine import REQUESTS, TEMPLATES, cfg_for, identity_c0
from .tiny import ARCHS, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
MORE = [make_request("Thomas Edison", "{} was born in", "Paris"),
        make_request("Lionel Messi", "{} plays for", "Juventus")]


def _edit(model, requests=REQUESTS):
    return edit(model, tiny_tokenizer(), requests, cfg_for(), c0=identity_c0(model, [1, 2]),
                context_templates=TEMPLATES, progress=False)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_factor_product_is_the_matrix_product_in_a_fixed_order():
    g = torch.Generator().manual_seed(0)
    P, Q = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    want = P[:, :1] * Q[:, 0] + P[:, 1:2] * Q[:, 1] + P[:, 2:] * Q[:, 2]  # left to right, one rounding each
    assert torch.equal(factor_product(P, Q), want)
    torch.testing.assert_close(factor_product(P, Q), P @ Q.T, rtol=1e-14, atol=1e-14)
    # Eq. 9's factors give Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹
    R, K = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    C0 = torch.eye(6, dtype=torch.float64) * 2
    U, V = solve_factors(R, K, C0, 0.5)
    expected = R.double() @ K.double().T @ torch.linalg.inv(0.5 * C0 + K.double() @ K.double().T)
    torch.testing.assert_close(U @ V.T, expected, rtol=1e-10, atol=1e-12)
    assert low_rank_pays(576, 1536, 10, torch.float32) and not low_rank_pays(576, 1536, 947, torch.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_compact_patch_reproduces_the_edit_bit_for_bit(arch, tmp_path):
    model = tiny_model(arch)
    base = _state(model)
    res = _edit(model)
    edited = _state(model)
    assert all(u.factors is not None for u in res.updates)  # Eq. 9 has rank 3 here: factors are smaller
    compact, full = res.save(tmp_path / "compact"), res.save(tmp_path / "full", full=True)
    with safe_open(str(compact), framework="pt") as f:
        names = set(f.keys())
    assert not any(n.startswith(("original::", "delta::")) for n in names)
    assert compact.stat().st_size < full.stat().st_size
    loaded = EditResult.load(compact)
    for u, v in zip(res.updates, loaded.updates, strict=True):  # Δ expanded from the factors: the edit's bits
        assert torch.equal(u.delta.to(v.delta.dtype), v.delta)
    # apply to a fresh base: the edit's bits; revert from the base model: the base's bits
    fresh = tiny_model(arch)
    EditResult.load(compact).apply(fresh)
    assert _same(_state(fresh), edited)
    revert_chain(fresh, [("compact", EditResult.load(compact))], base=lambda: tiny_model(arch))
    assert _same(_state(fresh), base)
    # a full patch reverts without the base model
    EditResult.load(full).apply(fresh)
    revert_chain(fresh, [("full", EditResult.load(full))])
    assert _same(_state(fresh), base)


def test_compact_patch_without_base_and_altered_factors_are_refused(tmp_path):
    model = tiny_model("llama")
    res = _edit(model)
    path = res.save(tmp_path / "p")
    with pytest.raises(PatchError, match="pass --base"):
        revert_chain(model, [("p", EditResult.load(path))])
    with pytest.raises(PatchError, match="keeps no original weights"):
        EditResult.load(path).revert(model)
    # one factor entry changed: the file still loads, applying it is refused and leaves the model as it was
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    key = next(k for k in tensors if k.startswith("factor_p::"))
    tensors[key][0, 0] += 1e-3
    meta.pop("patch_id")  # as a careless tool would leave it
    save_file(tensors, str(path), metadata=meta)
    fresh = tiny_model("llama")
    before = _state(fresh)
    with pytest.raises(PatchError, match="other bits than the edit wrote"):
        EditResult.load(path).apply(fresh)
    assert _same(_state(fresh), before)
    # the recorded id covers the metadata: a changed request is refused at load
    meta = json.loads(json.dumps(dict(res.metadata())))
    reqs = json.loads(meta["requests"])
    reqs[0]["target_new"] = "German"
    meta["requests"] = json.dumps(reqs)
    save_file(load_file(str(res.save(tmp_path / "q"))), str(tmp_path / "q" / "patch.safetensors"), metadata=meta)
    with pytest.raises(PatchError, match="recorded id does not match"):
        EditResult.load(tmp_path / "q")


def _chain(tmp_path):
    """Patches a (on the base), b (on base + a), as `pmet edit --patch-on a` makes b."""
    model = tiny_model("qwen2")
    base = _state(model)
    a = _edit(model, REQUESTS[:2])
    after_a = _state(model)
    b = _edit(model, MORE)
    b.parents, b.base_fingerprint = [a.patch_id], a.fingerprint
    after_b = _state(model)
    return a.save(tmp_path / "a"), b.save(tmp_path / "b"), base, after_a, after_b


def test_chain_applies_in_order_and_reverts_any_suffix(tmp_path):
    a, b, base, after_a, after_b = _chain(tmp_path)
    load = EditResult.load
    model = tiny_model("qwen2")
    apply_chain(model, [("a", load(a)), ("b", load(b))])
    assert _same(_state(model), after_b)
    assert load(b).parents == [load(a).patch_id]
    revert_chain(model, [("b", load(b))], keep=[("a", load(a))], base=lambda: tiny_model("qwen2"))
    assert _same(_state(model), after_a)
    apply_chain(model, [("b", load(b))])  # b alone on base + a: its recorded originals match
    revert_chain(model, [("b", load(b)), ("a", load(a))], base=lambda: tiny_model("qwen2"))
    assert _same(_state(model), base)


def test_chain_out_of_order_or_incomplete_is_refused(tmp_path):
    a, b, base, *_ = _chain(tmp_path)
    load = EditResult.load
    model = tiny_model("qwen2")
    with pytest.raises(PatchError, match="made on top of .* not on top of"):
        apply_chain(model, [("b", load(b)), ("a", load(a))])
    assert _same(_state(model), base)  # b was checked before anything was added
    with pytest.raises(PatchError, match=r"it was made on top of patch .*: apply it first"):
        apply_chain(model, [("b", load(b))])
    with pytest.raises(PatchError, match="was made for base model"):
        apply_chain(tiny_model("qwen2", seed=1), [("a", load(a))])
    apply_chain(model, [("a", load(a)), ("b", load(b))])
    with pytest.raises(PatchError, match="last applied first"):
        revert_chain(model, [("a", load(a)), ("b", load(b))], base=lambda: tiny_model("qwen2"))
    with pytest.raises(PatchError, match="not given: pass the patches that stay applied with --keep"):
        revert_chain(model, [("b", load(b))], base=lambda: tiny_model("qwen2"))
    with pytest.raises(PatchError, match="do not give the weight"):  # the wrong base model
        revert_chain(model, [("b", load(b))], keep=[("a", load(a))], base=lambda: tiny_model("qwen2", seed=1))


def test_older_full_format_still_applies_and_reverts(tmp_path):
    model = tiny_model("gpt2")
    base = _state(model)
    res = _edit(model)
    edited = _state(model)
    path = res.save(tmp_path / "p", full=True)
    meta = {k: v for k, v in res.metadata(full=True).items()
            if k in ("format", "model", "fingerprint", "config", "requests", "context_templates", "diagnostics",
                     "weights", "timings", "stats")}
    meta["format"] = "pmet-patch/1"
    meta["weights"] = json.dumps({k: {f: w[f] for f in ("layer", "component", "residual_norm", "delta_norm",
                                                        "sha256_original", "sha256_edited", "dtype")}
                                  for k, w in json.loads(meta["weights"]).items()})
    save_file(load_file(str(path)), str(path), metadata=meta)
    fresh = tiny_model("gpt2")
    EditResult.load(path).apply(fresh)
    assert _same(_state(fresh), edited)
    EditResult.load(path).revert(fresh)
    assert _same(_state(fresh), base)


def test_show_reads_only_the_header_and_card_lists_the_edits(tmp_path):
    model = tiny_model("llama")
    res = _edit(model)
    res.method = "pmet"
    path = res.save(tmp_path / "p")
    text = describe(tmp_path / "p")
    assert "pmet-patch/2" in text and "compact" in text and "method pmet" in text
    assert "The mother tongue of Danielle Darrieux is  ? -> English" in text
    assert text.count("factors, rank 3") == len(res.updates)
    assert res.patch_id[:12] in text
    code = ("import sys; from pmet.patch_info import describe; describe(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    card = card_text([res], "tiny-llama")
    assert "not the original tiny-llama" in card and "| Toko Yasuda | {} plays the | ? → piano keyboard |" in card
    assert res.patch_id in card
    meta = card_metadata([res], "tiny-llama")
    assert json.loads(meta["pmet.patch_ids"]) == [res.patch_id]
    assert [e["new"] for e in json.loads(meta["pmet.edits"])] == [r.target_new for r in REQUESTS]
    assert tensor_sha256(torch.zeros(1)) != tensor_sha256(torch.ones(1))
