"""``python -m bench.alarms.families``: the shift-family benchmark of issue 20 on one or more
alarm models, every candidate of :mod:`bench.alarms.combine` beside pytorch-ood's baselines.

For each model: its benchmark table (:func:`bench.alarms.collect.table_of`: all 50,000
training images, the per-class nulls from test images 0..4,999), the training references of
the candidates' components (the table's score reference for the library's components; the
50,000 training images' logits, from their cached penultimate features through the head, for
``energy`` and ``max_logit``), then every set of :func:`bench.alarms.sets.family_sets` in both
parts (``n`` images each) and the CIFAR-10 images of each part, judged once and cached under
``alarms/MODEL/families/TABLE_KIND/nN/``, with their stage distances
(:mod:`bench.alarms.stage_stats`, for the gated candidates) under
``alarms/MODEL/families/stage_mahalanobis/nN/``. The ``nominal`` sets (the training
augmentations, which must stay at chance) are judged against the *same* ``n`` images
unshifted (:func:`bench.alarms.sets.base_rows`), so a subset of unusual images does not pass
for an effect of the augmentation; every other set against the part's 5,000 CIFAR-10 images.
Written: ``results/families/MODEL.json`` with ``parts[part]["sets"][set]`` = the set's family, kind,
severity, images, the library alarm's rate at 1% and every score's AUROC / FPR95 (the
format :mod:`bench.alarms.loo` reads:
``python -m bench.alarms.loo --results bench/alarms/results/families``).

Options: ``--models resnet18,vgg_bn,vgg_plain,mobilenet``, ``--n 500``, ``--threads 1``,
``--score gated-stage-energy-v1`` (the library's gated score judges the sets: the results carry
its evidence variants without a fit, ``library energy`` and ``library energy+mass``, with a
KNN bank also ``library energy+knn`` and ``library energy+mass+knn``, and the baselines),
``--gate-level 0.005`` (its gate's level, ``AlarmOptions.gate_level``: a table and judged sets
of their own).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from bench.alarms import collect, stage_stats
from bench.alarms.combine import CANDIDATES, GATED_CANDIDATES, References, candidate_scores
from bench.alarms.report import log, plain
from bench.alarms.scores import Baselines, detection
from bench.alarms.sets import PARTS, ImageSet, base_rows, cache_stem, cifar_part, family_sets
from bench.alarms.stage_stats import StageStatistics, names_of
from bench.strong_models import ALARM_MODELS, training_record
from surprise_monitor.calibrate.evidence_choice import fixed_variants
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.atypicality import (
    FISHER_SCORE_NAME,
    GATE_LEVEL,
    SCORES,
    Gate,
)
from surprise_monitor.monitor.options import Thresholds

HERE = Path(__file__).resolve().parent
LIBRARY = "library default"
#: The family of the training augmentations (judged against the same images unshifted).
NOMINAL = "nominal"


def references(
    name: str, model: torch.nn.Module, table: object, stages: StageStatistics | None = None
) -> References:
    """The candidates' training references of one model (see the module docstring), with the
    stage distances' reference rows when ``stages`` is given."""
    alarm = table.alarm  # type: ignore[attr-defined]
    cols = [r.numpy() for r in alarm.reference.sorted_components]
    m = min(len(c) for c in cols)
    feats, _ = collect.train_features(name, model)
    head = collect.head_of(model)
    with torch.no_grad():
        logits = head(torch.from_numpy(feats).float()).numpy()
    rows, stage_names = (
        (None, ()) if stages is None else (stages.reference, names_of(stages.layers))
    )
    comps = np.stack([c[:m] for c in cols], axis=1)
    return References.of(comps, alarm.component_names(), logits, None, rows, stage_names)


def judged(
    name: str, monitor: SurpriseMonitor, images: ImageSet, n: int, kind: str = collect.TABLE_KIND
) -> dict[str, np.ndarray]:
    """:func:`bench.alarms.collect._judge` of a set, cached per (model, table ``kind``, n,
    part, set): a family set of ``n`` images never meets a set of the same name and other size
    (the CIFAR-10 images of a part, the same for every ``n``, share :func:`collect.judged`'s
    cache)."""
    if images.name == "cifar10":  # the part's 5,000 CIFAR-10 images, whatever n: shared
        return collect.judged(name, monitor, images, kind)
    folder = collect.folder(name) / "families" / kind / f"n{n}"
    path = folder / f"{cache_stem(images.part, images.name)}.npz"
    if path.is_file():
        return collect.load_judged(path)
    found = collect._judge(monitor, images)
    folder.mkdir(parents=True, exist_ok=True)
    collect._save(path, **found)
    return found


