"""An edit as data: EditResult, saved as a safetensors patch that can be applied to and reverted from the
same base model, bit-exactly, alone or as a chain of patches made one on top of another.

A patch holds, per edited matrix, either Δ's two factors (P, Q), float64, with Δ = P Qᵀ (PMET/MEMIT: Eq. 9 has
rank ≤ the number of edits, pmet.update.stored_delta) or Δ itself (in the stored layout and dtype of the weight:
sequential methods, or when the factors would be larger), plus metadata (JSON strings): base-model fingerprint,
method, config, requests, context templates, per-request diagnostics, the SHA-256 of every original and edited
matrix, the patch's id and the ids of the patches it was made on top of ("parents", in order). With the null-space
option it also holds each matrix's keys K1 (`keys::<weight>`, hash recorded), so that an edit chained on top of it
(`pmet edit --patch-on`) keeps this edit's keys in its null space, as a sequential batch would.

Applying checks the fingerprint and the original hashes, performs exactly the addition the edit performed
(W += Δ, Δ expanded from its factors by the one function the edit used), and checks the edited hashes. A compact
patch (the default) keeps no original weights: reverting reads them from the base model's own file (and the
patches below it in its chain) and checks them against their recorded hashes. A full patch (`full=True`, and every
file of the older format pmet-patch/1) keeps the originals and reverts without the base model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .arch import get_weight
from .cache import tensor_sha256
from .config import PMETConfig, from_dict
from .errors import PatchError
from .fileio import atomic_write
from .models import fingerprint as model_fingerprint
from .patch_info import FORMAT, PATCH_FILE, read_header
from .requests import EditRequest, parse_record
from .targets import TargetDiagnostics, Targets
from .update import LayerUpdate, factor_product


def short(patch_id: str) -> str:
    return patch_id[:12]


@dataclass
class EditResult:
    """Everything an edit computed and did (see module docstring)."""

    requests: list[EditRequest]
    config: PMETConfig
    updates: list[LayerUpdate]
    originals: dict[str, torch.Tensor]  # weight name -> original weight (CPU copy, model dtype); {} for a loaded
    #                                     compact patch until it is applied
    targets: Targets
    context_templates: list[list[str]]
    fingerprint: str
    model_name: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    stream_check: dict[str, float] = field(default_factory=dict)  # pmet.update.StreamCheck (PMET/MEMIT only)
    method: str = ""
    parents: list[str] = field(default_factory=list)  # ids of the patches below this one in its chain, in order
    base_fingerprint: str = ""  # the chain's unedited model ("" = `fingerprint`: no parents)
    recorded: dict[str, dict[str, Any]] = field(default_factory=dict)  # a loaded patch's per-weight record

    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        return {u.weight: u.delta for u in self.updates}

    def delta_norms(self) -> dict[str, float]:
        """Frobenius norm of Δ per edited matrix (the paper's Figure 4)."""
        return {u.weight: float(u.delta.float().norm()) for u in self.updates}

    def diagnostics(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.targets.diagnostics]

    def originals_sha(self) -> dict[str, str]:
        if not self.originals:
            return {k: w["sha256_original"] for k, w in self.recorded.items()}
        return {k: tensor_sha256(v) for k, v in self.originals.items()}

    def edited_sha(self) -> dict[str, str]:
        """SHA-256 of each edited matrix as `apply` leaves it (W0 + Δ in the weight's dtype)."""
        if not self.originals:
            return {k: w["sha256_edited"] for k, w in self.recorded.items()}
        return {u.weight: tensor_sha256(self.originals[u.weight] + u.delta.to(self.originals[u.weight].dtype))
                for u in self.updates}

    @property
    def patch_id(self) -> str:
        """The patch's identity: SHA-256 over its base fingerprint, parents, requests and weight hashes."""
        parts = [self.fingerprint, self.parents, [r.to_dict() for r in self.requests],
                 sorted(self.originals_sha().items()), sorted(self.edited_sha().items())]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def dtype_of(self, name: str) -> torch.dtype:
        if name in self.originals:
            return self.originals[name].dtype
        return getattr(torch, self.recorded[name]["dtype"])

    # -- applying to a model -------------------------------------------------------------------------
    def apply(self, model: PreTrainedModel, source: str = "patch") -> None:
        """Add every Δ to `model` after checking that it is the base model this edit was made on; afterwards the
        edited matrices must have the recorded hashes (else the model is left as it was)."""
        found = apply_deltas(model, self.deltas, self.originals_sha(), self.fingerprint, self.edited_sha(),
                             hint=_parents_hint(self.parents), source=source)
        self.originals = self.originals or found

    def revert(self, model: PreTrainedModel) -> None:
        """Write the original weights back (bit-exact)."""
        if not self.originals:
            raise PatchError("this compact patch keeps no original weights: revert it from the base model "
                             "(pmet revert PATCH --model EDITED --base BASE)")
        with torch.no_grad():
            for name, orig in self.originals.items():
                get_weight_by_name(model, name).copy_(orig)

    # -- files ---------------------------------------------------------------------------------------
    def metadata(self, full: bool = False) -> dict[str, str]:
        original_sha, edited_sha = self.originals_sha(), self.edited_sha()
        weights = {
            u.weight: {
                "layer": u.layer, "component": u.component, "residual_norm": u.residual_norm,
                "delta_norm": float(u.delta.float().norm()),
                "sha256_original": original_sha[u.weight],
                "sha256_edited": edited_sha[u.weight],
                "dtype": str(self.dtype_of(u.weight)).removeprefix("torch."),
                "shape": list(u.delta.shape),
                "storage": "factors" if u.factors is not None and not full else "delta",
                "rank": None if u.factors is None else u.factors[0].shape[1],
                "sha256_keys": None if u.keys is None else tensor_sha256(u.keys),
            }
            for u in self.updates
        }
        return {
            "format": FORMAT,
            "model": self.model_name,
            "method": self.method,
            "fingerprint": self.fingerprint,
            "base_fingerprint": self.base_fingerprint or self.fingerprint,
            "patch_id": self.patch_id,
            "parents": json.dumps(self.parents),
            "originals": "kept" if full else "base",
            "config": json.dumps(self.config.to_dict()),
            "requests": json.dumps([r.to_dict() for r in self.requests]),
            "context_templates": json.dumps(self.context_templates),
            "diagnostics": json.dumps(self.diagnostics()),
            "weights": json.dumps(weights),
            "timings": json.dumps(self.timings),
            "stats": json.dumps(self.stats, default=str),
        }

    def save(self, out_dir: str | os.PathLike, full: bool = False) -> Path:
        """Write `out_dir/patch.safetensors` atomically; returns its path. Compact (factors where the update has
        them, no originals) unless `full` (every Δ and every original weight)."""
        if full and not self.originals:
            raise PatchError("a full patch needs the original weights: apply this patch to its base model first")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for u in self.updates:
            if u.factors is not None and not full:
                tensors[f"factor_p::{u.weight}"] = u.factors[0].double().contiguous()
                tensors[f"factor_q::{u.weight}"] = u.factors[1].double().contiguous()
            else:
                tensors[f"delta::{u.weight}"] = u.delta.to(self.dtype_of(u.weight)).contiguous()
            if full:
                tensors[f"original::{u.weight}"] = self.originals[u.weight].contiguous()
            if u.keys is not None:  # the null-space option: what protects this edit in a later chained edit
                tensors[f"keys::{u.weight}"] = u.keys.contiguous()
        for name, values in (("ffn", self.targets.ffn), ("attn", self.targets.attn)):
            if values is not None:
                tensors[f"target::{name}"] = values.cpu().contiguous()
        meta = self.metadata(full)
        return atomic_write(out / PATCH_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditResult:
        """Read a patch file (or a directory holding patch.safetensors) and verify what can be verified without
        a model: recorded hashes of kept originals, factor shapes, the patch id."""
        p, meta, _ = read_header(path)
        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise PatchError(f"patch {p}: not a readable safetensors file ({e})") from None
        try:
            result = cls._from_parts(meta, tensors, p)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PatchError(f"patch {p}: malformed metadata or tensors ({type(e).__name__}: {e})") from None
        result.verify(str(p), meta)
        return result

    @classmethod
    def _from_parts(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor], p: Path) -> EditResult:
        weights = _meta_json(meta, "weights", p)
        updates = [_stored_update(name, w, tensors, p) for name, w in weights.items()]
        keeps = meta["format"] == "pmet-patch/1" or meta.get("originals") == "kept"
        diags = [TargetDiagnostics(**d) for d in _meta_json(meta, "diagnostics", p)]
        return cls(
            requests=[parse_record(r, source=str(p), record=i + 1)
                      for i, r in enumerate(_meta_json(meta, "requests", p))],
            config=from_dict(_meta_json(meta, "config", p), source=str(p)),
            updates=updates,
            originals={name: _tensor(tensors, f"original::{name}", p) for name in weights} if keeps else {},
            targets=Targets(tensors.get("target::ffn"), tensors.get("target::attn"), diags),
            context_templates=_meta_json(meta, "context_templates", p),
            fingerprint=str(meta["fingerprint"]),
            model_name=meta.get("model", ""),
            timings=_meta_json(meta, "timings", p, default={}),
            stats=_meta_json(meta, "stats", p, default={}),
            method=meta.get("method", ""),
            parents=_meta_json(meta, "parents", p, default=[]),
            base_fingerprint=meta.get("base_fingerprint", ""),
            recorded=weights,
        )

    def verify(self, source: str, meta: dict[str, str]) -> None:
        """Refuse a patch whose tensors are not the ones it recorded: each kept original must have its recorded
        SHA-256, and original + Δ the recorded edited SHA-256 (a compact patch's Δ is checked when applied)."""
        for name, w in self.recorded.items():
            if list(self.deltas[name].shape) != list(w.get("shape", self.deltas[name].shape)):
                raise PatchError(f"patch {source}: weight '{name}': Δ has not the recorded shape {w['shape']}")
            if not self.originals:
                continue
            if self.deltas[name].shape != self.originals[name].shape:
                raise PatchError(f"patch {source}: weight '{name}': Δ and original differ in shape")
            if w.get("sha256_original") != tensor_sha256(self.originals[name]):
                raise PatchError(f"patch {source}: weight '{name}': the stored original does not match its "
                                 "recorded SHA-256 (the patch was altered or damaged)")
            edited = self.originals[name] + self.deltas[name].to(self.originals[name].dtype)
            if w.get("sha256_edited") != tensor_sha256(edited):
                raise PatchError(f"patch {source}: weight '{name}': original + Δ does not give the recorded edited "
                                 "weight (the patch was altered or damaged)")
        if "patch_id" in meta and meta["patch_id"] != self.patch_id:
            raise PatchError(f"patch {source}: its recorded id does not match its contents (the patch was altered)")


def _stored_update(name: str, w: dict[str, Any], tensors: dict[str, torch.Tensor], p: Path) -> LayerUpdate:
    """A LayerUpdate from a patch's tensors: Δ itself, or Δ expanded from its factors as the edit expanded it."""
    keys = tensors.get(f"keys::{name}")
    if (None if keys is None else tensor_sha256(keys)) != w.get("sha256_keys"):
        raise PatchError(f"patch {p}: weight '{name}': the stored keys do not match their recorded SHA-256 (the "
                         "patch was altered or damaged)")
    if w.get("storage", "delta") == "delta":
        return LayerUpdate(name, w["layer"], w["component"], _tensor(tensors, f"delta::{name}", p),
                           w["residual_norm"], keys=keys)
    P, Q = _tensor(tensors, f"factor_p::{name}", p), _tensor(tensors, f"factor_q::{name}", p)
    if P.dim() != 2 or Q.dim() != 2 or P.shape[1] != Q.shape[1] or [P.shape[0], Q.shape[0]] != w["shape"]:
        raise PatchError(f"patch {p}: weight '{name}': factors of shapes {list(P.shape)}, {list(Q.shape)} do not "
                         f"make a {w['shape']} matrix")
    delta = factor_product(P, Q).to(getattr(torch, w["dtype"]))
    return LayerUpdate(name, w["layer"], w["component"], delta, w["residual_norm"], (P, Q), keys)


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
                 fingerprint: str, edited_sha: dict[str, str], *, hint: str = "", source: str = "patch"
                 ) -> dict[str, torch.Tensor]:
    """W += Δ for each weight, after checking the model's fingerprint and each original matrix exactly, and
    checking each result against its recorded edited hash (else every weight is put back). Returns copies of the
    original weights (CPU)."""
    weights = {n: get_weight_by_name(model, n) for n in deltas}
    found = {n: tensor_sha256(W) if W.shape == deltas[n].shape else "shape" for n, W in weights.items()}
    current = model_fingerprint(model)
    if current != fingerprint or any(found[n] != originals_sha[n] for n in deltas):
        if all(found[n] == edited_sha[n] for n in deltas):
            raise PatchError(f"{source}: this model is already edited with this patch (its edited weights match): "
                             "revert it first")
        differ = [n for n in deltas if found[n] != originals_sha[n]]
        what = (f"{len(differ)} of the {len(deltas)} weights it edits differ from the originals it recorded, e.g. "
                f"'{differ[0]}'" + (" (other shape)" if found[differ[0]] == "shape" else "")) if differ else \
            "the weights it edits match, but other weights differ"
        raise PatchError(f"{source}: patch was made for base model {fingerprint[:12]}, this model is "
                         f"{current[:12]}: {what}{hint}")
    originals = {n: W.detach().cpu().clone() for n, W in weights.items()}
    with torch.no_grad():
        for name, W in weights.items():
            W.add_(deltas[name].to(device=W.device, dtype=W.dtype))
        wrong = [n for n, W in weights.items() if tensor_sha256(W) != edited_sha[n]]
        if wrong:
            for name, W in weights.items():
                W.copy_(originals[name])
            raise PatchError(f"{source}: applying it gives other bits than the edit wrote for '{wrong[0]}' (the "
                             "patch was altered or damaged); the model was left as it was")
    return originals


