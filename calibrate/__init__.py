"""Offline calibration: the monitor's probe run over training data, per (class, filter) Grad-AMap
statistics written to a calibration table.

The table format itself (:class:`CalibrationTable`, :class:`TableError`, the default levels) and
the model fingerprint live in :mod:`monitor`, which reads them at inference time; they are
re-exported here for ``from calibrate import ...``.
"""

from calibrate.builder import calibrate
from calibrate.detector import NotFittedError, SurpriseDetector
from monitor.fingerprint import model_fingerprint
from monitor.table import DEFAULT_LEVELS, CalibrationTable, TableError

__all__ = [
    "DEFAULT_LEVELS",
    "CalibrationTable",
    "NotFittedError",
    "SurpriseDetector",
    "TableError",
    "calibrate",
    "model_fingerprint",
]
