"""Replaying layers L..N-1 of one pass of rows at every step of the target optimisation (Eq. 10).

δ is added at the subject's last token s of layer L. Attention is causal, so no position before s, and no layer
below L, can change. `full` replays layers L..N-1 over every position; `suffix` (the default) replays each row
only from its own s on, each layer attending to the keys and values that the clean forward computed for the
row's positions before s. Both give the same hidden states, float rounding aside.

How: each decoder layer is called exactly as the model called it (arguments recorded by `hooks.LayerInputs`),
with its inputs taken at the replayed positions (hidden states, mask rows, position ids, rotary tables) and, in
place of a transformers Cache, a `SuffixCache` whose `update` writes the suffix's keys/values into the clean
ones at their absolute positions, so attention sees every position in order and the recorded mask (causal,
padding, sliding window) applies as it is. The clean keys/values are read in the clean forward itself, through the
same cache hook (`RecordKeyValues`).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from .hooks import LayerInputs, select_batch_rows

log = logging.getLogger(__name__)

CACHE_ARGS = ("cache", "past_key_values", "layer_past", "past_key_value")  # the cache's name across versions
_POSITIONAL = {"position_ids", "position_embeddings"}  # per-position inputs, gathered at the replayed positions


class _Recorder:
    """Cache stand-in that keeps the keys/values each attention computes and returns them unchanged."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


