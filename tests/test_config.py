"""Hyper-parameters: presets, user files, and the official/EasyEdit PMET hparams files as they are."""

from __future__ import annotations

import json

import pytest

from pmet.config import ABLATIONS, PMETConfig, load_config, parse_overrides, preset_names
from pmet.errors import ConfigError

# The authors' edit/hparams/PMET/EleutherAI_gpt-j-6B.json, verbatim.
OFFICIAL_GPTJ = {
    "layers": [3, 4, 5, 6, 7, 8], "clamp_norm_factor": 0.75, "layer_selection": "all",
    "fact_token": "subject_last", "v_num_grad_steps": 30, "v_lr": 2e-1, "v_loss_layer": 27,
    "v_weight_decay": 0.5, "kl_factor": 1, "rewrite_module_tmp": "transformer.h.{}.attn.out_proj",
    "rewrite_module_tmps": ["transformer.h.{}.mlp.fc_out"], "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp.fc_out", "attn_module_tmp": "transformer.h.{}.attn.out_proj",
    "ln_f_module": "transformer.ln_f", "lm_head_module": "lm_head", "mom2_adjustment": True,
    "mom2_update_weight": 6000, "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32",
    "nll_loss_factor": 1,
}
# EasyEdit's hparams/PMET/gpt-j-6B.yaml, verbatim (it repeats the key model_parallel).
EASYEDIT_GPTJ = """alg_name: "PMET"
model_name: "./hugging_cache/gpt-j-6B"
stats_dir: "./data/stats"
device: 0
layers: [3, 4, 5, 6, 7, 8]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 30
v_lr: 2e-1
v_loss_layer: 27
v_weight_decay: 0.5
kl_factor: 1
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "transformer.h.{}.mlp.fc_out"
rewrite_module_tmps: ["transformer.h.{}.mlp.fc_out"]
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp.fc_out"
attn_module_tmp: "transformer.h.{}.attn.out_proj"
ln_f_module: "transformer.ln_f"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
nll_loss_factor: 1
model_parallel: false
"""


def test_official_hparams_json(tmp_path):
    p = tmp_path / "EleutherAI_gpt-j-6B.json"
    p.write_text(json.dumps(OFFICIAL_GPTJ))
    cfg = load_config(str(p))
    assert cfg.layers == [3, 4, 5, 6, 7, 8] and cfg.L == 8
    assert (cfg.v_num_grad_steps, cfg.v_lr, cfg.clamp_norm_factor, cfg.mom2_update_weight) == (30, 0.2, 0.75, 6000)
    assert cfg.nll_factor == 1 and cfg.mom2_dataset == "auto"


def test_easyedit_hparams_yaml(tmp_path):
    p = tmp_path / "gpt-j-6B.yaml"
    p.write_text(EASYEDIT_GPTJ)
    cfg = load_config(str(p))
    assert cfg.mom2_update_weight == 15000 and cfg.v_lr == 0.2 and cfg.layers[-1] == 8


def test_gpt_j_preset_is_the_paper():
    cfg = load_config("gpt-j-6b")
    assert cfg == PMETConfig(**{**PMETConfig().to_dict(), "mom2_n_samples": 100000, "mom2_n_tokens": 10_000_000})
    neox = load_config("gpt-neox-20b")
    assert neox.layers == [6, 7, 8, 9, 10] and neox.mom2_update_weight == 15000 and neox.clamp_norm_factor == 0.8


def test_every_preset_loads():
    names = preset_names()
    assert {"smollm2-135m", "gemma3-270m", "gpt-j-6b", "gpt-neox-20b"} <= set(names)
    for name in names:
        assert load_config(name).layers


def test_smollm2_zsre_preset_changes_pmet_only():
    """smollm2-135m-zsre: PMET's zsRE-swept clamp and λ; the baselines exactly as in the CounterFact preset."""
    def diff(method):
        a, b = load_config("smollm2-135m-zsre", method).to_dict(), load_config("smollm2-135m", method).to_dict()
        return {k for k in a if a[k] != b[k]}

    assert diff("pmet") == {"clamp_norm_factor", "mom2_update_weight"}
    assert diff("memit") == diff("rome") == set()


