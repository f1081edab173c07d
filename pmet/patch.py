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
        apply_deltas(model, self.deltas, self.originals_sha(), self.fingerprint, self.edited_sha())

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
        for name, values in (("ffn", self.targets.ffn), ("attn", self.targets.attn)):
            if values is not None:
                tensors[f"target::{name}"] = values.cpu().contiguous()
        return atomic_write(out / PATCH_FILE, lambda tmp: save_file(tensors, tmp, metadata=self.metadata()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditResult:
        """Read a patch file (or a directory holding patch.safetensors) and verify its recorded hashes."""
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
        try:
            result = cls._from_parts(meta, tensors, p)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PatchError(f"patch {p}: malformed metadata or tensors ({type(e).__name__}: {e})") from None
        result.verify(str(p), json.loads(meta["weights"]))
        return result

    @classmethod
    def _from_parts(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor], p: Path) -> EditResult:
        weights = _meta_json(meta, "weights", p)
        updates = [
            LayerUpdate(name, w["layer"], w["component"], _tensor(tensors, f"delta::{name}", p), w["residual_norm"])
            for name, w in weights.items()
        ]
        diags = [TargetDiagnostics(**d) for d in _meta_json(meta, "diagnostics", p)]
        return cls(
            requests=[parse_record(r, source=str(p), record=i + 1)
                      for i, r in enumerate(_meta_json(meta, "requests", p))],
            config=from_dict(_meta_json(meta, "config", p), source=str(p)),
            updates=updates,
            originals={name: _tensor(tensors, f"original::{name}", p) for name in weights},
            targets=Targets(tensors.get("target::ffn"), tensors.get("target::attn"), diags),
            context_templates=_meta_json(meta, "context_templates", p),
            fingerprint=str(meta["fingerprint"]),
            model_name=meta.get("model", ""),
            timings=_meta_json(meta, "timings", p, default={}),
            stats=_meta_json(meta, "stats", p, default={}),
        )

    def verify(self, source: str, recorded: dict[str, dict[str, Any]]) -> None:
        """Refuse a patch whose tensors are not the ones it recorded: each stored original must have its
        recorded SHA-256, and original + Δ the recorded edited SHA-256."""
        original_sha, edited_sha = self.originals_sha(), self.edited_sha()
        for name, w in recorded.items():
            if self.deltas[name].shape != self.originals[name].shape:
                raise PatchError(f"patch {source}: weight '{name}': Δ and original differ in shape")
            if w.get("sha256_original") != original_sha[name]:
                raise PatchError(f"patch {source}: weight '{name}': the stored original does not match its "
                                 "recorded SHA-256 (the patch was altered or damaged)")
            if w.get("sha256_edited") != edited_sha[name]:
                raise PatchError(f"patch {source}: weight '{name}': original + Δ does not give the recorded edited "
                                 "weight (the patch was altered or damaged)")


def _meta_json(meta: dict[str, str], key: str, p: Path, default: Any = None) -> Any:
    if key not in meta:
        if default is not None:
            return default
        raise PatchError(f"patch {p}: metadata field '{key}' is missing")
    try:
        return json.loads(meta[key])
    except ValueError:
        raise PatchError(f"patch {p}: metadata field '{key}' is not valid JSON") from None


def _tensor(tensors: dict[str, torch.Tensor], key: str, p: Path) -> torch.Tensor:
    if key not in tensors:
        raise PatchError(f"patch {p}: tensor '{key}' is missing")
    return tensors[key]


def get_weight_by_name(model: PreTrainedModel, weight_name: str) -> torch.nn.Parameter:
    module, _, attr = weight_name.rpartition(".")
    if attr != "weight":
        raise PatchError(f"patch names '{weight_name}', which is not a module weight")
    try:
        return get_weight(model, module)
    except (AttributeError, IndexError, KeyError, ValueError):
        raise PatchError(f"this model has no weight '{weight_name}': the patch is for another architecture"
                         ) from None


def apply_deltas(model: PreTrainedModel, deltas: dict[str, torch.Tensor], originals_sha: dict[str, str],
                 fingerprint: str, edited_sha: dict[str, str] | None = None) -> None:
    """W += Δ for each weight, after checking the model's fingerprint and each original matrix exactly."""
    weights = {n: get_weight_by_name(model, n) for n in deltas}
    found = {n: tensor_sha256(W) if W.shape == deltas[n].shape else "shape" for n, W in weights.items()}
    current = model_fingerprint(model)
    if current != fingerprint or any(found[n] != originals_sha[n] for n in deltas):
        if edited_sha and all(found[n] == edited_sha[n] for n in deltas):
            raise PatchError("this model is already edited with this patch (its edited weights match): revert it first")
        differ = [n for n in deltas if found[n] != originals_sha[n]]
        what = (f"{len(differ)} of the {len(deltas)} weights it edits differ from the originals it recorded, e.g. "
                f"'{differ[0]}'" + (" (other shape)" if found[differ[0]] == "shape" else "")) if differ else \
            "the weights it edits match, but other weights differ"
        raise PatchError(f"patch was made for base model {fingerprint[:12]}, this model is {current[:12]}: {what}")
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
