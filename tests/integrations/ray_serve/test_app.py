"""``serve run``'s keys become surprise-serve's flags and the deployment's options; bad ones are
refused before anything is deployed, naming the flag or key. Needs Ray (the ``ray`` extra)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray
pytest.importorskip("ray.serve")

from surprise_monitor.integrations.ray_serve import app as ray_app  # noqa: E402


def test_keys_become_flags_and_deployment_options(monkeypatch):
    seen = {}

    def fake_build(argv, **options):
        seen.update(argv=argv, options=options)
        return "app"

    monkeypatch.setattr(ray_app, "build_app", fake_build)
    got = ray_app.app_builder({
        "model": "resnet18", "table": "t.safetensors", "per_class_metrics": "true",
        "no_monitor": "false", "alarm_rate": "0.02", "num_replicas": "2", "num_cpus": "0.5",
        "max_batch_size": "8", "batch_wait_timeout_s": "0.01",
    })  # fmt: skip
    assert got == "app"
    assert seen["argv"] == ["--model", "resnet18", "--table", "t.safetensors",
                            "--per-class-metrics", "--alarm-rate", "0.02"]  # fmt: skip
    assert seen["options"] == {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 2,
                               "max_batch_size": 8, "batch_wait_timeout_s": 0.01}  # fmt: skip


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model": "resnet18"}, "--table is required"),
        ({"model": "resnet18", "table": "t", "alarm_rate": "2"}, "alarm-rate"),
        ({"model": "resnet18", "table": "t", "colour": "red"}, "unrecognized arguments: --colour"),
        ({"model": "resnet18", "table": "t", "num_replicas": "two"}, "num_replicas='two'"),
        ({"model": "resnet18", "table": "t", "num_replicas": "0"}, "num_replicas"),
        ({"write_config": "x"}, "--write-config is surprise-serve's"),
    ],
)
def test_bad_keys_are_refused_naming_them(config, message):
    with pytest.raises(ray_app.AppConfigError, match=message):
        ray_app.app_builder(config)


def test_the_application_has_the_model_and_one_alarm_log():
    app = ray_app.build_app(["--model", "resnet18", "--table", "t.safetensors"], num_replicas=3)
    assert app is not None
    model = app._bound_deployment
    assert model.name == "MonitoredModel" and model.num_replicas == 3
    log = model.init_args[1]
    assert log._bound_deployment.name == "AlarmLog" and log._bound_deployment.num_replicas == 1
    none = ray_app.build_app(["--model", "resnet18", "--table", "t", "--alarm-log", "0"])
    assert none._bound_deployment.init_args[1] is None


def test_the_readmes_ray_example_builds_the_application_it_describes(monkeypatch):
    import re
    from pathlib import Path

    from ray import serve

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme[readme.index("## Serving at scale") :]
    block = re.search(r"^```py\n(.*?)^```", section, flags=re.S | re.M).group(1)
    started = []
    monkeypatch.setattr(serve, "run", lambda app, **kw: started.append((app, kw)))
    exec(compile(block, "README.md Ray block", "exec"), {})  # noqa: S102 - our own README
    ((app, kw),) = started
    model = app._bound_deployment
    assert model.num_replicas == 4 and kw == {"route_prefix": "/"}
    assert model.ray_actor_options["num_cpus"] == 2 and model.ray_actor_options["num_gpus"] == 0.5
    assert model.init_args[2:] == (16, 0.005) and "--alarm-audit" in model.init_args[0]
