"""The gated score's class-evidence variant, chosen on the user's own held-out images (issue 20).

``AlarmOptions(evidence="auto")`` (the default): the first
:data:`CHOICE_IMAGES` held-out images (not part of the null) are judged as they are and under
each synthetic shift of :data:`SHIFTS` (made from those images: no other data), and each variant
of :data:`~surprise_monitor.monitor.atypicality.EVIDENCE_VARIANTS` is scored from the same
components (one judgement serves every variant). The rule is the benchmark's
(``bench/alarms/loo.py``): the variant whose *worst margin* over the shifts, its AUROC minus the
best of MSP / MaxLogit / Energy (from the same logits), is highest; ties go to the first
variant listed (``energy``). On the benchmark's four models this picked what their own shifted
sets picked (``bench/README.md``).

The shifts work on the model's input tensors ``[B, C, H, W]`` as the data loader gives them
(normalised or not): turned a quarter and upside down, channel mean (grey), contrast
halved around each image's mean, a 5 x 5 box blur, Gaussian noise of a fifth of the images'
spread, down- and up-sampled by two, and a centred square of a quarter of the area set to the
image's mean (occlusion).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from surprise_monitor.monitor.atypicality import EVIDENCE_VARIANTS, Gate, energy

#: Held-out images the choice is made on (taken from the start of the held-out stream and left
#: out of the null).
CHOICE_IMAGES = 500
#: ``evidence="auto"``.
AUTO = "auto"
#: Held-out images (when the held-out data's length is known) ``auto`` needs to choose: the
#: choice's and as many again for the null. With fewer, calibration keeps
#: :data:`~surprise_monitor.monitor.atypicality.DEFAULT_EVIDENCE` and says so.
AUTO_MIN_HELDOUT = 2 * CHOICE_IMAGES


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """A quarter turn (square images; others are flipped left-right and upside down)."""
    if x.shape[-1] == x.shape[-2]:
        return torch.rot90(x, 1, dims=(-2, -1))
    return torch.flip(x, dims=(-2, -1))


def _contrast(x: torch.Tensor) -> torch.Tensor:
    """Contrast halved around each image's mean."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + 0.5 * (x - mean)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A 5 x 5 box blur per channel (edges replicated)."""
    c = x.shape[1]
    kernel = torch.full((c, 1, 5, 5), 1.0 / 25.0, dtype=x.dtype, device=x.device)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=c)


def _noise(x: torch.Tensor) -> torch.Tensor:
    """Gaussian noise of a fifth of the batch's spread (a fixed seed)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
    return x + 0.2 * x.std() * noise


def _down_up(x: torch.Tensor) -> torch.Tensor:
    """Down-sampled by two (area) and back (bilinear)."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // 2), max(1, w // 2)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def _occlude(x: torch.Tensor) -> torch.Tensor:
    """A centred square of a quarter of the area set to each image's mean."""
    h, w = x.shape[-2:]
    out = x.clone()
    t, left = h // 4, w // 4
    out[..., t : t + h // 2, left : left + w // 2] = x.mean(dim=(1, 2, 3), keepdim=True)
    return out


#: The synthetic shifts, by name.
SHIFTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rotate90": _rotate,
    "upside down": lambda x: torch.flip(x, dims=(-2,)),
    "grey": lambda x: x.mean(dim=1, keepdim=True).expand_as(x).contiguous(),
    "contrast": _contrast,
    "blur": _blur,
    "noise": _noise,
    "down-up": _down_up,
    "occlusion": _occlude,
}


def auroc(inlier: torch.Tensor, outlier: torch.Tensor) -> float:
    """The probability that an outlier scores above an inlier (ties count half): the
    Mann-Whitney statistic, from mid-ranks."""
    a, b = inlier.double().flatten(), outlier.double().flatten()
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("auroc needs inliers and outliers")
    both = torch.sort(torch.cat([a, b])).values
    below = torch.searchsorted(both, b, right=False)  # values below each outlier's
    at_most = torch.searchsorted(both, b, right=True)
    mid_ranks = (below + at_most + 1).double() / 2.0  # 1-based, ties sharing their mean rank
    r = mid_ranks.sum() - b.numel() * (b.numel() + 1) / 2
    return float(r / (a.numel() * b.numel()))


def logit_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """MSP, MaxLogit and Energy of ``[B, K]`` logits (higher = more atypical; pytorch-ood's
    conventions)."""
    z = logits.double()
    return {
        "MSP": -torch.softmax(z, dim=1).max(dim=1).values,
        "MaxLogit": -z.max(dim=1).values,
        "Energy": energy(logits),
    }


def choose(
    names: Sequence[str],
    threshold: float,
    clean: tuple[torch.Tensor, torch.Tensor],
    shifted: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[str, dict[str, float]]:
    """The variant with the highest worst margin (see the module docstring) and every
    variant's worst margin. ``clean`` and each ``shifted[name]`` are ``(ranks [B, J], logits
    [B, K])`` of the judged images; ``names`` the components' names, ``threshold`` the gate's."""
    if not shifted:
        raise ValueError("no shifted images to choose on")
    base_in = logit_scores(clean[1])
    best = {  # per shift, the best logit score's AUROC (the same for every variant)
        name: max(auroc(base_in[k], v) for k, v in logit_scores(logits).items())
        for name, (_, logits) in shifted.items()
    }
    worst: dict[str, float] = {}
    for variant in EVIDENCE_VARIANTS:
        gate = Gate.columns(names, variant, threshold)
        score_in = gate.score(clean[0].float())
        worst[variant] = min(
            auroc(score_in, gate.score(ranks.float())) - best[name]
            for name, (ranks, _) in shifted.items()
        )
    chosen = max(EVIDENCE_VARIANTS, key=lambda v: (round(worst[v], 9), -list(worst).index(v)))
    return chosen, worst
