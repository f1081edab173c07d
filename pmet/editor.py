"""PMET end to end: context templates, C0, target values (Eq. 10), weight update (Eq. 9, 11).

    result = edit(model, tok, requests, config)           # edits `model` in place, returns an EditResult
    result.revert(model)                                  # original weights back, bit-exact
    result.save("out/")                                   # patch.safetensors

Every derived or random input can be passed in (`context_templates`, `c0`), so an edit is reproducible and
can be cross-checked against other implementations on the same inputs.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch import get_weight, layout_of
from .cache import cache_root, digest
from .config import PMETConfig
from .context import ContextTemplates, get_context_templates, validate_templates
from .errors import ConfigError
from .models import fingerprint as model_fingerprint
from .patch import EditResult
from .requests import EditRequest
from .target_cache import cached_targets
from .targets import compute_targets
from .update import insert

C0Input = dict[int, torch.Tensor] | dict[tuple[int, str], torch.Tensor]


def context_templates_for(model: PreTrainedModel, tok: PreTrainedTokenizerBase, cfg: PMETConfig,
                          fingerprint: str, cache_dir: str | os.PathLike | None = None) -> ContextTemplates:
    """The model's own context templates for `cfg` (cached per model fingerprint and generation settings)."""
    settings = [cfg.seed, cfg.context_template_top_k, cfg.context_template_length, cfg.context_template_starts]
    key = f"templates-{digest(settings, 10)}.json"
    return get_context_templates(
        model, tok, starts=cfg.context_template_starts, length=cfg.context_template_length,
        top_k=cfg.context_template_top_k, seed=cfg.seed,
        cache_file=cache_root(cache_dir) / "templates" / fingerprint / key,
    )


def covariances(model: PreTrainedModel, tok: PreTrainedTokenizerBase, cfg: PMETConfig, fingerprint: str, *,
                corpus: str | None = None, cache_dir: str | os.PathLike | None = None,
                progress: bool = True) -> tuple[dict[tuple[int, str], torch.Tensor], dict[str, Any]]:
    """C0 for every (critical layer, edited component), from the cache or one pass over the corpus each."""
    from .stats import get_c0

    c0: dict[tuple[int, str], torch.Tensor] = {}
    info: dict[str, Any] = {}
    for comp in cfg.update_modules:
        per_layer, stats_info = get_c0(
            model, tok, cfg.layers, corpus or cfg.mom2_dataset, cfg.mom2_n_tokens, component=comp,
            cache_dir=cache_dir, fingerprint=fingerprint, progress=progress, seed=cfg.seed,
        )
        c0.update({(l, comp): t for l, t in per_layer.items()})
        info[comp] = asdict(stats_info)
    return c0, info


def _normalise_c0(c0: C0Input) -> dict[tuple[int, str], torch.Tensor]:
    return {(k if isinstance(k, tuple) else (k, "ffn")): v for k, v in c0.items()}


@dataclass
class Prepared:
    """The derived inputs of an edit: context templates, C0 per (layer, component), the base fingerprint."""

    templates: ContextTemplates
    c0: dict[tuple[int, str], torch.Tensor]
    fingerprint: str
    stats: dict[str, Any]
    timings: dict[str, float]
    projectors: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # null_space's P, if on


