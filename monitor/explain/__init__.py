"""Explanations and fixes on top of the judge: why an input was flagged (the region behind one
filter, the filter's training exemplars, figures) and the paper's "suppressing surprise" fix."""

from surprise_monitor.monitor.explain.choice import choose_filter, most_surprising_filter
from surprise_monitor.monitor.explain.exemplars import Exemplar, exemplars, load_images
from surprise_monitor.monitor.explain.explanation import Explanation, explain
from surprise_monitor.monitor.explain.fixes import (
    DEFAULT_N_SEGMENTS,
    DEFAULT_REMOVE,
    METHODS,
    FixAttempt,
    FixResult,
    fix,
)
from surprise_monitor.monitor.explain.saliency import input_gradient

__all__ = [
    "DEFAULT_N_SEGMENTS",
    "DEFAULT_REMOVE",
    "METHODS",
    "Exemplar",
    "Explanation",
    "FixAttempt",
    "FixResult",
    "choose_filter",
    "exemplars",
    "explain",
    "fix",
    "input_gradient",
    "load_images",
    "most_surprising_filter",
]
