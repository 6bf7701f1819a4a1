"""Quickstart on an embedded default: scikit-learn's handwritten digits, no download.

1. train a small CNN on the training split (CPU, seconds);
2. write the training and held-out splits as ImageFolders and calibrate through the
   ``surprise-calibrate`` command line (the same code path a user runs; ``--heldout`` sets the
   alarm's false-alarm rate);
3. monitor the evaluation split (images no part of calibration saw) and atypical inputs
   (rotated, inverted, blurred, noise) and print accuracy, the alarm rate (nominal 1%, with its
   binomial interval on normal inputs, and averaged over random re-splits of the held-out and
   evaluation images) and the per-filter surprise / expectation / low-beta
   rates, then the filters that explain a few alarms.

Run: ``python examples/quickstart.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from surprise_monitor.monitor.options import Thresholds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_model import DigitsCNN  # noqa: E402

from surprise_monitor.calibrate import CalibrationTable  # noqa: E402
from surprise_monitor.calibrate.cli import main as calibrate_cli  # noqa: E402
from surprise_monitor.monitor import SurpriseMonitor  # noqa: E402
from surprise_monitor.monitor.conformal import resampled_alarm_rate  # noqa: E402


def load_digits_uint8(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as uint8 ``[N, 8, 8]`` (0..255) with labels, split per class into
    ``train`` (60%), ``heldout`` (20%: the alarm's null) and ``evaluation`` (20%)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    x_tr, x_rest, y_tr, y_rest = train_test_split(
        x, d.target, test_size=0.4, random_state=seed, stratify=d.target
    )
    x_ho, x_ev, y_ho, y_ev = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
    )
    return {"train": (x_tr, y_tr), "heldout": (x_ho, y_ho), "evaluation": (x_ev, y_ev)}


def to_input(x: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 8, 8]`` -> the CLI's preprocessing: ToTensor then Normalize(0.5, 0.5)."""
    return ((torch.from_numpy(x).float() / 255.0 - 0.5) / 0.5).unsqueeze(1)


def write_image_folder(x: np.ndarray, y: np.ndarray, root: Path) -> None:
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = root / f"{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:05d}.png")


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    inputs, targets = to_input(x), torch.from_numpy(y).long()
    for _ in range(epochs):
        perm = torch.randperm(len(inputs))
        for start in range(0, len(inputs), 64):
            idx = perm[start : start + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(inputs[idx]), targets[idx]).backward()
            opt.step()
    return model.eval()


