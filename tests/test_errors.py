"""Every error the project raises on purpose derives from ``SurpriseMonitorError`` and keeps its
built-in parent, so ``except SurpriseMonitorError`` catches them all and ``except ValueError``
still works."""

import importlib
import inspect
import pkgutil

import pytest

from surprise_monitor import SurpriseMonitorError

LAYERS = ("kernels", "monitor", "calibrate")

# Not errors of the project: a carrier of the *model's* own exception through the probe
# (unwrapped before the caller sees it).
CARRIERS = {"ModelRaised", "SurpriseMonitorError"}  # and the base itself


def project_exceptions() -> dict[str, type]:
    """Public exception classes defined in any module of the package."""
    found = {}
    layers = [importlib.import_module(f"surprise_monitor.{n}") for n in LAYERS]
    infos = [
        info for pkg in layers for info in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}.")
    ]
    for info in infos:
        if info.name.endswith(("_triton", "__main__")) or ".serve" in info.name:
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj) and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__ and not name.startswith("_")
            ):  # fmt: skip
                found[name] = obj
    return found


def test_the_walk_finds_the_errors():
    found = project_exceptions()
    assert {"TableError", "InvalidInputError", "CheckpointError", "NotFittedError"} <= set(found)
    assert len(found) >= 12


@pytest.mark.parametrize("name", sorted(set(project_exceptions()) - CARRIERS))
def test_each_error_has_the_common_base_and_a_builtin_parent(name):
    cls = project_exceptions()[name]
    assert issubclass(cls, SurpriseMonitorError)
    assert issubclass(cls, ValueError | RuntimeError | LookupError | TypeError | OSError)