def _parents_hint(parents: Sequence[str]) -> str:
    if not parents:
        return ""
    return f" (it was made on top of patch{'es' if len(parents) > 1 else ''} " \
        f"{', '.join(short(p) for p in parents)}: apply {'those' if len(parents) > 1 else 'it'} first)"


def chain_keys(patches: Sequence[EditResult]) -> tuple[dict[tuple[int, str], torch.Tensor], list[str]]:
    """K_p K_pᵀ per (layer, component) summed over the keys the patches stored (null-space option, float64), and
    the ids of the patches that stored none (their edits are not in the sum)."""
    grams: dict[tuple[int, str], torch.Tensor] = {}
    without = []
    for p in patches:
        if not any(u.keys is not None for u in p.updates):
            without.append(p.patch_id)
        for u in p.updates:
            if u.keys is not None:
                key = (u.layer, u.component)
                grams[key] = grams[key] + u.key_gram if key in grams else u.key_gram
    return grams, without


def apply_chain(model: PreTrainedModel, chain: Sequence[tuple[str, EditResult]]) -> None:
    """Apply patches (source, patch) in order: each must have been made on top of the ones before it (checked for
    the whole chain before anything is applied)."""
    for i, (src, p) in enumerate(chain):
        below = [q.patch_id for _, q in chain[:i]]
        if below and p.parents[max(0, len(p.parents) - len(below)):] != below:
            made_on = ", ".join(short(x) for x in p.parents) or "the base model"
            raise PatchError(f"patch {src}: made on top of {made_on}, not on top of "
                             f"{', '.join(short(x) for x in below)}: apply a chain in the order it was made")
    for src, p in chain:
        p.apply(model, source=f"patch {src}")


