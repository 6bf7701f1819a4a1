"""Offline calibration: per (class, filter) Grad-AMap statistics on the training data."""

from calibrate.builder import calibrate
from calibrate.fingerprint import model_fingerprint
from calibrate.table import DEFAULT_LEVELS, CalibrationTable, TableError

__all__ = ["DEFAULT_LEVELS", "CalibrationTable", "TableError", "calibrate", "model_fingerprint"]
