"""surprise-serve's command line in process: --help states each default once, --write-config
writes the shipped files (atomically, refusing to overwrite other contents), the start-up line,
and the flags reaching the monitor through monitor_from_args."""

from __future__ import annotations

import re
import types

import pytest
from prometheus_client import CollectorRegistry

from surprise_monitor.serve import cli
from surprise_monitor.serve.config_files import (
    CONFIG_FILES,
    ConfigExistsError,
    config_bytes,
    write_config,
)
from tests._models import mixed_inputs


def help_entries(text: str) -> dict[str, str]:
    """``{--flag: its whole help entry}`` of an argparse ``--help`` text."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        start = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if start:
            current = start.group(2)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_help_states_each_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = cli.parser().format_help()
    entries = help_entries(text)
    assert {"--model", "--table", "--device", "--alarm-rate", "--write-config"} <= set(entries)
    for entry in entries.values():
        assert len(re.findall(r"default", entry, re.I)) <= 1, entry
    for flag, value in (("--port", "8000"), ("--host", "127.0.0.1"), ("--device", "cpu"),
                        ("--alarm-rate", "0.01"), ("--alarm-log", "500")):  # fmt: skip
        assert entries[flag].count(value) == 1, entries[flag]
        assert re.search(rf"default:? {re.escape(value)}\b", entries[flag]), entries[flag]
    device = entries["--device"].split("DEVICE", 1)[1]
    assert "where the model" in device  # --device has help
    assert "--sample-every K " in entries["--sample-every"]


def test_write_config_writes_the_shipped_files_and_refuses_other_contents(tmp_path):
    out = tmp_path / "conf"
    written = write_config(out)
    assert sorted(written) == sorted(out / name for name in CONFIG_FILES)
    for name in CONFIG_FILES:
        assert (out / name).read_bytes() == config_bytes(name)
    assert b"SurpriseMonitorAlarmRateHigh" in (out / "alerts.yml").read_bytes()
    assert write_config(out) == []  # the same contents: nothing rewritten
    (out / "alerts.yml").write_text("mine\n")
    (out / "grafana" / "datasource.yml").unlink()
    with pytest.raises(ConfigExistsError, match=r"alerts\.yml.*--force"):
        write_config(out)
    assert (out / "alerts.yml").read_text() == "mine\n"  # refused whole: nothing written
    assert not (out / "grafana" / "datasource.yml").exists()
    assert sorted(write_config(out, force=True)) == [
        out / "alerts.yml",
        out / "grafana" / "datasource.yml",
    ]
    assert (out / "alerts.yml").read_bytes() == config_bytes("alerts.yml")
    assert [p.name for p in out.rglob("*.tmp")] == []  # no temporary file left behind
    with pytest.raises(ValueError, match="alerts.yml"):
        config_bytes("nope.yml")


def test_write_config_flag_exits_without_a_model(tmp_path, capsys):
    cli.main(["--write-config", str(tmp_path / "c")])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "c" / name) for name in CONFIG_FILES]
    (tmp_path / "c" / "grafana" / "dashboard.json").write_text("{}")
    with pytest.raises(SystemExit, match="dashboard.json.*--force"):
        cli.main(["--write-config", str(tmp_path / "c")])
    cli.main(["--write-config", str(tmp_path / "c"), "--force"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "c" / "grafana/dashboard.json")]


def test_startup_line(saved_tiny_model):
    _, table, args = saved_tiny_model
    parsed = cli.parser().parse_args([*args, "--port", "8123", "--alarm-rate", "0.05"])
    line = cli.startup_line(parsed, table)
    assert line.startswith("surprise-serve: serving http://127.0.0.1:8123 on cpu; ")
    assert "model tests._models:TinyCNN (weights " in line
    assert f"table {args[args.index('--table') + 1]}, held-out null of 2000 images" in line
    assert "; monitor sync, alarm rate 0.05; p-values: per-class nulls (Mondrian) for " in line
    assert line.endswith("held-out images each)")  # every class has enough: no warning
    assert "\n" not in line
    bare = cli.parser().parse_args(
        ["--onnx", "m.onnx", "--no-monitor", "--host", "::1", "--sample-every", "4"]
    )
    line = cli.startup_line(bare, types.SimpleNamespace(alarm=None))
    assert "http://[::1]:8000" in line and "model --onnx m.onnx;" in line
    assert "no held-out null (no input will alarm)" in line and line.endswith("monitor off")
    sampled = cli.parser().parse_args([*args, "--mode", "async", "--sample-every", "4"])
    assert "monitor async, alarm rate 0.01, one input in 4 judged; p-values: " in (
        cli.startup_line(sampled, table)
    )


def test_monitor_from_args_maps_every_flag(calibrated):
    model, table = calibrated
    args = cli.parser().parse_args([
        "--table", "t", "--alarm-rate", "0.2", "--sample-every", "3", "--metrics-window", "7",
        "--per-class-metrics", "--metrics-label", "model=tiny", "--metrics-label", "zone=a",
    ])  # fmt: skip
    registry = CollectorRegistry()
    with cli.monitor_from_args(args, model, table, registry, None) as monitor:
        assert monitor.sampling.mode == "sync" and monitor.thresholds.alarm_rate == 0.2
        monitor(mixed_inputs(6))
        labels = {"model": "tiny", "zone": "a"}
        assert registry.get_sample_value("surprise_monitor_alarm_rate_nominal", labels) == 0.2
        assert registry.get_sample_value("surprise_monitor_window_size", labels) == 2  # of 7
        monitored = [
            s.value for fam in registry.collect() for s in fam.samples
            if s.name == "surprise_monitor_inputs_monitored_total"
        ]  # fmt: skip
        assert sum(monitored) == 2 and len(monitored) >= 1  # one input in 3, per class
        assert all("class" in s.labels for fam in registry.collect() for s in fam.samples
                   if s.name == "surprise_monitor_inputs_monitored_total")  # fmt: skip
    sure = cli.parser().parse_args(["--table", "t", "--alarm-confidence", "0.9"])
    with cli.monitor_from_args(sure, model, table, CollectorRegistry(), None) as monitor:
        assert monitor.thresholds.alarm_confidence == 0.9
    assert "alarm rate 0.01 with probability 0.9 over the held-out draw" in cli.startup_line(
        sure, table
    )
    plain = cli.parser().parse_args(["--table", "t", "--p-values", "conservative"])
    with cli.monitor_from_args(plain, model, table, CollectorRegistry(), None) as monitor:
        assert monitor.thresholds.p_values == "conservative"
    assert "alarm rate 0.01 (conservative p-values)" in cli.startup_line(plain, table)
    default = cli.parser().parse_args(["--table", "t"])
    assert default.p_values == "interpolated"
    assert "conservative" not in cli.startup_line(default, table)

    async_args = cli.parser().parse_args(
        ["--table", "t", "--mode", "async", "--queue-size", "2", "--judge-batch", "8"]
    )
    with cli.monitor_from_args(async_args, model, table, CollectorRegistry(), None) as monitor:
        assert monitor.sampling.mode == "async" and monitor.sampling.queue_size == 2
        assert monitor.sampling.judge_batch == 8


def test_an_unknown_p_value_rule_is_named(capsys):
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--table", "t", "--p-values", "exact"])
    assert "--p-values: invalid choice: 'exact'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "--table is required"),
        (
            ["--table", "t", "--alarm-rate", "1.5"],
            r"--alarm-rate must be a fraction in \(0, 1\), e\.g\. 0\.01, got 1\.5$",
        ),
        (
            ["--table", "t", "--alarm-confidence", "1"],
            r"--alarm-confidence must be a number in \[0, 1\), e\.g\. 0\.9, got 1\.0$",
        ),
        (["--table", "t", "--sample-every", "0"], "--sample-every must be an integer >= 1, got 0$"),
        (["--table", "t", "--queue-size", "0"], "--queue-size must be an integer >= 1, got 0$"),
        (["--table", "t", "--judge-batch", "0"], "--judge-batch must be an integer >= 1, got 0$"),
        (
            ["--table", "t", "--metrics-window", "0"],
            "--metrics-window must be an integer >= 1, got 0$",
        ),
        (["--table", "t", "--metrics-label", "oops"], "--metrics-label takes KEY=VALUE"),
        (["--table", "t", "--alarm-audit", "a.jsonl", "--alarm-log", "0"], "--alarm-log"),
    ],
)
def test_bad_flags_are_named(flags, message):
    args = cli.parser().parse_args(flags)
    with pytest.raises(SystemExit, match=message):
        cli.check_args(args)


def test_device_flag_is_checked():
    assert cli.device_of("cpu").type == "cpu"
    with pytest.raises(SystemExit, match="--device 'gpu0' is not a device"):
        cli.device_of("gpu0")


def test_python_dash_m_runs_the_same_main():
    from surprise_monitor.serve import __main__ as entry

    assert entry.main is cli.main


def test_the_service_is_the_top_only_the_serving_engines_build_on_it():
    """Nothing imports the service but the serving-engine integrations (Ray Serve reuses its
    routes and flags), and nothing imports those."""
    from tests.test_architecture import import_graph

    graph = import_graph()
    serve = {m for m in graph if m.startswith("surprise_monitor.serve")}
    engines = {m for m in graph if m.startswith("surprise_monitor.integrations")}
    assert {"surprise_monitor.serve.app", "surprise_monitor.serve.cli"} <= serve
    assert "surprise_monitor.integrations.ray_serve.deployment" in engines
    importers = {a for a, bs in graph.items() for b in bs if b in serve} - serve
    assert importers <= engines and importers
    assert {a for a, bs in graph.items() for b in bs if b in engines} <= engines


def test_the_examples_wrapper_still_runs_the_command_line():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "examples" / "serve.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: surprise-serve") and "--write-config DIR" in proc.stdout


def test_the_flags_defaults_are_the_declarations_they_configure(tmp_path):
    from surprise_monitor.monitor.alarms.log import AlarmLog
    from surprise_monitor.monitor.alarms.sink import JsonlSink
    from surprise_monitor.monitor.options import MetricsOptions, Sampling, Thresholds
    from surprise_monitor.serve.limits import MIB, Limits

    args = cli.parser().parse_args([])
    limits = Limits()
    assert args.max_body_mb * MIB == limits.max_body_bytes
    assert (args.max_batch, args.max_image_pixels) == (limits.max_batch, limits.max_image_pixels)
    assert (args.mode, args.every, args.queue_size) == (Sampling().mode, 1, Sampling().queue_size)
    assert args.judge_batch == Sampling().judge_batch
    assert (args.alarm_rate, args.window) == (Thresholds().alarm_rate, MetricsOptions().window)
    log = AlarmLog()
    assert args.alarm_log == log.capacity
    sink = JsonlSink(tmp_path / "a.jsonl")
    assert args.alarm_audit_max_mb * MIB == sink.max_bytes
    assert f"{sink.backups} older files kept" in " ".join(cli.parser().format_help().split())
    log.close()


KEY = b"serve-table-key-0123456789abcdef"


def test_table_key_verifies_the_table_and_the_startup_line_says_so(saved_tiny_model, tmp_path):
    from surprise_monitor.monitor.table import CalibrationTable

    _, table, args = saved_tiny_model
    key = tmp_path / "table.key"
    key.write_bytes(KEY + b"\n")
    signed = table.save(tmp_path / "signed.safetensors", key=KEY)
    flags = [*args[:-2], "--table", str(signed)]
    parsed = cli.parser().parse_args([*flags, "--table-key", str(key)])
    verified = cli.table_from_args(parsed)
    assert verified.signature_verified
    assert f"table {signed}, held-out null of 2000 images, signed table, signature verified; " in (
        cli.startup_line(parsed, verified)
    )
    unkeyed = cli.parser().parse_args(flags)
    line = cli.startup_line(unkeyed, cli.table_from_args(unkeyed))
    assert ", table signed but not authenticated (no --table-key); " in line
    plain = cli.parser().parse_args(args)
    line = cli.startup_line(plain, CalibrationTable.load(args[-1], exemplars=False))
    assert "held-out null of 2000 images, table not authenticated (no --table-key); " in line


def test_table_key_refuses_unsigned_and_changed_tables_naming_the_flag(saved_tiny_model, tmp_path):
    from tests._checks import resign

    _, table, args = saved_tiny_model
    key = tmp_path / "table.key"
    key.write_bytes(KEY)
    unsigned = cli.parser().parse_args([*args, "--table-key", str(key)])
    with pytest.raises(SystemExit, match=rf"error: --table-key {key}: .*table\.safetensors is not "
                       "signed; sign it with surprise-calibrate --sign-key"):  # fmt: skip
        cli.table_from_args(unsigned)
    changed = table.save(tmp_path / "changed.safetensors", key=KEY)
    resign(changed, lambda meta: meta.update(layer_reason="edited"))  # checksum recomputed
    parsed = cli.parser().parse_args([*args[:-2], "--table", str(changed), "--table-key", str(key)])
    with pytest.raises(SystemExit, match=rf"--table-key {key}: .*signature mismatch"):
        cli.table_from_args(parsed)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, r"--table-key: key file .*: no such file"),
     (b"tiny-key\n", r"--table-key: key file .* is too short: a table key needs at least 16")],
)  # fmt: skip
def test_a_bad_table_key_file_is_named(saved_tiny_model, tmp_path, content, message):
    _, _, args = saved_tiny_model
    key = tmp_path / "table.key"
    if content is not None:
        key.write_bytes(content)
    parsed = cli.parser().parse_args([*args, "--table-key", str(key)])
    with pytest.raises(SystemExit, match=message) as info:
        cli.table_from_args(parsed)
    assert "tiny-key" not in str(info.value)  # never the key itself
    with pytest.raises(SystemExit, match="--table-key needs --table"):
        cli.table_from_args(cli.parser().parse_args(["--no-monitor", "--table-key", str(key)]))


def test_the_monitor_of_an_unverified_table_is_refused_with_table_key(calibrated, tmp_path):
    from surprise_monitor.monitor.table_file import TableError

    model, table = calibrated
    key = tmp_path / "table.key"
    key.write_bytes(KEY)
    args = cli.parser().parse_args(["--table", "t", "--table-key", str(key)])
    with pytest.raises(TableError, match="pass the path, or load the table with key="):
        cli.monitor_from_args(args, model, table, CollectorRegistry(), None)
