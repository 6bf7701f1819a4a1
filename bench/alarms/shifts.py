"""Shift families of the alarm benchmark: image shifts of CIFAR-10 in numpy and PIL.

:func:`shift` applies one *kind* of shift at one *severity* (1 mild, 2, 3 strong; kinds without a
meaningful strength have severity 1 only, the nominal translation 1 and 2) to uint8
``[N, H, W, 3]`` images, deterministically for a ``numpy.random.Generator``. Every kind's
parameter per severity is declared once, in :data:`FAMILIES`.

Where CIFAR-10-C defines a corruption (D. Hendrycks and T. Dietterich, *Benchmarking Neural
Network Robustness to Common Corruptions and Perturbations*, ICLR 2019; the CIFAR parameters of
its ``make_cifar_c.py``), the kind uses that definition with the CIFAR-10-C severities listed in
:data:`FROM_CIFAR10C` (1, 3 and 5 of its five, unless said otherwise); the code here is our own
and its random numbers are not CIFAR-10-C's (re-implemented, not the released images; values
are rounded, where CIFAR-10-C truncated to uint8). The other kinds' parameters are our own.

Families (:data:`FAMILIES`):

- ``geometry``: rotation by 90 degrees (counter-clockwise) and 180, vertical flip, and rotation
  by a small angle (each image turned by ``+-angle``, the sign at random; bilinear, reflected
  at the border);
- ``photometric``: colour inversion ``255 - x``; grey (a blend towards the ITU-R 601 luma,
  complete at severity 3); brightness and saturation (CIFAR-10-C, in HSV); hue rotation; a
  random non-identity order of the colour channels per image (``RGB -> BGR``, ``GBR``...);
- ``resolution``: pixelation (CIFAR-10-C: box down- and up-sampling), bilinear down- and
  up-sampling, JPEG re-compression (CIFAR-10-C; caveat: the CIFAR-10 files are themselves JPEGs of
  quality 75, so quality 80 changes little);
- ``noise``: Gaussian, impulse (salt and pepper, per channel) and speckle noise (CIFAR-10-C);
- ``blur``: Gaussian and defocus blur (CIFAR-10-C);
- ``contrast``: contrast reduction around each channel's mean (CIFAR-10-C);
- ``occlusion``: a mid-grey square patch and a uniform-noise square patch, at a random position
  (wholly inside the image);
- ``nominal``: what the models were trained with (random 32 x 32 crops of the image reflected
  4 pixels out, horizontal flips), so it must *not* raise alarms: horizontal flip, and a
  translation by exactly ``s`` pixels (``(dy, dx)`` one of the eight in ``{-s, 0, s}^2``) with
  reflect padding.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

#: Every non-identity order of the three colour channels (``(2, 1, 0)``: RGB -> BGR).
CHANNEL_ORDERS: tuple[tuple[int, int, int], ...] = (
    (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0),
)  # fmt: skip

#: family -> kind -> parameter at severity 1, 2, 3 (one entry: the kind has one severity).
FAMILIES: dict[str, dict[str, tuple[Any, ...]]] = {
    "geometry": {
        "rotate90": (90,),  # degrees, counter-clockwise (exact, np.rot90)
        "rotate180": (180,),  # degrees (upside down)
        "vflip": ("top-bottom",),
        "rotate": (15, 30, 45),  # +-degrees (sign at random per image), reflect padding
    },
    "photometric": {
        "invert": ("255 - x",),
        "grayscale": (0.5, 0.75, 1.0),  # fraction of the way to the ITU-R 601 luma grey
        "brightness": (0.05, 0.15, 0.3),  # added to HSV value [0, 1] (CIFAR-10-C 1, 3, 5)
        "saturate": ((1.5, 0.0), (2.0, 0.1), (2.5, 0.2)),  # HSV s -> s * a + b (C 3, 4, 5)
        "hue": (30, 90, 180),  # degrees added to the HSV hue
        "channel_order": (CHANNEL_ORDERS,),  # one of these per image, at random
    },
    "resolution": {
        "pixelate": (0.95, 0.85, 0.65),  # box down to int(side * c), box up (C 1, 3, 5)
        "downup": (0.75, 0.5, 0.25),  # bilinear down to int(side * c) (32: 24, 16, 8), up
        "jpeg": (80, 58, 40),  # JPEG quality (CIFAR-10-C 1, 3, 5)
    },
    "noise": {
        "gaussian_noise": (0.04, 0.08, 0.10),  # std on [0, 1] (CIFAR-10-C 1, 3, 5)
        "impulse_noise": (0.01, 0.03, 0.07),  # fraction of values set to 0 or 1 (C 1, 3, 5)
        "speckle_noise": (0.06, 0.12, 0.20),  # x + x * N(0, c^2) (CIFAR-10-C 1, 3, 5)
    },
    "blur": {
        "gaussian_blur": (0.4, 0.7, 1.0),  # sigma, pixels (CIFAR-10-C 1, 3, 5)
        # (disk radius, its anti-aliasing Gaussian's sigma), pixels (CIFAR-10-C 1, 3, 5)
        "defocus_blur": ((0.3, 0.4), (0.5, 0.6), (1.5, 0.1)),
    },
    "contrast": {
        "contrast": (0.75, 0.4, 0.15),  # factor around each channel's mean (C 1, 3, 5)
    },
    "occlusion": {
        "grey_patch": (8, 12, 16),  # side of a square of value 128, pixels (of 32)
        "noise_patch": (8, 12, 16),  # side of a square of uniform noise, pixels (of 32)
    },
    "nominal": {
        "hflip": ("left-right",),
        "translate": (1, 2),  # pixels, (dy, dx) in {-s, 0, s}^2 \ {(0, 0)}, reflect padding
    },
}

#: kind -> the CIFAR-10-C severities (of its 1..5) its severities 1, 2, 3 take; the other kinds'
#: parameters are our own.
FROM_CIFAR10C: dict[str, tuple[int, ...]] = {
    "brightness": (1, 3, 5),
    "saturate": (3, 4, 5),  # its 1, 2 *reduce* saturation (0.3, 0.1): "grayscale" covers that
    "pixelate": (1, 3, 5),
    "jpeg": (1, 3, 5),
    "gaussian_noise": (1, 3, 5),
    "impulse_noise": (1, 3, 5),
    "speckle_noise": (1, 3, 5),
    "gaussian_blur": (1, 3, 5),
    "defocus_blur": (1, 3, 5),
    "contrast": (1, 3, 5),
}

#: kind -> its family.
KIND_FAMILY: dict[str, str] = {k: f for f, kinds in FAMILIES.items() for k in kinds}


def severities(kind: str) -> tuple[int, ...]:
    """The severities ``kind`` has: ``(1,)``, ``(1, 2)`` or ``(1, 2, 3)``."""
    return tuple(range(1, len(_params(kind)) + 1))


def shift(images: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` images with ``kind`` applied at ``severity`` (its parameter:
    ``FAMILIES[family][kind][severity - 1]``); the same ``rng`` state gives the same images."""
    params = _params(kind)
    if severity not in range(1, len(params) + 1):
        raise ValueError(f"{kind} has severities 1..{len(params)}, got {severity!r}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    out = _KINDS[kind](np.ascontiguousarray(images), params[severity - 1], rng)
    if out.dtype != np.uint8 or out.shape != images.shape:  # pragma: no cover - a bug here
        raise AssertionError(f"{kind} returned {out.dtype} {out.shape}")
    return out


def _params(kind: str) -> tuple[Any, ...]:
    """The per-severity parameters of ``kind`` in :data:`FAMILIES`."""
    if kind not in KIND_FAMILY:
        raise ValueError(f"kind must be one of {sorted(KIND_FAMILY)}, got {kind!r}")
    return FAMILIES[KIND_FAMILY[kind]][kind]


# ------------------------------------------------------------------------------------ helpers
def _unit(images: np.ndarray) -> np.ndarray:
    """uint8 -> float64 on ``[0, 1]``."""
    return images.astype(np.float64) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    """float on ``[0, 1]`` (clipped) -> uint8, rounded."""
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """RGB on ``[0, 1]`` (last axis) -> HSV on ``[0, 1]`` (hue as a fraction of the circle;
    hue and saturation 0 where undefined), as ``skimage.color.rgb2hsv``."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    delta = v - x.min(axis=-1)
    safe = np.where(delta > 0, delta, 1.0)
    h = np.where(v == r, ((g - b) / safe) % 6.0, 0.0)
    h = np.where(v == g, (b - r) / safe + 2.0, h)
    h = np.where(v == b, (r - g) / safe + 4.0, h)
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1.0), 0.0)
    return np.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv[..., 0] % 1.0, hsv[..., 1], hsv[..., 2]
    h6 = h * 6.0
    sector = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    channels = [np.choose(sector, [c[i] for c in choices]) for i in range(3)]
    return np.stack(channels, axis=-1)


def _correlate(x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """``[N, H, W, C]`` floats correlated over H and W with a 2-D odd-sized ``kernel``, the
    border padded with ``np.pad``'s ``mode``."""
    kh, kw = kernel.shape
    ry, rx = kh // 2, kw // 2
    padded = np.pad(x, ((0, 0), (ry, ry), (rx, rx), (0, 0)), mode=mode)
    h, w = x.shape[1:3]
    out = np.zeros_like(x)
    for i, j in zip(*np.nonzero(kernel), strict=True):
        out += kernel[i, j] * padded[:, i : i + h, j : j + w]
    return out


def _gaussian_1d(sigma: float, radius: int) -> np.ndarray:
    """Normalised samples of a Gaussian of ``sigma`` at ``-radius..radius``."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _resize_each(images: np.ndarray, size: int, down: int, up: int) -> np.ndarray:
    """Each image resized with PIL to ``size`` x ``size`` (filter ``down``) and back (``up``)."""
    out = np.empty_like(images)
    h, w = images.shape[1:3]
    for i, img in enumerate(images):
        small = Image.fromarray(img).resize((size, size), down)
        out[i] = np.asarray(small.resize((w, h), up))
    return out


# -------------------------------------------------------------------------------------- kinds
def _rotate90(x: np.ndarray, degrees: int, rng: np.random.Generator) -> np.ndarray:
    """Exact rotation by a multiple of 90 degrees, counter-clockwise (square images)."""
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"rotation by {degrees} degrees needs square images, got {x.shape}")
    return np.ascontiguousarray(np.rot90(x, k=degrees // 90, axes=(1, 2)))


def _vflip(x: np.ndarray, _: Any, rng: np.random.Generator) -> np.ndarray:
    """Upside-down mirror image (rows reversed)."""
    return np.ascontiguousarray(x[:, ::-1])


def _hflip(x: np.ndarray, _: Any, rng: np.random.Generator) -> np.ndarray:
    """Left-right mirror image (columns reversed)."""
    return np.ascontiguousarray(x[:, :, ::-1])


def _rotate(x: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Each image turned by ``+-degrees`` (sign at random) about its centre, bilinear, the
    source coordinates reflected at the border (about the edge pixels' centres)."""
    n, h, w, _ = x.shape
    theta = np.deg2rad(degrees) * rng.choice([-1.0, 1.0], size=n)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    ys = cos * yy - sin * xx + cy  # the source of each output pixel
    xs = sin * yy + cos * xx + cx

    def reflect(u: np.ndarray, size: int) -> np.ndarray:
        period = 2.0 * (size - 1)
        u = np.abs(u) % period
        return np.where(u > size - 1, period - u, u)

    ys, xs = reflect(ys, h), reflect(xs, w)
    y0 = np.clip(np.floor(ys).astype(np.int64), 0, h - 2)
    x0 = np.clip(np.floor(xs).astype(np.int64), 0, w - 2)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    idx = np.arange(n)[:, None, None]
    f = x.astype(np.float64)
    top = f[idx, y0, x0] * (1 - wx) + f[idx, y0, x0 + 1] * wx
    bottom = f[idx, y0 + 1, x0] * (1 - wx) + f[idx, y0 + 1, x0 + 1] * wx
    return np.rint(np.clip(top * (1 - wy) + bottom * wy, 0, 255)).astype(np.uint8)


def _invert(x: np.ndarray, _: Any, rng: np.random.Generator) -> np.ndarray:
    """The negative, ``255 - x``."""
    return 255 - x


def _grayscale(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """A blend ``(1 - amount) x + amount grey``, grey the ITU-R 601 luma; ``amount = 1``: every
    channel equal."""
    f = _unit(x)
    grey = f @ np.array([0.299, 0.587, 0.114])
    if amount >= 1.0:
        return np.repeat(_uint8(grey)[..., None], 3, axis=-1)
    return _uint8((1 - amount) * f + amount * grey[..., None])


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C brightness: ``c`` added to the HSV value (clipped to 1)."""
    hsv = rgb_to_hsv(_unit(x))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _uint8(hsv_to_rgb(hsv))


def _saturate(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C saturate: HSV saturation ``s -> clip(s * a + b, 0, 1)``."""
    hsv = rgb_to_hsv(_unit(x))
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return _uint8(hsv_to_rgb(hsv))


def _hue(x: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """The HSV hue turned by ``degrees`` (grey pixels unchanged)."""
    hsv = rgb_to_hsv(_unit(x))
    hsv[..., 0] = (hsv[..., 0] + degrees / 360.0) % 1.0
    return _uint8(hsv_to_rgb(hsv))


def _channel_order(x: np.ndarray, orders: tuple, rng: np.random.Generator) -> np.ndarray:
    """Each image's channels reordered by one of ``orders``, drawn at random."""
    perms = np.asarray(orders)[rng.integers(0, len(orders), size=len(x))]  # [N, 3]
    return np.ascontiguousarray(np.take_along_axis(x, perms[:, None, None, :], axis=-1))


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C pixelate: box down-sampling to ``int(side * c)``, box up-sampling."""
    return _resize_each(x, int(x.shape[1] * c), Image.BOX, Image.BOX)


def _downup(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Bilinear down-sampling to ``int(side * c)`` (PIL, antialiased), bilinear up-sampling."""
    return _resize_each(x, int(x.shape[1] * c), Image.BILINEAR, Image.BILINEAR)


def jpeg_recompress(images: np.ndarray, quality: int) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` images compressed as JPEG of ``quality`` and decoded again
    (Pillow's defaults otherwise)."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def _jpeg(x: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    """Re-compression as JPEG of ``quality`` (Pillow's defaults otherwise)."""
    return jpeg_recompress(x, quality)


def _gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C Gaussian noise: ``x + N(0, std^2)`` per value, on ``[0, 1]``."""
    f = _unit(x)
    return _uint8(f + rng.normal(0.0, std, size=f.shape))


def _impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C impulse noise (scikit-image's ``s&p``): each value, with probability
    ``amount``, set to 0 or 255 (even odds), channels independently."""
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def _speckle_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C speckle noise: ``x + x * N(0, std^2)`` per value, on ``[0, 1]``."""
    f = _unit(x)
    return _uint8(f + f * rng.normal(0.0, std, size=f.shape))


def _gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C Gaussian blur (scikit-image's ``gaussian``: truncated at 4 sigma, the border
    extended with its nearest pixel), separable."""
    k = _gaussian_1d(sigma, int(4.0 * sigma + 0.5))
    f = _correlate(_unit(x), k[:, None], "edge")
    return _uint8(_correlate(f, k[None, :], "edge"))


def disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """CIFAR-10-C's defocus kernel: the normalised disk ``y^2 + x^2 <= radius^2`` on the grid
    ``-8..8`` smoothed by a 3 x 3 Gaussian of ``alias_sigma``, trimmed to its non-zero support."""
    t = np.arange(-8, 9, dtype=np.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _gaussian_1d(alias_sigma, 1)
    smooth = _correlate(disk[None, :, :, None], np.outer(g, g), "reflect")[0, :, :, 0]
    r = int(np.abs(np.nonzero(smooth)[0] - 8).max())
    return smooth[8 - r : 9 + r, 8 - r : 9 + r]


def _defocus_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C defocus blur: :func:`disk_kernel` applied per channel, the border reflected
    (OpenCV's default, ``BORDER_REFLECT_101``)."""
    return _uint8(_correlate(_unit(x), disk_kernel(*c), "reflect"))


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C contrast: ``(x - m) * c + m``, ``m`` each image's per-channel mean."""
    f = _unit(x)
    m = f.mean(axis=(1, 2), keepdims=True)
    return _uint8((f - m) * c + m)


def _patches(x: np.ndarray, side: int, rng: np.random.Generator, fill: Callable) -> np.ndarray:
    """Each image with a ``side`` x ``side`` square (clipped to the image) at a random position
    wholly inside it, its pixels from ``fill(shape)``."""
    out = x.copy()
    h, w = x.shape[1:3]
    sy, sx = min(side, h), min(side, w)
    ys = rng.integers(0, h - sy + 1, size=len(x))
    xs = rng.integers(0, w - sx + 1, size=len(x))
    for i, (y0, x0) in enumerate(zip(ys, xs, strict=True)):
        out[i, y0 : y0 + sy, x0 : x0 + sx] = fill((sy, sx, 3))
    return out


def _grey_patch(x: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """A mid-grey (128) square of ``side`` pixels at a random position."""
    return _patches(x, side, rng, lambda shape: 128)


def _noise_patch(x: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """A square of ``side`` pixels of uniform noise (0..255 per value) at a random position."""
    return _patches(x, side, rng, lambda shape: rng.integers(0, 256, size=shape, dtype=np.uint8))


def _translate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by ``(dy, dx)``, one of the eight in ``{-s, 0, s}^2`` without
    ``(0, 0)``, at random: ``out[i, j] = x[i + dy, j + dx]``, reflected at the border (a crop
    of the image reflect-padded by ``s``, as the training augmentation's crops)."""
    steps = np.array([(dy, dx) for dy in (-s, 0, s) for dx in (-s, 0, s) if (dy, dx) != (0, 0)])
    moves = steps[rng.integers(0, len(steps), size=len(x))]
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), mode="reflect")
    out = np.empty_like(x)
    for i, (dy, dx) in enumerate(moves):
        out[i] = padded[i, s + dy : s + dy + h, s + dx : s + dx + w]
    return out


_KINDS: dict[str, Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]] = {
    "rotate90": _rotate90,
    "rotate180": _rotate90,
    "vflip": _vflip,
    "rotate": _rotate,
    "invert": _invert,
    "grayscale": _grayscale,
    "brightness": _brightness,
    "saturate": _saturate,
    "hue": _hue,
    "channel_order": _channel_order,
    "pixelate": _pixelate,
    "downup": _downup,
    "jpeg": _jpeg,
    "gaussian_noise": _gaussian_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "contrast": _contrast,
    "grey_patch": _grey_patch,
    "noise_patch": _noise_patch,
    "hflip": _hflip,
    "translate": _translate,
}
if set(_KINDS) != set(KIND_FAMILY):  # pragma: no cover - checked on import
    raise AssertionError(f"kinds without code or parameters: {set(_KINDS) ^ set(KIND_FAMILY)}")
