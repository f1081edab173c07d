"""The paper's Figure 2: how much each MHSA and FFN component changes the last token's hidden state.

For every prompt and layer l, at the prompt's last token ("Investigating the Role of MHSA and FFN"):
- MHSA: h^{l-1} (the input of decoder layer l) vs a^l (the output of the MHSA output projection W_O^MHSA);
- FFN: the residual state that actually enters the FFN block vs m^l (the output of W_O^FFN).
  In parallel blocks (GPT-J, GPT-NeoX with use_parallel_residual) that state is h^{l-1}, as in the paper.
  In sequential blocks (GPT-2, Llama/SmolLM2, Qwen2, Gemma 3) the FFN sees the residual after attention,
  h^{l-1} + a^l (Gemma 3: h^{l-1} + post_attention_norm(a^l)); it is read as the input of the module named in
  FFN_ENTRY below, or, for a model type missing there, recomputed from the recorded h^{l-1} and a^l.

Gemma 3 normalises component outputs before the residual add; a^l and m^l are the projections' raw outputs
(where PMET edits) unless `after_post_norms=True`, which reads the normalised contributions instead.

Two similarities per pair (x, y): the cosine of the vectors, and the Jaccard similarity (Eq. 7) of their top-k
vocabulary tokens under the logit lens W_E γ(·) (final norm, then unembedding, softcapping included).
Every activation is read with one `Trace` per batch; the similarities are tensor ops over the whole batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..arch import ModelLayout, layout_of, unembed
from ..errors import RequestError
from ..hooks import Trace
from ..prompts import chunks, pad_right

# Module (relative to one decoder layer) whose input is the residual state entering the FFN block, for
# sequential blocks. Data, not code: add a row for a new sequential architecture (without one, the state is
# recomputed as h^{l-1} + post_norm(a^l) from the recorded tensors). Parallel blocks do not use this table.
FFN_ENTRY: dict[str, str] = {
    "gpt2": "ln_2",
    "llama": "post_attention_layernorm",  # the pre-FFN norm in Llama-style blocks
    "mistral": "post_attention_layernorm",
    "qwen2": "post_attention_layernorm",
    "qwen3": "post_attention_layernorm",
    "gpt_neox": "post_attention_layernorm",  # only when use_parallel_residual is False
    "gemma3_text": "pre_feedforward_layernorm",  # after the post-attention norm and the residual add
}


@dataclass
class LayerStates:
    """Last-token states of one batch, each (batch, n_layers, d): h^{l-1}, a^l, FFN input, m^l."""

    h_in: torch.Tensor
    attn: torch.Tensor
    ffn_in: torch.Tensor
    ffn_out: torch.Tensor
    ffn_entry: str  # how ffn_in was obtained (for the JSON note)


def ffn_entry_description(model: PreTrainedModel, layout: ModelLayout) -> str:
    """Which state is compared with m^l, in words."""
    if layout.parallel:
        return "h^{l-1} (parallel block: the FFN reads the layer input)"
    name = FFN_ENTRY.get(model.config.model_type)
    if name is not None and _has(model, f"{layout.layer(0)}.{name}"):
        return f"h^{{l-1}} + a^l, read as the input of '{name}' (sequential block)"
    norm = f" after '{layout.spec.post_norms[0]}'" if layout.spec.post_norms else ""
    return f"h^{{l-1}} + a^l{norm} (recomputed: no FFN_ENTRY row for '{model.config.model_type}')"


def _has(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


@torch.no_grad()
def read_states(model: PreTrainedModel, layout: ModelLayout, ids: torch.Tensor, mask: torch.Tensor, *,
                after_post_norms: bool = False) -> LayerStates:
    """One forward of a right-padded batch; the four states of every layer at each row's last real token.

    `after_post_norms`: where the architecture normalises component outputs before the residual add (Gemma 3's
    `post_norms`), read a^l and m^l after those norms, i.e. the contributions actually added to the residual.
    """
    n = layout.n_layers
    entry = None if layout.parallel else FFN_ENTRY.get(model.config.model_type)
    if entry is not None and not _has(model, f"{layout.layer(0)}.{entry}"):
        entry = None
    layer_names = [layout.layer(l) for l in range(n)]
    attn_names = [layout.attn_out(l) for l in range(n)]
    ffn_names = [layout.ffn_out(l) for l in range(n)]
    if after_post_norms and layout.spec.post_norms:
        attn_names = [layout.post_norm(l, "attn") for l in range(n)]
        ffn_names = [layout.post_norm(l, "ffn") for l in range(n)]
    entry_names = [f"{layout.layer(l)}.{entry}" for l in range(n)] if entry else []
    with Trace(model, inputs=layer_names + entry_names, outputs=attn_names + ffn_names,
               stop_after=layer_names[-1]) as tr:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    rows = torch.arange(ids.shape[0], device=ids.device)
    last = mask.sum(-1) - 1

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[rows, last]

    h_in = torch.stack([pick(tr.inputs[k]) for k in layer_names], 1)
    attn = torch.stack([pick(tr.outputs[k]) for k in attn_names], 1)
    ffn_out = torch.stack([pick(tr.outputs[k]) for k in ffn_names], 1)
    if layout.parallel:
        ffn_in = h_in
    elif entry:
        ffn_in = torch.stack([pick(tr.inputs[k]) for k in entry_names], 1)
    else:
        added = attn
        if layout.spec.post_norms and not after_post_norms:
            added = torch.stack([model.get_submodule(layout.post_norm(l, "attn"))(attn[:, l])
                                 for l in range(n)], 1)
        ffn_in = h_in + added
    return LayerStates(h_in, attn, ffn_in, ffn_out, ffn_entry_description(model, layout))


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension (float32)."""
    return F.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-12)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 7 for sets of distinct token ids given as rows: |A∩B| / |A∪B|, over the leading dimensions."""
    inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).sum((-1, -2)).float()
    return inter / (a.shape[-1] + b.shape[-1] - inter)


def topk_ids(model: PreTrainedModel, layout: ModelLayout, states: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k vocabulary ids of each state under the logit lens W_E γ(state)."""
    norm = model.get_submodule(layout.spec.final_norm)
    logits = unembed(model, layout, norm(states))
    return logits.topk(k, dim=-1).indices


