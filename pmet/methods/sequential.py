"""Sequential editing, one loop for all: ROME and FT-W (one request per step) and PMET/MEMIT in consecutive
batches (`--sequential-batches K`). Each step edits the model in place, on the model as edited so far.

The loop keeps what the steps produced in a SequentialState, saves it (with the edited matrices) through
checkpoint.py so that an interrupted run resumes where it stopped, and at the end turns the many in-place
additions to each matrix into one Δ = W_now − W_0, saved as one patch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ..config import PMETConfig
from ..errors import ConfigError
from ..requests import EditRequest
from ..targets import TargetDiagnostics, Targets
from ..update import LayerUpdate
from .checkpoint import SequentialCheckpoint, SequentialState, weight_named


@dataclass
class Step:
    """What one step (one request, or one batch) produced."""

    diagnostics: list[TargetDiagnostics]
    values: torch.Tensor | None = None  # target values (n, d) of the step's requests; None for FT-W
    attn_values: torch.Tensor | None = None  # PMET's a0 + δa (if any)
    residual_norms: dict[str, float] = field(default_factory=dict)  # per edited matrix: mean ‖R‖ of this step
    timings: dict[str, float] = field(default_factory=dict)
    key_grams: dict[str, torch.Tensor] = field(default_factory=dict)  # per edited matrix: K Kᵀ of this step's
    #                                                                    keys (the null-space option only)


@dataclass
class Matrix:
    """An edited weight: its name (`<module>.weight`), layer and component."""

    weight: str
    layer: int
    component: str = "ffn"


def run_sequential(model: PreTrainedModel, requests: list[EditRequest], matrices: list[Matrix],
                   step: Callable[[list[EditRequest], int], Step], *, size: int = 1,
                   checkpoint: str | os.PathLike | None = None, progress: bool = True, desc: str = "edit",
                   resumed: Callable[[SequentialState], None] | None = None,
                   after_step: Callable[[int], None] | None = None,
                   ) -> tuple[SequentialState, list[LayerUpdate], dict[str, torch.Tensor]]:
    """Call `step(requests[i:i+size], i)` for consecutive chunks, resuming after the chunks saved in `checkpoint`
    (a file; saved at most every checkpoint.SAVE_EVERY_S seconds and after the last chunk); `after_step(done)` is
    called after each chunk with the number of requests edited so far (e.g. a curve's evaluation). Returns the state,
    one LayerUpdate per matrix (Δ = W_now − W_0, residual norm averaged over steps) and the original weights."""
    names = [m.weight for m in matrices]
    originals = {n: weight_named(model, n).detach().cpu().clone() for n in names}  # before resume: W_0 of this model
    saver = SequentialCheckpoint(checkpoint, requests)
    state = saver.resume(model)
    if resumed is not None:
        resumed(state)  # the caller's own running state (e.g. the null-space key Gram matrices) from the save
    from tqdm.auto import tqdm

    with tqdm(desc=desc, unit="edit", disable=not progress, initial=state.done, total=len(requests)) as bar:
        for i in range(state.done, len(requests), size):
            chunk = requests[i : i + size]
            state.add(step(chunk, i), len(chunk))
            saver.save(model, names, state, final=state.done == len(requests))
            bar.update(len(chunk))
            if after_step is not None:
                after_step(state.done)
    updates = []
    for m in matrices:
        norms = state.residual_norms.get(m.weight, [])
        norm = sum(norms) / len(norms) if norms else float("nan")
        updates.append(finish_sequential(model, m.weight, m.layer, originals[m.weight], norm, m.component))
    return state, updates, originals


def state_targets(state: SequentialState) -> Targets:
    """The targets of every request edited so far, in order (`ffn` None when the method has none: FT-W)."""
    return Targets(ffn=torch.cat(state.values) if state.values else None,
                   attn=torch.cat(state.attn_values) if state.attn_values else None,
                   diagnostics=list(state.diagnostics))


def finish_sequential(model: PreTrainedModel, name: str, layer: int, original: torch.Tensor,
                      residual_norm: float, component: str = "ffn") -> LayerUpdate:
    """Turn many in-place additions to `name` (`<module>.weight`) into one Δ = W_now − W_0 (computed in float64)
    and write W_0 + Δ back, so that the model holds exactly what applying the saved patch gives (bit-exact
    apply/revert)."""
    W = weight_named(model, name)
    with torch.no_grad():
        delta = (W.detach().double().cpu() - original.double()).to(W.dtype)
        W.copy_(original.to(W.device) + delta.to(W.device))
    return LayerUpdate(name, layer, component, delta.float(), residual_norm)


def single_layer(config: PMETConfig, method: str) -> int:
    """The one layer a single-layer baseline (`method` = "rome" or "ft") edits; a clear error if there are more."""
    if len(config.layers) != 1:
        raise ConfigError(f"config field 'layers': {method} edits one layer, got {config.layers} "
                          f"(set methods.{method}.layers in the preset)")
    return config.layers[0]
