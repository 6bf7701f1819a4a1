"""``python -m bench.alarms``: the alarm benchmark on the strong CIFAR-10 models.

For each model: calibrate with the held-out null (cached), judge every set's selection and
report parts, score them with the monitor's candidates and pytorch-ood's baselines, and write

- ``bench/alarms/results/MODEL.json``: AUROC / FPR95 per (part, set, score), alarm rates;
- ``bench/alarms/results/MODEL.md``: the tables (report part) that ``bench/README.md`` quotes;
- ``bench/alarms/figures/MODEL-roc.png`` and ``MODEL-pvalues.png``.

Options: ``--models resnet18,vgg_bn``, ``--n 2000`` (images per corruption / photo / noise set),
``--threads 1``. Long: the first run calibrates on 50,000 training images per model (about
30-60 min on a shared 2-core CPU); later runs read the cache.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.alarms import collect
from bench.alarms.class_rates import class_rates
from bench.alarms.report import log, markdown, plain, plot_pvalues, plot_roc
from bench.alarms.scores import Baselines, alarm_rate, all_scores, detection
from bench.alarms.sets import PARTS, atypical_sets, cifar_part
from bench.strong_models import STRONG_MODELS, training_record
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.conformal import resampled_alarm_rate
from surprise_monitor.monitor.options import Thresholds

HERE = Path(__file__).resolve().parent
RATES = (0.01, 0.001)


def run_model(name: str, n: int) -> dict:
    """Every figure of one model (see the module docstring)."""
    model = collect.load_model(name)
    table = collect.table_of(name, model, log)
    feats, labels = collect.train_features(name, model)
    baselines = Baselines(feats, labels)
    out: dict = {"model": name, "training": training_record(name), "parts": {}}
    with SurpriseMonitor(model, table, thresholds=Thresholds(alarm_rate=0.01)) as monitor:
        for part in PARTS:
            log(f"{name}: judging the {part} part")
            inlier = collect.with_ablations(collect.judged(name, monitor, cifar_part(part)), table)
            scores_in = all_scores(inlier, baselines)
            sets, shown = {}, {"cifar10": {"scores": scores_in, "p_value": inlier["p_value"]}}
            for images in atypical_sets(part, n):
                judged = collect.with_ablations(collect.judged(name, monitor, images), table)
                scores = all_scores(judged, baselines)
                sets[images.name] = {
                    "images": len(images.images),
                    "alarm_rate": float((judged["p_value"] <= 0.01).mean()),
                    "scores": detection(scores_in, scores),
                }
                shown[images.name] = {"scores": scores, "p_value": judged["p_value"]}
            out["parts"][part] = {"in_distribution_images": len(inlier["score"]), "sets": sets}
            if part == "report":
                out["class_rates"] = class_rates(table, inlier)
                out["alarm_rates"] = {
                    "predicted": [alarm_rate(inlier["p_value"], r) for r in RATES],
                    "labelled": [alarm_rate(inlier["p_value_labelled"], r) for r in RATES],
                }
                null = table.alarm.null_predicted.scores
                out["resampled_alarm_rates"] = [
                    {
                        "nominal": r,
                        **resampled_alarm_rate(null, torch.from_numpy(inlier["score"]), r),
                    }
                    for r in RATES
                ]
                out["_plots"] = shown
    alarm = table.alarm
    out["table"] = {"profile_layers": list(alarm.profile_layers), "head_layer": alarm.head_layer,
                    "null": alarm.heldout,
                    "reference_images": alarm.reference_images}  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(STRONG_MODELS))
    p.add_argument("--n", type=int, default=2000, help="images per corruption / photo / noise set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--figures", default=str(HERE / "figures"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, figures = Path(args.out), Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        started = time.perf_counter()
        results = run_model(name, args.n)
        plots = results.pop("_plots")
        plot_roc(name, plots, figures / f"{name}-roc.png")
        plot_pvalues(name, plots, figures / f"{name}-pvalues.png")
        results["seconds"] = round(time.perf_counter() - started)
        (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=plain))
        (out / f"{name}.md").write_text(markdown(results))
        log(f"{name}: done in {results['seconds']} s; {out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
