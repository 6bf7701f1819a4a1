"""The service's monitoring configuration, shipped as package data (``serve/config/``): the
Prometheus rules and the Grafana dashboard with its provisioning files.

:func:`write_config` (``surprise-serve --write-config DIR``) writes them out; these copies are
the only ones (the repository's ``examples/`` holds none).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.files import atomic_write_bytes

# The files, as paths relative to the config folder (and to the folder they are written to).
CONFIG_FILES = (
    "alerts.yml",
    "alerts-ray.yml",  # the same rules for Ray Serve's names and labels (serve/ray_rules.py)
    "grafana/dashboard.json",
    "grafana/provisioning.yml",
    "grafana/datasource.yml",
)


class ConfigExistsError(SurpriseMonitorError, FileExistsError):
    """A file :func:`write_config` would write exists with other contents (``force`` not set)."""


def config_bytes(name: str) -> bytes:
    """The shipped contents of config file ``name`` (one of :data:`CONFIG_FILES`)."""
    if name not in CONFIG_FILES:
        raise ValueError(f"no config file {name!r}; the files are {', '.join(CONFIG_FILES)}")
    return resources.files("surprise_monitor.serve").joinpath("config", name).read_bytes()


def write_config(folder: str | Path, force: bool = False) -> list[Path]:
    """Write every config file under ``folder`` (``alerts.yml``, ``grafana/...``), each one
    atomically; a file already there with the same contents is left alone. A file there with
    other contents is refused (:class:`ConfigExistsError` naming them all, nothing written)
    unless ``force``. Returns the paths written (the unchanged ones not included)."""
    folder = Path(folder)
    wanted = {folder / name: config_bytes(name) for name in CONFIG_FILES}
    if folder.exists() and not folder.is_dir():
        raise ConfigExistsError(f"{folder} exists and is not a folder")
    clashes = [p for p, data in wanted.items() if p.exists() and _differs(p, data)]
    if clashes and not force:
        raise ConfigExistsError(
            f"{len(clashes)} file(s) exist with other contents: "
            f"{', '.join(str(p) for p in clashes)}; pass --force to overwrite them"
        )
    written = []
    for path, data in wanted.items():
        if not path.exists() or _differs(path, data):
            atomic_write_bytes(path, data)
            written.append(path)
    return written


def _differs(path: Path, data: bytes) -> bool:
    """True when ``path`` is not a file holding exactly ``data``."""
    return not path.is_file() or path.read_bytes() != data
