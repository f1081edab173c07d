"""What a patch file holds, read from its header alone (no torch, no model): `pmet show`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import PatchError

PATCH_FILE = "patch.safetensors"
FORMAT = "pmet-patch/2"  # factors or Δ, originals kept or read from the base model (patch.py)
READABLE = ("pmet-patch/1", FORMAT)
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1}


def patch_file(path: str | os.PathLike) -> Path:
    """`path`, or `path/patch.safetensors` for a folder; a PatchError if there is no such file."""
    p = Path(path)
    if p.is_dir():
        p = p / PATCH_FILE
    if not p.is_file():
        raise PatchError(f"patch {p}: file not found")
    return p


def read_header(path: str | os.PathLike) -> tuple[Path, dict[str, str], dict[str, tuple[list[int], str]]]:
    """(file, metadata, {tensor: (shape, dtype)}) without reading any tensor."""
    from safetensors import SafetensorError, safe_open

    p = patch_file(path)
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: (list(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype())) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise PatchError(f"patch {p}: not a readable safetensors file ({e})") from None
    if meta.get("format") not in READABLE:
        raise PatchError(f"patch {p}: not a pmet patch (format {meta.get('format')!r})")
    return p, meta, tensors


def _json(meta: dict[str, str], key: str, p: Path, default: Any) -> Any:
    try:
        return json.loads(meta[key]) if key in meta else default
    except ValueError:
        raise PatchError(f"patch {p}: metadata field '{key}' is not valid JSON") from None


def _kb(n: float) -> str:
    return f"{n / 1024:.0f} KB" if n < 1024**2 else f"{n / 1024**2:.1f} MB"


def describe(path: str | os.PathLike) -> str:
    """A few lines for a person: what was edited, how, where, and what the file's bytes are spent on."""
    p, meta, tensors = read_header(path)
    sizes = {k: math.prod(s) * _BYTES.get(d, 4) for k, (s, d) in tensors.items()}
    weights, requests = _json(meta, "weights", p, {}), _json(meta, "requests", p, [])
    config, parents = _json(meta, "config", p, {}), _json(meta, "parents", p, [])
    kept = meta["format"] == "pmet-patch/1" or meta.get("originals") == "kept"
    lines = [
        f"{p}: {meta['format']}, {_kb(p.stat().st_size)}, "
        + ("full (every Δ and the original weights)" if kept else "compact (originals come from the base model)"),
        f"  id {meta.get('patch_id', '?')[:12]}  model {meta.get('model') or '?'} (fingerprint "
        f"{meta.get('fingerprint', '?')[:12]})  method {meta.get('method') or '?'}",
        "  made on: " + (", ".join(x[:12] for x in parents) if parents else "the base model itself"),
        f"  layers {config.get('layers')}  λ {config.get('mom2_update_weight')}  update {config.get('update_modules')}",
        f"  {len(requests)} request{'s' if len(requests) != 1 else ''}:",
    ]
    for i, r in enumerate(requests[:20]):
        old = r.get("target_true") or "?"
        lines.append(f"    {i + 1}. {r['prompt'].replace('{}', r['subject'], 1)}  {old} -> {r['target_new']}")
    if len(requests) > 20:
        lines.append(f"    ... {len(requests) - 20} more")
    lines.append(f"  {len(weights)} weight{'s' if len(weights) != 1 else ''}:")
    for name, w in weights.items():
        stored = [k for k in tensors if k.endswith(f"::{name}") and not k.startswith("original::")]
        how = f"factors, rank {w.get('rank')}" if w.get("storage") == "factors" else "full Δ"
        lines.append(f"    {name}  layer {w['layer']} {w['component']}  {'x'.join(map(str, w.get('shape', [])))} "
                     f"{w.get('dtype', '?')}  {how} ({_kb(sum(sizes[k] for k in stored))})  "
                     f"|Δ| {w['delta_norm']:.4g}  |R| {w['residual_norm']:.4g}")
    parts = {"Δ / factors": [k for k in sizes if k.split("::")[0] in ("delta", "factor_p", "factor_q")],
             "originals": [k for k in sizes if k.startswith("original::")],
             "targets": [k for k in sizes if k.startswith("target::")]}
    lines.append("  bytes: " + ", ".join(f"{what} {_kb(sum(sizes[k] for k in keys))}"
                                         for what, keys in parts.items() if keys)
                 + f", metadata {_kb(sum(len(v) for v in meta.values()))}")
    return "\n".join(lines)
