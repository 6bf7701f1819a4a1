"""Where a layer output's channels and positions are: the layouts Grad-AMap reads.

- ``"nchw"``: a convolution's ``[B, C, H, W]`` feature map (filters = channels);
- ``"nhwc"``: a channels-last ``[B, H, W, C]`` map (Swin's stages, timm's NHWC heads);
- ``"tokens"``: a transformer's ``[B, T, C]`` tokens (filters = embedding channels, positions =
  tokens, a class or register token included: alpha is the mean over every token, exactly as
  over a conv map's positions; where the head reads only the class token, the others carry no
  gradient and add zeros to that mean).

A layer is named by a *spec*: the module's name, with ``":nhwc"`` (or ``":nchw"``,
``":tokens"``) after it when its layout is not the one its rank implies (4-D: ``nchw``, 3-D:
``tokens``): ``"norm:nhwc"`` for a timm Swin's final norm. :func:`split_layer` parts a spec.

:func:`as_nchw` views any of them as ``[B, C, H, W]`` (tokens as ``[B, C, T, 1]``), so the probe,
the kernels, the saliency and the profiles read one layout; it is a view (no copy) and gradients
map back through it.
"""

from __future__ import annotations

import torch

LAYOUTS = ("nchw", "nhwc", "tokens")


def split_layer(spec: str) -> tuple[str, str | None]:
    """A layer spec's module name and stated layout (``None``: by the output's rank)."""
    name, sep, layout = spec.partition(":")
    if sep and layout not in LAYOUTS:
        raise ValueError(
            f"layer {spec!r}: the part after ':' must be a layout, one of {', '.join(LAYOUTS)}"
        )
    return name, (layout if sep else None)


def layer_spec(name: str, layout: str) -> str:
    """The spec naming module ``name`` read with ``layout`` (a suffix only where needed)."""
    return f"{name}:{layout}" if layout == "nhwc" else name


def layout_for(t: torch.Tensor, layout: str | None) -> str:
    """``layout``, or the one ``t``'s rank implies (3-D: tokens, else nchw)."""
    return layout if layout is not None else ("tokens" if t.ndim == 3 else "nchw")


def check_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`LAYOUTS` (``ValueError`` otherwise)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def as_nchw(t: torch.Tensor, layout: str | None = None) -> torch.Tensor:
    """``t`` (a ``layout`` tensor; ``None``: by its rank) viewed as ``[B, C, H, W]`` (tokens:
    ``[B, C, T, 1]``)."""
    layout = layout_for(t, layout)
    want = 3 if layout == "tokens" else 4
    if t.ndim != want:
        raise ValueError(
            f"a {layout} activation is {want}-D, got shape {tuple(t.shape)} "
            f"({'[B, T, C]' if want == 3 else '[B, C, H, W] or [B, H, W, C]'})"
        )
    if layout == "nhwc":
        return t.permute(0, 3, 1, 2)
    if layout == "tokens":
        return t.transpose(1, 2).unsqueeze(-1)
    return t


def channel_axis(layout: str) -> int:
    """The channel axis of a ``layout`` tensor."""
    return 1 if layout == "nchw" else -1


def nchw_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """A ``layout`` tensor's shape as ``[B, C, H, W]`` would have it (tokens: ``[B, C, T, 1]``)."""
    if layout == "nhwc":
        return (shape[0], shape[3], shape[1], shape[2])
    if layout == "tokens":
        return (shape[0], shape[2], shape[1], 1)
    return tuple(shape)
