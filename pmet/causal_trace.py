"""Causal tracing (ROME, Meng et al. 2022, §2.1), to choose the critical layers R of a new model.

For a fact the model knows (prompt with subject → its own next-token prediction o):
- clean run: P(o) at the last token;
- corrupted run: Gaussian noise ν·N(0, I) added to the embeddings of every subject token (ν = 3 × the standard
  deviation of subject-token embeddings over the facts, ROME's choice), S noise samples, the same noise for
  every restoration (ROME reseeds per call);
- restored runs: the corrupted run with one state put back to its clean value: the hidden state (layer output)
  at token t of layer l, or the FFN output / MHSA output at token t of the `window` layers centred on l (ROME:
  10); the score is P(o), averaged over the noise samples.
Indirect effect = restored − corrupted. Averaged over facts per token group (first / middle / last subject token,
first subsequent token, further tokens, last token) as in ROME's Figure 2. The suggested critical range is the
`span` consecutive layers with the largest average FFN effect at the last subject token (MEMIT §4: the critical
MLP layers at the subject's last token).

All restorations of a fact run as rows of batched forward passes (one row per (token, layer, sample)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch import layout_of
from .hooks import Trace
from .prompts import encode, pad_right, target_ids

KINDS = ("hidden", "ffn", "attn")
GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
          "further tokens", "last token")


@dataclass
class FactTrace:
    """Scores of one fact: P(answer) with each (token, layer) restored, per kind ([T, N] arrays)."""

    prompt: str
    subject: str
    answer: str
    tokens: list[str]
    subject_range: tuple[int, int]  # [first, last + 1) token indices of the subject
    clean: float
    corrupted: float
    scores: dict[str, np.ndarray] = field(default_factory=dict)

    def effects(self, kind: str) -> np.ndarray:
        return self.scores[kind] - self.corrupted

    def grouped(self, kind: str) -> np.ndarray:
        """[6, N] indirect effects averaged within ROME's token groups (NaN for an empty group)."""
        eff = self.effects(kind)
        b, e = self.subject_range
        T = eff.shape[0]
        idx = [[b], list(range(b + 1, e - 1)), [e - 1], [e] if e < T - 1 else [],
               list(range(e + 1, T - 1)), [T - 1]]
        return np.stack([eff[i].mean(0) if i else np.full(eff.shape[1], np.nan) for i in idx])


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def subject_token_range(tok: PreTrainedTokenizerBase, prompt: str, subject: str) -> tuple[list[int], int, int]:
    """Token ids of the prompt and the [first, last + 1) token range of the subject in it."""
    template = prompt.replace(subject, "{}", 1)
    enc = encode(tok, template, subject)
    s0 = template.index("{}")
    if getattr(tok, "is_fast", False):
        offsets = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
        start = next(i for i, (a, b) in enumerate(offsets) if b > a and b > s0)
    else:
        start = len(tok(prompt[:s0])["input_ids"])
    return list(enc.ids), min(start, enc.subject_last), enc.subject_last + 1


def embedding_noise_std(model: PreTrainedModel, tok: PreTrainedTokenizerBase, subjects: list[str]) -> float:
    """Standard deviation of the input embeddings of all subject tokens (ROME `collect_embedding_std`)."""
    emb = model.get_input_embeddings()
    name = _module_name(model, emb)
    rows = []
    for s in subjects:
        ids = torch.tensor([tok(s, add_special_tokens=False)["input_ids"]], device=emb.weight.device)
        with torch.no_grad(), Trace(model, outputs=[name], stop_after=name) as tr:
            model(input_ids=ids, use_cache=False)
        rows.append(tr.outputs[name][0].float())
    return float(torch.cat(rows).std())


