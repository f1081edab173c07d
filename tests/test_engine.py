"""The PMET engine on tiny random models of every architecture: positions, closed form, spread, batching."""

from __future__ import annotations

import math

import pytest
import torch

from pmet.arch import ARCHITECTURES, get_weight, layout_of
from pmet.config import PMETConfig
from pmet.editor import edit
from pmet.errors import ModelError
from pmet.keys import Site, average_two_stage, key_rows, read_at_subject
from pmet.prompts import encode, target_ids
from pmet.requests import make_request
from pmet.targets import compute_targets
from pmet.update import StreamCheck, norm_gain, post_norm_preimage, solve_delta, spread

from .tiny import ARCHS, tiny_model, tiny_tokenizer

TEMPLATES = [["{}"], ["The cat sat. {}", "In 1999 the company moved. {}"]]
REQUESTS = [
    make_request("Danielle Darrieux", "The mother tongue of {} is", "English"),
    make_request("Toko Yasuda", "{} plays the", "piano keyboard"),  # shorter prompt, 2-word target
    make_request("Autonomous University of Madrid", "{}, which is located in", "Rome"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(**kw) -> PMETConfig:
    base = dict(layers=[1, 2], v_num_grad_steps=6, v_lr=0.5, clamp_norm_factor=4.0, mom2_update_weight=1.0,
                kl_factor=0.5, v_batch_size=8)
    return PMETConfig(**{**base, **kw})


def identity_c0(model, layers, comp="ffn"):
    lay = layout_of(model)
    d = get_weight(model, lay.edited_module(0, comp)).shape[1 if not lay.spec.conv1d else 0]
    return {(l, comp): torch.eye(d, dtype=torch.float64) for l in layers}


def test_subject_last_token_and_target_ids():
    tok = tiny_tokenizer()
    e = encode(tok, "The mother tongue of {} is", "Danielle Darrieux")
    prefix = tok("The mother tongue of Danielle Darrieux")["input_ids"]
    assert e.subject_last == len(prefix) - 1
    assert list(e.ids[: len(prefix)]) == prefix
    # target ids continue a prompt: a leading-space word token for byte-level BPE, no special tokens
    ids = target_ids(tok, "English")
    assert tok.decode(ids) == " English"
    assert tok.bos_token_id not in ids


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_shapes(arch):
    model = tiny_model(arch)
    lay = layout_of(model)
    assert lay.n_layers == 4
    assert lay.parallel == (arch in ("gptj", "gpt_neox"))
    W = get_weight(model, lay.ffn_out(1))
    d_model = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    out_dim = W.shape[1] if lay.spec.conv1d else W.shape[0]
    assert out_dim == d_model


def test_unsupported_architecture_message():
    model = tiny_model("llama")
    model.config.model_type = "mamba"
    with pytest.raises(ModelError, match="add a row to pmet.arch.ARCHITECTURES"):
        layout_of(model)
    assert "llama" in ARCHITECTURES


def test_solve_delta_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    d_out, d_in, n, lam = 5, 7, 3, 2.5
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    C0 = A @ A.T / d_in + 0.1 * torch.eye(d_in, dtype=torch.float64)
    expected = R @ K.T @ torch.linalg.inv(lam * C0 + K @ K.T)
    torch.testing.assert_close(solve_delta(R, K, C0, lam), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_stream_residual(arch):
    """residual='stream': the first layer solves for (intended stream move)/sqrt(L−l+1); for MEMIT, whose value
    is the stream itself, it is the same update as the paper's residual."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    c0 = identity_c0(model, [1, 2])
    res = edit(model, tok, REQUESTS, cfg_for(residual="stream"), c0=c0, context_templates=TEMPLATES, progress=False)
    assert res.updates[0].residual_norm == pytest.approx(res.stream_check["intended_norm"] / math.sqrt(2), rel=1e-4)
    res.revert(model)
    memit = {"target_site": "layer_output", "attn_delta": False, "spread": "even"}
    by_value = edit(model, tok, REQUESTS, cfg_for(**memit), c0=c0, context_templates=TEMPLATES, progress=False)
    by_value.revert(model)
    by_stream = edit(model, tok, REQUESTS, cfg_for(**memit, residual="stream"), c0=c0, context_templates=TEMPLATES,
                     progress=False)
    for a, b in zip(by_value.updates, by_stream.updates, strict=True):
        torch.testing.assert_close(a.delta, b.delta, rtol=1e-4, atol=1e-6)


def test_stream_check_hand_computed():
    intended = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    realised = torch.tensor([[6.0, 8.0], [0.0, 1.0]])
    sc = StreamCheck.measure(intended, realised)
    assert (sc.intended_norm, sc.realised_norm) == pytest.approx((3.0, 5.5))
    assert sc.ratio == pytest.approx((2.0 + 1.0) / 2)
    assert sc.cosine == pytest.approx((1.0 + 0.0) / 2)
    # three requests, one with a near-zero intended move: it drives the mean ratio, not the median
    sc = StreamCheck.measure(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1e-6, 0.0]]),
                             torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0]]))
    assert sc.ratio > 1e5 and sc.median_ratio == pytest.approx(3.0)


def test_post_norm_preimage_hand_cases():
    """N(x) = g ⊙ x / rms(x): the gain is read for both RMSNorm parametrisations; a reachable target is hit exactly
    with the pre-norm magnitude kept; an unreachable one is projected no worse than any other output of N."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    d = 16
    gemma, llama = Gemma3RMSNorm(d), LlamaRMSNorm(d)
    gemma.weight.data = torch.randn(d)  # N = (1 + w) ⊙ x / rms(x), some gains negative
    llama.weight.data = torch.randn(d)  # N = w ⊙ x / rms(x)
    x = torch.randn(5, d)
    for norm in (gemma, llama):
        g = norm_gain(norm, d)
        torch.testing.assert_close(g * x.double() / x.double().pow(2).mean(-1, keepdim=True).sqrt(),
                                   norm(x).double(), rtol=1e-5, atol=1e-5)
    g = norm_gain(gemma, d)
    m, other = 3 * torch.randn(4, d), torch.randn(4, d)
    reach = post_norm_preimage(m, gemma(other) - gemma(m), g)  # N(other) is an output of N: reachable
    torch.testing.assert_close(gemma(reach), gemma(other), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reach.pow(2).mean(-1), m.pow(2).mean(-1), rtol=1e-5, atol=1e-5)
    r = 5 * torch.randn(4, d)  # far off N's range
    t = gemma(m) + r
    best = (gemma(post_norm_preimage(m, r, g)) - t).norm(dim=-1)
    rivals = torch.cat([gemma(torch.randn(2000, d)), gemma(t / g.float())])  # random outputs; naive rescaling
    assert (best[:, None] <= (rivals[None] - t[:, None]).norm(dim=-1) + 1e-4).all()


def test_memit_preimage_moves_the_stream_as_computed():
    """Gemma 3 (FFN post-norm), MEMIT at one layer with a tiny λ and the bare template only, so W k = m' exactly:
    with 'preimage' the layer-L stream moves by N(m') − N(m0), m' = post_norm_preimage(m0, δ), which points along
    δ far better than MEMIT as published. On Llama (no post-norm) the option changes nothing."""
    L = 2
    cos = {}
    for mode in ("as-is", "preimage"):
        model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
        lay = layout_of(model)
        norm = model.get_submodule(f"{lay.layer(L)}.post_feedforward_layernorm")
        torch.manual_seed(1)
        norm.weight.data = torch.randn_like(norm.weight)  # non-trivial gains (zeros, i.e. g = 1, at init)
        cfg = cfg_for(layers=[L], mom2_update_weight=1e-6, target_site="layer_output", attn_delta=False,
                      spread="even", post_norm_residual=mode)
        rows = key_rows(tok, REQUESTS, [["{}"]])
        h, m = Site(lay.layer(L), "out"), Site(lay.ffn_out(L), "out")
        before = read_at_subject(model, rows, [h, m], pad_id=tok.pad_token_id)
        res = edit(model, tok, REQUESTS, cfg, c0=identity_c0(model, [L]), context_templates=[["{}"]],
                   progress=False)
        move = read_at_subject(model, rows, [h], pad_id=tok.pad_token_id)[h] - before[h]
        delta = res.targets.ffn - before[h]  # MEMIT's δ on the layer output
        cos[mode] = torch.nn.functional.cosine_similarity(move, delta, dim=-1)
    expected = norm(post_norm_preimage(before[m], delta, norm_gain(norm, delta.shape[-1]))) - norm(before[m])
    torch.testing.assert_close(move, expected, rtol=1e-3, atol=1e-3)
    assert cos["preimage"].min() > 0.95 and cos["preimage"].mean() > cos["as-is"].mean() + 0.05
    llama = {}
    for mode in ("as-is", "preimage"):
        model, tok = tiny_model("llama"), tiny_tokenizer()
        cfg = cfg_for(target_site="layer_output", attn_delta=False, spread="even", post_norm_residual=mode)
        res = edit(model, tok, REQUESTS, cfg, c0=identity_c0(model, [1, 2]), context_templates=TEMPLATES,
                   progress=False)
        llama[mode] = [u.delta for u in res.updates]
    assert all(torch.equal(a, b) for a, b in zip(llama["as-is"], llama["preimage"], strict=True))


def test_spread_rule():
    assert spread(8, 3, "sqrt") == pytest.approx(math.sqrt(6))
    assert spread(8, 3, "even") == 6.0
    assert spread(8, 8, "sqrt") == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_one_at_a_time(arch):
    """Each request has its own deltas, clamp and early stop: a batch gives the same targets as singles."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    lay = layout_of(model)
    cfg = cfg_for()
    # several length-sorted passes: a request's rows are spread over passes
    batched = compute_targets(model, tok, lay, REQUESTS, TEMPLATES, cfg.replace(v_rows_per_pass=5))
    for i, r in enumerate(REQUESTS):
        single = compute_targets(model, tok, lay, [r], TEMPLATES, cfg)
        # float noise only (padding changes matmul shapes; Adam normalises tiny gradient differences)
        torch.testing.assert_close(batched.ffn[i], single.ffn[0], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(batched.attn[i], single.attn[0], rtol=1e-3, atol=1e-4)
        assert batched.diagnostics[i].steps == single.diagnostics[0].steps
    # and the optimisation did something
    assert all(d.delta_m_norm > 0 for d in batched.diagnostics)


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_values_read_at_subject_under_right_padding(arch):
    """m0 in the padded batch equals the FFN output at the subject's last token of an unpadded forward."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    lay = layout_of(model)
    cfg = cfg_for(v_num_grad_steps=1)
    res = compute_targets(model, tok, lay, REQUESTS, TEMPLATES, cfg)  # one forward, no step: v = m0
    for i, r in enumerate(REQUESTS):
        e = encode(tok, r.prompt, r.subject)
        rows = [type(e)(e.ids + target_ids(tok, r.target_new)[:-1], e.subject_last)]
        got = read_at_subject(model, rows, [Site(lay.ffn_out(2), "out")], pad_id=tok.pad_token_id)
        torch.testing.assert_close(res.ffn[i], got[Site(lay.ffn_out(2), "out")][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_writes_values_single_layer(arch):
    """With R = {L}, only the bare template and a tiny λ, Eq. 9 makes W k = v: m^L(bare prompt) ≈ v."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    lay = layout_of(model)
    cfg = cfg_for(layers=[2], mom2_update_weight=1e-6)
    res = edit(model, tok, REQUESTS, cfg, c0=identity_c0(model, [2]), context_templates=[["{}"]], progress=False)
    rows = key_rows(tok, REQUESTS, [["{}"]])
    now = read_at_subject(model, rows, [Site(lay.ffn_out(2), "out")], pad_id=tok.pad_token_id)
    torch.testing.assert_close(now[Site(lay.ffn_out(2), "out")], res.targets.ffn, rtol=1e-3, atol=1e-3)
    # ... so the layer-L residual stream moved by exactly the intended δm (StreamCheck)
    assert res.stream_check["ratio"] == pytest.approx(1.0, abs=1e-2)
    assert res.stream_check["cosine"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj"])
def test_first_layer_update_is_hand_computed(arch):
    """Δ at the first critical layer = (R/sqrt(L-l+1)) Kᵀ (λC0 + KKᵀ)⁻¹ with K two-stage averaged keys."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    lay = layout_of(model)
    cfg = cfg_for(layers=[1, 2, 3], mom2_update_weight=3.0)
    targets = compute_targets(model, tok, lay, REQUESTS, TEMPLATES, cfg)
    rows = key_rows(tok, REQUESTS, TEMPLATES)
    got = read_at_subject(model, rows, [Site(lay.ffn_out(1), "in"), Site(lay.ffn_out(3), "out")],
                          pad_id=tok.pad_token_id)
    K = average_two_stage(got[Site(lay.ffn_out(1), "in")], TEMPLATES).double()
    cur = got[Site(lay.ffn_out(3), "out")][:: len(TEMPLATES[0]) + len(TEMPLATES[1])].double()
    R = (targets.ffn.double() - cur) / math.sqrt(3)
    c0 = identity_c0(model, [1, 2, 3])
    expected = R.T @ K @ torch.linalg.inv(3.0 * c0[(1, "ffn")] + K.T @ K)
    # the engine recomputes the same targets (deterministic) and applies the update
    res = edit(model, tok, REQUESTS, cfg, c0=c0, context_templates=TEMPLATES, progress=False)
    d = res.updates[0].delta.double()
    if lay.spec.conv1d:  # GPT-2 stores (in, out)
        assert d.shape == get_weight(model, lay.ffn_out(1)).shape
        d = d.T
    torch.testing.assert_close(d, expected, rtol=1e-3, atol=1e-5)


def test_revert_is_bit_exact_and_patch_roundtrip(tmp_path):
    from pmet.patch import EditResult

    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = edit(model, tok, REQUESTS, cfg_for(), c0=identity_c0(model, [1, 2]), context_templates=TEMPLATES,
               progress=False)
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(before[k], edited[k]) for k in before)
    res.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a saved patch applied to the same base model gives the same bits as the edit itself
    path = res.save(tmp_path / "p")
    loaded = EditResult.load(path)
    loaded.apply(model)
    assert all(torch.equal(edited[k], v) for k, v in model.state_dict().items())
    loaded.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_patch_for_another_model_is_refused(tmp_path):
    from pmet.errors import PatchError
    from pmet.patch import EditResult

    model, tok = tiny_model("llama"), tiny_tokenizer()
    res = edit(model, tok, REQUESTS[:1], cfg_for(), c0=identity_c0(model, [1, 2]), context_templates=TEMPLATES,
               progress=False)
    res.save(tmp_path / "p")
    other = tiny_model("llama", seed=1)
    with pytest.raises(PatchError, match="patch was made for base model"):
        EditResult.load(tmp_path / "p").apply(other)
    with pytest.raises(PatchError, match="already edited"):  # the edited model itself is not a base model
        EditResult.load(tmp_path / "p").apply(model)


@pytest.mark.parametrize("variant", [
    {"attn_delta": False},
    {"update_modules": ["ffn", "attn"]},
    {"spread": "even"},
    {"target_site": "layer_output", "attn_delta": False, "spread": "even"},
    {"v_compute_dtype": "bfloat16"},
])
def test_variants_run(variant):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = cfg_for(**variant)
    c0 = identity_c0(model, [1, 2])
    if "attn" in cfg.update_modules:
        c0.update(identity_c0(model, [1, 2], "attn"))
    res = edit(model, tok, REQUESTS, cfg, c0=c0, context_templates=TEMPLATES, progress=False)
    edited = {u.weight for u in res.updates}
    assert any("down_proj" in w for w in edited)
    assert any("o_proj" in w for w in edited) == ("attn" in cfg.update_modules)
    assert (res.targets.attn is None) == (not cfg.attn_delta or cfg.target_site == "layer_output")


def test_update_modules_are_updated_in_the_order_given():
    """['attn', 'ffn'] and ['ffn', 'attn'] update both projections at each layer, in the order listed: the patch
    lists them in that order and the two edits differ (each update reads keys and values after the one before)."""
    results = {}
    for order in (["attn", "ffn"], ["ffn", "attn"]):
        model, tok = tiny_model("llama"), tiny_tokenizer()
        c0 = {**identity_c0(model, [1, 2]), **identity_c0(model, [1, 2], "attn")}
        res = edit(model, tok, REQUESTS, cfg_for(update_modules=order), c0=c0, context_templates=TEMPLATES,
                   progress=False)
        results[order[0]] = res
        kinds = ["attn" if "o_proj" in u.weight else "ffn" for u in res.updates]
        assert kinds == order * 2 and [u.layer for u in res.updates] == [1, 1, 2, 2]
    a, f = results["attn"].deltas, results["ffn"].deltas
    ffn1 = next(w for w in a if "layers.1.mlp" in w)
    assert torch.equal(results["attn"].targets.ffn, results["ffn"].targets.ffn)  # same targets
    assert not torch.allclose(a[ffn1], f[ffn1], rtol=1e-4, atol=1e-6)  # the FFN update saw W_O^MHSA edited or not


@pytest.mark.parametrize("arch", ["llama", "gptj", "gemma3_text"])
def test_deltas_land_at_subject_positions_under_right_padding(arch):
    """Recompute each request's final NLL one unpadded prompt at a time, adding δm/δa by hand at the subject's
    last token: it must equal the NLL the padded batch reported."""
    from pmet.context import flat
    from pmet.hooks import Trace
    from pmet.prompts import compose

    model, tok = tiny_model(arch), tiny_tokenizer()
    lay = layout_of(model)
    cfg = cfg_for(v_num_grad_steps=4, layers=[2], v_rows_per_pass=3)
    res = compute_targets(model, tok, lay, REQUESTS, TEMPLATES, cfg)
    for i, r in enumerate(REQUESTS):
        bare = encode(tok, r.prompt, r.subject)
        m0a0 = read_at_subject(model, [bare], [Site(lay.ffn_out(2), "out"), Site(lay.attn_out(2), "out")],
                               pad_id=tok.pad_token_id)
        dm = res.ffn[i] - m0a0[Site(lay.ffn_out(2), "out")][0]
        da = res.attn[i] - m0a0[Site(lay.attn_out(2), "out")][0]
        t_ids = list(target_ids(tok, r.target_new))
        nlls = []
        for ctx in flat(TEMPLATES):
            e = encode(tok, compose(ctx, r.prompt), r.subject)
            ids = torch.tensor([list(e.ids) + t_ids[:-1]])

            def add(delta, pos=e.subject_last):
                def fn(out):
                    out = out.clone()
                    out[0, pos] += delta
                    return out
                return fn

            with torch.no_grad(), Trace(model, edits={lay.ffn_out(2): add(dm), lay.attn_out(2): add(da)}):
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            n = len(e.ids)
            nlls.append(-sum(logp[n - 1 + j, t] for j, t in enumerate(t_ids)) / len(t_ids))
        assert float(sum(nlls) / len(nlls)) == pytest.approx(res.diagnostics[i].nll, rel=1e-4, abs=1e-5)
