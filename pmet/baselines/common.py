"""What sequential edits share: many in-place additions to a matrix, saved as one patch."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..arch import get_weight
from ..config import PMETConfig
from ..errors import ConfigError
from ..update import LayerUpdate


def finish_sequential(model: PreTrainedModel, name: str, layer: int, original: torch.Tensor,
                      residual_norm: float, component: str = "ffn") -> LayerUpdate:
    """Turn many in-place additions to `name` into one Δ = W_now − W_0 (computed in float64) and write W_0 + Δ
    back, so that the model holds exactly what applying the saved patch gives (bit-exact apply/revert)."""
    W = get_weight(model, name)
    with torch.no_grad():
        delta = (W.detach().double().cpu() - original.double()).to(W.dtype)
        W.copy_(original.to(W.device) + delta.to(W.device))
    return LayerUpdate(f"{name}.weight", layer, component, delta.float(), residual_norm)


def single_layer(config: PMETConfig, method: str) -> int:
    """The one layer a single-layer baseline (`method` = "rome" or "ft") edits; a clear error if there are more."""
    if len(config.layers) != 1:
        raise ConfigError(f"config field 'layers': {method} edits one layer, got {config.layers} "
                          f"(set methods.{method}.layers in the preset)")
    return config.layers[0]
