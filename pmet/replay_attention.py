"""The attention of the target optimisation's replay in low precision (`v_compute_dtype` bfloat16/float16, Eq. 10
steps, pmet.replay): transformers' `sdpa` attention, except that queries, keys and values are attended in float32
and the output returns in the queries' dtype (docs/PERFORMANCE.md, "bfloat16 target optimisation"). On a CPU the
fused kernel's low-precision backward is ~20× slower than its float32 one, and the math kernel converts the clean
prefix's keys/values at every layer and step; here the prefix stays float32 (pmet.replay.SuffixCache) and the fused
float32 kernel runs. Grouped keys/values (GQA: SmolLM2's 3 key/value heads for 9 query heads, Qwen2, Gemma 3)
reach the kernel as they are (`enable_gqa`); transformers repeats them per query head whenever a mask is given.

The model is switched to this function only while the optimisation steps run, only from `sdpa`, and only on a
CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "pmet_replay_sdpa"
_GQA = torch.torch_version.TorchVersion(torch.__version__) >= "2.5"  # enable_gqa in scaled_dot_product_attention


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An AttentionInterface function: (B, H, W, d) queries over (B, H_kv, T, d) keys/values with the replay's
    explicit mask (B, 1, W, T); returns (B, W, H, d) in the queries' dtype. Anything else goes to transformers'
    own `sdpa` function (on float32 inputs)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    low = query.dtype
    q, k, v = query.float(), key.float(), value.float()
    mask = attention_mask.float() if attention_mask is not None and attention_mask.is_floating_point() \
        else attention_mask
    grouped = k.shape[1] != q.shape[1]
    if mask is None or dropout or (grouped and not _GQA) or any(kwargs.get(a) is not None
                                                                 for a in ("softcap", "position_bias")):
        out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                        is_causal=is_causal, **kwargs)
        return out.to(low), None
    gqa = {"enable_gqa": True} if grouped else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, **gqa)
    return out.to(low).transpose(1, 2).contiguous(), None


def _switchable(model: nn.Module) -> bool:
    """A model on a CPU (elsewhere the kernels' trade-offs differ: not measured) running transformers' `sdpa`,
    with a transformers that can switch it."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return on_cpu and getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa" and hasattr(
        model, "set_attn_implementation")


@contextlib.contextmanager
def replay_attention(model: nn.Module) -> Iterator[bool]:
    """While the steps run, the model's attention is `attention` above where `_switchable`; yields whether it
    is."""
    if not _switchable(model):
        yield False
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
    with contextlib.suppress(ImportError):  # masks are recorded, not built, in the replay; registered for safety
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")
