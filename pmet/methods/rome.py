"""ROME (Meng et al., 2022): a rank-one update of one layer's FFN output projection per edit, applied in sequence.

For each request, on the model as edited so far:
    v    = m0 + δm at layer l, from the Eq. 10 machinery with one layer, no δa and ROME's stopping rule
           (loss < stop_loss only; its record in methods/__init__.py); m0 at the bare prompt
    k*   = key at the subject's last token, averaged over all context templates alike (ROME's compute_u: one
           mean over the template list, not PMET's two-stage mean)
    u    = C0⁻¹ k*                                   (ROME Eq. 2 with the second moment C0 = E[k kᵀ])
    Δ    = (v − W k*) uᵀ / (uᵀ k*)                    (ROME Eq. 2: afterwards the projection maps k* to v)
W k* (bias included, where the projection has one) is read as the mean FFN output over the same template rows.
This is Eq. 2 as written, with k* in every place, which is also EasyEdit's default (`enable_random_prefix_keys`,
after Gupta et al. 2024, "Rebuilding ROME"). ROME's original code instead divides by uᵀk and subtracts W k for
the bare prompt's key k, which maps that key, not k*, to v; that variant is not implemented. ROME's own context
templates (20 generated prefixes) are replaced by PMET's, so all methods see the same prefixes; both choices
are written in docs/EVALUATION.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..arch import as_linear, get_weight, layout_of
from ..config import PMETConfig
from ..context import ContextTemplates
from ..editor import prepare
from ..keys import Site, key_rows, read_at_subject
from ..patch import EditResult
from ..requests import EditRequest
from ..targets import compute_targets
from .sequential import Matrix, Step, run_sequential, single_layer, state_targets


def rank_one_delta(v: torch.Tensor, current: torch.Tensor, k: torch.Tensor, C0: torch.Tensor) -> torch.Tensor:
    """Δ = (v − current) (C0⁻¹k)ᵀ / (kᵀ C0⁻¹ k), in float64 (ROME Eq. 2). Shapes: (d_out,), (d_out,), (d_in,),
    (d_in, d_in) -> (d_out, d_in). After W += Δ, the projection maps k to v exactly."""
    k64 = k.double()
    u = torch.linalg.solve(C0.double().to(k.device), k64)
    return torch.outer((v.double() - current.double()), u) / torch.dot(u, k64)


def edit_rome(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    config: PMETConfig,
    *,
    c0: dict | None = None,
    context_templates: ContextTemplates | None = None,
    corpus: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_name: str = "",
    progress: bool = True,
    fingerprint: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    after_step: Callable[[int], None] | None = None,
    **_: object,
) -> EditResult:
    """Apply `requests` one after another with ROME (in place); returns the summed change as one EditResult.
    With `checkpoint` (a file), progress is saved there every minute and a rerun resumes from it (checkpoint.py);
    `after_step(done)` runs after each edit (sequential.py)."""
    layout = layout_of(model)
    l = single_layer(config, "rome")
    prep = prepare(model, tok, config, c0=c0, context_templates=context_templates, corpus=corpus,
                   cache_dir=cache_dir, progress=progress, fingerprint=fingerprint)
    name = layout.edited_module(l, "ffn")
    W = get_weight(model, name)
    key_site, value_site = Site(name, "in"), Site(layout.ffn_out(l), "out")

    def step(chunk: list[EditRequest], _: int) -> Step:
        t = time.perf_counter()
        tg = compute_targets(model, tok, layout, chunk, prep.templates, config)
        t_targets = time.perf_counter() - t
        t = time.perf_counter()
        got = read_at_subject(model, key_rows(tok, chunk, prep.templates), [key_site, value_site],
                              pad_id=tok.pad_token_id, stop_after=value_site.module)
        k = got[key_site].mean(0)  # k*: one mean over this request's template rows (ROME's compute_u)
        current = got[value_site].mean(0)  # W k* (+ bias), read in the same pass
        delta = rank_one_delta(tg.ffn[0], current, k, prep.c0[(l, "ffn")])
        with torch.no_grad():
            W.add_(as_linear(delta, layout.spec.conv1d).to(W.dtype))
        return Step(tg.diagnostics, tg.ffn, residual_norms={f"{name}.weight": float((tg.ffn[0] - current).norm())},
                    timings={"targets": t_targets, "update": time.perf_counter() - t})

    state, updates, originals = run_sequential(model, requests, [Matrix(f"{name}.weight", l)], step,
                                               checkpoint=checkpoint, progress=progress, desc="rome",
                                               after_step=after_step)
    return EditResult(
        requests=list(requests), config=config, updates=updates, originals=originals, targets=state_targets(state),
        context_templates=prep.templates, fingerprint=prep.fingerprint, model_name=model_name,
        timings={**prep.timings, **state.timings}, stats=prep.stats,
    )
