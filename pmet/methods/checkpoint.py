"""Crash-safe progress of a sequential edit (sequential.py: ROME, FT-W, `--sequential-batches`), so that an
interrupted run resumes where it stopped.

One safetensors file holds the edited matrices as they are after the first `done` edits, the target values found
so far, the key Gram matrices of the null-space option (if on), and (as JSON metadata) their diagnostics,
residual norms, the time spent so far, which matrices are edited and a digest of the requests edited. Each edit
(or batch) depends only on the model as edited so far and on its requests, so resuming from the saved matrices
continues exactly as the uninterrupted run would have (tests/test_eval.py checks bit-equality). Written
atomically, at most every SAVE_EVERY_S seconds and after the
last edit; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from ..arch import get_weight
from ..cache import digest
from ..fileio import atomic_write
from ..requests import EditRequest
from ..targets import TargetDiagnostics

if TYPE_CHECKING:
    from .sequential import Step

SAVE_EVERY_S = 60.0  # seconds between two saves (the last edit is always saved)


def requests_digest(requests: list[EditRequest]) -> str:
    """Digest of the requests' (subject, prompt, new target), in order."""
    return digest([[r.subject, r.prompt, r.target_new] for r in requests], 16)


@dataclass
class SequentialState:
    """What the first `done` edits produced (empty when starting afresh)."""

    done: int = 0
    diagnostics: list[TargetDiagnostics] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)  # target values (n_i, d), per step, in order
    attn_values: list[torch.Tensor] = field(default_factory=list)  # PMET's a0 + δa per step (if any)
    residual_norms: dict[str, list[float]] = field(default_factory=dict)  # per edited matrix, one per step
    timings: dict[str, float] = field(default_factory=dict)  # summed over steps
    key_grams: dict[str, torch.Tensor] = field(default_factory=dict)  # per matrix: Σ K Kᵀ of the edits so far
    #                                                                    (null_space's K_p K_pᵀ), float64

    def add(self, step: Step, n: int) -> None:
        """Record one step that edited `n` more requests."""
        self.done += n
        self.diagnostics += step.diagnostics
        for rows, new in ((self.values, step.values), (self.attn_values, step.attn_values)):
            if new is not None:
                rows.append(new)
        for name, norm in step.residual_norms.items():
            self.residual_norms.setdefault(name, []).append(norm)
        for name, gram in step.key_grams.items():
            self.key_grams[name] = self.key_grams[name] + gram if name in self.key_grams else gram
        self.timings = add_timings(self.timings, step.timings)


def add_timings(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Stage timings summed per stage (stages in order of first appearance)."""
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in dict.fromkeys([*a, *b])}


def weight_named(model: PreTrainedModel, name: str) -> torch.Tensor:
    """The edited matrix `name` (`<module>.weight`) of `model`."""
    return get_weight(model, name.removesuffix(".weight"))


class SequentialCheckpoint:
    """Load and save a SequentialState with the edited matrices of `model`; `path=None` does nothing."""

    def __init__(self, path: str | os.PathLike | None, requests: list[EditRequest],
                 every_s: float | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.requests = requests
        self.every_s = SAVE_EVERY_S if every_s is None else every_s
        self._saved_at = time.monotonic()

    def resume(self, model: PreTrainedModel) -> SequentialState:
        """The saved state if the file exists and belongs to these requests and this model's matrices: then the
        model holds the saved matrices. Else a fresh state (the model untouched)."""
        if self.path is None or not self.path.exists():
            return SequentialState()
        try:
            with safe_open(self.path, "pt") as f:
                meta = json.loads(f.metadata()["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __contains__)
            done = int(meta["done"])
            saved = {k.removeprefix("weight/"): v for k, v in tensors.items() if k.startswith("weight/")}
            current = {name: weight_named(model, name) for name in saved}
            ok = (0 < done <= len(self.requests) and meta["requests"] == requests_digest(self.requests[:done])
                  and bool(saved) and all(saved[n].shape == current[n].shape for n in saved))
            state = SequentialState(
                done, [TargetDiagnostics(**d) for d in meta["diagnostics"]],
                residual_norms={k: [float(x) for x in v] for k, v in meta["residual_norms"].items()},
                timings={k: float(v) for k, v in meta["timings"].items()})
        except (OSError, SafetensorError, KeyError, TypeError, ValueError, AttributeError):
            return SequentialState()  # unreadable or another run's: start afresh (the file is overwritten)
        if not ok:
            return SequentialState()
        device = next(iter(current.values())).device
        for key, rows in (("values", state.values), ("attn_values", state.attn_values)):
            if key in tensors:  # the rows so far as one part (they are only ever concatenated)
                rows.append(tensors[key].to(device))
        state.key_grams = {k.removeprefix("gram/"): v for k, v in tensors.items() if k.startswith("gram/")}
        with torch.no_grad():
            for name, W in current.items():
                W.copy_(saved[name].to(W.device, W.dtype))
        return state

    def save(self, model: PreTrainedModel, names: list[str], state: SequentialState, *, final: bool = False
             ) -> None:
        """Write `state` and the matrices `names` (atomically) if `every_s` seconds have passed since the last
        write, or if `final`."""
        if self.path is None or (not final and time.monotonic() - self._saved_at < self.every_s):
            return
        tensors = {f"weight/{n}": weight_named(model, n).detach().cpu().contiguous() for n in names}
        meta = {"done": state.done, "requests": requests_digest(self.requests[: state.done]),
                "diagnostics": [d.to_dict() for d in state.diagnostics],
                "residual_norms": state.residual_norms, "timings": state.timings}
        for key, rows in (("values", state.values), ("attn_values", state.attn_values)):
            if rows:
                tensors[key] = torch.cat(rows).float().cpu().contiguous()
        tensors.update({f"gram/{n}": g.cpu().contiguous() for n, g in state.key_grams.items()})
        atomic_write(self.path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))
        self._saved_at = time.monotonic()


def saved_edits(path: str | os.PathLike) -> int:
    """How many edits the checkpoint at `path` holds (0 if none or unreadable)."""
    try:
        with safe_open(path, "pt") as f:
            return int(json.loads(f.metadata()["state"])["done"])
    except (OSError, SafetensorError, KeyError, TypeError, ValueError):
        return 0
