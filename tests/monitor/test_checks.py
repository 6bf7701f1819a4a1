"""The value checks every option and argument shares: each range's wording once, the error's
fields, parents and pickling, and the boundaries of each range."""

from __future__ import annotations

import pytest

from surprise_monitor import SurpriseMonitorError
from surprise_monitor.monitor import checks
from surprise_monitor.monitor.checks import OptionValueError


def test_the_error_carries_its_parts_and_keeps_its_parents():
    exc = OptionValueError("sampling.every", "an integer >= 1", 0)
    assert str(exc) == "sampling.every must be an integer >= 1, got 0"
    assert (exc.name, exc.option, exc.requirement, exc.value) == (
        "sampling.every", "every", "an integer >= 1", 0
    )  # fmt: skip
    assert isinstance(exc, ValueError) and isinstance(exc, SurpriseMonitorError)
    assert exc.worded_for("--sample-every") == "--sample-every must be an integer >= 1, got 0"
    make, fields = exc.__reduce__()  # what pickling (a DataLoader worker's error) rebuilds from
    back = make(*fields)
    assert type(back) is OptionValueError and str(back) == str(exc) and back.option == "every"


@pytest.mark.parametrize(
    ("check", "good", "bad", "requirement"),
    [
        (checks.percentage, [0, 0.1, 100, "99.9"], [-0.001, 100.5], "a percentage in [0, 100]"),
        (checks.fraction, [1e-9, 0.5, 0.999], [0, 1, -0.1, 2], "a fraction in (0, 1), e.g. 0.01"),
        (checks.positive_int, [1, 7], [0, -3, 1.0, True, "2", None], "an integer >= 1"),
        (checks.non_negative_int, [0, 4], [-1, 0.0, False], "an integer >= 0"),
    ],
)
def test_each_range_accepts_its_boundaries_and_refuses_outside(check, good, bad, requirement):
    for value in good:
        got = check("x", value)
        assert got == (float(value) if check in (checks.percentage, checks.fraction) else value)
    for value in bad:
        with pytest.raises(OptionValueError) as raised:
            check("x", value)
        assert raised.value.requirement == requirement
        assert str(raised.value).startswith(f"x must be {requirement}, got ")


def test_one_of_names_the_allowed_values():
    assert checks.one_of("mode", "sync", ("sync", "async")) == "sync"
    want = r"^mode must be one of \('sync', 'async'\), got 'a'$"
    with pytest.raises(OptionValueError, match=want):
        checks.one_of("mode", "a", ["sync", "async"])


def test_a_percentage_that_is_no_number_is_a_plain_value_error():
    with pytest.raises(ValueError, match="could not convert"):
        checks.percentage("surprise_pct", "high")
