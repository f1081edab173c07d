"""`v_compute_dtype`: the target optimisation (Eq. 10) with layers L..N-1 replayed in bfloat16 or float16, forward
and backward, while the deltas, the clean values m0/a0, attention (pmet.replay_attention), the vocabulary
projection and the loss stay float32 (docs/PERFORMANCE.md, "bfloat16 target optimisation"). float32, the default,
runs as the paper."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .replay import LayerReplay
from .replay_attention import replay_attention


@contextlib.contextmanager
def replay_precision(dtype: str, model: nn.Module, layers: nn.ModuleList, start: int,
                     replays: list[LayerReplay]) -> Iterator[None]:
    """While the optimisation runs in low precision: the floating parameters and buffers of layers start..N-1, and
    each pass's recorded inputs, held in `dtype` (converted once, not at every step as autocast would), attention
    by pmet.replay_attention in float32; the layers get their exact original tensors back afterwards."""
    if dtype == "float32":
        yield
        return
    with replay_attention(model) as switched:
        low = getattr(torch, dtype)
        for replay in replays:
            replay.to(low, clean_prefix=not switched)  # switched: attention reads the float32 prefix as it is
        tensors = [t for layer in layers[start:] for t in (*layer.parameters(), *layer.buffers())
                   if t.is_floating_point()]
        saved = [t.data for t in tensors]
        try:
            for t, s in zip(tensors, saved, strict=True):
                t.data = s.to(low)
            with contextlib.nullcontext() if switched else _math_kernel(saved[0].device if saved else None):
                yield
        finally:
            for t, s in zip(tensors, saved, strict=True):
                t.data = s


def _math_kernel(device: torch.device | None) -> Any:
    """Low-precision attention by transformers' own function on a CPU: the math kernel, since the fused kernel's
    bfloat16 backward is ~20× slower than its float32 one there (measured: docs/PERFORMANCE.md)."""
    if device is None or device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