class RecordKeyValues:
    """While the clean forward runs, hand each decoder layer ≥ `start` a `_Recorder` as its cache, so that the
    suffix replay gets the clean keys/values without running those layers again (outputs are unchanged)."""

    def __init__(self, layers: nn.ModuleList, start: int) -> None:
        self.layers, self.start, self.recorder = layers, start, _Recorder()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> RecordKeyValues:
        for i in range(self.start, len(self.layers)):
            self._handles.append(self.layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def _hook(self, i: int):
        def hook(layer: nn.Module, args: tuple, kwargs: dict):
            call = named_call(layer, args, kwargs)
            name = _cache_arg(layer, call) if call is not None else None
            if name is None or call.get(name) is not None:
                return None
            return (), {**call, name: self.recorder}
        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


class SuffixCache:
    """Cache stand-in: the clean keys/values (B, H, T + W, d) with the replayed positions' own written in at
    `index` (B, W), their absolute positions; stores nothing."""

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], index: torch.Tensor) -> None:
        self.keys, self.values, self.index = keys, values, index

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        """Every position's keys/values, in the clean ones' dtype."""
        at = self.index[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        return keys.scatter(2, at, key.to(keys.dtype)), values.scatter(2, at, value.to(values.dtype))

    def to(self, dtype: torch.dtype) -> None:
        self.keys = {i: k.to(dtype) for i, k in self.keys.items()}
        self.values = {i: v.to(dtype) for i, v in self.values.items()}

    def select(self, rows: torch.Tensor) -> None:
        self.keys = {i: k.index_select(0, rows) for i, k in self.keys.items()}
        self.values = {i: v.index_select(0, rows) for i, v in self.values.items()}
        self.index = self.index.index_select(0, rows)


def named_call(layer: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """A recorded call as keyword arguments of `layer.forward` (None if the signature cannot take them)."""
    try:
        sig = inspect.signature(layer.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    call: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            call[name] = value
    return call


def _cache_arg(layer: nn.Module, call: dict[str, Any]) -> str | None:
    params = inspect.signature(layer.forward).parameters
    return next((n for n in CACHE_ARGS if n in params or n in call), None)


def _at(t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """t (1 or B, T, ...) read at positions where (B, W) along dim 1."""
    t = t.expand(where.shape[0], *t.shape[1:])
    return t.gather(1, where.view(*where.shape, *([1] * (t.dim() - 2))).expand(*where.shape, *t.shape[2:]))


def _suffix_mask(mask: Any, pos: torch.Tensor, length: int) -> torch.Tensor | None:
    """Mask rows (B, 1, W, T + W) of the replayed positions over every key position; the W extra key positions
    (where padding queries write their keys) are masked. None (causal, nothing masked) becomes explicit, since
    attention kernels align an implicit causal mask to the top-left when queries are fewer than keys."""
    rows, width = pos.shape
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1:
        q = pos.clamp(max=length - 1)
        m = mask.expand(rows, 1, length, mask.shape[-1])[..., :length]
        m = m.gather(2, q[:, None, :, None].expand(rows, 1, width, length))
        blocked = torch.zeros((), dtype=m.dtype) if m.dtype == torch.bool else torch.finfo(m.dtype).min
        return torch.cat([m, torch.full((rows, 1, width, width), blocked, dtype=m.dtype, device=m.device)], -1)
    if mask is None:
        keys = torch.arange(length + width, device=pos.device)
        return (keys[None, None, None, :] <= pos[:, None, :, None]) & (keys < length)[None, None, None, :]
    return None  # another mask type (e.g. a flex-attention block mask): not supported


class LayerReplay:
    """Layers `start`..N-1 for one pass of rows, as recorded by `cap` in the clean forward; see module docstring.

    `starts` (B,): the first replayed position of each row (its subject's last token for `suffix`, 0 for `full`);
    `ends` (B,): each row's length. The replayed state of row r at position p is at index p - starts[r]."""

    def __init__(self, layers: nn.ModuleList, cap: LayerInputs, starts: torch.Tensor, ends: torch.Tensor,
                 mode: str = "suffix", recorded: RecordKeyValues | None = None) -> None:
        self.layers, self.start = layers, cap.start
        self.hidden = cap.hidden_in()
        self.dtype = self.hidden.dtype  # the model's own: what `__call__` returns, whatever `to` converts to
        self.starts = torch.zeros_like(starts)
        self.cap: LayerInputs | None = cap
        self.calls: dict[int, dict[str, Any]] = {}
        self.cache: SuffixCache | None = None
        if mode == "suffix":
            self._to_suffix(starts, ends, recorded.recorder if recorded is not None else None)

    def _to_suffix(self, starts: torch.Tensor, ends: torch.Tensor, recorder: _Recorder | None) -> None:
        length = self.hidden.shape[1]
        pos = starts[:, None] + torch.arange(int((ends - starts).max()), device=starts.device)[None, :]
        calls, cache_names = {}, {}
        for i in range(self.start, len(self.layers)):
            call = named_call(self.layers[i], *self.cap.calls[i])
            name = _cache_arg(self.layers[i], call) if call is not None else None
            mask = _suffix_mask(call.get("attention_mask"), pos, length) if call is not None else None
            if call is None or name is None or mask is None or _unknown_sequence_input(call, length):
                log.warning("suffix replay is not supported for layer %s; replaying every position", i)
                return
            calls[i], cache_names[i] = (call, mask), name
        if recorder is None or set(recorder.keys) != set(calls):
            recorder = _Recorder()
            with torch.no_grad():  # the clean keys/values of every layer ≥ L, from the recorded inputs
                for i, (call, _) in calls.items():
                    self.layers[i](**{**call, cache_names[i]: recorder})
        pad = {i: k.new_zeros(*k.shape[:2], pos.shape[1], k.shape[-1]) for i, k in recorder.keys.items()}
        self.cache = SuffixCache({i: torch.cat([k, pad[i]], 2) for i, k in recorder.keys.items()},
                                 {i: torch.cat([v, pad[i]], 2) for i, v in recorder.values.items()}, pos)
        clipped = pos.clamp(max=length - 1)
        for i, (call, mask) in calls.items():
            suffix = {k: _positional(v, clipped) if k in _POSITIONAL else v for k, v in call.items()
                      if k != "hidden_states"}
            self.calls[i] = {**suffix, "attention_mask": mask, cache_names[i]: self.cache}
        self.hidden, self.starts, self.cap = _at(self.hidden, clipped), starts, None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the layers on `hidden` (the state entering L at the replayed positions); returns the last state, in
        the model's dtype."""
        if self.cap is not None:
            return self.cap.replay(hidden).to(self.dtype)
        for i in range(self.start, len(self.layers)):
            out = self.layers[i](hidden_states=hidden, **self.calls[i])
            hidden = out[0] if isinstance(out, tuple | list) else out
        return hidden.to(self.dtype)

    def to(self, dtype: torch.dtype, clean_prefix: bool = True) -> None:
        """Hold the replay's floating inputs (hidden state, rotary tables, additive masks, and with `clean_prefix`
        the clean keys/values) in `dtype`, converted once instead of at every step."""
        self.hidden = self.hidden.to(dtype)
        if self.cap is not None:
            self.cap.calls = {i: (_cast(a, dtype), _cast(k, dtype)) for i, (a, k) in self.cap.calls.items()}
            return
        self.calls = {i: {k: v if isinstance(v, SuffixCache) else _cast(v, dtype) for k, v in c.items()}
                      for i, c in self.calls.items()}
        if clean_prefix:
            self.cache.to(dtype)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (the others' requests have stopped)."""
        batch = self.hidden.shape[0]
        if self.cap is not None:
            self.cap.select_rows(rows, batch)
        else:
            self.calls = {i: {k: v if isinstance(v, SuffixCache) else select_batch_rows(v, rows, batch)
                              for k, v in c.items()} for i, c in self.calls.items()}
            self.cache.select(rows)
        self.hidden = self.hidden.index_select(0, rows)
        self.starts = self.starts.index_select(0, rows)


def _unknown_sequence_input(call: dict[str, Any], length: int) -> bool:
    """Whether the call has a per-position input this module does not know how to cut."""
    return "cache_position" in call or any(
        isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == length and k not in _POSITIONAL
        for k, v in call.items() if k not in ("hidden_states", "attention_mask"))


def _cast(x: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (nested in tuples and dicts) in `dtype`; an additive mask's "blocked" value (float32's
    lowest, which rounds to -inf in bfloat16) stays finite."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype).clamp_min(torch.finfo(dtype).min)
    if isinstance(x, tuple):
        return tuple(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def _positional(value: Any, where: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value.expand(where.shape[0], -1).gather(1, where)
    if isinstance(value, tuple):
        return tuple(_at(t, where) for t in value)
    return value