def revert_patch(model: PreTrainedModel, patch: EditResult, originals: dict[str, torch.Tensor] | None = None,
                 source: str = "patch") -> None:
    """Restore the original weights of an edited model (`originals`: the patch's own by default), refusing if
    the model does not carry this patch as its last one on these weights."""
    originals = originals if originals is not None else patch.originals
    if not originals:
        patch.revert(model)  # raises: a compact patch needs its originals from the base model
    edited, original = patch.edited_sha(), patch.originals_sha()
    for name, sha in edited.items():
        if tensor_sha256(get_weight_by_name(model, name)) not in (sha, original[name]):
            raise PatchError(f"{source}: weight '{name}' is neither as this patch left it nor as it found it: revert "
                             "the patches applied after it first (last applied first), or this model is not one it "
                             "edited")
    with torch.no_grad():
        for name, orig in originals.items():
            get_weight_by_name(model, name).copy_(orig)


def originals_from_base(patch: EditResult, base: PreTrainedModel, available: dict[str, EditResult],
                        source: str = "patch") -> dict[str, torch.Tensor]:
    """The weights `patch` was made on: the base model's, plus every patch below it in its chain (found by id in
    `available`) added as applying adds them; checked against the patch's recorded original hashes."""
    weights = {n: get_weight_by_name(base, n).detach().cpu().clone() for n in patch.deltas}
    for pid in patch.parents:
        if pid not in available:
            raise PatchError(f"{source}: made on top of patch {short(pid)}, which was not given: pass the patches "
                             "that stay applied with --keep, in order")
        for name, delta in available[pid].deltas.items():
            if name in weights:
                weights[name].add_(delta.to(weights[name].dtype))
    want = patch.originals_sha()
    for name, W in weights.items():
        if tensor_sha256(W) != want[name]:
            raise PatchError(f"{source}: the base model{' and the patches below it' if patch.parents else ''} do not "
                             f"give the weight '{name}' it was made on (another base model?)")
    return weights


def revert_chain(model: PreTrainedModel, undo: Sequence[tuple[str, EditResult]],
                 keep: Sequence[tuple[str, EditResult]] = (), base: Callable[[], PreTrainedModel] | None = None
                 ) -> None:
    """Revert `undo` (last applied first). A patch without originals gets them from `base()` (the unedited model)
    plus the patches below it, taken from `keep` and `undo`."""
    for (src, p), nxt in zip(undo, [*undo[1:], None], strict=True):
        if nxt is not None and (not p.parents or p.parents[-1] != nxt[1].patch_id):
            raise PatchError(f"patch {src}: {nxt[0]} is not the patch below it: revert a chain last applied first")
    available = {p.patch_id: p for _, p in [*keep, *undo]}
    for src, p in undo:
        if not p.originals and base is None:
            raise PatchError(f"patch {src}: a compact patch is reverted from its base model: pass --base")
        originals = p.originals or originals_from_base(p, base(), available, f"patch {src}")
        revert_patch(model, p, originals, f"patch {src}")
