"""Target values at the last critical layer L (Eq. 10), optimised for many requests at once.

For request i, PMET adds δa_i to the MHSA output a^L and δm_i to the FFN output m^L at the subject's last
token of every prompt (rewriting prompts pref_j ⊕ p(x_i) ⊕ target[:-1], and the KL prompt "{S} is a"), and
minimises, with one Adam over both deltas (docs/REFERENCE.md, "Target optimisation"):

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

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch import ModelLayout, logits_from_hidden
from .config import PMETConfig
from .context import ContextTemplates, flat
from .hooks import LayerInputs, Trace
from .precision import replay_precision
from .prompts import Encoded, compose, encode, pad_right, target_ids
from .replay import LayerReplay, RecordKeyValues
from .requests import EditRequest
from .sizing import request_batches


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
    """v_i for every request: `ffn` (m0+δm, or h^L+δ for MEMIT; None for FT-W, which has no targets), `attn`
    (a0+δa; None without δa)."""

    ffn: torch.Tensor | None  # (n, d) float32
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
    """Eq. 10 for all requests, in optimisation batches of `cfg.v_batch_size` requests (pmet.sizing)."""
    device = next(model.parameters()).device
    with target_progress(len(requests), cfg, progress) as bar:
        parts = [optimise_batch(model, tok, layout, [requests[i] for i in batch], templates, batch_cfg,
                                on_step=bar.update) for batch, batch_cfg in request_batches(len(requests), cfg, device)]
    attn = None if parts[0].attn is None else torch.cat([p.attn for p in parts])
    return Targets(
        ffn=torch.cat([p.ffn for p in parts]),
        attn=attn,
        diagnostics=[d for p in parts for d in p.diagnostics],
    )


def target_progress(n_requests: int, cfg: PMETConfig, enabled: bool) -> Any:
    """A progress bar over the Adam-step budget of each request (a request that stops early skips ahead: its
    batch reports the unused budget), so the job's size and an estimated time show after the first step."""
    from tqdm.auto import tqdm

    return tqdm(total=n_requests * cfg.v_num_grad_steps, unit="req-step", unit_scale=True, disable=not enabled,
                desc=f"targets: {n_requests} requests")


def optimise_batch(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    templates: ContextTemplates,
    cfg: PMETConfig,
    on_step: Callable[[int], object] = lambda n: None,
) -> Targets:
    """Eq. 10 for one batch of requests: row plan, one recording pass, then Adam steps on the deltas, each
    replaying layers L..N-1 (pmet.replay), until every request has met a stopping rule or the budget is spent."""
    device = next(model.parameters()).device
    plan = _plan(tok, requests, templates, cfg.kl_prompt)
    rows = _row_tensors(tok, plan, requests, device)
    components = cfg.target_site == "components"
    m_site = layout.ffn_out(cfg.L) if components else layout.layer(cfg.L)
    a_site = layout.attn_out(cfg.L) if components and cfg.attn_delta else None
    passes, init = _record(model, tok, layout, plan, rows, [m_site] + ([a_site] if a_site else []), cfg)
    layers = model.get_submodule(layout.spec.layers)
    with replay_precision(cfg.v_compute_dtype, model, layers, cfg.L, [ps.replay for ps in passes]):
        return _adam_steps(model, layout, rows, passes, init, (m_site, a_site), len(flat(templates)), cfg, on_step)


