"""Keys K1 (Eq. 12) and current values at the subject's last token, read in batched forward passes.

k_i^l = mean over prefixes of prev(W, pref_j ⊕ S): the input of the edited projection at the subject's last
token, averaged in two stages (within each template group, then across groups; docs/REFERENCE.md), so the bare
prompt carries half the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .context import ContextTemplates, flat
from .hooks import Trace
from .prompts import Encoded, chunks, compose, encode, pad_right
from .requests import EditRequest


@dataclass(frozen=True)
class Site:
    """A module whose input ('in') or output ('out') is read at the subject's last token."""

    module: str
    side: str  # "in" | "out"


def read_at_subject(
    model: PreTrainedModel,
    rows: list[Encoded],
    sites: list[Site],
    *,
    pad_id: int,
    stop_after: str | None = None,
    batch_size: int = 64,
) -> dict[Site, torch.Tensor]:
    """Batched forward passes over `rows`; for each site, a (len(rows), d) float32 matrix of its
    input/output at each row's subject-last token. Stops the pass after `stop_after` if given."""
    device = next(model.parameters()).device
    got: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    ins = [s.module for s in sites if s.side == "in"]
    outs = [s.module for s in sites if s.side == "out"]
    for r in chunks(len(rows), batch_size):
        batch = [rows[i] for i in r]
        ids, mask = pad_right([e.ids for e in batch], pad_id, device)
        idx = torch.tensor([e.subject_last for e in batch], device=device)
        ar = torch.arange(len(batch), device=device)
        with torch.no_grad(), Trace(model, inputs=ins, outputs=outs, stop_after=stop_after) as tr:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for s in sites:
            t = tr.inputs[s.module] if s.side == "in" else tr.outputs[s.module]
            got[s].append(t[ar, idx].float())
    return {s: torch.cat(v) for s, v in got.items()}


def key_rows(tok: PreTrainedTokenizerBase, requests: list[EditRequest], templates: ContextTemplates
             ) -> list[Encoded]:
    """One row per (request, template), request-major; the first template of the first group is '{}'."""
    return [encode(tok, compose(t, r.prompt), r.subject) for r in requests for t in flat(templates)]


def average_two_stage(per_row: torch.Tensor, templates: ContextTemplates) -> torch.Tensor:
    """(n_requests * n_templates, d) -> (n_requests, d): mean within each template group, then across groups."""
    sizes = [len(g) for g in templates]
    per_req = per_row.view(-1, sum(sizes), per_row.shape[-1])
    groups = torch.split(per_req, sizes, dim=1)
    return torch.stack([g.mean(1) for g in groups], 1).mean(1)

