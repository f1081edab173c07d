"""FT-W: constrained fine-tuning (ROME's "FT-L", MEMIT's fine-tuning baseline with a weight constraint).

For each request in sequence, Adam (`ft_lr`) on the FFN output projection of layer `layers[0]` only, for at most
`ft_num_steps` steps, minimising the mean NLL of the new target after the rewrite prompt (teacher-forced over
every target token); after each step every weight entry is clipped to W_start ± `ft_norm_constraint` (an L∞
ball around the weights at the start of that edit). Stops early when the loss is below 1e-2 (ROME's rule).

Deviation, written down: ROME's FT-L reads all target tokens from the prompt's last position (a known
shortcut for multi-token targets); here each target token is predicted at its own position.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..arch import get_weight, layout_of
from ..config import PMETConfig
from ..models import fingerprint as model_fingerprint
from ..patch import EditResult
from ..prompts import target_ids
from ..requests import EditRequest
from ..targets import TargetDiagnostics
from .sequential import Matrix, Step, run_sequential, single_layer, state_targets

STOP_LOSS = 1e-2


def _target_nll(model: PreTrainedModel, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Mean −log P(y_j | prompt, y_<j) over the target tokens ids[n_prompt:] of one row."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0, n_prompt - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, ids[n_prompt:])


def _fine_tune(model: PreTrainedModel, tok: PreTrainedTokenizerBase, W: torch.nn.Parameter, r: EditRequest,
               config: PMETConfig) -> TargetDiagnostics:
    """Adam on `W` for one request, each step followed by the L∞ clip around W at the start (module docstring)."""
    prompt = tuple(tok(r.text)["input_ids"])
    ids = torch.tensor(prompt + target_ids(tok, r.target_new), device=W.device)
    start = W.detach().clone()
    opt = torch.optim.Adam([W], lr=config.ft_lr)
    steps, loss = 0, torch.tensor(float("nan"))
    for _ in range(config.ft_num_steps):
        opt.zero_grad(set_to_none=True)
        loss = _target_nll(model, ids, len(prompt))
        if float(loss.detach()) < STOP_LOSS:
            break
        loss.backward()
        opt.step()
        steps += 1
        with torch.no_grad():
            W.copy_(torch.maximum(torch.minimum(W, start + config.ft_norm_constraint),
                                  start - config.ft_norm_constraint))
    nll = float(loss.detach())
    return TargetDiagnostics(nll=nll, kl=0.0, prob=float(np.exp(-nll)), steps=steps,
                             stop="loss" if steps < config.ft_num_steps else "budget",
                             delta_m_norm=0.0, delta_a_norm=0.0, init_m_norm=0.0, init_a_norm=0.0)


def edit_ft(model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest], config: PMETConfig,
            *, model_name: str = "", progress: bool = True, fingerprint: str | None = None,
            checkpoint: str | os.PathLike | None = None, after_step: Callable[[int], None] | None = None,
            **_: object) -> EditResult:
    """Fine-tune for `requests` one after another (in place); returns the summed change as one EditResult (no
    target values: `targets.ffn` is None). With `checkpoint` (a file), progress is saved there every minute and a
    rerun resumes from it (checkpoint.py); `after_step(done)` runs after each edit (sequential.py)."""
    layout = layout_of(model)
    l = single_layer(config, "ft")
    fp = fingerprint or model_fingerprint(model)
    name = layout.edited_module(l, "ffn")
    W = get_weight(model, name)
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    def step(chunk: list[EditRequest], _: int) -> Step:
        t = time.perf_counter()
        diag = _fine_tune(model, tok, W, chunk[0], config)
        return Step([diag], timings={"update": time.perf_counter() - t})

    try:
        W.requires_grad_(True)
        state, updates, originals = run_sequential(model, requests, [Matrix(f"{name}.weight", l)], step,
                                                   checkpoint=checkpoint, progress=progress, desc="ft-w",
                                                   after_step=after_step)
    finally:
        W.requires_grad_(False)
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
        W.grad = None
    return EditResult(
        requests=list(requests), config=config, updates=updates, originals=originals, targets=state_targets(state),
        context_templates=[["{}"]], fingerprint=fp, model_name=model_name,
        timings={"targets": 0.0, **state.timings}, stats={"source": "none (FT-W uses no statistics)"},
    )
