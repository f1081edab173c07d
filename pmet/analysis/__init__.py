"""Reproductions of the paper's analyses: Figure 2 (how MHSA and FFN change the hidden state, `components`)
and Figure 4 (norms of the incremental weights Δ, `deltas`).

Names are imported lazily so that `pmet --help` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FFN_ENTRY": "components", "ComponentStats": "components", "component_similarity": "components",
    "cosine": "components", "jaccard": "components", "load_prompts": "components", "read_states": "components",
    "delta_norm_table": "deltas",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