@dataclass
class ComponentStats:
    """Per-fact (rows) per-layer (columns) similarities; `summary()` is the components.json content."""

    mhsa_cosine: np.ndarray
    mhsa_jaccard: np.ndarray
    ffn_cosine: np.ndarray
    ffn_jaccard: np.ndarray
    top_k: int
    model_type: str
    parallel: bool
    ffn_input: str
    prompts: list[str] = field(default_factory=list)
    post_norms: tuple[str, ...] = ()
    after_post_norms: bool = False

    @property
    def n_facts(self) -> int:
        return int(self.mhsa_cosine.shape[0])

    @property
    def layers(self) -> list[int]:
        return list(range(self.mhsa_cosine.shape[1]))

    def note(self) -> str:
        return (
            "Last token of each prompt. MHSA: cosine and top-k Jaccard (Eq. 7, logit lens = final norm + "
            "unembedding) between h^{l-1} (input of decoder layer l) and a^l (output of the MHSA output "
            f"projection). FFN: between the residual state entering the FFN block, {self.ffn_input}, and m^l "
            "(output of the FFN output projection). "
            + (self._post_norm_note() if self.post_norms else "")
            + "Means and standard deviations over facts."
        )

    def _post_norm_note(self) -> str:
        names = ", ".join(self.post_norms)
        if self.after_post_norms:
            return (f"This architecture normalises component outputs before the residual add ({names}); a^l and "
                    "m^l are read AFTER those norms (the contributions actually added). ")
        return (f"This architecture normalises component outputs before the residual add ({names}); a^l and m^l "
                "are the projections' raw outputs, BEFORE those norms. ")

    def summary(self) -> dict:
        def part(cos: np.ndarray, jac: np.ndarray) -> dict:
            return {
                "cosine": _round(cos.mean(0)), "jaccard": _round(jac.mean(0)),
                "std": {"cosine": _round(cos.std(0)), "jaccard": _round(jac.std(0))},
            }

        return {
            "layers": self.layers,
            "mhsa": part(self.mhsa_cosine, self.mhsa_jaccard),
            "ffn": part(self.ffn_cosine, self.ffn_jaccard),
            "n_facts": self.n_facts,
            "top_k": self.top_k,
            "model_type": self.model_type,
            "parallel": self.parallel,
            "after_post_norms": self.after_post_norms,
            "note": self.note(),
        }

    def csv_rows(self) -> list[dict]:
        s = self.summary()
        return [
            {"layer": l, "component": comp, "cosine_mean": s[comp]["cosine"][l],
             "cosine_std": s[comp]["std"]["cosine"][l], "jaccard_mean": s[comp]["jaccard"][l],
             "jaccard_std": s[comp]["std"]["jaccard"][l], "n_facts": self.n_facts}
            for comp in ("mhsa", "ffn") for l in self.layers
        ]


