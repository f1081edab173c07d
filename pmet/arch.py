"""Where each piece of the paper's Eq. 2 lives in a Hugging Face model, as data.

One row per `config.model_type`. Names are dotted module paths: `layers` from the model root, the others
relative to one decoder layer (`attn_out`, `ffn_out`) or to the model root (`final_norm`, `unembed`).

- `attn_out`: W_O^MHSA, whose output is the MHSA component output a^l (Eq. 2).
- `ffn_out`:  W_O^FFN, whose input is the key k^l = σ(W_I γ(h^{l-1})) (Eq. 12) and whose output is m^l.
- `final_norm`, `unembed`: γ and W_E of Eq. 1 (the logit lens of Eq. 7 uses them too).
- `parallel`: MHSA and FFN read the same layer input (GPT-J, GPT-NeoX) rather than in sequence.
- `conv1d`: weights stored as (in, out) (GPT-2's Conv1D) instead of nn.Linear's (out, in).
- A name may list alternatives "a|b" (renamed modules across transformers versions); the first present wins.
- `post_norms`: modules normalising a component's output before the residual add (Gemma 3); edits act on
  the projection's output, before these norms.

An architecture missing here gets a ModelError that says which row to add.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    layers: str
    attn_out: str
    ffn_out: str
    final_norm: str
    unembed: str
    parallel: bool | str = False  # bool, or the name of a boolean config attribute
    conv1d: bool = False
    post_norms: tuple[str, ...] = ()


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    attn_out="self_attn.o_proj",
    ffn_out="mlp.down_proj",
    final_norm="model.norm",
    unembed="lm_head",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h",
        attn_out="attn.c_proj",
        ffn_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        conv1d=True,
    ),
    "gptj": ArchSpec(
        layers="transformer.h",
        attn_out="attn.out_proj",
        ffn_out="mlp.fc_out",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        parallel=True,
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        attn_out="attention.dense",
        ffn_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head|embed_out",  # renamed to lm_head in transformers 5
        parallel="use_parallel_residual",
    ),
    "llama": _LLAMA_LIKE,  # SmolLM2 is a Llama
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": ArchSpec(
        layers="model.layers",
        attn_out="self_attn.o_proj",
        ffn_out="mlp.down_proj",
        final_norm="model.norm",
        unembed="lm_head",
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    ),
}


@dataclass(frozen=True)
class ModelLayout:
    """An ArchSpec resolved against one model: full module names per layer, and its parallel flag."""

    spec: ArchSpec
    n_layers: int
    parallel: bool

    def layer(self, l: int) -> str:
        return f"{self.spec.layers}.{l}"

    def attn_out(self, l: int) -> str:
        return f"{self.layer(l)}.{self.spec.attn_out}"

    def ffn_out(self, l: int) -> str:
        return f"{self.layer(l)}.{self.spec.ffn_out}"

    def edited_module(self, l: int, component: str) -> str:
        """Name of the weight edited for `component` ('ffn' or 'attn') at layer l."""
        return self.ffn_out(l) if component == "ffn" else self.attn_out(l)

    def post_norm(self, l: int, component: str) -> str:
        """Name of the norm applied to `component`'s output ('ffn' or 'attn') at layer l before the residual add;
        only for architectures that have one (`spec.post_norms`, Gemma 3)."""
        return f"{self.layer(l)}.{self.spec.post_norms[1 if component == 'ffn' else 0]}"


def layout_of(model: nn.Module) -> ModelLayout:
    """Resolve the architecture table for `model`, or fail with a message saying what to add."""
    model_type = getattr(model.config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise ModelError(
            f"unsupported architecture '{model_type}': add a row to pmet.arch.ARCHITECTURES naming its "
            f"decoder layer list, attention output projection, FFN output projection, final norm and "
            f"unembedding (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    spec = replace(spec, unembed=_first_present(model, spec.unembed), final_norm=_first_present(model, spec.final_norm))
    parallel = spec.parallel
    if isinstance(parallel, str):
        parallel = bool(getattr(model.config, parallel, False))
    layers = model.get_submodule(spec.layers)
    return ModelLayout(spec=spec, n_layers=len(layers), parallel=parallel)


def _first_present(model: nn.Module, names: str) -> str:
    for name in names.split("|"):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            continue
    raise ModelError(f"none of the modules {names!r} exists in this {type(model).__name__}")


def get_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight Parameter of the projection `name`."""
    return model.get_submodule(name).weight


def as_linear(delta: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """Map a (out, in) update Δ to the stored layout of the weight (Conv1D stores (in, out))."""
    return delta.T if conv1d else delta


def unembed(model: nn.Module, layout: ModelLayout, normed: torch.Tensor) -> torch.Tensor:
    """W_E of Eq. 1 on already-normalised states (with Gemma-style final logit softcapping if configured), in
    float32."""
    logits = model.get_submodule(layout.spec.unembed)(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def logits_from_hidden(model: nn.Module, layout: ModelLayout, h: torch.Tensor) -> torch.Tensor:
    """W_E γ(h) of Eq. 1 for already-selected positions (h: (..., d))."""
    return unembed(model, layout, model.get_submodule(layout.spec.final_norm)(h))
