"""The surprise-calibrate command line on a small ImageFolder of real photos."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surprise_monitor.calibrate import CalibrationTable
from surprise_monitor.calibrate.cli import main
from surprise_monitor.monitor import SurpriseMonitor
from tests._models import TinyCNN, seeded


@pytest.fixture(scope="module")
def image_folder(photo_folder):
    """Three classes of 40x40 crops from three real photos, five per class."""
    return photo_folder({"astronaut": 5, "chelsea": 5, "coffee": 5}, seed=0)


def _args(image_folder, out, weights, *extra):
    """The flags of a run of the seeded (untrained) TinyCNN: its accuracy is at chance, so
    ``--min-accuracy 0`` lets it calibrate."""
    return [
        "--model", "tests._models:TinyCNN", "--model-kwargs", json.dumps({"num_classes": 3}),
        "--weights", str(weights), "--data", str(image_folder), "--out", str(out),
        "--resize", "36", "--crop", "32", "--batch-size", "4", "--min-accuracy", "0", "--quiet",
        *extra,
    ]  # fmt: skip


def test_cli_writes_a_table_and_a_summary(image_folder, tiny_weights, tmp_path, capsys):
    out = tmp_path / "table.safetensors"
    assert main(_args(image_folder, out, tiny_weights, "--top-k", "3")) == 0
    text = capsys.readouterr().out
    assert "layer: features (the feature map the classifier head reads: " in text
    assert "images per class: astronaut=5, chelsea=5, coffee=5" in text
    assert "3 classes have fewer than 1000 images" in text
    assert "profile layers ['features.1'], head layer features, score reference" in text
    assert f"table written to {out}" in text and "images/s" in text
    table = CalibrationTable.load(out)
    assert table.class_names == ["astronaut", "chelsea", "coffee"]
    assert table.input_shape == (3, 32, 32) and table.top_k == 3
    assert table.data_source["kind"] == "imagefolder" and table.data_source["crop"] == 32
    model = seeded(TinyCNN(num_classes=3))
    from surprise_monitor.calibrate import model_fingerprint

    assert table.model_fingerprint == model_fingerprint(model)


def test_cli_named_layer_and_torchvision_arch(image_folder, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    code = main([
        "--model", "resnet18", "--data", str(image_folder), "--out", str(out), "--resize", "40",
        "--crop", "32", "--layer", "layer3", "--batch-size", "8", "--min-accuracy", "0", "--quiet",
    ])  # fmt: skip
    assert code == 0
    table = CalibrationTable.load(out)
    assert table.layer == "layer3" and table.num_filters == 256 and table.num_classes == 3


def test_cli_errors_are_clear(image_folder, tiny_weights, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(_args(image_folder, tmp_path / "o", bad)) == 2
    assert "not a loadable state_dict file" in capsys.readouterr().err
    assert main(_args(tmp_path / "missing", tmp_path / "o", tiny_weights)) == 2
    assert "no such folder" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save(seeded(TinyCNN(num_classes=3, width=4)).state_dict(), other)
    assert main(_args(image_folder, tmp_path / "o", other)) == 2
    assert "weights do not fit the model" in capsys.readouterr().err
    assert (
        main(["--model", "nosuchnet", "--data", str(image_folder), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "neither a torchvision model name" in capsys.readouterr().err
    assert main(_args(image_folder, tmp_path / "o", tiny_weights, "--head-layer", "nope")) == 2
    assert "--head-layer 'nope': the model has no module of that name" in capsys.readouterr().err


def test_python_dash_m_and_console_script():
    script = Path(sys.executable).with_name("surprise-calibrate")  # the venv's, active or not
    for cmd in (
        [sys.executable, "-m", "surprise_monitor.calibrate", "--help"],
        [str(script), "--help"],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert "--layer" in out and "ImageFolder" in out


def _last_line_only(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_abbreviations_are_refused_and_the_old_positional_model_still_works(
    image_folder, tiny_weights, tmp_path, capsys
):
    with pytest.raises(SystemExit):  # --model-kw is not read as --model-kwargs
        main(["--model", "x:y", "--model-kw", "{}", "--data", "d", "--out", "o"])
    assert "unrecognized arguments: --model-kw" in capsys.readouterr().err
    args = _args(image_folder, tmp_path / "t.safetensors", tiny_weights)
    assert main(args[1:]) == 0  # MODEL positional: the old spelling
    assert "positional argument is deprecated; use --model" in capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for default in ("(default: 256)", "(default: 224)", "(default: 0.5)", "(default: 500)"):
        assert default in text, default
    assert "ImageNet's by default" in text


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ([], "(each 3x224x224, from --resize 256 --crop 224)"),  # ImageNet defaults on CIFAR
        (["--resize", "0", "--crop", "0", "--grayscale", "--mean", "0.5", "--std", "0.2"],
         "(each 1x40x40, from --resize 0 --crop 0 --grayscale)"),
        (["--resize", "0", "--crop", "32", "--mean", "0.5", "0.5", "0.5", "0.5",
          "--std", "0.2", "0.2", "0.2", "0.2"], "--mean has 4 values but the images have 3"),
    ],
)  # fmt: skip
def test_preprocessing_mistakes_are_one_line(image_folder, tmp_path, capsys, extra, expect):
    code = main(["--model", "tests._models:FlatCNN", "--data", str(image_folder),
                 "--out", str(tmp_path / "t.safetensors"), "--quiet", *extra])  # fmt: skip
    assert code == 2
    line = _last_line_only(capsys.readouterr().err)
    assert expect in line and line.startswith("surprise-calibrate: error: ")


def test_mixed_image_sizes_are_one_line(photo_folder, tmp_path, capsys):
    from PIL import Image

    folder = photo_folder({"astronaut": 2, "coffee": 2}, seed=5)
    Image.new("RGB", (32, 32)).save(folder / "coffee" / "small.png")
    code = main(["--model", "tests._models:TinyCNN", "--data", str(folder), "--out",
                 str(tmp_path / "t.safetensors"), "--resize", "0", "--crop", "0",
                 "--accuracy-images", "0", "--quiet"])  # fmt: skip
    assert code == 2
    assert "different sizes (3x32x32 and 3x40x40)" in _last_line_only(capsys.readouterr().err)


def test_accuracy_is_printed_and_a_wrong_class_order_is_named(tmp_path, capsys):
    from tests._models import write_colour_folder

    folder = write_colour_folder(tmp_path / "colours")
    base = ["--model", "tests._models:ColourNet", "--data", str(folder), "--resize", "0",
            "--crop", "0", "--mean", "0", "--std", "1", "--quiet"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "a.safetensors")]) == 2  # at chance: stopped
    captured = capsys.readouterr()
    assert "model accuracy on 18 calibration images (3 classes): 33.3%" in captured.out
    assert "ERROR" in captured.err and "below --min-accuracy 0.5" in captured.err
    assert "folder 'blue' -> class 2" in captured.err and "--class-order" in captured.err
    assert not (tmp_path / "a.safetensors").exists()
    names = tmp_path / "labels.txt"
    names.write_text("red\ngreen\nblue\n")
    out = tmp_path / "b.safetensors"
    assert main([*base, "--out", str(out), "--class-order", str(names)]) == 0
    captured = capsys.readouterr()
    assert "18 calibration images (3 classes): 100.0%" in captured.out
    assert "WARNING" not in captured.err
    table = CalibrationTable.load(out)
    assert table.class_names == ["red", "green", "blue"]
    assert table.counts.tolist() == [6, 6, 6]
    with SurpriseMonitor(ColourNetOf(), table) as monitor:  # labels are the model's now
        assert monitor.inspect(torch.tensor([[[[1.0]], [[0.0]], [[0.0]]]]).expand(1, 3, 8, 8)
                               ).classes.tolist() == [0]  # fmt: skip


def ColourNetOf():  # noqa: N802 - a factory named after its class
    from tests._models import ColourNet

    return ColourNet().eval()


def test_out_is_checked_before_calibrating(image_folder, tiny_weights, tmp_path, capsys,
                                           monkeypatch):  # fmt: skip
    from surprise_monitor.calibrate import cli

    ran = []
    monkeypatch.setattr(cli, "calibrate", lambda *a, **k: ran.append(1))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cases = [(tmp_path, "is a folder"), (tmp_path / "f.txt" / "t.st", "is not a folder")]
    if os.geteuid() != 0:  # root may write anywhere
        cases.append((locked / "t.st", "not writable"))
    (tmp_path / "f.txt").write_text("a file")
    for out, says in cases:
        assert main(_args(image_folder, out, tiny_weights)) == 2
        assert f"--out {out}: " in (line := _last_line_only(capsys.readouterr().err))
        assert says in line
    assert ran == []


def test_sign_key_signs_the_table_that_surprise_serve_table_key_accepts(
    image_folder, tiny_weights, tmp_path, capsys, monkeypatch
):
    from surprise_monitor.serve import cli as serve_cli

    key = tmp_path / "table.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    fast = ["--no-alarm", "--accuracy-images", "0"]
    signed, plain = tmp_path / "signed.safetensors", tmp_path / "plain.safetensors"
    assert main(_args(image_folder, signed, tiny_weights, "--sign-key", str(key), *fast)) == 0
    assert f"table written to {signed}, signed (--sign-key)" in capsys.readouterr().out
    assert main(_args(image_folder, plain, tiny_weights, *fast)) == 0
    assert CalibrationTable.load(signed, key=key).signature_verified
    served = []
    monkeypatch.setattr(serve_cli, "serve", lambda *a: served.append(a))  # no server started
    model = ["--model", "tests._models:TinyCNN", "--model-kwargs", json.dumps({"num_classes": 3}),
             "--weights", str(tiny_weights), "--alarm-log", "0"]  # fmt: skip
    serve_cli.main([*model, "--table", str(signed), "--table-key", str(key)])
    args, _, monitor, table = served.pop()
    assert table.signature_verified and monitor.table is table
    assert ", signed table, signature verified;" in serve_cli.startup_line(args, table)
    monitor.close()
    with pytest.raises(SystemExit, match=rf"--table-key {key}: {plain} is not signed"):
        serve_cli.main([*model, "--table", str(plain), "--table-key", str(key)])
    assert served == []


def test_a_bad_sign_key_is_named_before_calibrating(image_folder, tiny_weights, tmp_path,
                                                    capsys, monkeypatch):  # fmt: skip
    from surprise_monitor.calibrate import cli

    monkeypatch.setattr(cli, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    for key, says in (
        (tmp_path / "missing.key", "missing.key: no such file; make one with"),
        (short, "short.key is too short: a table key needs at least 16 bytes"),
    ):
        out = tmp_path / "t.safetensors"
        assert main(_args(image_folder, out, tiny_weights, "--sign-key", str(key))) == 2
        line = _last_line_only(capsys.readouterr().err)
        assert line.startswith("surprise-calibrate: error: --sign-key: key file ") and says in line
        assert not out.exists()


def test_images_needed_for_the_999th_percentile_is_1000():
    from surprise_monitor.monitor.table import images_needed
    from tests._checks import table_with_counts

    assert images_needed(99.9) == 1000 and images_needed(0.1) == 1000
    assert images_needed(99.0) == 100 and images_needed(97.5) == 40
    assert table_with_counts([1000, 999, 5000]).undersampled_classes(99.9) == [1]


def test_working_directory_modules_load_under_the_console_script(image_folder, tmp_path):
    script = Path(sys.executable).with_name("surprise-calibrate")
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, 3))\n"
    )
    proc = subprocess.run(
        [str(script), "--model", "mynet:build", "--data", str(image_folder), "--out",
         "t.safetensors", "--resize", "36", "--crop", "32", "--accuracy-images", "6",
         "--min-accuracy", "0", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert CalibrationTable.load(tmp_path / "t.safetensors").layer == "1"  # the ReLU pooled


ROOT = Path(__file__).resolve().parents[2]


def _start_slow_run(image_folder, tmp_path, *extra):
    """``python -m surprise_monitor.calibrate`` on a model that takes 0.2 s per batch of one
    image."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "surprise_monitor.calibrate", "--model", "tests._models:SlowCNN",
           "--model-kwargs", json.dumps({"num_classes": 3}), "--data", str(image_folder),
           "--out", str(tmp_path / "t.safetensors"), "--resize", "36", "--crop", "32",
           "--batch-size", "1", "--accuracy-images", "0", "--quiet", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)  # fmt: skip
    return proc, tmp