def atypical_sets(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs unlike the training digits, made from the held-out split."""
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    blurred = np.stack([gaussian(img / 255.0, sigma=1.0) for img in x])
    return {
        "rotated 90": np.ascontiguousarray(np.rot90(x, k=1, axes=(1, 2))),
        "inverted": 255 - x,
        "blurred": np.round(blurred * 255).astype(np.uint8),
        "noise": rng.integers(0, 256, size=x.shape, dtype=np.uint8),
    }


def summarise(monitor: SurpriseMonitor, x: np.ndarray, y: np.ndarray | None) -> dict:
    """The monitor's rates on one set of images (judged against the predictions)."""
    report = monitor.inspect(to_input(x))
    pred = report.predictions.numpy()
    return {
        "n": len(x),
        "accuracy": float((pred == y).mean()) if y is not None else None,
        "alarm": float(report.alarm.float().mean()),
        "alarms": int(report.alarm.sum()),
        "median_p": float(report.p_value.median()),
        "flagged": float(report.flagged.float().mean()),
        "surprise": float(report.surprise.any(1).float().mean()),
        "expectation": float(report.expectation.any(1).float().mean()),
        "low_beta": float(report.low_beta.float().mean()),
        "report": report,
    }


def calibrate_through_the_cli(splits: dict, weights: Path, work: Path) -> Path:
    """Write the training and held-out splits as ImageFolders and run ``surprise-calibrate``."""
    for name in ("train", "heldout"):
        write_image_folder(*splits[name], work / name)
    table_path = work / "digits_table.safetensors"
    code = calibrate_cli([
        "--model", "digits_model:DigitsCNN", "--weights", str(weights),
        "--data", str(work / "train"), "--heldout", str(work / "heldout"),
        "--out", str(table_path), "--resize", "0", "--crop", "0", "--grayscale",
        "--mean", "0.5", "--std", "0.5", "--batch-size", "128", "--device", "cpu", "--quiet",
    ])  # fmt: skip
    if code != 0:
        raise SystemExit(code)
    return table_path


def print_table(results: dict[str, dict], nominal: float) -> None:
    """The rates per set, then the evaluation split's alarm rate against the nominal one."""
    from scipy.stats import binomtest

    header = (
        f"{'inputs':<11}{'n':>5}{'acc':>7}{'alarm':>8}{'med. p':>8}{'flagged':>9}"
        f"{'surprise':>10}{'expect.':>9}{'low beta':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
        print(
            f"{name:<11}{r['n']:>5}{acc:>7}{r['alarm']:>8.3f}{r['median_p']:>8.3f}"
            f"{r['flagged']:>9.3f}{r['surprise']:>10.3f}{r['expectation']:>9.3f}"
            f"{r['low_beta']:>10.3f}"
        )
    ev = results["evaluation"]
    ci = binomtest(ev["alarms"], ev["n"]).proportion_ci(method="exact")
    print(
        f"\nalarm = conformal p-value <= {nominal:.0%} among the held-out digits: on the "
        f"evaluation digits (no part of calibration saw them) {ev['alarm']:.2%} alarm "
        f"({ev['alarms']}/{ev['n']}, 95% interval {ci.low:.2%} - {ci.high:.2%}; nominal "
        f"{nominal:.0%}).\n'flagged' is the paper's per-filter test (any filter beyond P99.9 / "
        "P0.1, or a low beta): over 64 filters\nit fires on many normal inputs; it explains an "
        "alarm rather than raising one."
    )


def print_resampled(found: dict[str, float], nominal: float) -> None:
    """One line: the re-split alarm rate against the nominal one."""
    print(
        f"over {found['draws']} random re-splits of held-out + evaluation digits into null and "
        f"evaluation: mean alarm rate {found['mean']:.2%} (5-95%: {found['p5']:.2%} - "
        f"{found['p95']:.2%}; nominal {nominal:.0%}, about {nominal:.0%} on average)."
    )


def print_explanations(results: dict[str, dict]) -> None:
    """The filters behind a few alarms."""
    print("\nwhy a few inputs alarmed (their most surprising / most missing filters):")
    shown = 0
    for name in ("rotated 90", "inverted", "noise"):
        report = results[name]["report"]
        for i in torch.nonzero(report.alarm).flatten()[:1].tolist():
            s = report.sample(i, max_filters=2)
            parts = [
                f"#{f['filter']} alpha={f['alpha']:.4f} (mu {f['mu']:.4f}, {f['kind']})"
                for f in s["surprising_filters"] + s["expected_filters"]
            ]
            print(
                f"  {name} input {i}: predicted {s['class_name']}, p={s['p_value']:.4f}, "
                f"score={s['score']:.1f}; " + (", ".join(parts) or "no flagged filter")
            )
            shown += 1
    if not shown:
        print("  (no alarm)")


def main(argv: list[str] | None = None) -> int:
    """Train, calibrate through the CLI, monitor; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where to keep the images, weights and table (default: temp)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--json", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quickstart-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        splits = load_digits_uint8()
        sizes = {k: len(v[1]) for k, v in splits.items()}
        print(
            f"digits (8x8): {sizes['train']} training, {sizes['heldout']} held-out (the alarm's "
            f"null), {sizes['evaluation']} evaluation images"
        )
        model = train(*splits["train"], args.epochs)
        weights = work / "digits_cnn.pt"
        torch.save(model.state_dict(), weights)
        table = CalibrationTable.load(calibrate_through_the_cli(splits, weights, work))
        x_ev, y_ev = splits["evaluation"]
        nominal = 0.01
        thresholds = Thresholds(alarm_rate=nominal)
        with SurpriseMonitor(model, table, thresholds=thresholds) as monitor:
            results = {"evaluation": summarise(monitor, x_ev, y_ev)}
            for name, xs in atypical_sets(x_ev).items():
                results[name] = summarise(monitor, xs, None if name == "noise" else y_ev)
        null_scores = table.alarm.null_predicted.scores  # the held-out digits' scores
        resampled = resampled_alarm_rate(
            null_scores, results["evaluation"]["report"].score, nominal, interpolated=True
        )
        print()
        print_table(results, nominal)
        print_resampled(resampled, nominal)
        print_explanations(results)
        print(f"\ndone in {time.perf_counter() - started:.1f} s")
        if args.json:
            plain = {k: {m: v for m, v in r.items() if m != "report"} for k, r in results.items()}
            plain["resampled_alarm_rate"] = resampled
            Path(args.json).write_text(json.dumps(plain, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
