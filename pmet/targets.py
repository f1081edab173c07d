"""Target values at the last critical layer L (Eq. 10), optimised for many requests at once.

For request i, PMET adds δa_i to the MHSA output a^L and δm_i to the FFN output m^L at the subject's last
token of every prompt (rewriting prompts pref_j ⊕ p(x_i) ⊕ target[:-1], and the KL prompt "{S} is a"), and
minimises, with one Adam over both deltas (NOTES.md "Target optimisation"):

    L_i = φ_i · NLL_i + μ · KL(P_edited ‖ P_orig)_i + w · (‖δm_i‖/‖m0_i‖² + ‖δa_i‖/‖a0_i‖²)

then projects each delta into ‖δ‖ ≤ clamp·‖initial value‖. It keeps v_i = m0_i + δm_i (the FFN output).
MEMIT (`target_site="layer_output"`) instead adds one δ to the layer's output h^L and keeps h^L + δ.

Batching: every request has its own rows, deltas, clamp and early stop; the summed loss gives each delta
exactly its own request's gradient, and Adam is element-wise, so a batch equals one-request-at-a-time runs.
The layers below L run once (their output is fixed); each step replays only layers L..N-1, and the
vocabulary projection is applied only where an NLL or KL term is read. Finished requests' rows are dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch import ModelLayout
from .config import PMETConfig
from .context import ContextTemplates, flat
from .hooks import LayerInputs, Trace
from .prompts import Encoded, compose, encode, pad_right, target_ids
from .requests import EditRequest


@dataclass
class TargetDiagnostics:
    """What the optimisation did for one request."""

    nll: float  # final mean NLL of the target over the rewriting prompts (per token)
    kl: float  # final KL(P_edited ‖ P_orig) on the KL prompt
    prob: float  # mean over prompts of exp(-NLL): average per-token probability of the target
    steps: int  # optimiser steps taken
    stop: str  # "loss", "kl", or "budget"
    delta_m_norm: float
    delta_a_norm: float
    init_m_norm: float
    init_a_norm: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Targets:
    """v_i for every request: `ffn` (m0+δm, or h^L+δ for MEMIT), `attn` (a0+δa; None without δa)."""

    ffn: torch.Tensor  # (n, d) float32
    attn: torch.Tensor | None
    diagnostics: list[TargetDiagnostics] = field(default_factory=list)


@dataclass
class _Plan:
    """Row layout of one optimisation batch (rows of request-chunk, request-major)."""

    rows: list[tuple[int, ...]]
    lookup: list[int]  # subject-last index per row
    req: list[int]  # request (within chunk) per row
    is_kl: list[bool]
    tgt_pos: list[list[int]]  # positions whose next token is a target token (rewriting rows)
    tgt_ids: list[list[int]]


def _plan(tok: PreTrainedTokenizerBase, requests: list[EditRequest], templates: ContextTemplates,
          kl_prompt: str) -> _Plan:
    p = _Plan([], [], [], [], [], [])
    for i, r in enumerate(requests):
        t_ids = list(target_ids(tok, r.target_new))
        for ctx in flat(templates):
            e = encode(tok, compose(ctx, r.prompt), r.subject)
            n = len(e.ids)
            p.rows.append(e.ids + tuple(t_ids[:-1]))
            p.lookup.append(e.subject_last)
            p.req.append(i)
            p.is_kl.append(False)
            p.tgt_pos.append(list(range(n - 1, n - 1 + len(t_ids))))
            p.tgt_ids.append(t_ids)
        e: Encoded = encode(tok, kl_prompt, r.subject)
        p.rows.append(e.ids)
        p.lookup.append(e.subject_last)
        p.req.append(i)
        p.is_kl.append(True)
        p.tgt_pos.append([])
        p.tgt_ids.append([])
    return p


def unembed(model: PreTrainedModel, layout: ModelLayout, normed: torch.Tensor) -> torch.Tensor:
    """W_E of Eq. 1 on already-normalised states (with Gemma-style final logit softcapping if configured)."""
    logits = model.get_submodule(layout.spec.unembed)(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def logits_from_hidden(model: PreTrainedModel, layout: ModelLayout, h: torch.Tensor) -> torch.Tensor:
    """W_E γ(h) of Eq. 1 for already-selected positions (h: (..., d))."""
    return unembed(model, layout, model.get_submodule(layout.spec.final_norm)(h))


def compute_targets(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    templates: ContextTemplates,
    cfg: PMETConfig,
    *,
    progress: bool = False,
) -> Targets:
    """Eq. 10 for all requests, `cfg.v_batch_size` requests per optimisation batch."""
    starts = range(0, len(requests), cfg.v_batch_size)
    with target_progress(len(requests), len(starts), cfg, progress) as bar:
        parts = [optimise_batch(model, tok, layout, requests[i : i + cfg.v_batch_size], templates, cfg,
                                 on_step=bar.update) for i in starts]
    attn = None if parts[0].attn is None else torch.cat([p.attn for p in parts])
    return Targets(
        ffn=torch.cat([p.ffn for p in parts]),
        attn=attn,
        diagnostics=[d for p in parts for d in p.diagnostics],
    )


def target_progress(n_requests: int, n_batches: int, cfg: PMETConfig, enabled: bool) -> Any:
    """A progress bar over the Adam-step budget of every batch (a batch that stops early skips ahead), so the
    job's size and an estimated time show after its first step."""
    from tqdm.auto import tqdm

    return tqdm(total=n_batches * cfg.v_num_grad_steps, unit="step", disable=not enabled,
                desc=f"targets: {n_requests} requests in {n_batches} batch{'es' if n_batches != 1 else ''}")


