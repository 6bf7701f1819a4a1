"""surprise-monitor: watch a deployed CNN at inference time and learn when an input is atypical
for the class the network gave it (a per-input alarm with a known false-alarm rate), and why
(the paper's surprising and expected filters, their regions and training exemplars).

One import package with three layers, each importing only the ones before it:

- :mod:`surprise_monitor.kernels`: math on tensors (Grad-AMap reduction, percentile lookup),
  each op a dispatcher, a PyTorch reference and a Triton kernel.
- :mod:`surprise_monitor.monitor`: the product at inference time: :class:`SurpriseMonitor`, the
  table format, the alarm's score and p-values, metrics, the alarm log, explanations and fixes.
- :mod:`surprise_monitor.calibrate`: the offline table builder (:func:`calibrate`, the
  ``surprise-calibrate`` command line, :class:`SurpriseDetector`).

The common case is importable from here: the facade, the calibration, the table, the
detector, the alarm log, the option groups of both (monitor: ``Thresholds``, ``Execution``,
``Sampling``, ``MetricsOptions``; calibration: ``TableOptions``, ``RunOptions``,
``CheckpointOptions``, ``AlarmOptions``) and ``SurpriseMonitorError``, the base of every error
the project raises on purpose. ``surprise_monitor.calibrate`` is one object, the package, and
calling it calls the function (``calibrate(model, data, ...)``); ``import
surprise_monitor.calibrate.cli`` and ``python -m surprise_monitor.calibrate`` reach the package.
"""

from typing import TYPE_CHECKING

from surprise_monitor.calibrate import (
    AlarmOptions,
    CheckpointOptions,
    RunOptions,
    SurpriseDetector,
    TableOptions,
)
from surprise_monitor.monitor import (
    AlarmLog,
    Execution,
    MetricsOptions,
    MonitorReport,
    Sampling,
    SurpriseMonitor,
    Thresholds,
)
from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.table import CalibrationTable

if TYPE_CHECKING:  # what type checkers see: the function the package calls
    from surprise_monitor.calibrate.builder import calibrate
else:  # at run time, the package itself, callable as that function
    from surprise_monitor import calibrate

__version__ = "0.1.0"

__all__ = [
    "AlarmLog",
    "AlarmOptions",
    "CalibrationTable",
    "CheckpointOptions",
    "Execution",
    "MetricsOptions",
    "MonitorReport",
    "RunOptions",
    "Sampling",
    "SurpriseDetector",
    "SurpriseMonitor",
    "SurpriseMonitorError",
    "TableOptions",
    "Thresholds",
    "__version__",
    "calibrate",
]
