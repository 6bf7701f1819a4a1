"""The gated score's class-evidence variant, chosen on the user's own held-out images (issue 20).

``AlarmOptions(evidence="preferred")`` (the default since stop 39, :func:`resolved`) takes
:data:`DEFAULT_VARIANT`, ``learned+knn``, where the table has the nearest-neighbour component
(its fit made on the images below), and the choice below where it has not.
``AlarmOptions(evidence="auto")`` (the default until stop 38): the first
:data:`CHOICE_IMAGES` held-out images (not part of the null) are judged as they are and under
each synthetic shift of :data:`SHIFTS` (made from those images: no other data), and each variant
of :data:`~surprise_monitor.monitor.atypicality.EVIDENCE_VARIANTS` is scored from the same
components (one judgement serves every variant; the ``+knn`` variants where the table has the
nearest-neighbour component). A variant's *margin* on a shift is its AUROC minus the best of
MSP / MaxLogit / Energy (from the same logits). The rule (:data:`RULE`, since stop 36): the
variant whose *mean margin* over the shifts is highest; ties go to the first variant listed
(``energy``). Until stop 35 it was the highest *worst* margin; the rule was chosen among
:data:`RULES` by leave-one-model-out on the benchmark's selection part, and on each held-out
model's report part its pick passed every check of issue 20 (``bench/README.md``, "The
nearest-neighbour evidence"). The learned variants
(:mod:`~surprise_monitor.monitor.learned_evidence`) compete with margins cross-fitted
(:func:`learned_margins`): their fit never sees the images, or the family of shift, it is
measured on.

The shifts work on the model's input tensors ``[B, C, H, W]`` as the data loader gives them
(normalised or not): turned a quarter and upside down, channel mean (grey), contrast
halved around each image's mean, a 5 x 5 box blur, Gaussian noise of a fifth of the images'
spread, down- and up-sampled by two, and a centred square of a quarter of the area set to the
image's mean (occlusion); since stop 34 also colours inverted (within each image's range), the
channels rotated by one, brightness raised by half the image's spread, saturation doubled,
impulse noise (3% of the values to the image's minimum, 3% to its maximum) and pixelation
(4 x 4 blocks). On single-channel images the colour shifts but inversion and brightness leave
the images as they are (a margin of 0 for every variant).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from surprise_monitor.calibrate.evidence_fit import fit_learned_evidence
from surprise_monitor.monitor.atypicality import (
    EVIDENCE_VARIANTS,
    KNN_COMPONENT,
    KNN_VARIANTS,
    Gate,
    energy,
)
from surprise_monitor.monitor.learned_evidence import (
    LEARNED_VARIANTS,
    LEARNED_WITH_KNN,
    LearnedEvidence,
)

#: Held-out images the choice is made on (taken from the start of the held-out stream and left
#: out of the null).
CHOICE_IMAGES = 500
#: ``evidence="auto"``.
AUTO = "auto"
#: ``evidence="preferred"`` (the option's default since stop 39): :data:`DEFAULT_VARIANT` where
#: the table has the nearest-neighbour component, else :data:`AUTO`'s choice (:func:`resolved`).
PREFERRED = "preferred"
#: The variant ``preferred`` stands for on a table with a KNN bank: chosen by leave-one-model-out
#: among the fixed and learned variants on the benchmark's selection part, and on each held-out
#: model's report part it passed every check of issue 20 (``bench/alarms/PROTOCOL.md``,
#: "Stop 39").
DEFAULT_VARIANT = LEARNED_WITH_KNN
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


def _invert(x: torch.Tensor) -> torch.Tensor:
    """Each image's values mirrored within its own range (colours inverted)."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return low + high - x


def _saturate(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's distance from its channel mean doubled (saturation)."""
    grey = x.mean(dim=1, keepdim=True)
    return grey + 2.0 * (x - grey)


def _impulse(x: torch.Tensor) -> torch.Tensor:
    """3% of the values set to their image's minimum and 3% to its maximum (a fixed seed)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    u = torch.rand(x.shape, generator=g).to(x.device)
    low = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x)
    high = x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return torch.where(u < 0.03, low, torch.where(u > 0.97, high, x))


def _pixelate(x: torch.Tensor) -> torch.Tensor:
    """Averaged over 4 x 4 blocks (area) and blown up again (nearest)."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // 4), max(1, w // 4)), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


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
    "invert": _invert,
    "channel order": lambda x: torch.roll(x, 1, dims=1),
    "brightness": lambda x: x + 0.5 * x.std(dim=(1, 2, 3), keepdim=True),
    "saturation": _saturate,
    "impulse": _impulse,
    "pixelate": _pixelate,
}

