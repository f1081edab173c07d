"""The weight update (Eq. 8, 9, 11): spread the residual over the critical layers and solve for Δ.

For l in R, in increasing order, with the weights as updated so far (docs/REFERENCE.md, "Weight update and residual
spread"):
    K1   = keys at layer l (Eq. 12)                    (d_in, n)
    R    = V1 − current value at layer L               (d, n)   (residual="value", the paper)
         = Σ_c (V_c − value_c⁰) − (h^L − h^L⁰)              (residual="stream", a deviation: the intended move
                                                             of the layer-L stream minus the move made so far)
    R_l  = R / sqrt(L − l + 1)   (PMET, Eq. 11)   or   R / (L − l + 1)   (MEMIT, even spread)
         → preimage(m_l, R_l) − m_l     (post_norm_residual="preimage", a MEMIT deviation for post-norm
                                         architectures: the pre-norm change that moves the stream by R_l)
    Δ_l  = R_l K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹ = U Vᵀ             (Eq. 9), in float64 by a Cholesky solve; a low-rank
                                                     patch stores (U, V) (`stored_delta`)
    W_l += Δ_l

`StreamCheck` is a diagnostic, not part of the method: how much the residual stream at layer L (subject's last
token, bare prompts) actually moved after all layers were updated, against the intended move Σ_c (V_c − value_c)
(δm for PMET, δ for MEMIT). A ratio far above 1 means the layers' writes add up to more than the target asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import null_space
from .arch import ModelLayout, get_weight
from .config import PMETConfig
from .context import ContextTemplates, flat
from .errors import ConfigError
from .keys import Site, average_two_stage, key_rows, read_at_subject
from .requests import EditRequest
from .targets import Targets


def spread(L: int, l: int, rule: str) -> float:
    """Divisor of the residual at layer l (Eq. 11): sqrt(L−l+1) for 'sqrt' (PMET), L−l+1 for 'even' (MEMIT)."""
    n = L - l + 1
    return math.sqrt(n) if rule == "sqrt" else float(n)


def norm_gain(norm: torch.nn.Module, d: int) -> torch.Tensor:
    """The elementwise gain g of an RMS norm N(x) = g ⊙ x / rms(x), read by applying it to a constant vector (any
    RMSNorm parametrisation: Gemma's 1 + w, Llama's w). Float64, shape (d,)."""
    p = next(norm.parameters())
    with torch.no_grad():  # N(c·1) = g · c / sqrt(c² + ε) = g for c ≫ sqrt(ε)
        return norm(torch.full((1, d), 1e3, dtype=p.dtype, device=p.device)).double().reshape(d).cpu()


def post_norm_preimage(m: torch.Tensor, r: torch.Tensor, g: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Pre-norm values m' with N(m') as close as N allows to N(m) + r, for the RMS norm N(x) = g ⊙ x / rms(x).

    N's outputs are exactly {g ⊙ u : ‖u‖² = d}, so with t = N(m) + r this solves min_u ‖g ⊙ u − t‖² s.t.
    ‖u‖² = d (a trust-region subproblem with a diagonal matrix): u = g t / (g² + μ) with the unique μ > −min g²
    where ‖u‖² = d, found by bisection. Where t is reachable (μ = 0) N(m') = t exactly. N is scale invariant, so
    m' = rms(m) · u keeps the pre-norm magnitude. m, r: (n, d); g: (d,). Returns m' (n, d), m's dtype.
    """
    m64, g = m.double(), g.double().to(m.device)
    d = m64.shape[-1]
    rms = m64.pow(2).mean(-1, keepdim=True).sqrt()
    t = g * m64 / rms + r.double()
    gt2 = (g * t).pow(2)  # (n, d)
    g2 = g.pow(2)
    lo = torch.full((m.shape[0], 1), -float(g2.min()), dtype=torch.float64, device=m.device)
    hi = gt2.sum(-1, keepdim=True).sqrt() / math.sqrt(d) - float(g2.min())  # all g² + hi ≥ ‖g t‖/√d: φ(hi) ≤ 0
    for _ in range(iters):  # φ(μ) = Σ g²t²/(g²+μ)² − d decreases on (−min g², ∞)
        mid = (lo + hi) / 2
        too_long = (gt2 / (g2 + mid).pow(2)).sum(-1, keepdim=True) > d
        lo, hi = torch.where(too_long, mid, lo), torch.where(too_long, hi, mid)
    u = g * t / (g2 + hi)
    return (rms * u).to(m.dtype)


