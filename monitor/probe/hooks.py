"""Forward hooks on named layers: the one utility the probe, the filter-restricted saliency and
the layer choice use.

- :class:`LayerTap` stays on one layer. While it is armed in the calling thread (and only then:
  the plain model and other threads are unaffected), it records the layer's output (a feature
  map in any layout of :mod:`~.layout`: its readers view it as ``[B, N, H, W]``), refuses a
  layer that runs twice in one pass, and hands the rest of the network a copy,
  so in-place operations downstream (``ReLU(inplace=True)``) cannot overwrite the recorded
  activation. With ``cut_graph=True`` (the probe) the recorded activation is a detached leaf
  that requires grad and grad mode is turned on for the head, so autograd records the head only.
- :func:`traced_calls` records every call of some modules during one forward pass (input
  identity and output shape), for choosing the target layer.
- :class:`CopySafeHook` wraps the hooks the monitor leaves on a model while it watches it, so
  the model can still be deep-copied, pickled and ``torch.save``-d: a copy carries an
  :class:`InertHook` (it does nothing) in place of each one.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surprise_monitor.monitor.probe.layout import split_layer


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (a layer spec's layout suffix, ``"norm:nhwc"``, is left
    aside); a clear error with close matches if there is none."""
    name = split_layer(name)[0]
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"model has no module named {name!r}{hint}")


class InertHook:
    """What a copy of a watched model (``copy.deepcopy``, pickle, ``torch.save``) holds in place
    of a :class:`CopySafeHook`: a hook (forward or pre-forward) that does nothing."""

    def __call__(self, *args: Any) -> None:
        """Do nothing: the copy is not watched."""
        return None


class CopySafeHook:
    """A hook callable on a watched model that copies of the model do not take along: it
    reduces to an :class:`InertHook`, so copying never touches the monitor's thread-local
    state (which cannot be copied) and a copy is never watched by the original's monitor."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        """Run the hook."""
        return self.fn(*args)

    def __reduce__(self) -> tuple[type, tuple]:
        """Copies and pickles become an :class:`InertHook`."""
        return (InertHook, ())


@dataclass
class TapRecord:
    """What an armed :class:`LayerTap` saw in one forward pass."""

    activation: torch.Tensor | None = None  # the layer's output (a leaf with cut_graph=True)
    calls: int = 0
    error: BaseException | None = None  # what the hook itself raised, if anything


class LayerTap:
    """A forward hook on ``model``'s module ``layer`` that records its output while armed.

    Args:
        model: the network (not modified; :meth:`close` removes the hook).
        layer: the module's name (see :func:`get_module`).
        cut_graph: record a detached leaf that requires grad and record the head in autograd
            (the probe); otherwise record the output as it is, graph and all (the saliency).
        on_output: applied to the layer's output before anything else (a subclass of the probe
            uses it to leave inference mode); default: the output as it is.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        cut_graph: bool,
        on_output: Callable[[Any], Any] | None = None,
    ) -> None:
        self.layer = layer
        self.layout = split_layer(layer)[1]  # None: by the output's rank
        self.cut_graph = cut_graph
        self._on_output = on_output
        self._local = threading.local()
        self._handle: Any = get_module(model, layer).register_forward_hook(CopySafeHook(self._hook))

    @property
    def closed(self) -> bool:
        """True once the hook is removed."""
        return self._handle is None

    def close(self) -> None:
        """Remove the hook from the model (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def is_armed(self) -> bool:
        """True while :meth:`armed` is active in the calling thread."""
        return getattr(self._local, "record", None) is not None

    @contextmanager
    def armed(self) -> Iterator[TapRecord]:
        """Record the layer's output in this thread for the duration of the block."""
        if self._handle is None:
            raise RuntimeError("probe is closed")
        record = TapRecord()
        self._local.record = record
        try:
            yield record
        finally:
            self._local.record = None

    def activation(self, record: TapRecord) -> torch.Tensor:
        """The recorded activation; ``RuntimeError`` when the layer did not run."""
        if record.activation is None:
            raise RuntimeError(f"layer {self.layer!r} did not run in the forward pass")
        return record.activation

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        """Record the output (once per pass) and return the copy the rest of the network sees;
        an error raised here is kept in the record (it is the tap's, not the model's)."""
        record: TapRecord | None = getattr(self._local, "record", None)
        if record is None:
            return None
        try:
            return self._record(record, output)
        except BaseException as exc:
            record.error = exc
            raise

    def _record(self, record: TapRecord, output: Any) -> Any:
        """Record the layer's output in ``record``; the copy the rest of the network sees."""
        if self._on_output is not None:
            output = self._on_output(output)
        record.calls += 1
        if record.calls > 1:
            raise RuntimeError(
                f"layer {self.layer!r} ran more than once in one forward pass; "
                "pick a module that runs exactly once"
            )
        ranks = (3,) if self.layout == "tokens" else (4,) if self.layout else (3, 4)
        if not isinstance(output, torch.Tensor) or output.ndim not in ranks:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise ValueError(
                f"layer {self.layer!r} output {shape} is not a feature map ([B, N, H, W], "
                "[B, H, W, N] or [B, T, N] tokens)"
            )
        if self.cut_graph:
            output = output.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # record the head only; the caller's mode restores it
        record.activation = output
        return output.clone()


@dataclass
class LayerCall:
    """One call of a traced module (calls are listed in the order they finish)."""

    name: str
    module: nn.Module
    input_key: tuple  # identity of the input tensor: (data_ptr, shape, stride), or the module's
    out_shape: tuple[int, ...]
    keep_alive: Any  # holds the input and output so their addresses cannot be reused
    output_key: tuple = ()  # identity of the output tensor (``()`` when it is not a tensor)


def tensor_key(t: torch.Tensor) -> tuple:
    """A tensor's identity while it is alive: its address, shape and strides (an in-place op's
    output shares its input's)."""
    return (t.data_ptr(), tuple(t.shape), t.stride())


def traced_calls(model: nn.Module, example: torch.Tensor, names: Sequence[str]) -> list[LayerCall]:
    """Every call of the named modules in one ``no_grad`` forward pass of ``example``, in the
    order they finish (a container after the modules inside it)."""
    modules = dict(model.named_modules())
    calls: list[LayerCall] = []

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        """The hook that records a call of module ``name``."""

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            key = tensor_key(x) if x is not None else (id(module),)
            is_tensor = isinstance(output, torch.Tensor)
            shape = tuple(output.shape) if is_tensor else ()
            out_key = tensor_key(output) if is_tensor else ()
            calls.append(LayerCall(name, module, key, shape, (x, output), out_key))

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return calls
