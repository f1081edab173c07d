"""A disk cache of target vectors (Eq. 10), one file per request, so that runs sharing targets (PMET, the
even-spread and update-attn ablations) optimise each request once.

Key: the model fingerprint (a different or already-edited model has another), the request's subject, prompt and
new target, the context templates, and every config field the optimisation reads (`config.TARGET_FIELDS`, and L).
Not in the key: the batch layout (`v_batch_size`, `v_rows_per_pass`) and `replay`; batched and one-at-a-time
optimisation, and suffix and full replay, agree to float rounding (docs/PERFORMANCE.md). Files are safetensors,
written atomically; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch import ModelLayout
from .cache import cache_root, digest
from .config import PMETConfig, target_key_fields
from .context import ContextTemplates
from .fileio import atomic_write
from .requests import EditRequest
from .sizing import request_batches
from .targets import TargetDiagnostics, Targets, optimise_batch, target_progress


def request_key(fingerprint: str, request: EditRequest, templates: ContextTemplates, cfg: PMETConfig) -> str:
    """Hex digest identifying one request's target under `cfg` on the model with `fingerprint`."""
    return digest({"fingerprint": fingerprint, "templates": templates, "config": target_key_fields(cfg),
                   "request": [request.subject, request.prompt, request.target_new]})


def _load(path: Path) -> tuple[torch.Tensor, torch.Tensor | None, TargetDiagnostics] | None:
    try:
        from safetensors import safe_open

        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            diag = TargetDiagnostics(**json.loads(f.metadata()["diagnostics"]))
    except (OSError, SafetensorError, KeyError, TypeError, ValueError):
        return None  # missing or unreadable: recompute
    return tensors["ffn"], tensors.get("attn"), diag


def _save(path: Path, ffn: torch.Tensor, attn: torch.Tensor | None, diag: TargetDiagnostics) -> None:
    tensors = {"ffn": ffn.detach().float().cpu().contiguous()}
    if attn is not None:
        tensors["attn"] = attn.detach().float().cpu().contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"diagnostics": json.dumps(diag.to_dict())}))


def _compute_batch(model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout,
                   requests: list[EditRequest], batch: list[int], templates: ContextTemplates, cfg: PMETConfig,
                   found: list, paths: list[Path], on_step: Callable[[int], object]) -> None:
    """Optimise one batch of missing targets, fill them into `found` and save each to the cache."""
    fresh = optimise_batch(model, tok, layout, [requests[i] for i in batch], templates, cfg, on_step=on_step)
    for j, i in enumerate(batch):
        attn = fresh.attn[j] if fresh.attn is not None else None
        found[i] = (fresh.ffn[j].cpu(), attn.cpu() if attn is not None else None, fresh.diagnostics[j])
        _save(paths[i], *found[i])


def cached_targets(model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout,
                   requests: list[EditRequest], templates: ContextTemplates, cfg: PMETConfig, *,
                   fingerprint: str, cache_dir: str | os.PathLike | None = None, progress: bool = False
                   ) -> tuple[Targets, int]:
    """`compute_targets` for the requests not in the cache; returns the targets of all and how many were hits."""
    folder = cache_root(cache_dir) / "targets" / fingerprint
    paths = [folder / f"{request_key(fingerprint, r, templates, cfg)}.safetensors" for r in requests]
    found = [_load(p) for p in paths]
    if cfg.attn_delta and cfg.target_site == "components":
        found = [f if f is None or f[1] is not None else None for f in found]
    missing = [i for i, f in enumerate(found) if f is None]
    # one optimisation batch at a time, each saved as soon as it is done (an interrupted run keeps its work)
    device = next(model.parameters()).device
    with target_progress(len(missing), cfg, progress) as bar:
        for batch, batch_cfg in request_batches(len(missing), cfg, device):
            _compute_batch(model, tok, layout, requests, [missing[j] for j in batch], templates, batch_cfg, found,
                           paths, bar.update)
    has_attn = all(f[1] is not None for f in found) and cfg.attn_delta and cfg.target_site == "components"
    return Targets(
        ffn=torch.stack([f[0] for f in found]).to(device),
        attn=torch.stack([f[1] for f in found]).to(device) if has_attn else None,
        diagnostics=[f[2] for f in found],
    ), len(requests) - len(missing)