def _adam_steps(model: PreTrainedModel, layout: ModelLayout, rows: _Rows, passes: list[_Pass],
                init: dict[str, torch.Tensor], sites: tuple[str, str | None], n_prompts: int, cfg: PMETConfig,
                on_step: Callable[[int], object]) -> Targets:
    """The optimisation proper: Adam on δm (and δa) from zero, each step replaying the passes with the deltas added,
    the Eq. 10 loss, the stopping rules, the norm clamp; finished requests keep their deltas and leave the passes."""
    device, n_req = rows.req.device, len(rows.first)
    m_site, a_site = sites
    m0 = init[m_site][rows.first]  # unperturbed values at the bare prompt (the first template)
    a0 = init[a_site][rows.first] if a_site else None

    delta_m = torch.zeros_like(m0, requires_grad=True)
    delta_a = torch.zeros_like(a0, requires_grad=True) if a_site else None
    params = [delta_m] + ([delta_a] if a_site else [])
    opt = torch.optim.Adam(params, lr=cfg.v_lr)
    edits = {m_site: delta_m} | ({a_site: delta_a} if a_site else {})
    state = _StopState(n_req, cfg, device)
    kl_init = None  # (n_req, vocab) log P_orig on each request's KL prompt, from step 0 (all deltas zero)

    for it in range(cfg.v_num_grad_steps):
        on_step(n_req)
        opt.zero_grad(set_to_none=True)
        nll_states, kl_states = _replay_passes(model, passes, edits, rows, device)
        if kl_init is None:
            kl_init = _kl_log_probs(model, layout, kl_states, rows, n_req).detach()
        loss, parts = _eq10_loss(model, layout, rows, nll_states, kl_states, kl_init, (delta_m, m0), (delta_a, a0),
                                 state.nll_factor, cfg, n_prompts)
        finishing = state.update(loss, parts, last_step=it == cfg.v_num_grad_steps - 1)
        if bool(state.done.all()):
            break
        (loss * (~state.done).float()).sum().backward()
        saved = [p.detach().clone() for p in params]
        opt.step()
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p[state.done] = s[state.done]  # finished requests keep their deltas (Adam moments would move them)
            _clamp(delta_m, cfg.clamp_norm_factor * m0.norm(dim=-1))
            if delta_a is not None:
                _clamp(delta_a, cfg.clamp_norm_factor * a0.norm(dim=-1))
        state.steps += (~state.done).long()
        if bool(finishing.any()):  # drop finished requests' rows from the replayed passes
            for ps in passes:
                ps.keep(~state.done[rows.req[ps.rows]])
    on_step(n_req * (cfg.v_num_grad_steps - 1 - it))  # the unused budget of a batch that stopped early
    return _targets(m0, delta_m.detach(), a0, delta_a.detach() if delta_a is not None else None, state)


_Read = tuple[torch.Tensor, torch.Tensor]  # (ids of the NLL terms or KL rows, final hidden states there)


@dataclass
class _Rows:
    """The row plan as index tensors on the device."""

    req: torch.Tensor  # request (within the batch) of each row
    lookup: torch.Tensor  # subject-last position of each row, where δ is added
    length: torch.Tensor  # tokens in each row
    first: torch.Tensor  # each request's first row (the bare prompt)
    kl: torch.Tensor  # the KL-prompt rows
    nll_row: torch.Tensor  # one entry per NLL term: its row, position and target token id
    nll_pos: torch.Tensor
    nll_tok: torch.Tensor
    n_tgt: torch.Tensor  # target length of each request (float)
    n_rows: int


def _row_tensors(tok: PreTrainedTokenizerBase, plan: _Plan, requests: list[EditRequest],
                 device: torch.device) -> _Rows:
    n_rows = len(plan.rows)
    return _Rows(
        req=torch.tensor(plan.req, device=device),
        lookup=torch.tensor(plan.lookup, device=device),
        length=torch.tensor([len(r) for r in plan.rows], device=device),
        first=torch.tensor([plan.req.index(i) for i in range(len(requests))], device=device),
        kl=torch.tensor([j for j in range(n_rows) if plan.is_kl[j]], device=device),
        nll_row=torch.tensor([j for j in range(n_rows) for _ in plan.tgt_pos[j]], device=device),
        nll_pos=torch.tensor([p for j in range(n_rows) for p in plan.tgt_pos[j]], device=device),
        nll_tok=torch.tensor([t for j in range(n_rows) for t in plan.tgt_ids[j]], device=device),
        n_tgt=torch.tensor([len(target_ids(tok, r.target_new)) for r in requests], device=device).float(),
        n_rows=n_rows,
    )


class _Pass:
    """One group of rows replayed together: their batch-row ids and the replay of layers L..N-1 over them."""

    def __init__(self, rows: torch.Tensor, replay: LayerReplay) -> None:
        self.rows, self.replay = rows, replay

    def keep(self, mask: torch.Tensor) -> None:
        """Drop the rows where `mask` is False (their requests have stopped)."""
        if bool(mask.all()):
            return
        sel = torch.nonzero(mask).flatten()
        self.replay.keep(sel)
        self.rows = self.rows[sel]