def all_scores(
    found: dict[str, np.ndarray], refs: References, baselines: Baselines
) -> dict[str, np.ndarray]:
    """Every candidate's, the library's and every baseline's score of one judged set."""
    candidates = CANDIDATES + (GATED_CANDIDATES if refs.stage else ())
    out = {LIBRARY: np.asarray(found["score"], np.float64)}
    out.update(candidate_scores(found, refs, candidates))
    out.update(baselines.scores(found))
    return out


def library_scores(
    found: dict[str, np.ndarray], table: object, baselines: Baselines
) -> dict[str, np.ndarray]:
    """The library's gated score in each class-evidence variant (``"library <variant>"``; the
    same components, reference and gate: only the evidence columns differ) and every
    baseline's score of one judged set."""
    alarm = table.alarm  # type: ignore[attr-defined]
    ranks = alarm.reference.ranks(torch.from_numpy(found["components"]).float())
    out = {
        f"library {v}": Gate.columns(alarm.component_names(), v, alarm.gate_threshold)
        .score(ranks)
        .double()
        .numpy()
        for v in fixed_variants(alarm.component_names())  # the learned: bench.alarms.learned
    }
    out.update(baselines.scores(found))
    return out


def run_model(
    name: str,
    n: int,
    say: Callable[[str], None] = log,
    score: str = FISHER_SCORE_NAME,
    gate_level: float = GATE_LEVEL,
) -> dict:
    """Every figure of one model (see the module docstring); with the library's gated
    ``score``, its two variants and the baselines only (:func:`library_scores`), its gate at
    ``gate_level``."""
    model = collect.load_model(name)
    table = collect.table_of(name, model, say, score, gate_level)
    kind = collect.table_kind(score, gate_level)
    feats, labels = collect.train_features(name, model)
    baselines = Baselines(feats, labels)
    scorer: Callable[[dict[str, np.ndarray], ImageSet], dict[str, np.ndarray]]
    if score == FISHER_SCORE_NAME:
        stages = stage_stats.statistics(name, model, table)
        refs = references(name, model, table, stages)
        distances = collect.folder(name) / "families" / stage_stats.KIND / f"n{n}"

        def scorer(found: dict[str, np.ndarray], images: ImageSet) -> dict[str, np.ndarray]:
            """The candidates', the library's and the baselines' scores (stage distances
            added to ``found``)."""
            found[stage_stats.KIND] = stage_stats.set_distances(
                name, model, stages, images, distances
            )
            return all_scores(found, refs, baselines)
    else:

        def scorer(found: dict[str, np.ndarray], images: ImageSet) -> dict[str, np.ndarray]:
            """The library's variants' and the baselines' scores."""
            return library_scores(found, table, baselines)

    out: dict = {"model": name, "training": training_record(name), "n": n, "score": score,
                 "gate_level": table.alarm.gate_level, "parts": {}}  # fmt: skip
    with SurpriseMonitor(model, table, thresholds=Thresholds(alarm_rate=0.01)) as monitor:
        for part in PARTS:
            clean = cifar_part(part)
            inlier = judged(name, monitor, clean, n, kind)
            scores_in = scorer(inlier, clean)
            sets: dict = {}
            for images in family_sets(part, n):
                found = judged(name, monitor, images, n, kind)
                reference = scores_in
                if images.family == NOMINAL:  # against the same images, unshifted
                    rows = base_rows(part, len(images.images))
                    reference = {k: v[rows] for k, v in scores_in.items()}
                sets[images.name] = {
                    "family": images.family, "kind": images.kind,
                    "severity": images.severity, "images": len(images.images),
                    "alarm_rate": float((found["p_value"] <= 0.01).mean()),
                    "scores": detection(reference, scorer(found, images)),
                }  # fmt: skip
            say(f"{name}: {part}: {len(sets)} sets")
            out["parts"][part] = {"in_distribution_images": len(inlier["score"]), "sets": sets}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(ALARM_MODELS))
    p.add_argument("--n", type=int, default=500, help="images per set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--score", default=FISHER_SCORE_NAME, choices=SCORES,
                   help="the library score whose table judges the sets")  # fmt: skip
    p.add_argument("--gate-level", type=float, default=GATE_LEVEL,
                   help="the gated score's gate level (AlarmOptions.gate_level)")  # fmt: skip
    p.add_argument("--out", default=str(HERE / "results" / "families"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        started = time.perf_counter()
        results = run_model(name, args.n, score=args.score, gate_level=args.gate_level)
        results["seconds"] = round(time.perf_counter() - started)
        path = folder / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=plain))
        tmp.replace(path)
        log(f"{name}: done in {results['seconds']} s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
