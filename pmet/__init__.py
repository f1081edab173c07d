"""pmet: Precise Model Editing in a Transformer (Li et al., AAAI 2024).

    from pmet import load_model, load_requests, load_config, edit
    lm = load_model("smollm2-135m")
    result = edit(lm.model, lm.tok, load_requests("examples/counterfacts.jsonl"), load_config("smollm2-135m"))

The names below are imported on first use, so that `pmet --help` and early input errors do not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_HOMES = {
    "EditRequest": "requests", "EditResult": "patch", "PMETConfig": "config", "PmetError": "errors", "edit": "editor",
    "fingerprint": "models", "load_config": "config", "load_model": "models", "load_requests": "requests",
    "make_request": "requests",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'pmet' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