def prepare(model: PreTrainedModel, tok: PreTrainedTokenizerBase, config: PMETConfig, *,
            c0: C0Input | None = None, context_templates: ContextTemplates | None = None,
            corpus: str | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True,
            fingerprint: str | None = None) -> Prepared:
    """Context templates and C0 for `config`: the given ones (checked), else the model's own (cached)."""
    layout = layout_of(model)
    if layout.n_layers <= config.L:
        raise ConfigError(f"config field 'layers': {config.layers} exceeds the model's {layout.n_layers} layers")
    if config.v_loss_layer not in (None, layout.n_layers - 1):
        raise ConfigError(f"config field 'v_loss_layer': {config.v_loss_layer}: pmet reads the target's NLL at the "
                          f"model's output, the last layer ({layout.n_layers - 1}); set it to that or null")
    timings: dict[str, float] = {}
    fp = fingerprint or model_fingerprint(model)
    t = time.perf_counter()
    templates = validate_templates(context_templates) if context_templates is not None else \
        context_templates_for(model, tok, config, fp, cache_dir)
    timings["context_templates"] = time.perf_counter() - t
    t = time.perf_counter()
    stats_info: dict[str, Any] = {"source": "given"}
    if c0 is None:
        c0n, stats_info = covariances(model, tok, config, fp, corpus=corpus, cache_dir=cache_dir,
                                      progress=progress)
    else:
        c0n = _normalise_c0(c0)
    missing = [(l, c) for l in config.layers for c in config.update_modules if (l, c) not in c0n]
    if missing:
        raise ConfigError(f"C0 missing for (layer, component) {missing}")
    projectors = {}
    if config.null_space:  # AlphaEdit's P per C0 (pmet/null_space.py), cached beside C0
        from .null_space import cached_projector

        projectors = {(l, c): cached_projector(c0n[(l, c)], config.null_space_threshold, cache_dir)
                      for l in config.layers for c in config.update_modules}
        dims = {f"{l}/{c}": round(float(P.trace())) for (l, c), P in projectors.items()}
        if not all(dims.values()):
            raise ConfigError(f"config field 'null_space_threshold': {config.null_space_threshold} is below every "
                              f"eigenvalue of C0 at (layer/component) {[k for k, v in dims.items() if not v]}: the "
                              "null space is empty and the update would be zero")
        stats_info = {**stats_info, "null_space_dims": dims}
    timings["stats"] = time.perf_counter() - t
    return Prepared(templates, c0n, fp, stats_info, timings, projectors)


def edit(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    config: PMETConfig,
    *,
    c0: C0Input | None = None,
    context_templates: ContextTemplates | None = None,
    corpus: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_name: str = "",
    progress: bool = True,
    fingerprint: str | None = None,
    target_cache: bool = False,
    checkpoint: None = None,
    earlier_keys: dict[tuple[int, str], torch.Tensor] | None = None,
) -> EditResult:
    """Apply all `requests` to `model` as ONE batch edit (in place) and return what was done.

    With `target_cache`, target vectors are read from / written to the cache (pmet.target_cache). `checkpoint`
    must be None: one batch has no progress to save (methods/sequential.py saves consecutive batches).
    `earlier_keys`: with config.null_space, K_p K_pᵀ of the edits made before on this model (pmet/null_space.py)."""
    if not requests:
        raise ConfigError("no requests to edit")
    layout = layout_of(model)
    prep = prepare(model, tok, config, c0=c0, context_templates=context_templates, corpus=corpus,
                   cache_dir=cache_dir, progress=progress, fingerprint=fingerprint)
    templates, c0n, timings = prep.templates, prep.c0, dict(prep.timings)

    t = time.perf_counter()
    if target_cache:
        targets, hits = cached_targets(model, tok, layout, requests, templates, config, fingerprint=prep.fingerprint,
                                       cache_dir=cache_dir, progress=progress)
        prep.stats["target_cache_hits"] = hits
    else:
        targets = compute_targets(model, tok, layout, requests, templates, config, progress=progress)
    timings["targets"] = time.perf_counter() - t

    names = [f"{layout.edited_module(l, c)}.weight" for l in config.layers for c in config.update_modules]
    originals = {n: get_weight(model, n.removesuffix(".weight")).detach().cpu().clone() for n in names}
    t = time.perf_counter()
    try:
        updates, stream_check = insert(model, tok, layout, requests, templates, targets, c0n, config,
                                       batch_size=max(8, config.v_batch_size), projectors=prep.projectors,
                                       earlier_keys=earlier_keys)
    except BaseException:
        with torch.no_grad():  # never leave a half-edited model behind
            for n, w in originals.items():
                get_weight(model, n.removesuffix(".weight")).copy_(w)
        raise
    timings["update"] = time.perf_counter() - t
    return EditResult(
        requests=list(requests), config=config, updates=updates, originals=originals, targets=targets,
        context_templates=templates, fingerprint=prep.fingerprint, model_name=model_name, timings=timings,
        stats=prep.stats, stream_check=asdict(stream_check),
    )
