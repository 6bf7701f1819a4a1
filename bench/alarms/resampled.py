"""How often the issue's done-when checks would pass on another draw of the same sets: a
paired bootstrap of one part's per-image scores (issue 20).

Each resample draws, with replacement, the part's CIFAR-10 reference images (one draw, shared
by every set judged against them, as one held-out draw is in the benchmark); the part's base
images, once for all the sets shifted from them (every family but :data:`OWN_IMAGES`: one draw
of images is behind some 55 sets, so their AUROCs move together); and the images of each
semantic and far set on their own. A ``nominal`` set is judged against the same images
unshifted, so the base draw indexes both. Every score's AUROC is then recomputed and the checks
of :func:`bench.alarms.learned.checked` rerun. The share of resamples that pass tells a pass at
the threshold from a robust one. The margins check is a minimum over some 60 sets, which
resampling pushes down, so the shares lean low.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bench.alarms import learned, loo
from bench.paper.metrics import auroc

#: Resamples per part and seed of the draws (the benchmark's figures).
RESAMPLES, SEED = 200, 20
#: The families whose sets have images of their own (the rest are shifts of the base images).
OWN_IMAGES = (loo.SEMANTIC, loo.FAR_FAMILY)
#: The checks whose pass shares are reported (``learned.checked``'s keys).
CHECKS = ("within", "mnist_ok", "nominal_ok", "beats_half", "passed")

#: set -> (family, the reference's per-image scores, the set's), each scores a name -> ``[n]``.
PartScores = Mapping[str, tuple[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]


def resampled_checks(
    sets: PartScores, score: str, model: str, resamples: int = RESAMPLES, seed: int = SEED
) -> list[dict]:
    """:func:`bench.alarms.learned.checked` of ``score`` (against :data:`bench.alarms.loo.
    BASELINES`) on each of ``resamples`` paired bootstrap draws of ``sets``
    (:func:`bench.alarms.learned.part_scores`' output; see the module docstring)."""
    keys = [score, *(b for b in loo.BASELINES if all(b in r for _, r, _ in sets.values()))]
    unshifted = [len(r[score]) for f, r, _ in sets.values() if f != loo.NOMINAL]
    references = _size("the non-nominal sets' references", unshifted)
    bases = _size("the shifted sets", [len(x[score]) for f, _, x in sets.values()
                                       if f not in OWN_IMAGES])  # fmt: skip
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(resamples):
        shared = rng.integers(0, references, references)
        base = rng.integers(0, bases, bases)
        rows = []
        for name, (family, reference, found) in sets.items():
            m = len(found[score])
            draw = rng.integers(0, m, m) if family in OWN_IMAGES else base
            ref_draw = draw if family == loo.NOMINAL else shared
            aurocs = {k: auroc(reference[k][ref_draw], found[k][draw]) for k in keys}
            rows.append({"model": model, **loo.set_report(aurocs, score, name, family)})
        out.append(learned.checked(rows))
    return out


def _size(what: str, sizes: Sequence[int]) -> int:
    """The one size in ``sizes`` (0 when empty); a ``ValueError`` naming ``what`` when they
    differ."""
    if len(set(sizes)) > 1:
        raise ValueError(f"{what} differ in size: {sorted(set(sizes))}")
    return sizes[0] if sizes else 0


def pass_shares(verdicts: Sequence[dict]) -> dict[str, float]:
    """The share of ``verdicts`` (:func:`resampled_checks`') in which each of :data:`CHECKS`
    holds (a check that does not apply counts as held), with the resamples' count."""
    if not verdicts:
        raise ValueError("no verdicts to summarise")
    shares = {c: sum(v[c] is not False for v in verdicts) / len(verdicts) for c in CHECKS}
    return {**shares, "resamples": len(verdicts)}
