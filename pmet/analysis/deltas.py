"""The paper's Figure 4: Frobenius norms of the incremental weights Δ per layer and per edited matrix.

Inputs are patches written by `EditResult.save` (patch.safetensors, or the folder holding it) or EditResult
objects; no model is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from ..patch import PATCH_FILE, EditResult

COMPONENT_NAMES = {"ffn": "FFN", "attn": "MHSA"}


def default_label(path: str | os.PathLike) -> str:
    """The folder name for `DIR` or `DIR/patch.safetensors`, else the file stem."""
    p = Path(path)
    if p.is_dir() or p.name == PATCH_FILE:
        return (p if p.is_dir() else p.parent).resolve().name
    return p.stem


def describe(result: EditResult) -> str:
    """The method variant of an edit in the paper's words (PMET, even spread, w/o δa, w/ W_O^MHSA, MEMIT)."""
    c = result.config
    if c.target_site != "components":
        return "MEMIT" if c.spread == "even" else f"layer-output target, {c.spread} spread"
    parts = []
    if not c.attn_delta:
        parts.append("w/o δa")
    if "attn" in c.update_modules:
        parts.append("w/ W_O^MHSA")
    if c.spread != "sqrt":
        parts.append(f"{c.spread} spread")
    return "PMET" + (" (" + ", ".join(parts) + ")" if parts else "")


def delta_norm_table(
    paths_or_results: Sequence[str | os.PathLike | EditResult], labels: Sequence[str] | None = None
) -> list[dict]:
    """One row per (input, edited matrix): label, method, layer, component, weight name, ‖Δ‖_F, requests."""
    if not paths_or_results:
        raise ConfigError("no patches given")
    if labels is not None and len(labels) != len(paths_or_results):
        raise ConfigError(f"{len(labels)} labels for {len(paths_or_results)} patches")
    names: list[str] = []
    rows: list[dict] = []
    for i, item in enumerate(paths_or_results):
        if isinstance(item, EditResult):
            result, label, source = item, f"edit {i + 1}", ""
        else:
            result, label, source = EditResult.load(item), default_label(item), str(item)
        if labels is not None:
            label = labels[i]
        if label in names:  # keep lines distinguishable
            label = f"{label} #{i + 1}"
        names.append(label)
        for u in sorted(result.updates, key=lambda u: (u.component, u.layer)):
            rows.append({
                "label": label, "method": describe(result), "source": source, "layer": u.layer,
                "component": u.component, "weight": u.weight, "norm": float(u.delta.float().norm()),
                "n_requests": len(result.requests), "model": result.model_name,
            })
    return rows


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Lines of the plot: "label" (one edited matrix kind) or "label (FFN)"/"label (MHSA)" -> (layers, norms)."""
    comps_of: dict[str, set[str]] = {}
    for r in rows:
        comps_of.setdefault(r["label"], set()).add(r["component"])
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        name = r["label"]
        if len(comps_of[name]) > 1:
            name = f"{name} ({COMPONENT_NAMES.get(r['component'], r['component'])})"
        xs, ys = out.setdefault(name, ([], []))
        xs.append(r["layer"])
        ys.append(r["norm"])
    return out