#: The shifts' families: the ``learned`` variant's margin on a shift is measured with every
#: shift of its family left out of the fit (a kind of shift the fit never saw).
SHIFT_FAMILIES = {
    "rotate90": "geometry", "upside down": "geometry", "grey": "colour", "contrast": "contrast",
    "blur": "blur", "noise": "noise", "down-up": "resolution", "occlusion": "occlusion",
    "invert": "colour", "channel order": "colour", "brightness": "colour",
    "saturation": "colour", "impulse": "noise", "pixelate": "resolution",
}  # fmt: skip
#: Cross-fitting folds of the ``learned`` variant's margins (the images alternate between them).
FOLDS = 2


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


#: The rules a choice could follow, each picking a variant from its margins on the shifts:
#: the highest worst margin; the highest mean; among the variants whose worst margin is within
#: :data:`TOLERANCE`, the highest mean; the highest worst plus mean; the highest median.
RULES = ("worst", "mean", "tolerance, then mean", "worst + mean", "median")
#: The rule :func:`choose` follows: the highest mean margin (since stop 36; before it the
#: highest worst). Chosen by leave-one-model-out among :data:`RULES` on the benchmark's
#: selection part (``bench/alarms/PROTOCOL.md``, "Stop 36").
RULE = "mean"
#: The worst margin a variant may have for ``"tolerance, then mean"`` (the issue's tolerance on
#: sets other than the semantic near-OOD set).
TOLERANCE = 0.03


def pick(margins: Mapping[str, Mapping[str, float]], rule: str = RULE) -> str:
    """The variant ``rule`` (one of :data:`RULES`) picks from ``margins`` (variant -> shift
    -> margin); values are compared to 1e-9 and ties go to the first listed."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    summary = margin_summary(margins)
    worst, mean = summary["worst_margin"], summary["mean_margin"]
    value = {
        "worst": worst, "mean": mean, "tolerance, then mean": mean,
        "worst + mean": {k: worst[k] + mean[k] for k in margins},
        "median": {k: statistics.median(m.values()) for k, m in margins.items()},
    }[rule]  # fmt: skip
    eligible = list(margins)
    if rule == "tolerance, then mean":
        eligible = [k for k in margins if worst[k] >= -TOLERANCE] or eligible
    order = list(margins)
    return max(eligible, key=lambda k: (round(value[k], 9), -order.index(k)))


def choose(
    names: Sequence[str],
    threshold: float,
    clean: tuple[torch.Tensor, torch.Tensor],
    shifted: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    floor: float | None = None,
) -> tuple[str, dict[str, float]]:
    """The variant :data:`RULE` picks from the margins (:func:`choice_margins`) and every
    variant's worst margin."""
    margins = choice_margins(names, threshold, clean, shifted, floor)
    return pick(margins), margin_summary(margins)["worst_margin"]


