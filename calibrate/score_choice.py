"""Which alarm score calibration uses when ``AlarmOptions(score="auto")`` (the default).

The gated score (``gated-stage-energy-v1``) ranks far shifts by the *stage distances*, a
Mahalanobis distance of each tapped layer's channel means, whose covariance is estimated on the
profile pass's reference images. A covariance of ``C`` channels from fewer than
:data:`STAGE_IMAGES_PER_CHANNEL` ``x C`` images is mostly its shrinkage: the distance then misses
inputs that every per-channel component finds extreme (measured: a saturated frame given to a
small vision transformer calibrated on 50 images for 192 channels passed the gate, while the
Fisher score's per-channel components put it beyond every reference image). ``auto`` therefore
takes the gated score where every tapped layer has enough images, and the Fisher score
(``fisher-profile-v2``) otherwise, or where no profile or head layer is tapped; calibration
says which and why (a log line; a warning for the fallback).
"""

from __future__ import annotations

from collections.abc import Sequence

from surprise_monitor.monitor.atypicality import FISHER_SCORE_NAME, GATED_SCORE_NAME

#: ``AlarmOptions(score="auto")``.
AUTO_SCORE = "auto"
#: Reference images per channel the stage distances need (of the largest tapped layer).
STAGE_IMAGES_PER_CHANNEL = 2


def too_few_images(channels: Sequence[int], images: int) -> str | None:
    """Why ``images`` profiled images are too few for the stage distances of layers of
    ``channels`` each (fewer than :data:`STAGE_IMAGES_PER_CHANNEL` per channel of the widest);
    ``None`` when they suffice."""
    needed = STAGE_IMAGES_PER_CHANNEL * max(channels)
    if images >= needed:
        return None
    return (
        f"the stage distances would rest on {images} reference images for {max(channels)} "
        f"channels (they need {needed}; raise --reference-images / reference_images or use "
        "more training images)"
    )


def choose_score(wanted: str, channels: Sequence[int], images: int) -> tuple[str, str]:
    """The score to calibrate and why: ``wanted`` unless it is :data:`AUTO_SCORE`, which
    takes the gated score when the tapped layers (``channels`` each) were profiled on enough
    ``images`` (:func:`too_few_images`), else the Fisher score."""
    if wanted != AUTO_SCORE:
        return wanted, "named"
    if not channels:
        return FISHER_SCORE_NAME, "no profile or head layer for the stage distances"
    thin = too_few_images(channels, images)
    if thin is not None:
        return FISHER_SCORE_NAME, thin
    return GATED_SCORE_NAME, f"{images} reference images for at most {max(channels)} channels"