def solve_factors(R: torch.Tensor, K: torch.Tensor, C0: torch.Tensor, lam: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 as two factors: Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹ = U Vᵀ with U = R and V = (λ C0 + K Kᵀ)⁻¹ K, in float64, by
    Cholesky (falls back to LU), never an inverse. Δ has rank ≤ n, so (U, V) is what a patch needs to store.

    R: (d_out, n) residuals; K: (d_in, n) keys; C0: (d_in, d_in) = E[k kᵀ]. Returns U (d_out, n), V (d_in, n).
    Besides C0, at most two d_in × d_in matrices exist at a time: A = λ C0 + K Kᵀ (built in place) and its
    Cholesky factor (A is freed before the solve).
    """
    R, K = R.double(), K.double()
    A = K @ K.T
    A.add_(C0.to(device=K.device, dtype=torch.float64), alpha=lam)  # symmetric positive (semi)definite
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        del A
        return R, torch.cholesky_solve(K, chol)
    del chol
    return R, torch.linalg.solve(A, K)


def solve_delta(R: torch.Tensor, K: torch.Tensor, C0: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 9: Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹ (d_out, d_in), float64: the product of `solve_factors`."""
    U, V = solve_factors(R, K, C0, lam)
    return U @ V.T


def factor_product(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """P Qᵀ in float64 with the same bits on every machine and device: Σ_i p_i q_iᵀ summed in order i = 0..r−1,
    each product and each sum one correctly rounded IEEE operation (separate kernels: no FMA, no BLAS blocking).
    A low-rank patch stores (P, Q); the edit and every later apply expand them with this one function."""
    P, Q = P.double(), Q.double()
    out = torch.zeros(P.shape[0], Q.shape[0], dtype=torch.float64, device=P.device)
    term = torch.empty_like(out)
    for i in range(P.shape[1]):
        torch.mul(P[:, i : i + 1], Q[:, i], out=term)
        out.add_(term)
    return out


def low_rank_pays(rows: int, cols: int, rank: int, dtype: torch.dtype) -> bool:
    """Whether float64 factors (rows + cols) × rank take less room than the full Δ in the weight's dtype."""
    return (rows + cols) * rank * 8 < rows * cols * torch.empty(0, dtype=dtype).element_size()


def stored_delta(U: torch.Tensor, V: torch.Tensor, weight: torch.Tensor, conv1d: bool
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Δ = U Vᵀ in the stored layout and dtype of `weight`, and its factors (P, Q) with Δ_stored = P Qᵀ when they
    are smaller than Δ (then Δ is expanded by `factor_product`, which a patch can repeat bit for bit; else by a
    matrix product and the patch stores Δ itself)."""
    P, Q = (V, U) if conv1d else (U, V)  # Conv1D stores (in, out) = (U Vᵀ)ᵀ = V Uᵀ
    if low_rank_pays(P.shape[0], Q.shape[0], P.shape[1], weight.dtype):
        return factor_product(P, Q).to(weight.dtype), (P, Q)
    return (P @ Q.T).to(weight.dtype), None


@dataclass
class StreamCheck:
    """Means over requests of ‖intended‖, ‖realised‖ change of the layer-L residual stream, their ratio, cosine;
    and the median ratio, which a few requests with a near-zero intended move cannot inflate (the mean can)."""

    intended_norm: float
    realised_norm: float
    ratio: float
    cosine: float
    median_ratio: float

    @classmethod
    def measure(cls, intended: torch.Tensor, realised: torch.Tensor) -> StreamCheck:
        """intended, realised: (n, d)."""
        ni, nr = intended.norm(dim=-1), realised.norm(dim=-1)
        cos = torch.nn.functional.cosine_similarity(intended, realised, dim=-1)
        ratio = nr / ni.clamp_min(1e-12)
        return cls(float(ni.mean()), float(nr.mean()), float(ratio.mean()), float(cos.mean()),
                   float(ratio.quantile(0.5)))


@dataclass
class LayerUpdate:
    """One edited matrix: its weight name, Δ in the stored layout (float32), and norms for the report."""

    weight: str
    layer: int
    component: str
    delta: torch.Tensor
    residual_norm: float  # mean ‖R_l‖ over requests before the update at this layer (the pre-norm change with
    #                       post_norm_residual="preimage")
    factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (P, Q) float64, Δ = factor_product(P, Q), when
    #                                                            a low-rank patch can store them (stored_delta)
    keys: torch.Tensor | None = None  # K1 (n, d_in), CPU, as the solve read them, with the null-space option: what
    #                                    protects this edit from later ones (K_p of the next batch or chained patch)

    @property
    def key_gram(self) -> torch.Tensor | None:
        """K1ᵀK1 of this update's keys in float64 (its share of K_p K_pᵀ), or None without keys."""
        return None if self.keys is None else self.keys.double().T @ self.keys.double()


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
    projectors: dict[tuple[int, str], torch.Tensor] | None = None,
    earlier_keys: dict[tuple[int, str], torch.Tensor] | None = None,
) -> tuple[list[LayerUpdate], StreamCheck]:
    """Apply Eq. 9/11 layer by layer to `model` in place; returns the applied updates and the StreamCheck. With
    cfg.null_space, AlphaEdit's solve (pmet/null_space.py) replaces Eq. 9's, with `projectors` P per (layer,
    component) and `earlier_keys` K_p K_pᵀ of earlier batches of a sequential run."""
    L = cfg.L
    _check_residual_rule(cfg, layout)
    rows = key_rows(tok, requests, templates)
    bare = torch.arange(len(requests)) * len(flat(templates))  # the '{}' template is first in each request's block
    components = list(cfg.update_modules)  # at each layer, in the order the config lists them
    value_site = {
        "ffn": Site(layout.ffn_out(L) if cfg.target_site == "components" else layout.layer(L), "out"),
        "attn": Site(layout.attn_out(L), "out"),
    }
    stream = Site(layout.layer(L), "out")
    bare_rows = [rows[int(i)] for i in bare]
    preimage = cfg.post_norm_residual == "preimage" and bool(layout.spec.post_norms)

    def read(rows_: list, sites: list[Site], stop: Site) -> dict[Site, torch.Tensor]:
        return read_at_subject(model, rows_, list(dict.fromkeys(sites)), pad_id=tok.pad_token_id,
                               batch_size=batch_size, stop_after=stop.module)

    before = read(bare_rows, [stream, *(value_site[c] for c in components)], stream)
    intended = sum(_stream_space(model, layout, cfg, c, _target(targets, c).to(before[stream].device))
                   - _stream_space(model, layout, cfg, c, before[value_site[c]]) for c in components)
    updates: list[LayerUpdate] = []
    for l in cfg.layers:
        for comp in components:
            key_site = Site(layout.edited_module(l, comp), "in")
            # the residual's site: the value site (paper) or the layer-L stream (residual="stream")
            r_site = stream if cfg.residual == "stream" else value_site[comp]
            m_site = Site(layout.ffn_out(l), "out")  # the pre-norm FFN output, for the preimage
            got = read(rows, [key_site, r_site, *([m_site] if preimage else [])], r_site)
            K = average_two_stage(got[key_site], templates)  # (n, d_in)
            current = got[r_site][bare.to(got[r_site].device)]  # (n, d)
            R = (intended - (current - before[stream]) if cfg.residual == "stream"
                 else _target(targets, comp).to(current.device) - current) / spread(L, l, cfg.spread)
            if preimage:  # R is a move of the stream; write the pre-norm change that makes it (docstring)
                R = _preimage_residual(model, layout, l, got[m_site][bare.to(current.device)], R)
            U, V = _solve(cfg, (l, comp), R, K, c0, projectors, earlier_keys)
            updates.append(_write(model, layout, l, comp, U, V, float(R.norm(dim=-1).mean()),
                                  K if cfg.null_space else None))
    realised = read(bare_rows, [stream], stream)[stream] - before[stream]
    return updates, StreamCheck.measure(intended, realised)


def _check_residual_rule(cfg: PMETConfig, layout: ModelLayout) -> None:
    if cfg.residual == "stream" and cfg.target_site == "components" and layout.spec.post_norms:
        raise ConfigError("config field 'residual': 'stream' is not defined for architectures that normalise the "
                          "FFN output before the residual add (Gemma 3); use 'value'")


def _preimage_residual(model: PreTrainedModel, layout: ModelLayout, l: int, m: torch.Tensor, R: torch.Tensor
                       ) -> torch.Tensor:
    """The pre-norm change of layer l's FFN output m that moves the stream by R (post_norm_residual="preimage")."""
    norm = model.get_submodule(layout.post_norm(l, "ffn"))
    return post_norm_preimage(m, R, norm_gain(norm, m.shape[-1])) - m


def _solve(cfg: PMETConfig, site: tuple[int, str], R: torch.Tensor, K: torch.Tensor,
           c0: dict[tuple[int, str], torch.Tensor], projectors: dict[tuple[int, str], torch.Tensor] | None,
           earlier_keys: dict[tuple[int, str], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ = U Vᵀ at one (layer, component): Eq. 9, or AlphaEdit's solve with cfg.null_space. R: (n, d), K: (n, d_in)."""
    if cfg.null_space:
        return null_space.solve_factors(R.T, K.T, projectors[site], (earlier_keys or {}).get(site),
                                        cfg.null_space_l2)
    return solve_factors(R.T, K.T, c0[site], cfg.mom2_update_weight)


def _write(model: PreTrainedModel, layout: ModelLayout, l: int, comp: str, U: torch.Tensor, V: torch.Tensor,
           residual_norm: float, keys: torch.Tensor | None) -> LayerUpdate:
    """W_l += U Vᵀ in the weight's stored layout and dtype; the LayerUpdate that records it (and `keys`, if kept)."""
    name = layout.edited_module(l, comp)
    W = get_weight(model, name)
    with torch.no_grad():
        stored, factors = stored_delta(U, V, W, layout.spec.conv1d)
        W.add_(stored)
    factors = None if factors is None else (factors[0].cpu(), factors[1].cpu())
    return LayerUpdate(f"{name}.weight", l, comp, stored.float().cpu(), residual_norm, factors,
                       None if keys is None else keys.detach().cpu().clone())


def _target(targets: Targets, comp: str) -> torch.Tensor:
    V = targets.ffn if comp == "ffn" else targets.attn
    if V is None:
        raise ValueError("updating the attention output projection needs δa targets (attn_delta=True)")
    return V


def _stream_space(model: PreTrainedModel, layout: ModelLayout, cfg: PMETConfig, comp: str, v: torch.Tensor
                  ) -> torch.Tensor:
    """A component value at layer L as it enters the residual stream: through the post-norm where the
    architecture has one (Gemma 3), as is otherwise (and for MEMIT's layer-output values)."""
    if cfg.target_site != "components" or not layout.spec.post_norms:
        return v
    module = model.get_submodule(layout.post_norm(cfg.L, comp))
    with torch.no_grad():
        return module(v.to(next(module.parameters()).dtype)).float()
