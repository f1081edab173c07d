"""The weight update (Eq. 8, 9, 11): spread the residual over the critical layers and solve for Δ.

For l in R, in increasing order, with the weights as updated so far (NOTES.md "Weight update"):
    K1   = keys at layer l (Eq. 12)                    (d_in, n)
    R    = V1 − current value at layer L               (d, n)
    R_l  = R / sqrt(L − l + 1)   (PMET, Eq. 11)   or   R / (L − l + 1)   (MEMIT, even spread)
    Δ_l  = R_l K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹                   (Eq. 9), in float64 by a Cholesky solve
    W_l += Δ_l
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch import ModelLayout, as_linear, get_weight
from .config import PMETConfig
from .context import ContextTemplates, flat
from .keys import Site, average_two_stage, key_rows, read_at_subject
from .requests import EditRequest
from .targets import Targets


def spread(L: int, l: int, rule: str) -> float:
    """Divisor of the residual at layer l (Eq. 11): sqrt(L−l+1) for 'sqrt' (PMET), L−l+1 for 'even' (MEMIT)."""
    n = L - l + 1
    return math.sqrt(n) if rule == "sqrt" else float(n)


def solve_delta(R: torch.Tensor, K: torch.Tensor, C0: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 9: Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹, in float64, by Cholesky (falls back to LU), never an inverse.

    R: (d_out, n) residuals; K: (d_in, n) keys; C0: (d_in, d_in) = E[k kᵀ]. Returns Δ: (d_out, d_in).
    """
    R, K, C0 = R.double(), K.double(), C0.double().to(K.device)
    A = lam * C0 + K @ K.T  # symmetric positive (semi)definite
    chol, info = torch.linalg.cholesky_ex(A)
    # Δᵀ = A⁻¹ K Rᵀ since A is symmetric
    X = torch.cholesky_solve(K @ R.T, chol) if int(info) == 0 else torch.linalg.solve(A, K @ R.T)
    return X.T


@dataclass
class LayerUpdate:
    """One edited matrix: its weight name, Δ in the stored layout (float32), and norms for the report."""

    weight: str
    layer: int
    component: str
    delta: torch.Tensor
    residual_norm: float  # mean ‖R_l‖ over requests before the update at this layer


def insert(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    templates: ContextTemplates,
    targets: Targets,
    c0: dict[tuple[int, str], torch.Tensor],
    cfg: PMETConfig,
    *,
    batch_size: int = 64,
) -> list[LayerUpdate]:
    """Apply Eq. 9/11 layer by layer to `model` in place; returns the applied updates."""
    L = cfg.L
    rows = key_rows(tok, requests, templates)
    n_t = len(flat(templates))
    bare = torch.arange(len(requests)) * n_t  # the '{}' template is first in each request's block
    components = [c for c in ("attn", "ffn") if c in cfg.update_modules]
    value_site = {
        "ffn": Site(layout.ffn_out(L) if cfg.target_site == "components" else layout.layer(L), "out"),
        "attn": Site(layout.attn_out(L), "out"),
    }
    updates: list[LayerUpdate] = []
    for l in cfg.layers:
        for comp in components:
            V = targets.ffn if comp == "ffn" else targets.attn
            if V is None:
                raise ValueError("updating the attention output projection needs δa targets (attn_delta=True)")
            key_site = Site(layout.edited_module(l, comp), "in")
            got = read_at_subject(model, rows, [key_site, value_site[comp]], pad_id=tok.pad_token_id,
                                  batch_size=batch_size, stop_after=value_site[comp].module)
            K = average_two_stage(got[key_site], templates)  # (n, d_in)
            current = got[value_site[comp]][bare.to(got[value_site[comp]].device)]  # (n, d)
            R = (V.to(current.device) - current) / spread(L, l, cfg.spread)
            delta = solve_delta(R.T, K.T, c0[(l, comp)], cfg.mom2_update_weight)
            name = layout.edited_module(l, comp)
            W = get_weight(model, name)
            with torch.no_grad():
                stored = as_linear(delta, layout.spec.conv1d).to(W.dtype).contiguous()
                W.add_(stored)
            updates.append(LayerUpdate(f"{name}.weight", l, comp, stored.float().cpu(),
                                       float(R.norm(dim=-1).mean())))
    return updates
