"""Run the product on a strong model: calibrate (with the held-out null), then judge every set.

Everything is cached under ``bench.cifar.cache_dir() / "alarms" / MODEL``: the alpha table (the
long part: 50,000 training images), the table with its alarm part for the current score
(``table-SCORE-classnullN.safetensors``: made again from the alpha table when the score's
formula or the per-class nulls change),
the training images' penultimate features (for the Mahalanobis and k-NN baselines) and, under
``sets/SCORE-classnullN/``, one ``.npz`` per (set, part) with what the benchmark reads of each
input.
Delete the folder to start over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.alarms.sets import ImageSet
from bench.cifar import cache_dir, data_source, load_cifar10, to_tensor
from bench.strong_models import HELDOUT, load_strong
from bench.strong_tables import table_path
from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.alarm import alarm_calibration
from surprise_monitor.calibrate.options import AlarmOptions, RunOptions, TableOptions
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.atypicality import (
    EXPONENTIAL_TAIL,
    FISHER_SCORE_NAME,
    GATE_LEVEL,
    GATED_SCORE_NAME,
    ScoreReference,
    normal_scores,
)
from surprise_monitor.monitor.conformal import DEFAULT_CLASS_NULL_MIN
from surprise_monitor.monitor.probe.layers import FINAL_CONV
from surprise_monitor.monitor.table import CalibrationTable

BATCH = 250


def table_kind(score: str = FISHER_SCORE_NAME, gate_level: float = GATE_LEVEL) -> str:
    """The cache name of the tables (and judged sets) of the library's ``score``: what decides
    them is the score's formula, how its tail ranks are read (the exponential tail calibration
    gives since stop 32; the step-rank tables of the committed results before it were cached
    without the suffix), how p-values are taken (per class with at least this many held-out
    images: the library's default) and, for the gated score at another than the default gate
    level, that level (``AlarmOptions.gate_level``)."""
    kind = f"{score}-classnull{DEFAULT_CLASS_NULL_MIN}-{EXPONENTIAL_TAIL}"
    if score == GATED_SCORE_NAME and gate_level != GATE_LEVEL:
        kind += f"-gate{gate_level:g}"
    return kind


#: The cache name of the Fisher score's tables.
TABLE_KIND = table_kind()


def folder(model_name: str) -> Path:
    """The model's cache folder (created)."""
    path = cache_dir() / "alarms" / model_name
    path.mkdir(parents=True, exist_ok=True)
    return path


def head_of(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear``: its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear head")
    return linears[-1]


def table_file(
    model_name: str, score: str = FISHER_SCORE_NAME, gate_level: float = GATE_LEVEL
) -> Path:
    """Where :func:`table_of` caches the model's table of ``score`` at ``gate_level``."""
    return folder(model_name) / f"table-{table_kind(score, gate_level)}.safetensors"


def load_judged(path: Path) -> dict[str, np.ndarray]:
    """A judged set's cached arrays (``FileNotFoundError`` naming the benchmark that makes
    them when the file is missing)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run python -m bench.alarms.families first")
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def table_of(
    model_name: str,
    model: nn.Module,
    log: Callable[[str], None],
    score: str = FISHER_SCORE_NAME,
    gate_level: float = GATE_LEVEL,
) -> CalibrationTable:
    """The model's table: all 50,000 training images, the held-out null of test 0..4,999, the
    library's ``score`` (its default unless named; the gated score's gate at ``gate_level``)."""
    path = table_file(model_name, score, gate_level)
    alpha_path = folder(model_name) / "alpha_table.safetensors"
    if path.is_file():
        return CalibrationTable.load(path)
    train, test = load_cifar10("train"), load_cifar10("test")
    held = slice(HELDOUT.start, HELDOUT.stop)
    data = TensorDataset(to_tensor(train.images), torch.from_numpy(train.labels))
    heldout = TensorDataset(to_tensor(test.images[held]), torch.from_numpy(test.labels[held]))
    started = time.perf_counter()
    strong = table_path(model_name, model, "train")  # the same alpha table, if built already
    source = alpha_path if alpha_path.is_file() else strong if strong.is_file() else None
    if source is not None:
        table = CalibrationTable.load(source)
        table.alarm = alarm_calibration(
            model,
            table,
            data,
            heldout,
            AlarmOptions(score=score, gate_level=gate_level),
            run=RunOptions(batch_size=BATCH),
            device=torch.device("cpu"),
        )
        table.validate()
    else:
        table = calibrate(
            model,
            data,
            heldout=heldout,
            layer=FINAL_CONV,  # the layer the recorded results were measured at
            table=TableOptions(class_names=train.class_names, data_source=data_source("train")),
            run=RunOptions(batch_size=BATCH),
            alarm=AlarmOptions(score=score, gate_level=gate_level),
        )
        replace(table, alarm=None, path=None, sha256="").save(alpha_path)
    table = replace(table, path=None, sha256="")
    table.save(path)
    log(f"{model_name}: calibrated in {time.perf_counter() - started:.0f} s: {table!r}")
    return table


@torch.no_grad()
def train_features(model_name: str, model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features ``[50000, D]`` and labels of the training images (cached)."""
    path = folder(model_name) / "train_features.npz"
    if path.is_file():
        with np.load(path) as d:
            return d["feats"], d["labels"]
    train = load_cifar10("train")
    captured: list[torch.Tensor] = []
    hook = head_of(model).register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    try:
        for s in range(0, len(train.images), BATCH):
            model(to_tensor(train.images[s : s + BATCH]))
    finally:
        hook.remove()
    feats = torch.cat(captured).float().numpy()
    _save(path, feats=feats, labels=train.labels)
    return feats, train.labels


def judged(
    model_name: str, monitor: SurpriseMonitor, images: ImageSet, kind: str = TABLE_KIND
) -> dict[str, np.ndarray]:
    """What the monitor says of every image of a set (cached under the monitor's table
    ``kind``): see :func:`_judge`."""
    name = f"{images.part}__{images.name.replace(' ', '_')}.npz"
    path = folder(model_name) / "sets" / kind / name
    if path.is_file():
        return load_judged(path)
    found = _judge(monitor, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, **found)
    return found


def with_ablations(found: dict[str, np.ndarray], table: CalibrationTable) -> dict[str, np.ndarray]:
    """``found`` with ``score_without_head``: the Fisher combination of every component but the
    head distance, against the same reference (the previous default, ``fisher-profile-v1``);
    computed from the stored components, so it needs no second pass."""
    alarm = table.alarm
    if alarm is None or alarm.reference is None or not alarm.head_layer:
        return found
    reference = ScoreReference(alarm.reference.sorted_components[:-1])
    parts = torch.from_numpy(found["components"][:, :-1]).float()
    return {**found, "score_without_head": reference.score(parts).numpy()}


def _judge(monitor: SurpriseMonitor, images: ImageSet) -> dict[str, np.ndarray]:
    """Per input, judged against its predicted class: score, p-value (and against the true
    label where there is one), components, beta, the final layer's mean ``z^2``, logits and
    penultimate features."""
    captured: list[torch.Tensor] = []
    head = head_of(monitor.judge.model)
    hook = head.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().float()))
    rows: dict[str, list[np.ndarray]] = {}
    try:
        for s in range(0, len(images.images), BATCH):
            x = to_tensor(images.images[s : s + BATCH])
            r = monitor.inspect(x)
            part = {
                "score": r.score, "p_value": r.p_value, "components": r.components,
                "beta": r.beta, "beta_percentile": r.beta_percentile, "logits": r.logits,
                "classes": r.classes, "final_z2": normal_scores(r.percentile).square().mean(1),
                "surprise_count": r.surprise_count, "expectation_count": r.expectation_count,
                "features": captured[-1],
            }  # fmt: skip
            labels = images.labels[s : s + BATCH]
            if (labels >= 0).all():
                part["p_value_labelled"] = monitor.inspect(x, torch.from_numpy(labels)).p_value
            for k, v in part.items():
                rows.setdefault(k, []).append(v.numpy())
            captured.clear()
    finally:
        hook.remove()
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out["labels"] = images.labels
    return out


def load_model(model_name: str) -> nn.Module:
    """A strong model in eval mode."""
    return load_strong(model_name).eval()


def _save(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to ``path`` atomically."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
