"""The wheel is the library, the service and its monitoring files, and nothing else: built from
a copy of the package folders alone, installed (``--no-deps``) into a fresh virtual environment
whose other packages come from this one, its ``surprise-serve`` writes the config, prints its help
and serves the tests' tiny model. And every package folder is listed in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from bench._serve_process import free_port, stop_process
from surprise_monitor.serve.config_files import CONFIG_FILES

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # {dotted package: folder}
TOP = "surprise_monitor"


def mapped_files(suffix: str = ".py") -> set[str]:
    """Every ``suffix`` file of the mapped package folders, as its path in the wheel."""
    out = set()
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in base.rglob(f"*{suffix}"):
            rel = path.relative_to(base)
            if "__pycache__" not in rel.parts:
                out.add("/".join((*package.split("."), *rel.parts)))
    return out


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set()
    for package, folder in PACKAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join((package, *rel.parts)))
    assert f"{TOP}.serve" in found and f"{TOP}.monitor.web" in found
    data_only = {f"{TOP}.serve.config", f"{TOP}.serve.config.grafana"}  # package data, no code
    assert all((ROOT / TOP / p.split(".", 1)[1].replace(".", "/")).is_dir() for p in data_only)
    assert found | data_only == listed, {"missing": found - listed, "not a folder": listed - found}
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["surprise-serve"] == "surprise_monitor.serve.cli:main"
    serve = {r.split(">")[0] for r in PYPROJECT["project"]["optional-dependencies"]["serve"]}
    assert serve == {"fastapi", "uvicorn", "starlette"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built (``pip wheel --no-deps``) from a copy holding only pyproject.toml, the
    README and the mapped package folders: the wheel needs nothing else of the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in set(PACKAGE_DIRS.values()):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(work / "dist")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = (work / "dist").glob("surprise_monitor-*.whl")
    return built


def test_the_wheel_holds_the_package_and_only_it(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    tops = {n.split("/")[0] for n in names}
    assert tops == {TOP, wheel.name.split("-py3")[0] + ".dist-info"}, tops
    modules = {n for n in names if n.endswith(".py")}
    expected = mapped_files()
    assert f"{TOP}/serve/cli.py" in expected and f"{TOP}/kernels/amap.py" in expected
    assert modules == expected, {"missing": expected - modules, "extra": modules - expected}
    for name in CONFIG_FILES:
        assert f"{TOP}/serve/config/{name}" in names, name
    assert "surprise-serve = surprise_monitor.serve.cli:main" in entry_points
    assert not any(n.startswith(("examples/", "tests/", "bench/")) for n in names)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed (``--no-deps``); its other packages
    come from this interpreter's site-packages through a ``.pth`` file (their own ``.pth``
    files, this checkout's editable install among them, are not run)."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True,
                   timeout=120)  # fmt: skip
    site = _site_packages(env_dir)
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "_outer_env.pth").write_text("\n".join(ours) + "\n")
    before = set(os.listdir(site))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install",
         "--no-deps", "--no-index", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gained = set(os.listdir(site)) - before - {"__pycache__"}
    assert gained == {TOP, wheel.name.split("-py3")[0] + ".dist-info"}, gained
    return env_dir


def _site_packages(env_dir: Path) -> Path:
    """The site-packages folder of the virtual environment at ``env_dir``."""
    rel = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    found = env_dir / rel
    assert found.is_dir(), found
    return found


def _clean_env() -> dict[str, str]:
    """This process's environment without PYTHONPATH (the installed copy must be the one used)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_the_installed_surprise_serve_writes_config_and_helps(venv, tmp_path):
    bin_dir = venv / "bin"
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import surprise_monitor.serve as s; print(s.__file__)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_clean_env(),
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(_site_packages(venv))), where
    out = tmp_path / "conf"
    proc = subprocess.run([str(bin_dir / "surprise-serve"), "--write-config", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=_clean_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in CONFIG_FILES:
        shipped = ROOT / TOP / "serve" / "config" / name
        assert (out / name).read_bytes() == shipped.read_bytes(), name
    helped = subprocess.run([str(bin_dir / "surprise-serve"), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path, env=_clean_env())  # fmt: skip
    assert helped.returncode == 0 and helped.stdout.startswith("usage: surprise-serve")
    assert "--write-config DIR" in helped.stdout and "--device" in helped.stdout


def test_the_installed_surprise_serve_serves(venv, saved_tiny_model, tmp_path):
    _, table, args = saved_tiny_model
    shutil.copy2(ROOT / "tests" / "_models.py", tmp_path / "tinymodels.py")  # torch, numpy only
    args = [a.replace("tests._models:", "tinymodels:") for a in args]
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [str(venv / "bin" / "surprise-serve"), *args, "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=_clean_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                health = httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert health.json() == {"status": "ok", "monitor": "sync"}
        assert f"surprise-serve: serving {url} on cpu; model tinymodels:TinyCNN" in log.read_text()
    finally:
        stop_process(proc)
