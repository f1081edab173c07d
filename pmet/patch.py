"""An edit as data: EditResult, saved as a safetensors patch that can be applied to and reverted from the
same base model, bit-exactly.

A patch holds, per edited matrix, Δ (in the stored layout and dtype of the weight) and the original
weight, plus metadata (JSON strings): base-model fingerprint, config, requests, context templates, per-request
diagnostics, and SHA-256 of every original and edited matrix. Applying checks the fingerprint and the
original hashes, then performs exactly the addition the edit performed (W += Δ), so an applied patch gives
the same bits as the edit itself; reverting writes the original weights back.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .arch import get_weight
from .config import PMETConfig, from_dict
from .errors import PatchError
from .fileio import atomic_write
from .models import fingerprint as model_fingerprint
from .requests import EditRequest, parse_record
from .targets import TargetDiagnostics, Targets
from .update import LayerUpdate

FORMAT = "pmet-patch/1"
PATCH_FILE = "patch.safetensors"


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (exact: any changed bit changes it)."""
    return hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()).hexdigest()


@dataclass
class EditResult:
    """Everything an edit computed and did (see module docstring)."""

    requests: list[EditRequest]
    config: PMETConfig
    updates: list[LayerUpdate]
    originals: dict[str, torch.Tensor]  # weight name -> original weight (CPU copy, model dtype)
    targets: Targets
    context_templates: list[list[str]]
    fingerprint: str
    model_name: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    stream_check: dict[str, float] = field(default_factory=dict)  # pmet.update.StreamCheck (PMET/MEMIT only)

    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        return {u.weight: u.delta for u in self.updates}

    def delta_norms(self) -> dict[str, float]:
        """Frobenius norm of Δ per edited matrix (the paper's Figure 4)."""
        return {u.weight: float(u.delta.float().norm()) for u in self.updates}

    def diagnostics(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.targets.diagnostics]

    # -- applying to a model -------------------------------------------------------------------------
    def apply(self, model: PreTrainedModel) -> None:
        """Add every Δ to `model` after checking that it is the base model this edit was made on."""
        apply_deltas(model, self.deltas, self.originals_sha(), self.fingerprint)

    def revert(self, model: PreTrainedModel) -> None:
        """Write the original weights back (bit-exact)."""
        with torch.no_grad():
            for name, orig in self.originals.items():
                get_weight_by_name(model, name).copy_(orig)

    def originals_sha(self) -> dict[str, str]:
        return {k: tensor_sha256(v) for k, v in self.originals.items()}

    def edited_sha(self) -> dict[str, str]:
        """SHA-256 of each edited matrix as `apply` leaves it (W0 + Δ in the weight's dtype)."""
        return {u.weight: tensor_sha256(self.originals[u.weight] + u.delta.to(self.originals[u.weight].dtype))
                for u in self.updates}

    # -- files ---------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        original_sha, edited_sha = self.originals_sha(), self.edited_sha()
        weights = {
            u.weight: {
                "layer": u.layer, "component": u.component, "residual_norm": u.residual_norm,
                "delta_norm": float(u.delta.float().norm()),
                "sha256_original": original_sha[u.weight],
                "sha256_edited": edited_sha[u.weight],
                "dtype": str(self.originals[u.weight].dtype).removeprefix("torch."),
            }
            for u in self.updates
        }
        return {
            "format": FORMAT,
            "model": self.model_name,
            "fingerprint": self.fingerprint,
            "config": json.dumps(self.config.to_dict()),
            "requests": json.dumps([r.to_dict() for r in self.requests]),
            "context_templates": json.dumps(self.context_templates),
            "diagnostics": json.dumps(self.diagnostics()),
            "weights": json.dumps(weights),
            "timings": json.dumps(self.timings),
            "stats": json.dumps(self.stats, default=str),
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write `out_dir/patch.safetensors` atomically; returns its path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for u in self.updates:
            tensors[f"delta::{u.weight}"] = u.delta.to(self.originals[u.weight].dtype).contiguous()
            tensors[f"original::{u.weight}"] = self.originals[u.weight].contiguous()
        tensors["target::ffn"] = self.targets.ffn.cpu().contiguous()
        if self.targets.attn is not None:
            tensors["target::attn"] = self.targets.attn.cpu().contiguous()
        return atomic_write(out / PATCH_FILE, lambda tmp: save_file(tensors, tmp, metadata=self.metadata()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditResult:
        """Read a patch file (or a directory holding patch.safetensors)."""
        p = Path(path)
        if p.is_dir():
            p = p / PATCH_FILE
        if not p.is_file():
            raise PatchError(f"patch {p}: file not found")
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise PatchError(f"patch {p}: not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT:
            raise PatchError(f"patch {p}: not a pmet patch (format {meta.get('format')!r})")
        weights = json.loads(meta["weights"])
        updates = [
            LayerUpdate(name, w["layer"], w["component"], tensors[f"delta::{name}"], w["residual_norm"])
            for name, w in weights.items()
        ]
        diags = [TargetDiagnostics(**d) for d in json.loads(meta["diagnostics"])]
        return cls(
            requests=[parse_record(r, source=str(p), record=i + 1)
                      for i, r in enumerate(json.loads(meta["requests"]))],
            config=from_dict(json.loads(meta["config"]), source=str(p)),
            updates=updates,
            originals={name: tensors[f"original::{name}"] for name in weights},
            targets=Targets(tensors["target::ffn"], tensors.get("target::attn"), diags),
            context_templates=json.loads(meta["context_templates"]),
            fingerprint=meta["fingerprint"],
            model_name=meta.get("model", ""),
            timings=json.loads(meta.get("timings", "{}")),
            stats=json.loads(meta.get("stats", "{}")),
        )


def get_weight_by_name(model: PreTrainedModel, weight_name: str) -> torch.nn.Parameter:
    module, _, attr = weight_name.rpartition(".")
    if attr != "weight":
        raise PatchError(f"patch names '{weight_name}', which is not a module weight")
    try:
        return get_weight(model, module)
    except AttributeError:
        raise PatchError(f"this model has no weight '{weight_name}': the patch is for another architecture"
                         ) from None


def apply_deltas(model: PreTrainedModel, deltas: dict[str, torch.Tensor], originals_sha: dict[str, str],
                 fingerprint: str) -> None:
    """W += Δ for each weight, after checking the model's fingerprint and each original matrix exactly."""
    current = model_fingerprint(model)
    if current != fingerprint:
        edited = all(
            tensor_sha256(get_weight_by_name(model, n)) != originals_sha[n] for n in deltas
        )
        hint = " (it looks already edited: revert it first)" if edited else ""
        raise PatchError(
            f"patch was made for base model {fingerprint[:12]}, this model is {current[:12]}{hint}"
        )
    weights = {n: get_weight_by_name(model, n) for n in deltas}
    for name, W in weights.items():
        if tensor_sha256(W) != originals_sha[name] or W.shape != deltas[name].shape:
            raise PatchError(f"weight '{name}' differs from the one the patch was made for")
    with torch.no_grad():
        for name, W in weights.items():
            W.add_(deltas[name].to(device=W.device, dtype=W.dtype))


def revert_patch(model: PreTrainedModel, patch: EditResult) -> None:
    """Restore the original weights of an edited model, refusing if it does not carry this patch."""
    original_sha = patch.originals_sha()
    for name, sha in patch.edited_sha().items():
        W = get_weight_by_name(model, name)
        if tensor_sha256(W) not in (sha, original_sha[name]):
            raise PatchError(f"weight '{name}' is neither the edited nor the original one: not this patch's model")
    patch.revert(model)
