"""Suffix replay (pmet.replay): replaying layers L..N-1 only at positions ≥ cut, attending to the clean prefix's
keys and values, gives the states of the full replay, on every architecture family."""

from __future__ import annotations

import pytest
import torch

from pmet.arch import layout_of
from pmet.hooks import LayerInputs, Trace
from pmet.prompts import pad_right
from pmet.replay import LayerReplay
from pmet.targets import _plan, _record, _row_tensors, compute_targets, replayed_positions

from .test_engine import REQUESTS, TEMPLATES, cfg_for
from .tiny import ARCHS, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _recorded(model, start: int, rows: list[list[int]]):
    layout = layout_of(model)
    ids, mask = pad_right(rows, 0, "cpu")
    with torch.no_grad(), LayerInputs(model.get_submodule(layout.spec.layers), start) as cap:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return model.get_submodule(layout.spec.layers), cap


@pytest.mark.parametrize("arch", ARCHS)
def test_suffix_replay_reproduces_the_full_replay(arch):
    """Rows of different lengths (right padding), a cut inside them, and a change added at a position ≥ cut: the
    suffix replay's states equal the full replay's at every position it replays (real tokens)."""
    model = tiny_model(arch)
    torch.manual_seed(0)
    lengths = [11, 8, 13]
    rows = [torch.randint(3, 300, (n,)).tolist() for n in lengths]
    starts, ends = torch.tensor([5, 2, 6]), torch.tensor(lengths)  # a different first replayed position per row
    layers, cap = _recorded(model, 2, rows)
    full = LayerReplay(layers, cap, starts, ends, mode="full")
    layers, cap = _recorded(model, 2, rows)
    suffix = LayerReplay(layers, cap, starts, ends, mode="suffix")
    assert not full.starts.any() and suffix.starts.tolist() == [5, 2, 6] and suffix.cap is None  # suffix path taken
    site = layout_of(model).ffn_out(2)
    bump = torch.randn(32)  # every tiny model has width 32

    def add(replay: LayerReplay):
        def edit(out: torch.Tensor) -> torch.Tensor:
            return out.index_put((torch.arange(3), 6 - replay.starts), bump, accumulate=True)  # position 6 of each row
        return edit

    with torch.no_grad():
        with Trace(model, edits={site: add(full)}):
            h_full = full(full.hidden)
        with Trace(model, edits={site: add(suffix)}):
            h_suffix = suffix(suffix.hidden)
    assert h_suffix.shape[1] == int((ends - starts).max())
    for r, n in enumerate(lengths):
        s = int(starts[r])
        torch.testing.assert_close(h_suffix[r, : n - s], h_full[r, s:n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_suffix_and_full_replay_give_the_same_targets(arch):
    """Eq. 10 end to end: the same Adam steps and stops for every request, and the same targets to float32
    rounding carried through six Adam steps (whose first update is lr·sign(g), so rounding-level gradients move)."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    layout = layout_of(model)
    full = compute_targets(model, tok, layout, REQUESTS, TEMPLATES, cfg_for(replay="full"))
    suffix = compute_targets(model, tok, layout, REQUESTS, TEMPLATES, cfg_for(replay="suffix"))
    assert [d.steps for d in full.diagnostics] == [d.steps for d in suffix.diagnostics]
    assert [d.stop for d in full.diagnostics] == [d.stop for d in suffix.diagnostics]
    rel = (suffix.ffn - full.ffn).norm(dim=-1) / full.ffn.norm(dim=-1)
    assert float(rel.max()) < 1e-3
    if full.attn is not None:
        assert float(((suffix.attn - full.attn).norm(dim=-1) / full.attn.norm(dim=-1)).max()) < 1e-3


@pytest.mark.parametrize("replay", ["suffix", "full"])
def test_replayed_positions_count_what_the_recorded_passes_replay(replay):
    """The cost count equals the positions (padding included) the recorded passes hold, several passes deep."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    layout, cfg, cpu = layout_of(model), cfg_for(replay=replay, v_rows_per_pass=3), torch.device("cpu")
    plan = _plan(tok, REQUESTS, TEMPLATES, cfg.kl_prompt)
    passes, _ = _record(model, tok, layout, plan, _row_tensors(tok, plan, REQUESTS, cpu), [layout.ffn_out(1)], cfg)
    assert len(passes) > 2
    held = sum(ps.replay.hidden.shape[0] * ps.replay.hidden.shape[1] for ps in passes)
    assert replayed_positions(tok, REQUESTS, TEMPLATES, cfg, cpu) == held
    if replay == "suffix":
        assert held < replayed_positions(tok, REQUESTS, TEMPLATES, cfg.replace(replay="full"), cpu)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_replay_runs_in_bfloat16_and_restores_the_weights(arch):
    """`v_compute_dtype: bfloat16`: every replayed layer sees bfloat16 states and weights (forward and backward in
    bfloat16), the model's tensors are bit-identical afterwards, and the targets stay near the float32 ones."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    layout = layout_of(model)
    layers = model.get_submodule(layout.spec.layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = set()
    hooks = [layers[i].register_forward_pre_hook(
        lambda m, args, kwargs: seen.add((next(m.parameters()).dtype,
                                          (args[0] if args else kwargs["hidden_states"]).dtype)), with_kwargs=True)
        for i in range(2, len(layers))]
    low = compute_targets(model, tok, layout, REQUESTS, TEMPLATES, cfg_for(v_compute_dtype="bfloat16"))
    for h in hooks:
        h.remove()
    assert (torch.bfloat16, torch.bfloat16) in seen  # the optimisation steps
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    full = compute_targets(model, tok, layout, REQUESTS, TEMPLATES, cfg_for())
    assert low.ffn.dtype == torch.float32 and torch.isfinite(low.ffn).all()
    rel = (low.ffn - full.ffn).norm(dim=-1) / full.ffn.norm(dim=-1)
    assert float(rel.max()) < 0.1


@pytest.mark.parametrize("v_dtype", ["float32", "bfloat16"])
def test_targets_of_a_bfloat16_model(v_dtype):
    """A model loaded in bfloat16 (`--dtype bfloat16`): the replay hands the final norm and the unembedding states
    in the model's own dtype, with or without the bfloat16 replay; targets are float32 and finite."""
    model, tok = tiny_model("llama").to(torch.bfloat16), tiny_tokenizer()
    targets = compute_targets(model, tok, layout_of(model), REQUESTS, TEMPLATES, cfg_for(v_compute_dtype=v_dtype))
    assert targets.ffn.dtype == torch.float32 and torch.isfinite(targets.ffn).all()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_bfloat16_suffix_replay_matches_the_bfloat16_full_replay():
    """The clean prefix is converted with the suffix; targets stay close to the full replay's in bfloat16."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    layout = layout_of(model)
    full = compute_targets(model, tok, layout, REQUESTS, TEMPLATES, cfg_for(replay="full", v_compute_dtype="bfloat16"))
    suffix = compute_targets(model, tok, layout, REQUESTS, TEMPLATES,
                             cfg_for(replay="suffix", v_compute_dtype="bfloat16"))
    rel = (suffix.ffn - full.ffn).norm(dim=-1) / full.ffn.norm(dim=-1)
    assert torch.isfinite(suffix.ffn).all() and float(rel.max()) < 5e-2


def test_replay_field_is_validated():
    from pmet.errors import ConfigError

    with pytest.raises(ConfigError, match="replay"):
        cfg_for(replay="partial")


@pytest.mark.parametrize("arch", ARCHS)
def test_clean_keys_and_values_are_recorded_in_the_clean_forward(arch):
    """RecordKeyValues hands each layer ≥ L a recording cache: every such layer's keys/values are kept, the
    outputs are unchanged, and the replay built on them needs no second pass."""
    from pmet.replay import RecordKeyValues

    model = tiny_model(arch)
    layers = model.get_submodule(layout_of(model).spec.layers)
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        with RecordKeyValues(layers, 2) as kv:
            recorded = model(input_ids=ids, use_cache=False).logits
    assert sorted(kv.recorder.keys) == [2, 3] and kv.recorder.keys[2].shape[0] == 2
    assert kv.recorder.keys[3].shape[-2] == 9
    torch.testing.assert_close(recorded, plain)


@pytest.mark.slow
def test_suffix_replay_on_smollm2_matches_the_full_replay(smol, examples_path):
    """The real model, the tuned preset and pmet's own context templates: identical Adam step counts and stops,
    targets equal to float32 rounding."""
    from pmet.config import load_config
    from pmet.editor import context_templates_for
    from pmet.models import fingerprint
    from pmet.requests import load_requests

    cfg = load_config("smollm2-135m").replace(v_num_grad_steps=10)
    reqs = load_requests(examples_path, limit=3)
    templates = context_templates_for(smol.model, smol.tok, cfg, fingerprint(smol.model))
    layout = layout_of(smol.model)
    full = compute_targets(smol.model, smol.tok, layout, reqs, templates, cfg.replace(replay="full"))
    suffix = compute_targets(smol.model, smol.tok, layout, reqs, templates, cfg.replace(replay="suffix"))
    assert [(d.steps, d.stop) for d in full.diagnostics] == [(d.steps, d.stop) for d in suffix.diagnostics]
    rel = (suffix.ffn - full.ffn).norm(dim=-1) / full.ffn.norm(dim=-1)
    assert float(rel.max()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_attention_equals_transformers_sdpa(dtype):
    """pmet.replay_attention on grouped keys/values with an explicit mask: transformers' sdpa result (grouped heads
    passed as they are, low precision attended in float32), in the queries' dtype, gradients included."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pmet.replay_attention import attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    q = torch.randn(2, 6, 4, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = torch.zeros(2, 1, 4, 9)
    mask[0, ..., 6:], mask[1, ..., :2] = torch.finfo(torch.float32).min, torch.finfo(torch.float32).min
    ours, _ = attention(module, q, k, v, mask.to(dtype).clamp_min(torch.finfo(dtype).min), scaling=0.3)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, _ = sdpa_attention_forward(module, *leaves, mask, scaling=0.3)
    assert ours.dtype == dtype and ours.shape == ref.shape == (2, 4, 6, 8)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(ours.float(), ref, **tol)
    grads = torch.autograd.grad(ours.float().square().sum(), (q, k, v))
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), leaves), strict=True):
        torch.testing.assert_close(g.float(), r, **{"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else
                                   {"rtol": 5e-2, "atol": 5e-2})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_optimisation_steps_attend_through_the_replay_attention(arch, monkeypatch):
    """In bfloat16 the steps (not the recording forward) run pmet.replay_attention; the model is back on sdpa
    afterwards; float32 runs transformers' own attention."""
    import pmet.replay_attention as ra

    model, tok = tiny_model(arch), tiny_tokenizer()
    calls = []
    real = ra.attention
    monkeypatch.setattr(ra, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = cfg_for(v_num_grad_steps=2)
    compute_targets(model, tok, layout_of(model), REQUESTS, TEMPLATES, cfg)
    assert not calls
    compute_targets(model, tok, layout_of(model), REQUESTS, TEMPLATES, cfg.replace(v_compute_dtype="bfloat16"))
    layers = len(model.get_submodule(layout_of(model).spec.layers))
    assert len(calls) >= 2 * (layers - cfg.L) and len(calls) % (layers - cfg.L) == 0
    assert model.config._attn_implementation == "sdpa"