# The cost of one more replayed pass per step, in replayed positions: measured on a CPU; on a CUDA device an
# estimate (a pass's ~10³ kernel launches against the positions per second of a small model).
PASS_OVERHEAD = {"cpu": 48, "cuda": 512}


def _pass_rows(plan: _Plan, cfg: PMETConfig, device: torch.device) -> list[torch.Tensor]:
    """Row ids in passes of at most `v_rows_per_pass`, sorted by the width each row is replayed over (its length;
    for the suffix replay its length from the subject's last token on). Full replay: consecutive groups. Suffix
    replay: cut where the replayed work is smallest (dynamic programming over the sorted rows; a pass costs its
    rows × its widest row + PASS_OVERHEAD), so that rows of very different widths do not pad each other."""
    width = _widths(plan, cfg)
    order, step = sorted(range(len(width)), key=lambda j: width[j]), cfg.v_rows_per_pass
    if cfg.replay == "full":
        return [torch.tensor(order[i : i + step], device=device) for i in range(0, len(order), step)]
    overhead = PASS_OVERHEAD.get(device.type, PASS_OVERHEAD["cuda"])
    best, start = np.zeros(len(order) + 1), np.zeros(len(order) + 1, dtype=np.int64)
    for k in range(1, len(order) + 1):  # the last pass is order[i:k] for the best i; its widest row is order[k-1]
        i = np.arange(max(0, k - step), k)
        cost = best[i] + (k - i) * width[order[k - 1]] + overhead
        best[k], start[k] = cost.min(), i[cost.argmin()]
    cuts, k = [], len(order)
    while k:
        cuts.append(torch.tensor(order[start[k] : k], device=device))
        k = int(start[k])
    return cuts[::-1]


def _widths(plan: _Plan, cfg: PMETConfig) -> list[int]:
    """Positions each row is replayed over: its length, or for the suffix replay its length from the subject's
    last token on."""
    return [len(r) - (plan.lookup[j] if cfg.replay == "suffix" else 0) for j, r in enumerate(plan.rows)]


def replayed_positions(tok: PreTrainedTokenizerBase, requests: list[EditRequest], templates: ContextTemplates,
                       cfg: PMETConfig, device: torch.device) -> int:
    """Positions (padding included) that one Adam step replays through layers L..N-1 for this batch of requests
    before any of them stops: over the passes, rows × widest row. What the target stage's cost scales with (for
    `replay: suffix`, where every layer supports it; pmet.replay otherwise falls back to every position)."""
    plan = _plan(tok, requests, templates, cfg.kl_prompt)
    width = _widths(plan, cfg)
    return sum(len(ps) * max(width[j] for j in ps.tolist()) for ps in _pass_rows(plan, cfg, device))


def _record(model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout, plan: _Plan, rows: _Rows,
            sites: list[str], cfg: PMETConfig) -> tuple[list[_Pass], dict[str, torch.Tensor]]:
    """One clean forward per pass: what the replay needs (the inputs of layers ≥ L), and each site's unperturbed
    value at every row's subject-last token."""
    device = rows.req.device
    passes: list[_Pass] = []
    init: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for ps_rows in _pass_rows(plan, cfg, device):
            ids, mask = pad_right([plan.rows[j] for j in ps_rows.tolist()], tok.pad_token_id, device)
            layers = model.get_submodule(layout.spec.layers)
            kv = RecordKeyValues(layers, cfg.L) if cfg.replay == "suffix" else contextlib.nullcontext()
            with LayerInputs(layers, cfg.L) as cap, kv, \
                    Trace(model, outputs=sites, stop_after=layout.spec.final_norm) as tr:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            replay = LayerReplay(layers, cap, rows.lookup[ps_rows], rows.length[ps_rows], cfg.replay,
                                 kv if cfg.replay == "suffix" else None)
            passes.append(_Pass(ps_rows, replay))
            for site in sites:
                out = tr.outputs[site][torch.arange(len(ps_rows), device=device), rows.lookup[ps_rows]].float()
                init.setdefault(site, out.new_empty(rows.n_rows, out.shape[-1]))[ps_rows] = out
    return passes, init


