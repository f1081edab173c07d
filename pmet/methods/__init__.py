"""The editing methods the paper compares, one record each: PMET (and its ablations), MEMIT, ROME, FT-W.

A record says what makes the method that method: the config fields it fixes whatever the preset says (a
preset's `methods: {name: {...}}` section then sets its per-model values, and user overrides come last),
whether it edits one request at a time on the model as edited so far, the revision of its computation, and the
function that runs it. Adding a method is one record here and its module beside this file.

This module is light (no torch): the CLI and config.py read the records before any heavy import. The runner is
named as "module:function" and imported when the method runs (`Method.editor`); `apply.apply_method` runs one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for --help
    runner: str  # "pmet.module:function" with edit()'s signature (pmet.editor.edit)
    overrides: Mapping[str, Any] = field(default_factory=dict)  # config fields the method fixes
    sequential: bool = False  # one request at a time, each on the model as edited so far (methods/sequential.py)
    revision: int = 1  # bumped when the computation changes: progress saved by an older one is not resumed
    statistics: bool = True  # reads context templates and C0 (editor.prepare)

    def editor(self) -> Callable[..., Any]:
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pmet", "PMET (Li et al., 2024): δa and δm at layer L, v = m + δm, sqrt spread", "pmet.editor:edit"),
    Method("memit", "one δ on the layer output, even spread, MEMIT's stopping rule", "pmet.editor:edit",
           overrides={"target_site": "layer_output", "attn_delta": False, "spread": "even", "stop_rule": "loss"}),
    # ROME: v at one layer's FFN output (no δa), compute_v's stopping rule; the rank-one update is in rome.py
    # (v_* values: ROME's GPT-J hparams, kmeng01/rome hparams/ROME/EleutherAI_gpt-j-6B.json; layers from the preset).
    # Revision 2: Eq. 2 with k* in every place.
    Method("rome", "rank-one, one layer, edits applied in sequence", "pmet.methods.rome:edit_rome",
           overrides={"target_site": "components", "attn_delta": False, "stop_rule": "loss", "v_num_grad_steps": 20,
                      "v_lr": 0.5, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0, "kl_factor": 0.0625},
           sequential=True, revision=2),
    Method("ft", "FT-W: L∞-constrained fine-tuning of one FFN projection, edits in sequence",
           "pmet.methods.ft:edit_ft", sequential=True, statistics=False),
)}


def get_method(name: str) -> Method:
    """The record of `name`; a ConfigError naming the choices if there is none."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]
