"""The value checks of options and arguments, each range worded once.

Every check returns the value (converted where it says so) or raises :class:`OptionValueError`,
which carries the option's name, what the value must be and the value itself, so a command line
can say the same thing with its own flag (``--batch-size must be an integer >= 1, got 0``; see
:func:`surprise_monitor.monitor.options.options_from_args`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from surprise_monitor.monitor.errors import SurpriseMonitorError


class OptionValueError(SurpriseMonitorError, ValueError):
    """An option or argument outside its range: ``"{name} must be {requirement}, got {value!r}"``.

    ``name`` is what the Python API calls it (``sampling.every``); :attr:`option` is the
    option's field name (``every``), by which a command line finds its flag."""

    def __init__(self, name: str, requirement: str, value: Any) -> None:
        super().__init__(f"{name} must be {requirement}, got {value!r}")
        self.name, self.requirement, self.value = name, requirement, value

    def __reduce__(self) -> tuple[type, tuple[str, str, Any]]:
        """Pickle by the three fields (a DataLoader worker sends its errors pickled)."""
        return type(self), (self.name, self.requirement, self.value)

    @property
    def option(self) -> str:
        """The option's field name: ``name`` without its group prefix."""
        return self.name.rsplit(".", 1)[-1]

    def worded_for(self, flag: str) -> str:
        """The same message with a command line's ``flag`` in place of the API name."""
        return f"{flag} must be {self.requirement}, got {self.value!r}"


def _is_int(value: Any) -> bool:
    """An integer, and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def percentage(name: str, value: Any) -> float:
    """``value`` as a float in [0, 100]."""
    value = float(value)
    if not 0.0 <= value <= 100.0:
        raise OptionValueError(name, "a percentage in [0, 100]", value)
    return value


def fraction(name: str, value: Any) -> float:
    """``value`` as a float in (0, 1) (a rate: 0 and 1 excluded)."""
    value = float(value)
    if not 0.0 < value < 1.0:
        raise OptionValueError(name, "a fraction in (0, 1), e.g. 0.01", value)
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` itself when it is an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise OptionValueError(name, "an integer >= 1", value)
    return value


def non_negative_int(name: str, value: Any) -> int:
    """``value`` itself when it is an integer >= 0."""
    if not _is_int(value) or value < 0:
        raise OptionValueError(name, "an integer >= 0", value)
    return value


def one_of(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` itself when it is one of ``allowed``."""
    if value not in allowed:
        raise OptionValueError(name, f"one of {tuple(allowed)}", value)
    return value