def _replay_passes(model: PreTrainedModel, passes: list[_Pass], edits: dict[str, torch.Tensor], rows: _Rows,
                   device: torch.device) -> tuple[_Read, _Read]:
    """Replay every pass with each request's deltas added at its rows' subject-last token; returns the final states
    where an NLL term is read (with the term ids) and at the KL rows (with their row ids)."""
    nll_parts, kl_parts = [], []
    for ps in passes:
        if not len(ps.rows):
            continue
        hooks = {site: _adder(delta, ps, rows) for site, delta in edits.items()}
        with Trace(model, edits=hooks):
            h = ps.replay(ps.replay.hidden)
        where = torch.full((rows.n_rows,), -1, dtype=torch.long, device=device)  # batch row -> row of h
        where[ps.rows] = torch.arange(len(ps.rows), device=device)
        t = torch.nonzero(where[rows.nll_row] >= 0).flatten()
        local = where[rows.nll_row[t]]
        nll_parts.append((t, h[local, rows.nll_pos[t] - ps.replay.starts[local]]))
        k = rows.kl[where[rows.kl] >= 0]
        kl_parts.append((k, h[where[k], rows.lookup[k] - ps.replay.starts[where[k]]]))
    return ((torch.cat([t for t, _ in nll_parts]), torch.cat([x for _, x in nll_parts])),
            (torch.cat([k for k, _ in kl_parts]), torch.cat([x for _, x in kl_parts])))


def _adder(delta: torch.Tensor, ps: _Pass, rows: _Rows) -> Callable[[torch.Tensor], torch.Tensor]:
    """An output edit adding each row's request delta at its subject-last token (positions relative to the
    replayed ones)."""
    def edit(out: torch.Tensor) -> torch.Tensor:
        at = (torch.arange(len(ps.rows), device=out.device), rows.lookup[ps.rows] - ps.replay.starts)
        return out.index_put(at, delta[rows.req[ps.rows]].to(out.dtype), accumulate=True)
    return edit


def _kl_log_probs(model: PreTrainedModel, layout: ModelLayout, kl_states: _Read, rows: _Rows,
                  n_req: int) -> torch.Tensor:
    """log P over the vocabulary at each request's KL prompt, (n_req, vocab)."""
    rk, x = kl_states
    logp = torch.log_softmax(logits_from_hidden(model, layout, x), -1)
    out = torch.empty(n_req, logp.shape[-1], device=logp.device, dtype=logp.dtype)
    out[rows.req[rk]] = logp
    return out


@dataclass
class _LossParts:
    nll: torch.Tensor  # per request: mean over prompts of -Σ log p(target tokens) / n_target
    kl: torch.Tensor  # per request: μ · KL(P_edited ‖ P_orig) on the KL prompt
    prob: torch.Tensor  # per request: mean over prompts of exp(mean target-token log-probability)
    all_argmax: torch.Tensor  # per request: the target is the argmax at every target position of every prompt


def _eq10_loss(model: PreTrainedModel, layout: ModelLayout, rows: _Rows,
               nll_states: _Read, kl_states: _Read,
               kl_init: torch.Tensor, m: tuple, a: tuple, nll_factor: torch.Tensor, cfg: PMETConfig,
               n_prompts: int) -> tuple[torch.Tensor, _LossParts]:
    """Eq. 10 per request: φ·NLL + μ·KL + w·(‖δm‖/‖m0‖² + ‖δa‖/‖a0‖²), with the vocabulary projection only
    where a term is read."""
    terms, x = nll_states
    n_req = len(rows.n_tgt)
    r_nll, t_nll = rows.nll_row[terms], rows.nll_tok[terms]
    logp = torch.log_softmax(logits_from_hidden(model, layout, x), -1)
    tok_logp = logp.gather(-1, t_nll[:, None]).squeeze(-1)
    req_of_term = rows.req[r_nll]
    nll = torch.zeros(n_req, device=x.device).index_add(0, req_of_term, -tok_logp) / rows.n_tgt / n_prompts
    misses = torch.zeros(n_req, device=x.device).index_add(0, req_of_term, (logp.argmax(-1) != t_nll).float())
    prompt_rows = r_nll.unique()
    per_prompt = torch.zeros(rows.n_rows, device=x.device).index_add(0, r_nll, tok_logp.detach())[prompt_rows]
    prob = torch.zeros(n_req, device=x.device).index_add(
        0, rows.req[prompt_rows], torch.exp(per_prompt / rows.n_tgt[rows.req[prompt_rows]])) / n_prompts
    rk, xk = kl_states
    kl_logp = torch.log_softmax(logits_from_hidden(model, layout, xk), -1)
    kl_terms = (kl_logp.exp() * (kl_logp - kl_init[rows.req[rk]])).sum(-1)
    kl = cfg.kl_factor * torch.zeros(n_req, device=x.device).index_add(0, rows.req[rk], kl_terms)
    (delta_m, m0), (delta_a, a0) = m, a
    decay = cfg.v_weight_decay * delta_m.norm(dim=-1) / m0.norm(dim=-1) ** 2
    if delta_a is not None:
        decay = decay + cfg.v_weight_decay * delta_a.norm(dim=-1) / a0.norm(dim=-1) ** 2
    return nll_factor * nll + kl + decay, _LossParts(nll, kl, prob, misses == 0)