def margin_summary(margins: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each variant's worst (``"worst_margin"``) and mean (``"mean_margin"``) margin over the
    shifts, from ``margins`` (variant -> shift -> margin)."""
    return {
        "worst_margin": {v: min(m.values()) for v, m in margins.items()},
        "mean_margin": {v: sum(m.values()) / len(m) for v, m in margins.items()},
    }


def choice_margins(
    names: Sequence[str],
    threshold: float,
    clean: tuple[torch.Tensor, torch.Tensor],
    shifted: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    floor: float | None = None,
) -> dict[str, dict[str, float]]:
    """Per variant and shift, its margin (see the module docstring). ``clean`` and each
    ``shifted[name]`` are ``(ranks [B, J], logits [B, K])`` of the judged images (the same
    images in the same order); ``names`` the components' names, ``threshold`` the gate's; with
    ``floor`` (``1/(m + 1)`` of the components' reference) the learned variants compete too
    (:func:`learned_margins`)."""
    if not shifted:
        raise ValueError("no shifted images to choose on")
    gates = {v: Gate.columns(names, v, threshold) for v in fixed_variants(names)}
    clean_scores = {v: g.score(clean[0].float()) for v, g in gates.items()}
    shifted_scores = {
        name: {v: g.score(ranks.float()) for v, g in gates.items()}
        for name, (ranks, _) in shifted.items()
    }
    logits = {name: lg for name, (_, lg) in shifted.items()}
    margins = shift_margins(clean_scores, shifted_scores, clean[1], logits)
    if floor is not None:
        margins.update(learned_margins(names, threshold, clean, shifted, floor))
    return margins


def resolved(evidence: str, knn: bool) -> str:
    """What ``AlarmOptions.evidence`` stands for on a table with (``knn``) or without the
    nearest-neighbour component: ``preferred`` is :data:`DEFAULT_VARIANT` or :data:`AUTO`;
    anything else is itself."""
    if evidence != PREFERRED:
        return evidence
    return DEFAULT_VARIANT if knn else AUTO


def served_variants(names: Sequence[str]) -> list[str]:
    """The variants components ``names`` serve: every one, the ``+knn`` ones only with the
    nearest-neighbour component."""
    knn = any(n.split(":", 1)[0] == KNN_COMPONENT for n in names)
    return [v for v in EVIDENCE_VARIANTS if knn or v not in KNN_VARIANTS]


def fixed_variants(names: Sequence[str]) -> list[str]:
    """The variants without a fit that components ``names`` serve (:func:`served_variants` but
    the learned)."""
    return [v for v in served_variants(names) if v not in LEARNED_VARIANTS]


def learned_variants(names: Sequence[str]) -> list[str]:
    """The learned variants components ``names`` serve (:func:`served_variants` with a fit)."""
    return [v for v in served_variants(names) if v in LEARNED_VARIANTS]


def shift_margins(
    clean: Mapping[str, torch.Tensor],
    shifted: Mapping[str, Mapping[str, torch.Tensor]],
    clean_logits: torch.Tensor,
    shifted_logits: Mapping[str, torch.Tensor],
) -> dict[str, dict[str, float]]:
    """Per score and shift, the score's margin: its AUROC minus the best of MSP / MaxLogit /
    Energy from the same logits. ``clean`` and each ``shifted[shift]`` map a score's name to
    the images' values; ``clean_logits`` and ``shifted_logits[shift]`` are their logits."""
    base_in = logit_scores(clean_logits)
    out: dict[str, dict[str, float]] = {k: {} for k in clean}
    for name, scores in shifted.items():
        base_out = logit_scores(shifted_logits[name])
        best = max(auroc(base_in[k], base_out[k]) for k in base_in)
        for k in clean:
            out[k][name] = auroc(clean[k], scores[k]) - best
    return out


def learned_margins(
    names: Sequence[str],
    threshold: float,
    clean: tuple[torch.Tensor, torch.Tensor],
    shifted: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    floor: float,
) -> dict[str, dict[str, float]]:
    """Per learned variant and shift, its margin over the best logit score, cross-fitted:
    for each of :data:`FOLDS` folds (the images alternating), fitted on the other folds' clean
    images and their shifts *outside the shift's family* (:data:`SHIFT_FAMILIES`), measured on
    this fold's clean and shifted images; the folds' margins averaged."""
    fold = torch.arange(len(clean[0])) % FOLDS
    family = {name: SHIFT_FAMILIES.get(name, name) for name in shifted}
    fits: dict[tuple[str, int], LearnedEvidence] = {}
    variants = learned_variants(names)
    margins: dict[str, dict[str, float]] = {v: {} for v in variants}
    for name, (ranks, logits) in shifted.items():
        train = {n: r for n, (r, _) in shifted.items() if family[n] != family[name]}
        train = train or {n: r for n, (r, _) in shifted.items()}  # one family: all of it
        sums = dict.fromkeys(variants, 0.0)
        for k in range(FOLDS):
            fit, held = fold != k, fold == k
            key = (family[name], k)
            if key not in fits:
                fits[key] = fit_learned_evidence(
                    clean[0][fit], {n: r[fit] for n, r in train.items()}, floor
                )
            base_in, base_out = logit_scores(clean[1][held]), logit_scores(logits[held])
            best = max(auroc(base_in[s], base_out[s]) for s in base_in)
            for variant in variants:
                gate = Gate.columns(names, variant, threshold, fits[key])
                a = auroc(gate.score(clean[0][held].float()), gate.score(ranks[held].float()))
                sums[variant] += (a - best) / FOLDS
        for variant in variants:
            margins[variant][name] = sums[variant]
    return margins
