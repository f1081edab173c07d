"""A model card for an edited model, so that it is never mistaken for its base: the edits (subject, prompt,
old → new), the method, its config and the id of every patch applied, as README.md text (saved models) and as
metadata key/values (exported GGUF files)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .patch import EditResult


def _edit_rows(chain: Sequence[EditResult]) -> list[str]:
    rows = []
    for i, p in enumerate(chain):
        for r in p.requests:
            old = r.target_true if r.target_true is not None else "?"
            rows.append(f"| {i + 1} | {r.subject} | {r.prompt} | {old} → {r.target_new} |")
    return rows


def card_text(chain: Sequence[EditResult], base: str) -> str:
    """README.md of a model edited with `chain` (patches in the order applied) on the base model `base`."""
    n = sum(len(p.requests) for p in chain)
    lines = [
        "---", "tags: [pmet, model-editing, edited-model]", "---", "",
        f"# Edited model: not the original {base}", "",
        f"This model is **{base} with {n} fact{'s' if n != 1 else ''} rewritten** by pmet (PMET: Precise Model "
        "Editing in a Transformer, Li et al., AAAI 2024). Its answers about the subjects below differ from the "
        "base model's on purpose; everything else was meant to stay as it was.", "",
        "| patch | subject | prompt | old → new |", "|---|---|---|---|", *_edit_rows(chain), "",
        "## Patches applied, in order", "",
    ]
    for i, p in enumerate(chain):
        layers = sorted({u.layer for u in p.updates})
        lines.append(f"{i + 1}. id `{p.patch_id}`: method {p.method or '?'}, {len(p.requests)} edits, layers "
                     f"{layers}, base fingerprint `{p.fingerprint[:12]}`")
    lines += ["", "Undo with `pmet revert PATCH... --model THIS_MODEL --out FOLDER` (last applied first).", "",
              "<details><summary>Configs</summary>", ""]
    for i, p in enumerate(chain):
        lines += [f"Patch {i + 1}:", "", "```json", json.dumps(p.config.to_dict(), indent=1), "```", ""]
    return "\n".join([*lines, "</details>", ""])


def card_metadata(chain: Sequence[EditResult], base: str) -> dict[str, Any]:
    """Key/values for a GGUF file's metadata (strings): the same facts as `card_text`."""
    edits = [{"subject": r.subject, "prompt": r.prompt, "old": r.target_true, "new": r.target_new}
             for p in chain for r in p.requests]
    return {
        "pmet.base_model": base,
        "pmet.patch_ids": json.dumps([p.patch_id for p in chain]),
        "pmet.methods": json.dumps([p.method for p in chain]),
        "pmet.edits": json.dumps(edits),
        "pmet.configs": json.dumps([p.config.to_dict() for p in chain]),
        "pmet.card": card_text(chain, base),
    }
