"""The one hooking layer: every read or write of an activation goes through `Trace` (after baukit's nethook).

A Trace hooks named modules for the duration of a `with` block and can
- record a module's input (first positional argument) and/or output,
- edit a module's output with a callback `fn(output) -> output`,
- stop the forward pass right after a module has run (`stop_after`), so that statistics or keys of
  early layers never pay for the layers above them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a Trace after `stop_after` has run; caught by `Trace.__exit__`."""


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple | list) else x


class Trace:
    """Hook named modules of `model`; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        *,
        inputs: Iterable[str] = (),
        outputs: Iterable[str] = (),
        edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        stop_after: str | None = None,
        detach: bool = True,
    ) -> None:
        self.model = model
        self.input_names, self.output_names = list(inputs), list(outputs)
        self.edits = dict(edits or {})
        self.stop_after = stop_after
        self.detach = detach
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    def __enter__(self) -> Trace:
        names = set(self.input_names) | set(self.output_names) | set(self.edits)
        if self.stop_after:
            names.add(self.stop_after)
        for name in names:
            module = self.model.get_submodule(name)
            if name in self.input_names:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name)))
        return self

    def _pre_hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            self.inputs[name] = self._keep(_first_tensor(args))

        return hook

    def _post_hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            if name in self.edits:
                if isinstance(output, tuple):
                    output = (self.edits[name](output[0]), *output[1:])
                else:
                    output = self.edits[name](output)
            if name in self.output_names:
                self.outputs[name] = self._keep(_first_tensor(output))
            if name == self.stop_after:
                raise StopForward
            return output

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        self.close()
        return exc_type is StopForward


class LayerInputs:
    """Capture the exact (args, kwargs) each decoder layer is called with, for replaying layers L..N-1.

    This is how target optimisation runs the layers below L once per batch: one full forward records the
    hidden state entering layer L and every layer's call arguments (masks, rotary embeddings, which differ per
    layer in Gemma 3), then each optimisation step calls only `layers[L:]`.
    """

    def __init__(self, layers: nn.ModuleList, start: int) -> None:
        self.layers, self.start = layers, start
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LayerInputs:
        for i in range(self.start, len(self.layers)):
            self._handles.append(
                self.layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True)
            )
        return self

    def _hook(self, i: int) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.calls[i] = (args, dict(kwargs))

        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def hidden_in(self) -> torch.Tensor:
        """The hidden state entering layer `start` (h^{L-1})."""
        args, kwargs = self.calls[self.start]
        return (args[0] if args else kwargs["hidden_states"]).detach()

    def replay(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run layers start..N-1 on `hidden` with the recorded call arguments; returns the last hidden state."""
        for i in range(self.start, len(self.layers)):
            args, kwargs = self.calls[i]
            if args:
                out = self.layers[i](hidden, *args[1:], **kwargs)
            else:
                out = self.layers[i](**{**kwargs, "hidden_states": hidden})
            hidden = _first_tensor(out)
        return hidden

    def select_rows(self, rows: torch.Tensor, batch_size: int) -> None:
        """Keep only batch rows `rows` in every recorded tensor whose first dimension is the batch."""
        self.calls = {i: (select_batch_rows(a, rows, batch_size), select_batch_rows(k, rows, batch_size))
                      for i, (a, k) in self.calls.items()}


def select_batch_rows(x: Any, rows: torch.Tensor, batch_size: int) -> Any:
    """`x` with only batch rows `rows` in every tensor (nested in tuples and dicts) whose first dimension is the
    batch; other values unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch_size:
        return x.index_select(0, rows)
    if isinstance(x, tuple):
        return tuple(select_batch_rows(v, rows, batch_size) for v in x)
    if isinstance(x, dict):
        return {k: select_batch_rows(v, rows, batch_size) for k, v in x.items()}
    return x
