"""Offline calibration: the monitor's probe run over training data, per (class, filter) Grad-AMap
statistics written to a calibration table.

This package is also the function: ``surprise_monitor.calibrate(model, data, ...)`` (and
``from surprise_monitor import calibrate``) calls
:func:`surprise_monitor.calibrate.builder.calibrate`, while ``import
surprise_monitor.calibrate.cli``, ``python -m surprise_monitor.calibrate`` and dotted patch
targets still find the package: the name is bound to one object only.

The table format itself (:class:`CalibrationTable`, :class:`TableError`, the default levels) and the
model fingerprint live in :mod:`surprise_monitor.monitor`, which reads them at inference time; they
are re-exported here for ``from surprise_monitor.calibrate import ...``, with the option groups
:func:`calibrate` takes (:mod:`surprise_monitor.calibrate.options`).
"""

import inspect
import sys
import types
from typing import Any

from surprise_monitor.calibrate.builder import calibrate
from surprise_monitor.calibrate.degenerate import DegenerateTableError
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
    "DegenerateTableError",
    "NotFittedError",
    "RunOptions",
    "SurpriseDetector",
    "TableError",
    "TableOptions",
    "calibrate",
    "model_fingerprint",
]


class _CallablePackage(types.ModuleType):
    """The package, callable as :func:`~surprise_monitor.calibrate.builder.calibrate`."""

    def __call__(self, *args: Any, **kwargs: Any) -> CalibrationTable:
        """``calibrate(model, data, ...)``: :func:`surprise_monitor.calibrate.builder.calibrate`."""
        return calibrate(*args, **kwargs)


#: What ``inspect.signature`` and ``help`` show for the package called as the function.
__signature__ = inspect.signature(calibrate)
sys.modules[__name__].__class__ = _CallablePackage
