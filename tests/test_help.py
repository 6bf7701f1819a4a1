"""``--help`` of the command lines: each option's default stated once, from the option groups."""

from __future__ import annotations

import argparse
import re

import pytest

from surprise_monitor.calibrate import cli as calibrate_cli
from surprise_monitor.calibrate.options import RunOptions, TableOptions
from surprise_monitor.monitor.explain import cli as explain_cli
from surprise_monitor.monitor.loading.model_args import HelpFormatter
from surprise_monitor.monitor.options import add_option_arguments, add_renamed_flags


def _entries(text: str) -> dict[str, str]:
    """Each option's entry in a ``--help`` text (by its first flag), on one line."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        start = re.match(r"  (-[^\s,]+)", line)
        if start:
            current = start.group(1)
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line
        else:
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def _shown(default: object) -> str:
    """A default as ``--help`` writes it (a list as on the command line)."""
    return " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)


@pytest.mark.parametrize(
    "cli", [calibrate_cli, explain_cli], ids=["surprise-calibrate", "surprise-explain"]
)
def test_help_states_each_default_once(cli, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    entries = _entries(capsys.readouterr().out)
    actions = [a for a in cli.parser()._actions if a.help is not argparse.SUPPRESS]
    assert {a.option_strings[0] for a in actions} == set(entries)
    stated = 0
    for action in actions:
        entry = entries[action.option_strings[0]]
        assert len(re.findall(r"\bdefault\b", entry)) <= 1, entry
        if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
            assert f"(default: {_shown(action.default)})" in entry, entry
            stated += 1
    assert stated >= (15 if cli is calibrate_cli else 3)


def test_help_of_calibrate_takes_the_groups_texts(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        calibrate_cli.main(["--help"])
    entries = _entries(capsys.readouterr().out)
    assert entries["--class-output"].endswith(
        "the class output differentiated for alpha: logit, softmax or log_softmax (default: logit)"
    )
    assert entries["--workers"] == "--workers WORKERS DataLoader worker processes (default: 0)"
    assert "(default: a temporary folder)" in entries["--spill-dir"]
    assert entries["--device"].startswith("--device DEVICE where the model runs: a torch device")
    assert "do not calibrate the alarm" in entries["--no-alarm"]
    assert "--score" not in entries


def test_option_flags_take_choices_metavars_and_negated_help_from_the_group(capsys):
    p = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    add_option_arguments(p, TableOptions, {"class_output": "--class-output"})
    add_option_arguments(
        p, RunOptions, {"num_workers": "--workers", "inference_mode": "--no-inference-mode"}
    )
    add_renamed_flags(p, {"--score": "--class-output"})
    args = p.parse_args(["--workers", "3", "--no-inference-mode"])
    assert (args.num_workers, args.inference_mode, args.class_output) == (3, False, "logit")
    assert not hasattr(args, "score")
    text = " ".join(p.format_help().split())
    assert "--workers WORKERS" in text and "{logit,softmax,log_softmax}" in text
    assert "do not run the layers before the target layer in torch.inference_mode" in text
    with pytest.raises(SystemExit):
        p.parse_args(["--class-output", "probability"])
    assert "invalid choice: 'probability'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        p.parse_args(["--score", "logit"])
    assert stopped.value.code == 2
    assert "x: error: --score is now --class-output" in capsys.readouterr().err


def test_a_flags_bad_value_is_worded_with_its_flag():
    """options_from_args: a value from a flag is named by the flag in the command line's
    message (the API message is unchanged); a value given in Python is named in API words."""
    from surprise_monitor.monitor.advice import cli_message
    from surprise_monitor.monitor.checks import OptionValueError
    from surprise_monitor.monitor.options import options_from_args

    p = argparse.ArgumentParser(prog="x")
    group = p.add_argument_group("run")  # flags added to a group are remembered too
    add_option_arguments(group, RunOptions, {"batch_size": "--batch-size"})
    add_option_arguments(p, RunOptions, {"num_workers": "--workers"})
    add_option_arguments(p, TableOptions, {"top_k": "--top-k"})
    for argv, message in (
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--workers", "-2"], "--workers must be an integer >= 0, got -2"),
    ):
        with pytest.raises(OptionValueError) as raised:
            options_from_args(RunOptions, p.parse_args(argv))
        assert cli_message(raised.value) == message
        assert str(raised.value) == message.replace("--batch-size", "batch_size").replace(
            "--workers", "num_workers"
        )
    with pytest.raises(OptionValueError) as raised:
        options_from_args(TableOptions, p.parse_args([]), top_k=0)  # given in Python
    assert cli_message(raised.value) == "top_k must be an integer >= 1, got 0"
    assert options_from_args(TableOptions, p.parse_args(["--top-k", "2"])).top_k == 2