class _StopState:
    """Per-request stopping rules in the reference order (docs/REFERENCE.md, "Stopping rules"; App. D): total loss
    below `stop_loss`; or, with `stop_rule: argmax`, the target argmax everywhere and KL ≤ `stop_kl` (φ drops to
    φ·nll_factor_when_argmax while the target is argmax); else the step budget."""

    def __init__(self, n_req: int, cfg: PMETConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.nll_factor = torch.full((n_req,), float(cfg.nll_factor), device=device)
        self.done = torch.zeros(n_req, dtype=torch.bool, device=device)
        self.steps = torch.zeros(n_req, dtype=torch.long, device=device)
        self.stop = ["budget"] * n_req
        self.last = {k: torch.zeros(n_req, device=device) for k in ("nll", "kl", "prob")}

    def update(self, loss: torch.Tensor, parts: _LossParts, last_step: bool) -> torch.Tensor:
        """Record this step's values for the running requests and mark those that stop; returns them."""
        cfg = self.cfg
        with torch.no_grad():
            running = ~self.done
            for key, val in (("nll", parts.nll), ("kl", parts.kl), ("prob", parts.prob)):
                self.last[key] = torch.where(running, val.detach(), self.last[key])
            stop_loss = running & (loss < cfg.stop_loss)
            argmax_now = running & ~stop_loss & parts.all_argmax & (cfg.stop_rule == "argmax")
            stop_kl = argmax_now & (parts.kl <= cfg.stop_kl)
            self.nll_factor = torch.where(argmax_now, cfg.nll_factor * cfg.nll_factor_when_argmax,
                                          torch.full_like(self.nll_factor, float(cfg.nll_factor)))
            for i in torch.nonzero(stop_loss).flatten().tolist():
                self.stop[i] = "loss"
            for i in torch.nonzero(stop_kl).flatten().tolist():
                self.stop[i] = "kl"
            finishing = running if last_step else stop_loss | stop_kl
            self.done = self.done | finishing
        return finishing


def _targets(m0: torch.Tensor, delta_m: torch.Tensor, a0: torch.Tensor | None, delta_a: torch.Tensor | None,
             state: _StopState) -> Targets:
    """v = m0 + δm (and a0 + δa), with what the optimisation did for each request."""
    diags = [
        TargetDiagnostics(
            nll=float(state.last["nll"][i]), kl=float(state.last["kl"][i]), prob=float(state.last["prob"][i]),
            steps=int(state.steps[i]), stop=state.stop[i],
            delta_m_norm=float(delta_m[i].norm()), init_m_norm=float(m0[i].norm()),
            delta_a_norm=float(delta_a[i].norm()) if delta_a is not None else 0.0,
            init_a_norm=float(a0[i].norm()) if a0 is not None else 0.0,
        )
        for i in range(len(m0))
    ]
    return Targets(ffn=m0 + delta_m, attn=a0 + delta_a if delta_a is not None else None, diagnostics=diags)


def _clamp(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Project each row into the ball ‖δ_i‖ ≤ max_norm_i, in place."""
    norm = delta.norm(dim=-1)
    scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
    delta.mul_(scale[:, None])