def trace_fact(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, subject: str, *, noise: float,
               samples: int = 10, window: int = 10, kinds: tuple[str, ...] = KINDS, batch_size: int = 256,
               seed: int = 1) -> FactTrace:
    """Trace one fact (module docstring). The answer is the model's own greedy next token."""
    layout = layout_of(model)
    device = next(model.parameters()).device
    ids, b, e = subject_token_range(tok, prompt, subject)
    T, N = len(ids), layout.n_layers
    emb_name = _module_name(model, model.get_input_embeddings())
    sites = {"hidden": layout.layer, "ffn": layout.ffn_out, "attn": layout.attn_out}
    x = torch.tensor([ids], device=device)

    # clean run: answer, its probability, and every clean state that can be restored
    names = [sites[k](l) for k in kinds for l in range(N)]
    with torch.no_grad(), Trace(model, outputs=names) as tr:
        logits = model(input_ids=x, use_cache=False).logits[0, -1].float()
    probs = logits.softmax(-1)
    answer = int(probs.argmax())
    clean_states = {n: tr.outputs[n][0].clone() for n in names}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    emb_noise = (noise * torch.randn(samples, e - b, model.get_input_embeddings().weight.shape[1],
                                     generator=gen)).to(device)

    def run(configs: list[tuple[int, int]], kind: str | None) -> np.ndarray:
        """P(answer) averaged over samples, for each (token, layer) restoration (none when kind is None)."""
        out = []
        for c0 in range(0, max(1, len(configs)), max(1, batch_size // samples)):
            chunk = configs[c0 : c0 + max(1, batch_size // samples)] or [(-1, -1)]
            rows = len(chunk) * samples
            ids_b, mask = pad_right([ids] * rows, tok.pad_token_id or 0, device)
            tok_of = torch.tensor([t for t, _ in chunk for _ in range(samples)], device=device)
            layer_of = torch.tensor([l for _, l in chunk for _ in range(samples)], device=device)
            edits = {emb_name: lambda h: _corrupt(h, b, e, emb_noise)}
            if kind is not None:
                # hidden: the one layer; ffn/attn: layers max(0, l - w//2) .. min(N, l + ceil(w/2)) - 1 (ROME)
                lo = layer_of if kind == "hidden" else (layer_of - window // 2).clamp(min=0)
                hi = layer_of + 1 if kind == "hidden" else (layer_of + (window + 1) // 2).clamp(max=N)
                for j in range(N):
                    sel = (lo <= j) & (j < hi) & (tok_of >= 0)
                    edits[sites[kind](j)] = _restore(sel, tok_of, clean_states[sites[kind](j)])
            with torch.no_grad(), Trace(model, edits=edits):
                # all rows have the same length: only the last position's logits are needed
                last = model(input_ids=ids_b, attention_mask=mask, use_cache=False,
                             logits_to_keep=1).logits[:, -1].float()
            p = last.softmax(-1)[:, answer].view(len(chunk), samples).mean(1)
            out.append(p.cpu())
        return torch.cat(out).numpy()

    corrupted = float(run([], None)[0])
    result = FactTrace(prompt, subject, tok.decode([answer]), [tok.decode([i]) for i in ids], (b, e),
                       float(probs[answer]), corrupted)
    configs = [(t, l) for t in range(T) for l in range(N)]
    for kind in kinds:
        result.scores[kind] = run(configs, kind).reshape(T, N)
    return result


def _corrupt(h: torch.Tensor, b: int, e: int, noise: torch.Tensor) -> torch.Tensor:
    h = h.clone()
    s = noise.shape[0]
    h[:, b:e] += noise.repeat(h.shape[0] // s, 1, 1).to(h.dtype)
    return h


def _restore(sel: torch.Tensor, tok_of: torch.Tensor, clean: torch.Tensor):
    rows = torch.nonzero(sel).flatten()

    def edit(h: torch.Tensor) -> torch.Tensor:
        if not len(rows):
            return h
        h = h.clone()
        h[rows, tok_of[rows]] = clean[tok_of[rows]].to(h.dtype)
        return h

    return edit


def suggest_layers(mean_grouped: dict[str, np.ndarray], span: int) -> list[int]:
    """The `span` consecutive layers with the largest summed FFN indirect effect at the last subject token."""
    curve = np.nan_to_num(mean_grouped["ffn"][GROUPS.index("last subject token")])
    span = min(span, len(curve))
    sums = np.convolve(curve, np.ones(span), mode="valid")
    start = int(np.argmax(sums))
    return list(range(start, start + span))


def known_facts(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: list[dict], n: int) -> list[dict]:
    """The first `n` facts whose attribute's first token is the model's greedy prediction (ROME: facts it knows)."""
    out = []
    device = next(model.parameters()).device
    for f in facts:
        ids = torch.tensor([tok(f["prompt"])["input_ids"]], device=device)
        with torch.no_grad():
            pred = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        if f["subject"] in f["prompt"] and pred == target_ids(tok, f["attribute"])[0]:
            out.append(f)
            if len(out) == n:
                break
    return out


def plot_grouped(mean_grouped: dict[str, np.ndarray], n_facts: int, model_name: str, path: str) -> None:
    """ROME Figure-2-style heatmaps: average indirect effect per token group (rows) and layer (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(mean_grouped)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.2), squeeze=False)
    cmaps = {"hidden": "Purples", "ffn": "Greens", "attn": "Reds"}
    for ax, kind in zip(axes[0], kinds, strict=True):
        im = ax.imshow(mean_grouped[kind], aspect="auto", cmap=cmaps.get(kind, "viridis"), vmin=0)
        ax.set_yticks(range(len(GROUPS)), GROUPS, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_title(f"{kind}: average indirect effect ({n_facts} facts)", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(model_name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def plot_fact(trace: FactTrace, path: str) -> None:
    """Per-fact heatmaps (tokens × layers) of P(answer) with each state restored, one panel per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(trace.scores)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 0.3 * len(trace.tokens) + 1.5), squeeze=False)
    labels = [t + ("*" if trace.subject_range[0] <= i < trace.subject_range[1] else "")
              for i, t in enumerate(trace.tokens)]
    for ax, kind in zip(axes[0], kinds, strict=True):
        im = ax.imshow(trace.scores[kind], aspect="auto", cmap="viridis", vmin=trace.corrupted)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(f"{kind}: P({trace.answer.strip()!r}) restored", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
