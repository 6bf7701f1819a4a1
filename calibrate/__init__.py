"""Offline calibration: the monitor's probe run over training data, per (class, filter) Grad-AMap
statistics written to a calibration table.

The table format itself (:class:`CalibrationTable`, :class:`TableError`, the default levels) and the
model fingerprint live in :mod:`surprise_monitor.monitor`, which reads them at inference time; they
are re-exported here for ``from surprise_monitor.calibrate import ...``, with the option groups
:func:`calibrate` takes (:mod:`surprise_monitor.calibrate.options`).
"""

from surprise_monitor.calibrate.builder import calibrate
from surprise_monitor.calibrate.detector import NotFittedError, SurpriseDetector
from surprise_monitor.calibrate.options import (
    AlarmOptions,
    CheckpointOptions,
    RunOptions,
    TableOptions,
)
from surprise_monitor.monitor.fingerprint import model_fingerprint
from surprise_monitor.monitor.table import DEFAULT_LEVELS, CalibrationTable, TableError

__all__ = [
    "DEFAULT_LEVELS",
    "AlarmOptions",
    "CalibrationTable",
    "CheckpointOptions",
    "NotFittedError",
    "RunOptions",
    "SurpriseDetector",
    "TableError",
    "TableOptions",
    "calibrate",
    "model_fingerprint",
]
