"""The pointing benchmark's loop: table, artefacted images, alarms, methods, scores."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.cifar import cache_dir, data_source, load_cifar10, to_tensor
from bench.explain import artefacts, methods, metrics
from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.options import AlarmOptions, RunOptions, TableOptions
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.atypicality import FISHER_SCORE_NAME
from surprise_monitor.monitor.table import CalibrationTable

N_TRAIN = 3000
HELDOUT = range(0, 2000)
FIRST_EVAL = 5000


def table_for(model: nn.Module, name: str, log: Callable[[str], None]) -> CalibrationTable:
    """The model's table from 3,000 training images with a null of test 0..1,999 (cached; one
    pooled null: about 200 held-out images per class is too few for per-class nulls)."""
    path = cache_dir() / f"explain-{name}-table-{N_TRAIN}-null{len(HELDOUT)}.safetensors"
    if path.is_file():
        return CalibrationTable.load(path)
    train, test = load_cifar10("train", limit=N_TRAIN), load_cifar10("test")
    calib = TensorDataset(to_tensor(train.images), torch.from_numpy(train.labels))
    calib.classes = train.class_names  # type: ignore[attr-defined]
    held = TensorDataset(to_tensor(test.images[HELDOUT.start : HELDOUT.stop]),
                         torch.from_numpy(test.labels[HELDOUT.start : HELDOUT.stop]))  # fmt: skip
    started = time.perf_counter()
    table = calibrate(
        model, calib, heldout=held, progress=False, run=RunOptions(batch_size=250),
        table=TableOptions(data_source=data_source("train", limit=N_TRAIN)),
        # the Fisher score and one pooled null, as the recorded runs
        alarm=AlarmOptions(score=FISHER_SCORE_NAME, class_null_min=0),
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    log(f"calibrated in {time.perf_counter() - started:.0f} s; cached at {path}")
    return CalibrationTable.load(path)


def alarms(monitor: SurpriseMonitor, x: torch.Tensor, batch: int = 250) -> np.ndarray:
    """The monitor's alarm (against the prediction) for each image of ``x``."""
    out = [monitor.inspect(x[i : i + batch]).alarm.cpu().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out).astype(bool)


def artefacted(kind: str, images: np.ndarray, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Every image with the artefact ``kind`` at a seeded random position: ``(x, masks)``."""
    rng = np.random.default_rng([seed, list(artefacts.KINDS).index(kind)])
    insert = artefacts.KINDS[kind]
    xs, masks = [], []
    for i, image in enumerate(images):
        donor = images[(i + 1 + int(rng.integers(0, len(images) - 1))) % len(images)]
        out, mask = insert(image, rng, donor)
        xs.append(artefacts.normalise(out))
        masks.append(mask)
    return torch.stack(xs), np.stack(masks)


def score_image(
    monitor: SurpriseMonitor, base: methods.Baselines, x: torch.Tensor, mask: np.ndarray, label: int
) -> dict[str, float | bool]:
    """Every method's pointing hit and mass share on one artefacted image."""
    view = methods.monitor_view(monitor, x, label)
    row: dict[str, float | bool] = {
        "monitor_hit": metrics.pointing_hit(view.saliency, mask),
        "monitor_mass": metrics.mass_share(view.saliency, mask),
        "monitor_region_overlaps": bool((view.region & mask).any()),
        "monitor_no_region": not view.has_region,
        "monitor_fired": view.fired,
        "random_pixel": float(mask.mean()),
        "random_superpixel": methods.random_superpixel_chance(view.segments, mask),
    }
    for name, saliency in base.maps(x, label).items():
        row[f"{name}_hit"] = metrics.pointing_hit(saliency, mask)
        row[f"{name}_mass"] = metrics.mass_share(saliency, mask)
        region = metrics.top_region(saliency, view.segments)
        row[f"{name}_region_overlaps"] = bool((region & mask).any())
    return row


def run_kind(
    kind: str,
    monitor: SurpriseMonitor,
    base: methods.Baselines,
    data: dict,
    contrast: int,
    log: Callable[[str], None],
) -> dict:
    """One artefact kind: which images alarm, and the scores on those and on a contrast set."""
    x, masks = artefacted(kind, data["pixels"], data["seed"])
    alarmed = alarms(monitor, x)
    eligible = ~data["original_alarm"]
    picked = {"alarmed": np.flatnonzero(eligible & alarmed),
              "not_alarmed": np.flatnonzero(eligible & ~alarmed)[:contrast]}  # fmt: skip
    log(f"{kind}: {len(picked['alarmed'])} of {int(eligible.sum())} alarmed")
    out: dict = {"images": len(x), "original_not_alarmed": int(eligible.sum()),
                 "newly_alarmed": len(picked["alarmed"])}  # fmt: skip
    for group, idx in picked.items():
        rows = [score_image(monitor, base, x[i], masks[i], int(data["labels"][i])) for i in idx]
        out[group] = summarise(rows)
    return out


def summarise(rows: list[dict[str, float | bool]]) -> dict:
    """Hit counts with Wilson intervals, and mean mass shares and chances, over ``rows``."""
    n = len(rows)
    out: dict = {"n": n}
    for key in rows[0] if rows else {}:
        values = [float(r[key]) for r in rows]
        if isinstance(rows[0][key], bool):
            out[key] = metrics.rate(int(sum(values)), n)
        else:
            out[key] = float(np.mean(values))
    return out


def run(
    n_images: int, contrast: int, seed: int, log: Callable[[str], None], name: str = "resnet18"
) -> dict:
    """The whole benchmark on the strong model ``name`` (see the package docstring)."""
    from bench.strong_models import load_strong

    started = time.perf_counter()
    model = load_strong(name)
    base = methods.Baselines(model, methods.CAM_LAYERS[name])
    table = table_for(model, name, log)
    test = load_cifar10("test")
    idx = slice(FIRST_EVAL, FIRST_EVAL + n_images)
    data = {"pixels": artefacts.pixels(test.images[idx]), "labels": test.labels[idx], "seed": seed}
    kinds: dict = {}
    with SurpriseMonitor(model, table) as monitor:
        data["original_alarm"] = alarms(monitor, to_tensor(test.images[idx]))
        log(f"{int(data['original_alarm'].sum())} of {n_images} originals alarm")
        for kind in artefacts.KINDS:
            kinds[kind] = run_kind(kind, monitor, base, data, contrast, log)
    return {
        "model": name, "images_per_kind": n_images, "first_test_image": FIRST_EVAL,
        "contrast_per_kind": contrast, "seed": seed, "table_training_images": N_TRAIN,
        "null": [HELDOUT.start, HELDOUT.stop - 1],
        "alarm_rate": monitor.judge.thresholds.alarm_rate,
        "original_alarms": int(data["original_alarm"].sum()), "kinds": kinds,
        "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
    }  # fmt: skip
