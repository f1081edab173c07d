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

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..arch import get_weight, layout_of
from ..config import PMETConfig
from ..models import fingerprint as model_fingerprint
from ..patch import EditResult
from ..prompts import target_ids
from ..requests import EditRequest
from ..targets import TargetDiagnostics, Targets
from .checkpoint import SequentialCheckpoint
from .common import finish_sequential, single_layer

STOP_LOSS = 1e-2


def _target_nll(model: PreTrainedModel, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Mean −log P(y_j | prompt, y_<j) over the target tokens ids[n_prompt:] of one row."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0, n_prompt - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, ids[n_prompt:])


def edit_ft(model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest], config: PMETConfig,
            *, model_name: str = "", progress: bool = True, fingerprint: str | None = None,
            checkpoint: str | os.PathLike | None = None, **_: object) -> EditResult:
    """Fine-tune for `requests` one after another (in place); returns the summed change as one EditResult.
    With `checkpoint` (a file), progress is saved there every minute and a rerun resumes from it (checkpoint.py)."""
    layout = layout_of(model)
    l = single_layer(config, "ft")
    fp = fingerprint or model_fingerprint(model)
    name = layout.edited_module(l, "ffn")
    W = get_weight(model, name)
    original = W.detach().cpu().clone()
    device = W.device
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    saver = SequentialCheckpoint(checkpoint, requests)
    state = saver.resume(model)  # after `original` was read: Δ stays W_now − W_0 of the unedited model
    t0 = time.perf_counter() - state.timings.get("update", 0.0)
    from tqdm.auto import tqdm

    try:
        W.requires_grad_(True)
        for r in tqdm(requests[state.done :], desc="ft-w", unit="edit", disable=not progress, initial=state.done,
                      total=len(requests)):
            prompt = tuple(tok(r.text)["input_ids"])
            ids = torch.tensor(prompt + target_ids(tok, r.target_new), device=device)
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
            state.diagnostics.append(TargetDiagnostics(
                nll=nll, kl=0.0, prob=float(np.exp(-nll)), steps=steps,
                stop="loss" if steps < config.ft_num_steps else "budget",
                delta_m_norm=0.0, delta_a_norm=0.0, init_m_norm=0.0, init_a_norm=0.0))
            state.done += 1
            state.timings = {"update": time.perf_counter() - t0}
            saver.save(model, [f"{name}.weight"], state, final=state.done == len(requests))
    finally:
        W.requires_grad_(False)
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
        W.grad = None
    update = finish_sequential(model, name, l, original, float("nan"))
    d = W.shape[0] if not layout.spec.conv1d else W.shape[1]
    return EditResult(
        requests=list(requests), config=config, updates=[update], originals={f"{name}.weight": original},
        targets=Targets(ffn=torch.zeros(0, d), attn=None, diagnostics=state.diagnostics), context_templates=[["{}"]],
        fingerprint=fp, model_name=model_name, timings={"targets": 0.0, "update": time.perf_counter() - t0},
        stats={"source": "none (FT-W uses no statistics)"},
    )
