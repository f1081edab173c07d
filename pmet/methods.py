"""One entry point for every editing method the paper compares: PMET (and its ablations), MEMIT, ROME, FT-W.

`apply_method(method, ...)` edits the model in place and returns an EditResult (saveable, revertible). PMET and
MEMIT apply all requests as one batch (`sequential_batches=K` splits them into consecutive batches of K on the
same model); ROME and FT-W apply them one at a time by construction.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .baselines.checkpoint import SequentialCheckpoint, SequentialState
from .baselines.common import finish_sequential
from .config import METHODS, PMETConfig
from .errors import ConfigError
from .patch import EditResult
from .requests import EditRequest
from .targets import Targets
from .update import LayerUpdate

SEQUENTIAL = ("rome", "ft")
# Bumped when a method's computation changes, so that progress saved by the old code (pmet.baselines.checkpoint)
# is not resumed by the new one. rome 2: Eq. 2 with k* in every place (2026-11-26).
REVISION = {"pmet": 1, "memit": 1, "rome": 2, "ft": 1}


def _editor(method: str) -> Callable[..., EditResult]:
    if method in ("pmet", "memit"):
        from .editor import edit

        return edit
    if method == "rome":
        from .baselines.rome import edit_rome

        return edit_rome
    if method == "ft":
        from .baselines.ft import edit_ft

        return edit_ft
    raise ConfigError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


def apply_method(method: str, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
                 config: PMETConfig, *, sequential_batches: int | None = None, c0: dict | None = None,
                 context_templates: list[list[str]] | None = None, corpus: str | None = None,
                 cache_dir: str | os.PathLike | None = None, model_name: str = "", progress: bool = True,
                 fingerprint: str | None = None, target_cache: bool = False,
                 checkpoint: str | os.PathLike | None = None) -> EditResult:
    """Edit `model` in place with `method`; see the module docstring for the batch semantics. `checkpoint` (ROME,
    FT-W, `sequential_batches`): a file where the sequential edit saves its progress and from which a rerun
    resumes (baselines/checkpoint.py)."""
    run = _editor(method)
    kwargs = dict(c0=c0, context_templates=context_templates, corpus=corpus, cache_dir=cache_dir,
                  model_name=model_name, progress=progress)
    if method in SEQUENTIAL or not sequential_batches or sequential_batches >= len(requests):
        extra = {"target_cache": target_cache} if method not in SEQUENTIAL else {"checkpoint": checkpoint}
        return run(model, tok, requests, config, fingerprint=fingerprint, **kwargs, **extra)
    if sequential_batches < 1:
        raise ConfigError("--sequential-batches must be a positive number of edits per batch")
    # Consecutive batches on the same model. Context templates and C0 come from the unedited model and are
    # reused (MEMIT/AlphaEdit sequential protocol); targets and keys are computed on the model as edited so far.
    from .editor import prepare

    prep = prepare(model, tok, config, c0=c0, context_templates=context_templates, corpus=corpus,
                   cache_dir=cache_dir, progress=progress, fingerprint=fingerprint)
    kwargs = {**kwargs, "c0": prep.c0, "context_templates": prep.templates}
    saver = SequentialCheckpoint(checkpoint, requests)
    state = saver.resume(model)  # the batches before `done`, as saved (the model then holds their edits)
    results = [_resumed_batches(state, requests, config, prep, model_name)] if state.done else []
    for i in range(state.done, len(requests), sequential_batches):
        res = run(model, tok, requests[i : i + sequential_batches], config, target_cache=target_cache,
                  fingerprint=prep.fingerprint if i == 0 else None, **kwargs)
        results.append(res)
        state.done = i + len(res.requests)
        state.updates = [[u.weight, u.layer, u.component, u.residual_norm] for u in results[0].updates]
        state.diagnostics += res.targets.diagnostics
        state.values.append(res.targets.ffn)
        if res.targets.attn is not None:
            state.attn_values.append(res.targets.attn)
        state.timings = {k: state.timings.get(k, 0.0) + v for k, v in res.timings.items()}
        saver.save(model, [u[0] for u in state.updates], state, final=state.done == len(requests))
    merged = merge_sequential(model, results)
    merged.timings.update({k: merged.timings.get(k, 0.0) + v for k, v in prep.timings.items()})
    merged.stats = prep.stats
    return merged


def _resumed_batches(state: SequentialState, requests: list[EditRequest], config: PMETConfig, prep: Any,
                     model_name: str) -> EditResult:
    """The saved first `state.done` requests of a sequential-batches run as one EditResult for merge_sequential
    (which reads each matrix's name, layer, component and residual norm, the originals and the targets)."""
    return EditResult(
        requests=requests[: state.done], config=config,
        updates=[LayerUpdate(w, int(l), c, torch.empty(0), float(r)) for w, l, c, r in state.updates],
        originals=state.originals,
        targets=Targets(ffn=torch.cat(state.values), attn=torch.cat(state.attn_values) if state.attn_values else None,
                        diagnostics=list(state.diagnostics)),
        context_templates=prep.templates, fingerprint=prep.fingerprint, model_name=model_name,
        timings=dict(state.timings), stats=prep.stats,
    )


def merge_sequential(model: PreTrainedModel, results: list[EditResult]) -> EditResult:
    """Consecutive edits of one model as one EditResult: per matrix Δ = W_now − W_0 and the first originals
    (the model is left holding exactly W_0 + Δ, so the patch applies and reverts bit-exactly)."""
    first = results[0]
    updates = [
        finish_sequential(model, u.weight.removesuffix(".weight"), u.layer, first.originals[u.weight],
                          u.residual_norm, component=u.component)
        for u in first.updates
    ]
    timings: dict[str, float] = {}
    for res in results:
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return EditResult(
        requests=[r for res in results for r in res.requests], config=first.config, updates=updates,
        originals=first.originals,
        targets=Targets(ffn=torch.cat([r.targets.ffn for r in results]),
                        attn=None if first.targets.attn is None else torch.cat([r.targets.attn for r in results]),
                        diagnostics=[d for r in results for d in r.targets.diagnostics]),
        context_templates=first.context_templates, fingerprint=first.fingerprint, model_name=first.model_name,
        timings=timings, stats=first.stats,
    )