def optimise_batch(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    templates: ContextTemplates,
    cfg: PMETConfig,
    on_step: Callable[[int], object] = lambda n: None,
) -> Targets:
    device = next(model.parameters()).device
    L = cfg.L
    plan = _plan(tok, requests, templates, cfg.kl_prompt)
    n_req, n_rows = len(requests), len(plan.rows)

    components = cfg.target_site == "components"
    m_site = layout.ffn_out(L) if components else layout.layer(L)
    a_site = layout.attn_out(L) if components and cfg.attn_delta else None

    row_req = torch.tensor(plan.req, device=device)
    row_lookup = torch.tensor(plan.lookup, device=device)
    first_row = torch.tensor([plan.req.index(i) for i in range(n_req)], device=device)
    kl_row = torch.tensor([j for j in range(n_rows) if plan.is_kl[j]], device=device)

    # Rows sorted by length and cut into passes, so that padding stays small. One full forward per pass
    # records the fixed hidden state entering layer L, every later layer's call arguments, and m0/a0.
    passes = [_Pass(rows) for rows in _length_buckets([len(r) for r in plan.rows], cfg.v_rows_per_pass, device)]
    sites = [m_site] + ([a_site] if a_site else [])
    init = {site: None for site in sites}
    with torch.no_grad():
        for ps in passes:
            ids, mask = pad_right([plan.rows[j] for j in ps.rows.tolist()], tok.pad_token_id, device)
            with LayerInputs(model.get_submodule(layout.spec.layers), L) as cap, \
                    Trace(model, outputs=sites, stop_after=layout.spec.final_norm) as tr:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            ps.cap, ps.hidden = cap, cap.hidden_in()
            for site in sites:
                out = tr.outputs[site][torch.arange(len(ps.rows), device=device), row_lookup[ps.rows]].float()
                if init[site] is None:
                    init[site] = out.new_empty(n_rows, out.shape[-1])
                init[site][ps.rows] = out
    m0 = init[m_site][first_row]  # unperturbed values at the bare prompt (the first template)
    a0 = init[a_site][first_row] if a_site else None

    delta_m = torch.zeros(n_req, m0.shape[-1], device=device, requires_grad=True)
    params = [delta_m]
    delta_a = None
    if a_site:
        delta_a = torch.zeros(n_req, a0.shape[-1], device=device, requires_grad=True)
        params.append(delta_a)
    opt = torch.optim.Adam(params, lr=cfg.v_lr)

    kl_init = None  # (n_req, vocab) log P_orig on each request's KL prompt, filled at it == 0
    nll_factor = torch.full((n_req,), float(cfg.nll_factor), device=device)
    done = torch.zeros(n_req, dtype=torch.bool, device=device)
    steps = torch.zeros(n_req, dtype=torch.long, device=device)
    stop = ["budget"] * n_req
    last = {k: torch.zeros(n_req, device=device) for k in ("nll", "kl", "prob")}
    replaying: dict[str, torch.Tensor] = {}  # batch rows of the pass being replayed, read by the edit hooks

    def add_delta(delta: torch.Tensor):
        def edit(out: torch.Tensor) -> torch.Tensor:
            rows = replaying["rows"]
            return out.index_put((torch.arange(len(rows), device=device), row_lookup[rows]),
                                 delta[row_req[rows]].to(out.dtype), accumulate=True)
        return edit

    edits = {m_site: add_delta(delta_m)}
    if a_site:
        edits[a_site] = add_delta(delta_a)

    # Flattened (row, position, target id) for every NLL term, over all rows of the batch.
    nll_row = torch.tensor([j for j in range(n_rows) for _ in plan.tgt_pos[j]], device=device)
    nll_pos = torch.tensor([p for j in range(n_rows) for p in plan.tgt_pos[j]], device=device)
    nll_tok = torch.tensor([t for j in range(n_rows) for t in plan.tgt_ids[j]], device=device)
    n_tgt = torch.tensor([len(target_ids(tok, r.target_new)) for r in requests], device=device).float()
    n_prompts = len(flat(templates))

    for it in range(cfg.v_num_grad_steps):
        on_step(1)
        opt.zero_grad(set_to_none=True)
        # Replay layers L..N-1 for every pass; keep the final states only where a loss term is read.
        nll_parts, kl_parts = [], []
        for ps in passes:
            if not len(ps.rows):
                continue
            replaying["rows"] = ps.rows
            with Trace(model, edits=edits), _autocast(device, cfg.v_compute_dtype):
                h = ps.cap.replay(ps.hidden)
            where = torch.full((n_rows,), -1, dtype=torch.long, device=device)  # batch row -> row of h
            where[ps.rows] = torch.arange(len(ps.rows), device=device)
            t = torch.nonzero(where[nll_row] >= 0).flatten()
            nll_parts.append((t, h[where[nll_row[t]], nll_pos[t]]))
            k = kl_row[where[kl_row] >= 0]
            kl_parts.append((k, h[where[k], row_lookup[k]]))
        terms = torch.cat([t for t, _ in nll_parts])
        r_nll, t_nll = nll_row[terms], nll_tok[terms]
        # NLL: log-probabilities of the target tokens at their positions (vocab projection there only).
        logp = torch.log_softmax(logits_from_hidden(model, layout, torch.cat([x for _, x in nll_parts])), -1)
        tok_logp = logp.gather(-1, t_nll[:, None]).squeeze(-1)
        req_of_term = row_req[r_nll]
        # per prompt: -Σ_j log p(t_j) / n_target; per request: mean over its prompts
        nll = torch.zeros(n_req, device=device).index_add(0, req_of_term, -tok_logp) / n_tgt / n_prompts
        misses = torch.zeros(n_req, device=device).index_add(0, req_of_term, (logp.argmax(-1) != t_nll).float())
        all_argmax = misses == 0  # the target is the argmax at every target position of every prompt
        prompt_rows = r_nll.unique()
        per_prompt = torch.zeros(n_rows, device=device).index_add(0, r_nll, tok_logp.detach())[prompt_rows]
        prob = torch.zeros(n_req, device=device).index_add(
            0, row_req[prompt_rows], torch.exp(per_prompt / n_tgt[row_req[prompt_rows]])) / n_prompts
        # KL(P_edited ‖ P_orig) at the subject's last token of "{S} is a" (batchmean over its one row).
        rk = torch.cat([k for k, _ in kl_parts])
        kl_logp = torch.log_softmax(logits_from_hidden(model, layout, torch.cat([x for _, x in kl_parts])), -1)
        if kl_init is None:  # it == 0: all deltas are zero, so this is P_orig
            kl_init = torch.empty(n_req, kl_logp.shape[-1], device=device)
            kl_init[row_req[rk]] = kl_logp.detach()
        kl_terms = (kl_logp.exp() * (kl_logp - kl_init[row_req[rk]])).sum(-1)
        kl_loss = cfg.kl_factor * torch.zeros(n_req, device=device).index_add(0, row_req[rk], kl_terms)
        decay = cfg.v_weight_decay * delta_m.norm(dim=-1) / m0.norm(dim=-1) ** 2
        if delta_a is not None:
            decay = decay + cfg.v_weight_decay * delta_a.norm(dim=-1) / a0.norm(dim=-1) ** 2
        loss = nll_factor * nll + kl_loss + decay

        # Stopping rules, per request, in the reference order (NOTES.md; App. D).
        with torch.no_grad():
            running = ~done
            for key, val in (("nll", nll), ("kl", kl_loss), ("prob", prob)):
                last[key] = torch.where(running, val.detach(), last[key])
            stop_loss = running & (loss < cfg.stop_loss)
            argmax_now = running & ~stop_loss & all_argmax & (cfg.stop_rule == "argmax")
            stop_kl = argmax_now & (kl_loss <= cfg.stop_kl)
            nll_factor = torch.where(argmax_now, cfg.nll_factor * cfg.nll_factor_when_argmax,
                                     torch.full_like(nll_factor, float(cfg.nll_factor)))
            for i in torch.nonzero(stop_loss).flatten().tolist():
                stop[i] = "loss"
            for i in torch.nonzero(stop_kl).flatten().tolist():
                stop[i] = "kl"
            finishing = running if it == cfg.v_num_grad_steps - 1 else stop_loss | stop_kl
            done = done | finishing
        if bool(done.all()):
            break
        (loss * (~done).float()).sum().backward()
        saved = [p.detach().clone() for p in params]
        opt.step()
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p[done] = s[done]  # finished requests keep their deltas (Adam moments would move them)
            _clamp(delta_m, cfg.clamp_norm_factor * m0.norm(dim=-1))
            if delta_a is not None:
                _clamp(delta_a, cfg.clamp_norm_factor * a0.norm(dim=-1))
        steps += (~done).long()
        if bool(finishing.any()):  # drop finished requests' rows from the replayed passes
            for ps in passes:
                ps.keep(~done[row_req[ps.rows]])
    on_step(cfg.v_num_grad_steps - 1 - it)  # the unused budget of a batch that stopped early

    with torch.no_grad():
        v_ffn = (m0 + delta_m).detach()
        v_attn = (a0 + delta_a).detach() if delta_a is not None else None
    delta_m = delta_m.detach()
    delta_a = delta_a.detach() if delta_a is not None else None
    diags = [
        TargetDiagnostics(
            nll=float(last["nll"][i]), kl=float(last["kl"][i]), prob=float(last["prob"][i]),
            steps=int(steps[i]), stop=stop[i],
            delta_m_norm=float(delta_m[i].norm()), init_m_norm=float(m0[i].norm()),
            delta_a_norm=float(delta_a[i].norm()) if delta_a is not None else 0.0,
            init_a_norm=float(a0[i].norm()) if a0 is not None else 0.0,
        )
        for i in range(n_req)
    ]
    return Targets(ffn=v_ffn, attn=v_attn, diagnostics=diags)


def _autocast(device: torch.device, dtype: str):
    """Mixed precision for the optimisation steps only (`v_compute_dtype`); float32 runs as the paper."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


class _Pass:
    """One replayed group of rows: their batch-row ids, recorded layer inputs and the hidden state entering L."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self.cap: LayerInputs | None = None
        self.hidden: torch.Tensor | None = None

    def keep(self, mask: torch.Tensor) -> None:
        """Drop the rows where `mask` is False (their requests have stopped)."""
        if bool(mask.all()):
            return
        sel = torch.nonzero(mask).flatten()
        self.cap.select_rows(sel, len(self.rows))
        self.hidden = self.hidden.index_select(0, sel)
        self.rows = self.rows[sel]


def _length_buckets(lengths: list[int], rows_per_pass: int, device: torch.device) -> list[torch.Tensor]:
    """Row ids sorted by length, cut into groups of at most `rows_per_pass` (less padding per pass)."""
    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    return [torch.tensor(order[i : i + rows_per_pass], device=device) for i in range(0, len(order), rows_per_pass)]


def _clamp(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Project each row into the ball ‖δ_i‖ ≤ max_norm_i, in place."""
    norm = delta.norm(dim=-1)
    scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
    delta.mul_(scale[:, None])