def _default_sigint() -> None:
    """The child gets Python's usual Ctrl-C handling even when the test run itself was started
    in the background by a shell (which starts background jobs with SIGINT ignored)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(proc, ready, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")],
)
def test_signals_stop_with_one_line_and_leave_no_spill(image_folder, tmp_path, sig, code, word):
    import signal

    proc, tmp = _start_slow_run(image_folder, tmp_path)
    _wait_for(proc, lambda: any(tmp.glob("surprise-spill-*")))  # calibrating, spill made
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert _last_line_only(err) == f"surprise-calibrate: {word}; nothing was written"
    assert list(tmp.glob("surprise-spill-*")) == []  # the temporary spill is gone
    assert not (tmp_path / "t.safetensors").exists()


def test_an_interrupted_checkpointed_run_resumes_to_the_same_table(
    image_folder, tiny_weights, tmp_path
):
    import signal

    from surprise_monitor.calibrate.checkpoint import read_manifest
    from tests._checks import assert_same_table

    ckpt = tmp_path / "ckpt"
    extra = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--weights",
             str(tiny_weights))  # fmt: skip
    proc, _ = _start_slow_run(image_folder, tmp_path, *extra)
    _wait_for(proc, lambda: (read_manifest(ckpt) or {}).get("batches_done", 0) >= 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in _last_line_only(err)
    resumed = tmp_path / "resumed.safetensors"
    args = _args(image_folder, resumed, tiny_weights, "--batch-size", "1", "--accuracy-images",
                 "0", *extra[:4], "--resume")  # fmt: skip
    args[args.index("--batch-size") + 1] = "1"
    assert main(args) == 0
    fresh = tmp_path / "fresh.safetensors"
    assert main(_args(image_folder, fresh, tiny_weights, "--batch-size", "1")) == 0
    assert_same_table(CalibrationTable.load(resumed), CalibrationTable.load(fresh))


def test_score_is_now_class_output_and_resume_needs_a_checkpoint(
    image_folder, tiny_weights, tmp_path, capsys
):
    out = tmp_path / "t.safetensors"
    with pytest.raises(SystemExit) as stopped:
        main(_args(image_folder, out, tiny_weights, "--score", "softmax"))
    assert stopped.value.code == 2
    assert "surprise-calibrate: error: --score is now --class-output" in capsys.readouterr().err
    fast = ["--no-alarm", "--accuracy-images", "0"]
    assert main(_args(image_folder, out, tiny_weights, "--class-output", "softmax", *fast)) == 0
    assert CalibrationTable.load(out).class_output == "softmax"
    assert main(_args(image_folder, out, tiny_weights, "--resume", *fast)) == 2
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err


def test_the_flags_defaults_are_the_option_groups():
    from surprise_monitor.calibrate.cli import parser
    from surprise_monitor.calibrate.options import (
        AlarmOptions,
        CheckpointOptions,
        RunOptions,
        TableOptions,
    )
    from surprise_monitor.monitor.options import options_from_args

    args = parser().parse_args(["--data", "d", "--out", "o"])
    assert options_from_args(TableOptions, args) == TableOptions()
    assert options_from_args(RunOptions, args) == RunOptions()
    assert options_from_args(AlarmOptions, args) == AlarmOptions()
    assert options_from_args(CheckpointOptions, args, dir="c") == CheckpointOptions("c")
    args = parser().parse_args([
        "--data", "d", "--out", "o", "--class-output", "log_softmax", "--top-k", "3",
        "--workers", "2", "--batch-size", "7", "--amp", "--spill-dir", "s", "--no-alarm",
        "--reference-images", "99", "--checkpoint-dir", "c", "--resume",
        "--checkpoint-every", "5", "--class-null-min", "0",
    ])  # fmt: skip
    assert options_from_args(TableOptions, args) == TableOptions("log_softmax", top_k=3)
    assert options_from_args(RunOptions, args) == RunOptions(
        batch_size=7, num_workers=2, amp=True, spill_dir="s"
    )
    assert options_from_args(AlarmOptions, args) == AlarmOptions(
        False, reference_images=99, class_null_min=0
    )
    assert options_from_args(CheckpointOptions, args) == CheckpointOptions("c", True, 5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--workers", "-1"], "--workers must be an integer >= 0, got -1"),
        (["--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
        (["--reference-images", "0"], "--reference-images must be an integer >= 1, got 0"),
        (["--class-null-min", "-2"], "--class-null-min must be an integer >= 0, got -2"),
        (["--gate-level", "1"], "--gate-level must be a fraction in (0, 1), e.g. 0.01, got 1.0"),
        (["--knn-bank", "-1"], "--knn-bank must be an integer >= 0, got -1"),
        (
            ["--checkpoint-dir", "ck", "--checkpoint-every", "0"],
            "--checkpoint-every must be an integer >= 1, got 0",
        ),
        (
            ["--approximate", "--sketch-accuracy", "1.5"],
            "--sketch-accuracy must be a fraction in (0, 1), e.g. 0.01, got 1.5",
        ),
        (
            ["--approximate", "--sketch-range", "1", "0.5"],
            "--sketch-range MIN MAX needs 0 < MIN < MAX, got 1.0 0.5",
        ),
    ],
)
def test_option_values_are_checked_with_their_flags_before_any_image_is_read(
    tmp_path, tiny_weights, capsys, extra, message
):
    missing = tmp_path / "no-such-folder"  # reading the images would fail another way
    args = _args(missing, tmp_path / "t.safetensors", tiny_weights, *extra)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"surprise-calibrate: error: {message}"), err
    assert not (tmp_path / "t.safetensors").exists()


def test_the_summary_says_which_classes_have_a_null_of_their_own(
    image_folder, tiny_weights, tmp_path, capsys
):
    out = tmp_path / "table.safetensors"
    args = _args(image_folder, out, tiny_weights, "--heldout", str(image_folder))
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "null of 15 held-out images" in text
    assert (
        "per-class nulls (Mondrian) for 0 of 3 predicted classes (>= 200 held-out images each); "
        "WARNING: 3 class(es) (0, 1, 2) have fewer and use the pooled null" in text
    )
    assert CalibrationTable.load(out).alarm.class_null_min == 200
    assert main([*args, "--class-null-min", "0"]) == 0
    assert "one pooled null for all classes" in capsys.readouterr().out
    assert CalibrationTable.load(out).alarm.class_null_predicted is None


def test_cli_calibrates_the_gated_score_when_asked(image_folder, tiny_weights, tmp_path, capsys):
    from surprise_monitor.monitor.atypicality import GATED_SCORE_NAME

    out = tmp_path / "table.safetensors"
    flags = ("--alarm-score", GATED_SCORE_NAME, "--alarm-evidence", "energy+mass",
             "--gate-level", "0.05")  # fmt: skip
    assert main(_args(image_folder, out, tiny_weights, *flags)) == 0
    text = capsys.readouterr().out
    assert f"alarm: score {GATED_SCORE_NAME} (evidence energy+mass), profile layers" in text
    assert "(the gate opens on 0.05 of them: --gate-level)" in text
    alarm = CalibrationTable.load(out).alarm
    assert alarm.score == GATED_SCORE_NAME and alarm.evidence == "energy+mass"
    assert alarm.gate_threshold is not None and len(alarm.stage_means) == 2
    assert alarm.gate_level == 0.05
    # the KNN bank: every reference image of the even half here, and its size said
    assert alarm.knn is not None and alarm.component_names()[-1].startswith("knn_distance:")
    rows = alarm.knn.bank.shape[0]
    assert f"KNN bank of {rows} images' head features (distance to the {alarm.knn.k}th" in text
    assert main(_args(image_folder, out, tiny_weights, *flags, "--knn-bank", "0")) == 0
    assert (
        "KNN bank" not in capsys.readouterr().out and CalibrationTable.load(out).alarm.knn is None
    )
    assert main(_args(image_folder, out, tiny_weights, "--alarm-score", GATED_SCORE_NAME,
                      "--alarm-evidence", "energy+knn", "--knn-bank", "0")) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--alarm-evidence must be a variant without the KNN component (--knn-bank" in err
    # a score this library does not compute is refused by argparse, naming the flag
    with pytest.raises(SystemExit):
        main(_args(image_folder, out, tiny_weights, "--alarm-score", "fisher-profile-v9"))
    assert "--alarm-score" in capsys.readouterr().err


def test_the_default_score_and_evidence_say_how_they_were_reached(
    image_folder, tiny_weights, tmp_path, capsys, caplog
):
    """``--alarm-score auto`` / ``--alarm-evidence preferred`` (the defaults) on a small folder:
    the 8 images of the profile pass are too few for the stage distances of 16 channels, so auto
    takes the Fisher score and warns why; the gated score named, the summary says the evidence
    fit (or, named, the choice) was skipped (too few held-out images). Both layers off is
    refused for the gated score."""
    from surprise_monitor.monitor.atypicality import FISHER_SCORE_NAME, GATED_SCORE_NAME

    out = tmp_path / "table.safetensors"
    held = ("--heldout", str(image_folder))
    with caplog.at_level(logging.WARNING):
        assert main(_args(image_folder, out, tiny_weights, *held)) == 0
    assert CalibrationTable.load(out).alarm.score == FISHER_SCORE_NAME
    assert f"alarm: score {FISHER_SCORE_NAME}, profile layers" in capsys.readouterr().out
    assert (
        f"alarm score {FISHER_SCORE_NAME} (--alarm-score auto): the stage distances would rest "
        "on 8 reference images for 16 channels (they need 32"
    ) in caplog.text
    gated = (*held, "--alarm-score", GATED_SCORE_NAME)
    assert main(_args(image_folder, out, tiny_weights, *gated)) == 0
    alarm = CalibrationTable.load(out).alarm
    assert alarm.heldout["evidence_choice"]["skipped"].endswith("evidence energy")
    assert alarm.heldout["evidence_choice"]["asked"] == "preferred" and alarm.knn is not None
    assert (  # the default: learned+knn, as the table has a KNN bank
        f"alarm: score {GATED_SCORE_NAME} (evidence energy: --alarm-evidence preferred skipped, "
        "the held-out data has 15 images, fewer than the 1000 the fit of the learned+knn "
        "evidence needs)"
    ) in capsys.readouterr().out
    assert main(_args(image_folder, out, tiny_weights, *gated, "--alarm-evidence", "auto")) == 0
    assert (
        f"alarm: score {GATED_SCORE_NAME} (evidence energy: --alarm-evidence auto skipped, the "
        "held-out data has 15 images, fewer than the 1000 the automatic choice needs)"
    ) in capsys.readouterr().out
    learned = (*gated, "--alarm-evidence", "learned")
    assert main(_args(image_folder, out, tiny_weights, *learned)) == 2
    assert "--alarm-evidence must be another variant than 'learned'" in capsys.readouterr().err
    off = ("--profile-layers", "none", "--head-layer", "none", "--alarm-score", GATED_SCORE_NAME)
    assert main(_args(image_folder, out, tiny_weights, *off)) == 2
    err = capsys.readouterr().err
    assert f"--alarm-score {GATED_SCORE_NAME} needs --profile-layers or --head-layer" in err