def _round(x: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in x]


def component_similarity(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    top_k: int = 50,
    batch_size: int = 32,
    progress: bool = True,
    after_post_norms: bool = False,
) -> ComponentStats:
    """Figure 2's cosine and Jaccard similarities for every prompt (last token) and layer.

    `after_post_norms` (Gemma 3 and other architectures with `post_norms`): compare with the normalised
    component outputs that are added to the residual stream instead of the projections' raw outputs.
    """
    if not prompts:
        raise RequestError("prompts", None, None, "no prompts to analyse")
    layout = layout_of(model)
    device = next(model.parameters()).device
    encoded = [tok(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    out = torch.zeros(4, len(prompts), layout.n_layers)
    batches = chunks(len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="components", unit="batch")
    ffn_input = ffn_entry_description(model, layout)
    for r in batches:
        idx = [order[i] for i in r]
        ids, mask = pad_right([encoded[i] for i in idx], tok.pad_token_id, device)
        s = read_states(model, layout, ids, mask, after_post_norms=after_post_norms)
        cos_a = cosine(s.h_in, s.attn)
        cos_m = cosine(s.ffn_in, s.ffn_out)
        jac_a = torch.empty_like(cos_a)
        jac_m = torch.empty_like(cos_m)
        # one layer at a time keeps the (states·batch, vocab) logits small; parallel blocks share h^{l-1}
        parts, ffn_in_at = (("h_in", "attn", "ffn_out"), 0) if layout.parallel else \
            (("h_in", "attn", "ffn_out", "ffn_in"), 3)
        for l in range(layout.n_layers):
            t = topk_ids(model, layout, torch.stack([getattr(s, p)[:, l] for p in parts]), top_k)
            jac_a[:, l] = jaccard(t[0], t[1])
            jac_m[:, l] = jaccard(t[ffn_in_at], t[2])
        where = torch.tensor(idx)
        for j, v in enumerate((cos_a, jac_a, cos_m, jac_m)):
            out[j, where] = v.float().cpu()
    arr = out.numpy()
    return ComponentStats(
        mhsa_cosine=arr[0], mhsa_jaccard=arr[1], ffn_cosine=arr[2], ffn_jaccard=arr[3], top_k=top_k,
        model_type=model.config.model_type, parallel=layout.parallel, ffn_input=ffn_input, prompts=list(prompts),
        post_norms=layout.spec.post_norms, after_post_norms=after_post_norms and bool(layout.spec.post_norms),
    )


def load_prompts(path: str | Path, *, limit: int | None = None) -> list[str]:
    """Prompts from a facts file.

    - a JSON list / JSONL of records with a filled-in "prompt" (ROME's known_1000.json, or {"prompt": ...});
    - any pmet request file (native, CounterFact, EasyEdit, zsRE, CSV): the request prompt with its subject;
    - a .txt file: one prompt per line.
    """
    from ..requests import load_requests

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RequestError(source, None, None, "file not found")
    if limit is not None and limit < 1:
        raise RequestError(source, None, None, f"--limit must be positive, got {limit}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(source, None, None, f"cannot read: {e}") from None
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        records = _json_records(text, suffix, source)
        if records and all(_plain_prompt(r) for r in records):
            prompts = [r["prompt"] for r in records]
        else:  # request formats: the prompt template needs its subject (and CounterFact nests it)
            prompts = [r.text for r in load_requests(path, limit=limit)]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise RequestError(source, None, None, "no prompts found")
    return prompts


def _plain_prompt(r: object) -> bool:
    """A record whose "prompt" is already the full text (no "{}" subject slot)."""
    return isinstance(r, dict) and isinstance(r.get("prompt"), str) and "{}" not in r["prompt"] and \
        bool(r["prompt"].strip())


def _json_records(text: str, suffix: str, source: str) -> list | None:
    """Records of a .json/.jsonl file (None for other suffixes); malformed JSON names the record."""
    if suffix == ".jsonl":
        out = []
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RequestError(source, number, None, f"malformed JSON: {e}") from None
        return out
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(source, None, None, f"malformed JSON: {e}") from None
        return data if isinstance(data, list) else [data]
    return None
