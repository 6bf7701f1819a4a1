"""A fit / predict face for people who know pytorch-ood or alibi-detect.

    det = SurpriseDetector(model).fit(train_loader, heldout_loader)
    det.predict(x)   # [B] atypicality scores, higher = less like the training images
    det.p_value(x)   # [B] conformal p-value among the held-out images
    det.alarms(x)    # [B] bool: p_value <= thresholds.alarm_rate (at most that share of normal
                     # inputs alarm)
    det.save("table.safetensors"); SurpriseDetector.load(model, "table.safetensors")

Thin over :func:`surprise_monitor.calibrate.calibrate` (``fit``) and
:class:`surprise_monitor.monitor.SurpriseMonitor` (the rest); ``det.report(x)`` gives the whole
:class:`surprise_monitor.monitor.MonitorReport` (the per-filter flags that explain an alarm).
``det(x)`` is ``det.predict(x)``, as pytorch-ood's ``Detector.predict`` and its call are.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from surprise_monitor.calibrate.builder import calibrate
from surprise_monitor.monitor import MonitorReport, SurpriseMonitor
from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.judge import option_group
from surprise_monitor.monitor.options import Thresholds, renamed_keywords
from surprise_monitor.monitor.table import CalibrationTable

#: The keywords of the 0.1 detector, refused with their new spelling.
_RENAMES = {"alarm_rate": "thresholds=Thresholds(alarm_rate=...)"}


class NotFittedError(SurpriseMonitorError, RuntimeError):
    """The detector has no calibration table yet: call :meth:`SurpriseDetector.fit`."""


class SurpriseDetector:
    """Per-input atypicality scores and alarms for ``model``, the alarms' false-alarm rate at
    most ``thresholds.alarm_rate``.

    Args:
        model: the CNN, in eval mode.
        thresholds: the monitor's :class:`~surprise_monitor.monitor.options.Thresholds`
            (``alarm_rate`` is the nominal false-alarm rate of :meth:`alarms`); ``None``: the
            defaults.
        monitor_kwargs: passed to :class:`~surprise_monitor.monitor.SurpriseMonitor` (e.g.
            ``execution=Execution(backend="torch")``).
        calibrate_kwargs: passed to :func:`~surprise_monitor.calibrate.calibrate` by :meth:`fit`
            (e.g. ``device``, ``layer``, ``run=RunOptions(batch_size=...)``,
            ``alarm=AlarmOptions(head_layer=...)``).
    """

    @renamed_keywords(_RENAMES)
    def __init__(
        self,
        model: nn.Module,
        *,
        thresholds: Thresholds | None = None,
        monitor_kwargs: Mapping[str, Any] | None = None,
        calibrate_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.thresholds = option_group(thresholds, Thresholds, "thresholds")
        self.monitor_kwargs = dict(monitor_kwargs or {})
        self.calibrate_kwargs = dict(calibrate_kwargs or {})
        self.monitor: SurpriseMonitor | None = None

    def fit(self, train: DataLoader | Dataset, heldout: DataLoader | Dataset) -> SurpriseDetector:
        """Calibrate on training images with their labels; ``heldout``: labelled images of the
        same classes the model did not train on (they set the alarm threshold)."""
        if heldout is None:
            raise ValueError(
                "fit needs heldout images (a validation split the model did not train on): "
                "they set the false-alarm rate"
            )
        table = calibrate(self.model, train, heldout=heldout, **self.calibrate_kwargs)
        return self._use(table)

    @classmethod
    @renamed_keywords(_RENAMES)
    def load(
        cls,
        model: nn.Module,
        path: str | Path,
        *,
        thresholds: Thresholds | None = None,
        monitor_kwargs: Mapping[str, Any] | None = None,
    ) -> SurpriseDetector:
        """A detector from a saved table (made by :meth:`save` or ``surprise-calibrate
        --heldout``); ``thresholds`` and ``monitor_kwargs`` as for the constructor."""
        det = cls(model, thresholds=thresholds, monitor_kwargs=monitor_kwargs)
        return det._use(CalibrationTable.load(path, exemplars=False))

    def _use(self, table: CalibrationTable) -> SurpriseDetector:
        """Watch the model with ``table`` (replacing any earlier monitor)."""
        if table.alarm is None or not table.alarm.has_null:
            raise ValueError(
                "the table has no held-out null: calibrate with heldout images to use it as a "
                "detector"
            )
        self.close()
        self.monitor = SurpriseMonitor(
            self.model, table, thresholds=self.thresholds, **self.monitor_kwargs
        )
        return self

    @property
    def table(self) -> CalibrationTable:
        """The calibration table (:class:`NotFittedError` before :meth:`fit`)."""
        return self._monitor().judge.table

    def report(self, x: torch.Tensor, labels: Any = None) -> MonitorReport:
        """The monitor's whole report for a batch (judged against ``labels`` when given, else
        the predictions)."""
        return self._monitor().inspect(x, labels)

    def predict(self, x: torch.Tensor, labels: Any = None) -> torch.Tensor:
        """``[B]`` atypicality scores (higher = more atypical), as pytorch-ood's
        ``Detector.predict`` returns its outlier scores."""
        return self.report(x, labels).score

    __call__ = predict

    def p_value(self, x: torch.Tensor, labels: Any = None) -> torch.Tensor:
        """``[B]`` conformal p-values among the held-out images (small = atypical)."""
        return self.report(x, labels).p_value

    def alarms(self, x: torch.Tensor, labels: Any = None) -> torch.Tensor:
        """``[B]`` bool alarms: ``p_value <= thresholds.alarm_rate``."""
        return self.report(x, labels).alarm

    def save(self, path: str | Path) -> Path:
        """Write the table (atomically); :meth:`load` reads it back."""
        return self.table.save(path)

    def close(self) -> None:
        """Remove the monitor's hooks from the model (idempotent)."""
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None

    def _monitor(self) -> SurpriseMonitor:
        """The fitted monitor (:class:`NotFittedError` before :meth:`fit` / :meth:`load`)."""
        if self.monitor is None:
            raise NotFittedError("the detector is not fitted: call fit(train, heldout) or load()")
        return self.monitor

    def __enter__(self) -> SurpriseDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
