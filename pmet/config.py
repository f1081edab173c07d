"""Hyper-parameters of an edit: a typed dataclass, named YAML presets per model family, user files.

Field names follow the reference implementation's hparams files (MEMIT/PMET JSON, EasyEdit YAML), so those
files load as they are; their module-path keys (`rewrite_module_tmp`, ...) are ignored because module
locations come from pmet.arch. Defaults are the paper's GPT-J CounterFact values (Appendix D; docs/REFERENCE.md,
"Hyper-parameters per model").

Method variants (the paper's ablations and the MEMIT baseline) are one option each:
- `target_site`: "components" (PMET: δa on the MHSA output and δm on the FFN output, keep v = m + δm) or
  "layer_output" (MEMIT: one δ on the layer's output hidden state).
- `attn_delta`: False is the "w/o δa" ablation (only δm is optimised).
- `update_modules`: ["ffn"] (PMET) or ["attn", "ffn"] (the "w/ W_O^MHSA" ablation); at each layer the modules
  are updated in the order listed.
- `spread`: "sqrt" (PMET, Eq. 11) or "even" (MEMIT).
- `residual`: "value" (the paper/reference: R = V − the current value at L's value site, recomputed per layer) or
  "stream" (a deviation, not in the paper: R = the intended move of the layer-L residual stream minus the move
  already made by the layers updated so far; identical to "value" for MEMIT). See docs/METHOD.md.
- `post_norm_residual`: "as-is" (MEMIT as published: its layer-output residual is written into the FFN output as
  it is) or "preimage" (a deviation for architectures that normalise the FFN output before the residual add,
  Gemma 3: write the pre-norm change whose normalised output moves the stream by the residual, or as close to
  it as the norm allows). MEMIT only (PMET's values already live before the norm). See docs/METHOD.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .methods import METHODS, get_method

# Keys of official/EasyEdit hparams files that pmet does not need (module paths, devices, file locations).
_IGNORED_KEYS = {
    "alg_name", "model_name", "stats_dir", "device", "model_parallel", "layer_selection", "mom2_dtype",
    "rewrite_module_tmp", "rewrite_module_tmps", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
    "ln_f_module", "lm_head_module", "mom2_adjustment", "max_length", "batch_size", "fp16", "description",
    "model", "family", "notes", "source", "tuning", "methods",
}
_RENAMED_KEYS = {"nll_loss_factor": "nll_factor", "nullspace_threshold": "null_space_threshold",
                 "L2": "null_space_l2"}


@dataclass
class PMETConfig:
    """All settings of one edit. Units and origins are in the field comments."""

    layers: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])  # critical layers R; L = max(R)
    # Target optimisation (Eq. 10)
    v_num_grad_steps: int = 30  # step budget
    v_lr: float = 0.2  # Adam learning rate
    v_weight_decay: float = 0.5  # decay = w·(‖δm‖/‖m0‖² + ‖δa‖/‖a0‖²)
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ factor·‖initial value‖
    kl_factor: float = 1.0  # μ of Eq. 10
    nll_factor: float = 1.0  # φ of Eq. 10
    nll_factor_when_argmax: float = 0.1  # φ once the target is argmax at every target position (App. D)
    stop_loss: float = 0.05  # stop when the total loss is below this
    stop_kl: float = 0.01  # ... or when the target is argmax and KL ≤ this (App. D)
    stop_rule: str = "argmax"  # "argmax": PMET's rule above; "loss": MEMIT/ROME compute_z, loss < stop_loss only
    kl_prompt: str = "{} is a"  # p' of Eq. 10
    v_loss_layer: int | None = None  # where the NLL of Eq. 10 is read: the model's output (None, or the last layer's
    #                                  index as the reference's files give it); any other layer is refused
    fact_token: str = "subject_last"  # only the subject's last token is supported
    v_batch_size: int = 64  # requests optimised together in one forward/backward
    v_rows_per_pass: int = 64  # prompts replayed together; rows are grouped by length to limit padding
    batch_sizing: str = "auto"  # "auto": on a CUDA device, v_batch_size / v_rows_per_pass grow to fill free memory
    #                             (pmet/sizing.py); "fixed": the values above everywhere (always so on a CPU)
    v_compute_dtype: str = "float32"  # "bfloat16": replay layers L..N-1 in bf16 (pmet.precision; faster on BF16 CPUs)
    replay: str = "suffix"  # each step replays layers L..N-1 at positions ≥ the subject's last token only
    #                         (same targets, pmet/replay.py); "full": at every position (for cross-checks)
    # Weight update (Eq. 8, 9, 11)
    mom2_update_weight: float = 6000.0  # λ
    mom2_dataset: str = "auto"  # corpus for C0: a path, "hf:DATASET[:CONFIG[:SPLIT]]", "self" or "auto"
    mom2_n_tokens: int = 100_000  # tokens used for C0 (the reference counts 100k *texts*; see docs)
    # Context templates (pref_j of Eq. 10 and 12; docs/REFERENCE.md, "Context templates")
    context_template_starts: list[str] = field(
        default_factory=lambda: ["The", "Therefore", "Because", "I", "You"]
    )
    context_template_length: int = 10  # tokens per generated template, start word included
    context_template_top_k: int = 5
    seed: int = 0  # seeds template generation and self-sampled corpora
    # Method variants (see module docstring); defaults are PMET
    target_site: str = "components"
    attn_delta: bool = True
    update_modules: list[str] = field(default_factory=lambda: ["ffn"])
    spread: str = "sqrt"
    residual: str = "value"  # "value" (paper) | "stream" (deviation; module docstring)
    post_norm_residual: str = "as-is"  # "as-is" (MEMIT as published) | "preimage" (deviation; module docstring)
    # Null-space constrained update (AlphaEdit, Fang et al., ICLR 2025): a beyond-paper option, off by default
    # (pmet/null_space.py; AlphaEdit's hparams files: nullspace_threshold 2e-2, L2 10)
    null_space: bool = False  # project each Δ onto the null space of C0's keys and of earlier edits' keys
    null_space_threshold: float = 2e-2  # eigenvalues of C0 below this span the null space (nullspace_threshold)
    null_space_l2: float = 10.0  # α of AlphaEdit's regularised solve (its L2)
    # FT-W baseline (ROME's constrained fine-tuning "FT-L"): Adam on one FFN output projection (layers[0])
    ft_num_steps: int = 25  # optimiser steps per edit
    ft_lr: float = 5e-4
    ft_norm_constraint: float = 5e-4  # L∞ bound on the change of every weight entry
    # Informational: reference sample count, kept so official files round-trip
    mom2_n_samples: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field '{name}': {why}")

        for f in dataclasses.fields(self):
            why = type_error(f.name, getattr(self, f.name))
            if why:
                raise bad(f.name, why)

        if not self.layers or any(not isinstance(x, int) or x < 0 for x in self.layers):
            raise bad("layers", f"must be a non-empty list of layer indices, got {self.layers!r}")
        if sorted(set(self.layers)) != list(self.layers):
            raise bad("layers", f"must be strictly increasing, got {self.layers!r}")
        if self.target_site not in ("components", "layer_output"):
            raise bad("target_site", "must be 'components' (PMET) or 'layer_output' (MEMIT)")
        if self.spread not in ("sqrt", "even"):
            raise bad("spread", "must be 'sqrt' (PMET) or 'even' (MEMIT)")
        if self.residual not in ("value", "stream"):
            raise bad("residual", "must be 'value' (PMET, the paper) or 'stream' (deviation)")
        if self.residual == "stream" and self.update_modules != ["ffn"]:
            raise bad("residual", "'stream' spreads one stream residual and needs update_modules ['ffn']")
        if self.post_norm_residual not in ("as-is", "preimage"):
            raise bad("post_norm_residual", "must be 'as-is' (MEMIT as published) or 'preimage' (deviation)")
        if self.post_norm_residual == "preimage" and self.target_site != "layer_output":
            raise bad("post_norm_residual", "'preimage' applies to MEMIT (target_site=layer_output) only")
        if (not self.update_modules or not set(self.update_modules) <= {"ffn", "attn"}
                or len(set(self.update_modules)) != len(self.update_modules)):
            raise bad("update_modules", "must list 'ffn' and/or 'attn' once each, in the order they are updated")
        if self.target_site == "layer_output" and self.update_modules != ["ffn"]:
            raise bad("update_modules", "MEMIT (target_site=layer_output) updates the FFN only")
        if self.stop_rule not in ("argmax", "loss"):
            raise bad("stop_rule", "must be 'argmax' (PMET, App. D) or 'loss' (MEMIT/ROME: loss < stop_loss only)")
        if self.replay not in ("suffix", "full"):
            raise bad("replay", "must be 'suffix' (positions ≥ the subject's last token) or 'full'")
        if self.batch_sizing not in ("auto", "fixed"):
            raise bad("batch_sizing", "must be 'auto' (fill a GPU's free memory) or 'fixed'")
        if self.v_compute_dtype not in ("float32", "bfloat16", "float16"):
            raise bad("v_compute_dtype", "must be float32, bfloat16 or float16")
        if self.fact_token != "subject_last":
            raise bad("fact_token", "only 'subject_last' is supported")
        if "{}" not in self.kl_prompt:
            raise bad("kl_prompt", "must contain '{}' for the subject")
        if self.v_loss_layer is not None and self.v_loss_layer < 0:
            raise bad("v_loss_layer", "must be the index of the model's last layer, or null")
        for name in ("v_num_grad_steps", "v_batch_size", "v_rows_per_pass", "mom2_n_tokens", "context_template_length"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        for name in ("v_lr", "mom2_update_weight", "clamp_norm_factor", "ft_lr", "ft_norm_constraint",
                     "ft_num_steps", "null_space_threshold", "null_space_l2"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")

    @property
    def L(self) -> int:  # the paper's name for the last critical layer
        return self.layers[-1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> PMETConfig:
        return from_dict({**self.to_dict(), **changes}, source="<replace>")


# Every field, declared once by whether it changes the target values of Eq. 10 (given the model, the request and
# the context templates). The target cache keys a request's target on TARGET_FIELDS (and on L, the last of
# `layers`); tests/test_config.py fails when a new field is in neither set.
TARGET_FIELDS = frozenset({
    "v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "nll_factor",
    "nll_factor_when_argmax", "stop_loss", "stop_kl", "stop_rule", "kl_prompt", "fact_token", "target_site",
    "attn_delta", "v_compute_dtype",
})
NON_TARGET_FIELDS = frozenset({
    "layers",  # only through L, keyed on its own (the layers below L do not change the targets)
    "v_batch_size", "v_rows_per_pass", "batch_sizing", "replay",  # batch layout, replay: equal to float rounding
    "v_loss_layer",  # only the last layer is accepted (editor.prepare)
    "context_template_starts", "context_template_length", "context_template_top_k", "seed",  # via the templates
    # the weight update (Eq. 9, 11), which reads the targets once they are found
    "mom2_update_weight", "mom2_dataset", "mom2_n_tokens", "mom2_n_samples",
    "update_modules", "spread", "residual", "post_norm_residual",
    "null_space", "null_space_threshold", "null_space_l2",
    "ft_num_steps", "ft_lr", "ft_norm_constraint",  # FT-W, which has no targets
})


def target_key_fields(cfg: PMETConfig) -> dict[str, Any]:
    """The config values a target depends on: TARGET_FIELDS and L."""
    return {"L": cfg.L, **{f: getattr(cfg, f) for f in sorted(TARGET_FIELDS)}}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What each field's annotation admits, checked before any range check (YAML's `attn_delta: maybe` is a string).
_TYPE_CHECKS: dict[str, tuple[str, Any]] = {
    "int": ("an integer", _is_int),
    "float": ("a number", lambda v: _is_int(v) or isinstance(v, float)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list[int]": ("a list of integers", lambda v: isinstance(v, list) and all(_is_int(x) for x in v)),
    "list[str]": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "int | None": ("an integer or null", lambda v: v is None or _is_int(v)),
}


def type_error(name: str, value: Any) -> str | None:
    """Why `value` cannot be the config field `name` (by the field's annotation), or None if it can."""
    kind, ok = _TYPE_CHECKS[PMETConfig.__dataclass_fields__[name].type]
    return None if ok(value) else f"expected {kind}, got {value!r}"


ABLATIONS: dict[str, dict[str, Any]] = {
    "no-attn-delta": {"attn_delta": False},
    "update-attn": {"update_modules": ["attn", "ffn"]},  # attention first, then the FFN, at each layer
    "even-spread": {"spread": "even"},
    "stream-residual": {"residual": "stream"},  # not a Table-3 ablation: our deviation (docs/METHOD.md)
}


def _numeric_string(key: str, value: Any) -> Any:
    """A number field given as a string (YAML 1.1 reads "2e-1" as one; EasyEdit's files do this) as the number;
    anything else unchanged. ValueError if the string is not a number."""
    default = PMETConfig.__dataclass_fields__[key].default
    if isinstance(value, str) and isinstance(default, int | float) and not isinstance(default, bool):
        return float(value) if isinstance(default, float) else int(value)
    return value


def from_dict(data: dict[str, Any], *, source: str) -> PMETConfig:
    """Build a config from a dict in pmet's, MEMIT/PMET's or EasyEdit's vocabulary."""
    known = {f.name for f in dataclasses.fields(PMETConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = _RENAMED_KEYS.get(key, key)
        if key in known:
            kwargs[key] = value
        elif key not in _IGNORED_KEYS:
            raise ConfigError(f"{source}: unknown config field '{key}'")
    for key, value in kwargs.items():
        try:
            kwargs[key] = _numeric_string(key, value)
        except ValueError:
            raise ConfigError(f"{source}: config field '{key}': expected a number, got {value!r}") from None
    if kwargs.get("mom2_dataset") == "wikipedia":  # the reference's name for its Wikipedia sample
        kwargs["mom2_dataset"] = "auto"
    try:
        return PMETConfig(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("pmet.presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_config(name_or_path: str, method: str = "pmet", *, settings: dict[str, Any] | None = None,
                **overrides: Any) -> PMETConfig:
    """Load a named preset (`pmet/presets/<name>.yaml`) or a YAML/JSON file for `method` (its base fields, then
    the method record's overrides (pmet/methods/__init__.py), then the file's `methods: {method: {...}}`
    section), then apply `overrides` (None values skipped: unset CLI options) and last `settings` (the user's
    `--set FIELD=VALUE`, None kept)."""
    record = get_method(method)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") and path.exists():
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    elif name_or_path in preset_names():
        source = f"preset '{name_or_path}'"
        text = resources.files("pmet.presets").joinpath(f"{name_or_path}.yaml").read_text()
    else:
        raise ConfigError(
            f"config '{name_or_path}' is neither a file nor a preset (presets: {', '.join(preset_names())})"
        )
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{source}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {_parse_problem(e)}"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields")
    sections = data.get("methods") or {}
    if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
        raise ConfigError(f"{source}: 'methods' must map method names to mappings of config fields")
    unknown = set(sections) - set(METHODS)
    if unknown:
        raise ConfigError(f"{source}: unknown method section(s) {sorted(unknown)} under 'methods'")
    data.update(record.overrides)
    data.update(sections.get(method, {}))
    data.update({k: v for k, v in overrides.items() if v is not None})
    data.update(settings or {})
    return from_dict(data, source=source)


def _parse_problem(e: Exception) -> str:
    """A JSON or YAML parse error in one line, with its line number ('!!python/...' tags are refused here)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "msg", None) or str(e)
    line = getattr(e, "lineno", None) or (mark.line + 1 if mark is not None else None)
    return f"{problem} (line {line})" if line else str(problem)


def parse_overrides(items: list[str] | tuple[str, ...], *, option: str = "--set") -> dict[str, Any]:
    """Read `FIELD=VALUE` strings (VALUE as YAML: `3.0`, `[3, 4, 5]`, `stream`) into config overrides; a field name
    that no config has, or an item without `=`, is a ConfigError naming it."""
    known = {f.name for f in dataclasses.fields(PMETConfig)} | set(_RENAMED_KEYS)
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{option} {item!r}: expected FIELD=VALUE, e.g. {option} mom2_update_weight=5000")
        if key not in known:
            raise ConfigError(f"{option} {item!r}: unknown config field '{key}'")
        key = _RENAMED_KEYS.get(key, key)
        try:
            value = _numeric_string(key, yaml.safe_load(text))
        except yaml.YAMLError:
            raise ConfigError(f"{option} {item!r}: value is not valid YAML") from None
        except ValueError:
            value = text  # reported just below as not a number
        why = type_error(key, value)
        if why:
            raise ConfigError(f"{option} {item!r}: config field '{key}': {why}")
        overrides[key] = value
    return overrides


# Presets for model families without an embedded alias, by `config.model_type`.
PRESET_BY_MODEL_TYPE = {"gptj": "gpt-j-6b", "gpt_neox": "gpt-neox-20b", "llama": "llama-2-7b"}


def config_for(model_type: str, preset: str | None, config: str | None, method: str, ablation: str | None,
               overrides: dict[str, Any], settings: dict[str, Any] | None = None) -> PMETConfig:
    """A run's config: `config` (a preset name or file), else the model's own preset, else the preset of its
    family (`model_type`); then the method, the ablation's option, the CLI `overrides`, and last `--set` items."""
    name = config or preset or PRESET_BY_MODEL_TYPE.get(model_type)
    if name is None:
        raise ConfigError(f"no preset for model type '{model_type}': pass --config FILE")
    extra: dict[str, Any] = {}
    if ablation:
        if ablation not in ABLATIONS:
            raise ConfigError(f"unknown --ablation '{ablation}' (choose from {', '.join(ABLATIONS)})")
        if method != "pmet":
            raise ConfigError("--ablation applies to --method pmet only")
        extra.update(ABLATIONS[ablation])
    cfg = load_config(name, method=method, settings=settings, **{**extra, **overrides})
    if cfg.null_space and get_method(method).sequential:
        raise ConfigError(f"null_space (--null-space) applies to PMET and MEMIT (and PMET's ablations), not to "
                          f"--method {method}")
    return cfg


def parse_layers(layers: str | None, option: str = "--layers") -> list[int] | None:
    """'3,4,5' -> [3, 4, 5]; None stays None (the config's layers)."""
    if layers is None:
        return None
    try:
        return [int(x) for x in layers.split(",")]
    except ValueError:
        raise ConfigError(f"{option} {layers!r}: expected comma-separated layer numbers, e.g. 3,4,5") from None
