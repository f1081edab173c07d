"""Crash-safe progress of a sequential edit (ROME, FT-W), so that an interrupted run resumes where it stopped.

One safetensors file holds the edited matrix as it is after the first `done` edits, each finished edit's target
value, and (as JSON metadata) their diagnostics, residual norms, the time spent so far and a digest of the
requests edited. Each edit depends only on the model as edited so far and on its request, so resuming from the
saved matrix continues exactly as the uninterrupted run would have (tests/test_eval.py checks bit-equality).
Written atomically, at most every SAVE_EVERY_S seconds and after the last edit; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..fileio import atomic_write
from ..requests import EditRequest
from ..targets import TargetDiagnostics

SAVE_EVERY_S = 60.0  # seconds between two saves (the last edit is always saved)


def requests_digest(requests: list[EditRequest]) -> str:
    """Digest of the requests' (subject, prompt, new target), in order."""
    data = [[r.subject, r.prompt, r.target_new] for r in requests]
    return hashlib.blake2b(json.dumps(data).encode(), digest_size=16).hexdigest()


@dataclass
class SequentialState:
    """What the first `done` edits produced (empty when starting afresh)."""

    done: int = 0
    diagnostics: list[TargetDiagnostics] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)  # one (1, d) target value per edit (ROME)
    residuals: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class SequentialCheckpoint:
    """Load and save a SequentialState with the edited matrix `W`; `path=None` does nothing."""

    def __init__(self, path: str | os.PathLike | None, requests: list[EditRequest],
                 every_s: float | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.requests = requests
        self.every_s = SAVE_EVERY_S if every_s is None else every_s
        self._saved_at = time.monotonic()

    def resume(self, W: torch.Tensor) -> SequentialState:
        """The saved state if the file exists and belongs to these requests and this matrix (then W holds the
        saved matrix); else a fresh state (W untouched)."""
        if self.path is None or not self.path.exists():
            return SequentialState()
        try:
            with safe_open(self.path, "pt") as f:
                meta = json.loads(f.metadata()["state"])
                weight = f.get_tensor("weight")
                names = set(f.keys())
                values = f.get_tensor("values") if "values" in names else None
            done = int(meta["done"])
            ok = (0 < done <= len(self.requests) and meta["requests"] == requests_digest(self.requests[:done])
                  and tuple(weight.shape) == tuple(W.shape))
            diags = [TargetDiagnostics(**d) for d in meta["diagnostics"]]
        except (OSError, SafetensorError, KeyError, TypeError, ValueError):
            return SequentialState()  # unreadable or another run's: start afresh (the file is overwritten)
        if not ok:
            return SequentialState()
        with torch.no_grad():
            W.copy_(weight.to(W.device, W.dtype))
        rows = [] if values is None else list(values.to(W.device).split(1))
        return SequentialState(done, diags, rows, [float(x) for x in meta["residuals"]],
                               {k: float(v) for k, v in meta["timings"].items()})

    def save(self, W: torch.Tensor, state: SequentialState, *, final: bool = False) -> None:
        """Write `state` and W (atomically) if `every_s` seconds have passed since the last write, or if `final`."""
        if self.path is None or (not final and time.monotonic() - self._saved_at < self.every_s):
            return
        tensors = {"weight": W.detach().cpu().contiguous()}
        if state.values:
            tensors["values"] = torch.cat(state.values).float().cpu().contiguous()
        meta = {"done": state.done, "requests": requests_digest(self.requests[: state.done]),
                "diagnostics": [d.to_dict() for d in state.diagnostics], "residuals": state.residuals,
                "timings": state.timings}
        atomic_write(self.path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))
        self._saved_at = time.monotonic()


def saved_edits(path: str | os.PathLike) -> int:
    """How many edits the checkpoint at `path` holds (0 if none or unreadable)."""
    try:
        with safe_open(path, "pt") as f:
            return int(json.loads(f.metadata()["state"])["done"])
    except (OSError, SafetensorError, KeyError, TypeError, ValueError):
        return 0