def test_bad_config_values(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("layers: [5, 3]\n")
    with pytest.raises(ConfigError, match="'layers'"):
        load_config(str(p))
    p.write_text("layers: [3]\nspeed: fast\n")
    with pytest.raises(ConfigError, match="unknown config field 'speed'"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset")
    for text, needle in [("layers: 3\n", "'layers': expected a list of integers, got 3"),
                         ("layers: [3]\nattn_delta: maybe\n", "'attn_delta': expected true or false"),
                         ("layers: [3]\nv_num_grad_steps: 2.5\n", "'v_num_grad_steps': expected an integer"),
                         ("layers: [3]\nupdate_modules: ffn\n", "'update_modules': expected a list of strings")]:
        p.write_text(text)  # wrong types are named, not crashed on or silently taken (a string is truthy)
        with pytest.raises(ConfigError, match=needle):
            load_config(str(p))
    p.write_text("layers: [3]\npost_norm_residual: preimage\n")  # a MEMIT option, refused for PMET
    with pytest.raises(ConfigError, match="'post_norm_residual'.*MEMIT"):
        load_config(str(p))
    assert load_config(str(p), method="memit").post_norm_residual == "preimage"


def test_set_overrides_are_typed_and_applied_last():
    """`--set FIELD=VALUE`: YAML-typed values, the reference's key names, applied after the method's section."""
    sets = parse_overrides(["mom2_update_weight=5000", "layers=[2, 3, 4, 5]", "residual=stream",
                            "nll_loss_factor=0.5", "mom2_n_samples=null"])
    assert sets == {"mom2_update_weight": 5000, "layers": [2, 3, 4, 5], "residual": "stream", "nll_factor": 0.5,
                    "mom2_n_samples": None}
    base = load_config("gemma3-270m", "memit")
    cfg = load_config("gemma3-270m", "memit", settings=parse_overrides(
        ["layers=[2, 3, 4, 5]", "mom2_update_weight=500", "post_norm_residual=preimage"]))
    assert (cfg.layers, cfg.mom2_update_weight, cfg.post_norm_residual) == ([2, 3, 4, 5], 500.0, "preimage")
    assert base.layers != cfg.layers and base.mom2_update_weight != 500.0  # the memit section was overridden
    assert cfg.replace(layers=base.layers, mom2_update_weight=base.mom2_update_weight,
                       post_norm_residual=base.post_norm_residual) == base  # and nothing else changed
    # --set wins over an ablation's option passed the way the CLI passes it
    assert load_config("gpt-j-6b", settings={"spread": "sqrt"}, **ABLATIONS["even-spread"]).spread == "sqrt"
    assert parse_overrides(["v_lr=2e-1"]) == {"v_lr": 0.2}  # YAML 1.1 reads 2e-1 as a string; files get the same
    for item, needle in [("layers", "expected FIELD=VALUE"), ("=3", "expected FIELD=VALUE"),
                         ("speed=fast", "unknown config field 'speed'"), ("layers=[3", "not valid YAML"),
                         ("layers=3", "'layers': expected a list of integers"),
                         ("attn_delta=maybe", "'attn_delta': expected true or false"),
                         ("v_lr=fast", "'v_lr': expected a number, got 'fast'")]:
        with pytest.raises(ConfigError, match=needle):
            parse_overrides([item])
    with pytest.raises(ConfigError, match="'post_norm_residual'.*MEMIT"):  # validated like a file's value
        load_config("gpt-j-6b", settings=parse_overrides(["post_norm_residual=preimage"]))


def test_variants_are_one_option_each():
    assert load_config("gpt-j-6b", **ABLATIONS["no-attn-delta"]).attn_delta is False
    assert load_config("gpt-j-6b", **ABLATIONS["update-attn"]).update_modules == ["attn", "ffn"]
    assert load_config("gpt-j-6b", **ABLATIONS["even-spread"]).spread == "even"
    memit = load_config("gpt-j-6b", method="memit")
    assert (memit.target_site, memit.spread, memit.attn_delta) == ("layer_output", "even", False)


def test_every_field_is_classified_for_the_target_cache():
    """A new config field must be declared as changing the targets or not (config.TARGET_FIELDS): otherwise the
    target cache could reuse targets computed under another value."""
    import dataclasses

    from pmet.config import NON_TARGET_FIELDS, TARGET_FIELDS, target_key_fields

    fields = {f.name for f in dataclasses.fields(PMETConfig)}
    assert fields == TARGET_FIELDS | NON_TARGET_FIELDS, "classify: " + ", ".join(
        sorted(fields - TARGET_FIELDS - NON_TARGET_FIELDS))
    assert not TARGET_FIELDS & NON_TARGET_FIELDS
    base = PMETConfig()
    changes = {"stop_rule": "loss", "target_site": "layer_output", "v_compute_dtype": "bfloat16",
               "kl_prompt": "{} was a", "attn_delta": False}
    for name in sorted(TARGET_FIELDS - {"fact_token"}):  # fact_token has one allowed value
        value = getattr(base, name)
        other = changes[name] if name in changes else value * 2 if isinstance(value, float) else value + 1
        changed = base.replace(**{name: other}, **({"attn_delta": False} if name == "target_site" else {}))
        assert target_key_fields(changed) != target_key_fields(base), name
    assert target_key_fields(base.replace(layers=[1, 8])) == target_key_fields(base)  # only L counts
    assert target_key_fields(base.replace(layers=[3, 9])) != target_key_fields(base)


def test_v_loss_layer_is_the_last_layer_or_refused():
    """The reference files name the layer whose output the NLL reads; pmet reads the model's output, so only the
    last layer (or null) is accepted, at edit time when the model's depth is known."""
    from pmet.editor import prepare
    from pmet.errors import ConfigError as CE

    from .test_engine import TEMPLATES, identity_c0
    from .tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    n = model.config.num_hidden_layers
    for ok in (None, n - 1):
        prepare(model, tok, PMETConfig(layers=[1], v_loss_layer=ok), c0=identity_c0(model, [1]),
                context_templates=TEMPLATES)
    with pytest.raises(CE, match=f"'v_loss_layer': {n - 2}.*last layer \\({n - 1}\\)"):
        prepare(model, tok, PMETConfig(layers=[1], v_loss_layer=n - 2), c0=identity_c0(model, [1]),
                context_templates=TEMPLATES)
    with pytest.raises(CE, match="'update_modules'"):
        PMETConfig(update_modules=["ffn", "ffn"])


def test_config_module_imports_no_torch_and_no_cycle():
    """The CLI reads configs and method records before importing torch; pmet.cli and pmet.evaluation.cli do not
    import each other both ways."""
    import subprocess
    import sys

    code = ("import sys, pmet.config, pmet.methods; assert 'torch' not in sys.modules, 'torch'; "
            "import pmet.evaluation.cli as e; assert 'pmet.cli' not in sys.modules, 'cycle'")
    subprocess.run([sys.executable, "-c", code], check=True)
