"""The default threshold levels, in percent: the one place their numbers are written.

The paper's: a filter is surprising above ``P_cn(99.9)`` and expected below ``P_cn(0.1)``; an
input's beta is low below the first percentile of its class's calibration betas. The monitor's
:class:`~surprise_monitor.monitor.options.Thresholds` take their defaults from here.
"""

DEFAULT_SURPRISE_PCT = 99.9
DEFAULT_EXPECTATION_PCT = 0.1
DEFAULT_LOW_BETA_PCT = 1.0
