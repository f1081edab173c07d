"""Run one method: `apply_method(name, ...)` edits the model in place and returns an EditResult (saveable,
revertible). PMET and MEMIT apply all requests as one batch (`sequential_batches=K` splits them into consecutive
batches of K on the same model); ROME and FT-W apply them one at a time by construction (their records say so).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..arch import layout_of
from ..config import PMETConfig
from ..errors import ConfigError
from ..patch import EditResult
from ..requests import EditRequest
from . import Method, get_method
from .checkpoint import add_timings
from .sequential import Matrix, Step, run_sequential, state_targets


def apply_method(method: str, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
                 config: PMETConfig, *, sequential_batches: int | None = None, c0: dict | None = None,
                 context_templates: list[list[str]] | None = None, corpus: str | None = None,
                 cache_dir: str | os.PathLike | None = None, model_name: str = "", progress: bool = True,
                 fingerprint: str | None = None, target_cache: bool = False,
                 checkpoint: str | os.PathLike | None = None,
                 after_step: Callable[[int], None] | None = None,
                 earlier_keys: dict[tuple[int, str], torch.Tensor] | None = None) -> EditResult:
    """Edit `model` in place with `method`; see the module docstring for the batch semantics. `checkpoint` (ROME,
    FT-W, `sequential_batches`): a file where the sequential edit saves its progress and from which a rerun
    resumes (methods/checkpoint.py). `after_step(done)` is called after each sequential step (one batch, or one
    request of ROME/FT-W) with the number of requests edited so far; after the one batch otherwise.
    `earlier_keys`: with the null-space option, K_p K_pᵀ per (layer, component) of edits made on this model before
    (e.g. the patches it was made on top of), protected as earlier batches are."""
    record = get_method(method)
    result = _run(record, model, tok, requests, config, sequential_batches, c0=c0, context_templates=context_templates,
                  corpus=corpus, cache_dir=cache_dir, model_name=model_name, progress=progress, fingerprint=fingerprint,
                  target_cache=target_cache, checkpoint=checkpoint, after_step=after_step,
                  earlier_keys=earlier_keys)
    result.method = method
    return result


def _run(record: Method, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
         config: PMETConfig, sequential_batches: int | None, **kwargs) -> EditResult:
    if record.sequential:
        return record.editor()(model, tok, requests, config, **kwargs)
    if not sequential_batches or sequential_batches >= len(requests):  # one batch: no progress to save
        after_step = kwargs.pop("after_step")
        result = record.editor()(model, tok, requests, config, **{**kwargs, "checkpoint": None})
        if after_step is not None:
            after_step(len(requests))
        return result
    if sequential_batches < 1:
        raise ConfigError("--sequential-batches must be a positive number of edits per batch")
    return _in_batches(record.editor(), model, tok, requests, config, sequential_batches, **kwargs)


def _in_batches(edit, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
                config: PMETConfig, size: int, *, checkpoint: str | os.PathLike | None,
                after_step: Callable[[int], None] | None,
                earlier_keys: dict[tuple[int, str], torch.Tensor] | None, **kwargs) -> EditResult:
    """Consecutive batches of `size` on the same model. Context templates and C0 come from the unedited model and
    are reused (MEMIT/AlphaEdit sequential protocol); targets and keys are computed on the model as edited so
    far (its fingerprint, which keys the target cache, is recomputed after the first batch)."""
    from ..editor import prepare

    prep = prepare(model, tok, config, c0=kwargs["c0"], context_templates=kwargs["context_templates"],
                   corpus=kwargs["corpus"], cache_dir=kwargs["cache_dir"], progress=kwargs["progress"],
                   fingerprint=kwargs["fingerprint"])
    layout = layout_of(model)
    matrices = [Matrix(f"{layout.edited_module(l, c)}.weight", l, c)
                for l in config.layers for c in config.update_modules]

    grams: dict[str, torch.Tensor] = {}  # null_space: K_p K_pᵀ of the batches so far, per matrix

    given = earlier_keys or {}

    def step(chunk: list[EditRequest], i: int) -> Step:
        earlier = {}
        for m in matrices:
            parts = [g for g in (given.get((m.layer, m.component)), grams.get(m.weight)) if g is not None]
            if parts:  # the given keys (e.g. of earlier patches) and this run's earlier batches
                earlier[(m.layer, m.component)] = sum(parts[1:], parts[0])
        res = edit(model, tok, chunk, config, **{**kwargs, "c0": prep.c0, "context_templates": prep.templates,
                                                 "fingerprint": prep.fingerprint if i == 0 else None,
                                                 "earlier_keys": earlier or None})
        new = {u.weight: u.key_gram for u in res.updates if u.key_gram is not None}
        grams.update({n: grams[n] + g if n in grams else g for n, g in new.items()})
        return Step(res.targets.diagnostics, res.targets.ffn, res.targets.attn,
                    {u.weight: u.residual_norm for u in res.updates}, res.timings, new)

    state, updates, originals = run_sequential(model, requests, matrices, step, size=size, checkpoint=checkpoint,
                                               progress=False, resumed=lambda s: grams.update(s.key_grams),
                                               after_step=after_step)
    return EditResult(
        requests=list(requests), config=config, updates=updates, originals=originals, targets=state_targets(state),
        context_templates=prep.templates, fingerprint=prep.fingerprint, model_name=kwargs["model_name"],
        timings=add_timings(state.timings, prep.timings),
        stats=prep.stats,
    )
