"""Paper Section 4.1 / Table 1: which filter ranking finds the filters the prediction needs?

For every test image the final convolution's filters are ranked by a method, then zeroed in 32
steps, most important first (the layer's output channels are set to 0, which is pruning the
filter for that image); the accuracy after each step, divided by the unpruned accuracy, is the
curve, and its area (fraction of filters removed on x) is the score: lower is better.

Methods (``A``: the layer's activation, ``g``: a gradient with respect to it, for the image's
true class ``c``; means are over the H x W positions):

- ``random``: a random order;  ``l1``: ``sum |A_n|`` (the activation map's l1 norm);
- ``gradcam``: ``mean(dO_c/dA_n)`` (Grad-CAM's weights, from the logit);
- ``gradcampp``: Grad-CAM++'s weights (closed form as in pytorch-grad-cam), from the logit;
- ``taylor``: the pruning criterion of Molchanov et al. as pruning computes it (and as the
  widely used pytorch-pruning code does): ``mean(dL/dA_n * A_n)`` with L the cross-entropy loss,
  summed over all evaluated images, then ``|.|``: *one* ranking for the whole data set. (Per image
  it would rank exactly as ``taylor_class``: ``dL/dA = -(1/S_c) dS_c/dA``, one positive factor
  per image.)
- ``taylor_class``: ``|mean(dS_c/dA_n * A_n)|`` per image, ``S_c`` the class's softmax score;
- ``grad_amap``: ``mean(dS_c/dA_n * A_n)`` (Grad-AMap from the softmax score, as Section 4.1);
- ``grad_amap_logit``: ``mean(dO_c/dA_n * A_n)`` (Grad-AMap from the logit: the monitor's default).

Run: ``python -m bench.paper.ranking [--data-dir DIR] [--n-test 5000]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from bench.cifar import _VGG, _ResNet, cache_dir
from bench.paper.common import (
    Setup,
    arg_parser,
    load_setup,
    log,
    new_figure,
    parse,
    save_figure,
    save_json,
    store,
    test_images,
)
from bench.paper.metrics import curve_auc
from bench.strong_models import VGGBN
from surprise_monitor.calibrate import model_fingerprint
from surprise_monitor.kernels import grad_amap
from surprise_monitor.monitor.probe import get_module

METHODS = (
    "random",
    "l1",
    "gradcampp",
    "gradcam",
    "taylor",
    "taylor_class",
    "grad_amap",
    "grad_amap_logit",
)
TITLES = {
    "random": "Random",
    "l1": "l1-norm",
    "gradcampp": "Grad-CAM++",
    "gradcam": "Grad-CAM",
    "taylor": "Taylor",
    "taylor_class": "Taylor (class)",
    "grad_amap": "Grad-AMap (softmax)",
    "grad_amap_logit": "Grad-AMap (logit)",
}
#: Table 1 of the paper (AUC; VGG16 and ResNet18 on ImageNet). Grad-AMap is from the softmax.
PAPER_AUC = {
    "random": (0.685, 0.733),
    "l1": (0.057, 0.618),
    "gradcampp": (0.147, 0.230),
    "gradcam": (0.079, 0.225),
    "taylor": (0.132, 0.629),
    "taylor_class": (0.052, 0.392),
    "grad_amap": (0.042, 0.146),
}
INCREMENTS = 32
#: Where the strong models' final convolution has gone through its batch norm (and, for the VGG,
#: the ReLU): zeroing a channel there removes the filter's whole contribution, where zeroing
#: the convolution's own output leaves the batch norm's shift ``beta - gamma * mean / std``.
AFTER_BN = {"resnet18": "layer4.1.bn2", "vgg_bn": "features.26"}


# ------------------------------------------------------------------------------ model split
@dataclass
class Split:
    """A model cut at a layer: ``prefix(x) -> (A, ctx)``; ``head(A, ctx) -> logits``."""

    prefix: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    head: Callable[[torch.Tensor, Any], torch.Tensor]


def split_model(model: nn.Module, layer: str) -> Split:
    """Cut ``model`` at ``layer`` so the head can be run alone on edited activations.

    Fast paths for the small VGG / ResNet of :mod:`bench.cifar`, the strong models of
    :mod:`bench.strong_models` (:class:`~bench.strong_models.VGGBN`, and a torchvision ResNet cut
    at the second convolution of its last basic block); any other model runs whole, with a
    forward hook that swaps the layer's output for the given activation.
    """
    fast = _strong_split(model, layer)
    if fast is not None:
        return fast
    if isinstance(model, _VGG) and layer.startswith("features."):
        i = int(layer.split(".")[1])
        front, rest = model.features[: i + 1], model.features[i + 1 :]

        def vgg_head(a: torch.Tensor, ctx: Any) -> torch.Tensor:
            return model.classifier(model.pool(rest(a.clone())))  # clone: ReLU(inplace=True)

        return Split(lambda x: (front(x), None), vgg_head)
    if isinstance(model, _ResNet) and layer == "layer3.conv2":
        blk = model.layer3

        def res_prefix(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
            h = model.layer2(model.layer1(model.stem(x)))
            return blk.conv2(blk.relu(blk.bn1(blk.conv1(h)))), blk.shortcut(h)

        def res_head(a: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
            return model.fc(blk.relu(blk.bn2(a) + shortcut).mean(dim=(2, 3)))

        return Split(res_prefix, res_head)
    module = get_module(model, layer)

    def hooked(x: torch.Tensor, replace: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        box: list[torch.Tensor] = []

        def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> torch.Tensor | None:
            box.append(out)
            return None if replace is None else replace.clone()

        handle = module.register_forward_hook(hook)
        try:
            logits = model(x)
        finally:
            handle.remove()
        return box[0], logits

    return Split(lambda x: (hooked(x, None)[0], x), lambda a, x: hooked(x, a)[1])


def _strong_split(model: nn.Module, layer: str) -> Split | None:
    """The fast cut of a :class:`VGGBN` at a ``features.i`` layer, or of a torchvision ResNet
    at ``layer4.{last}.conv2`` (the shared CIFAR-10 ResNet-18's final convolution) or at the
    batch norm after it, ``layer4.{last}.bn2``; ``None`` for anything else."""
    if isinstance(model, VGGBN) and layer.startswith("features."):
        i = int(layer.split(".")[1])
        front, rest = model.features[: i + 1], model.features[i + 1 :]

        def vgg_head(a: torch.Tensor, ctx: Any) -> torch.Tensor:
            return model.classifier(rest(a.clone()).mean(dim=(2, 3)))  # clone: inplace ReLU

        return Split(lambda x: (front(x), None), vgg_head)
    if not isinstance(model, ResNet) or not isinstance(model.layer4[-1], BasicBlock):
        return None
    last = f"layer4.{len(model.layer4) - 1}"
    if layer not in (f"{last}.conv2", f"{last}.bn2"):
        return None
    blk = model.layer4[-1]
    after_bn = layer.endswith("bn2")

    def res_prefix(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        h = model.layer4[:-1](model.layer3(model.layer2(model.layer1(h))))
        identity = h if blk.downsample is None else blk.downsample(h)
        a = blk.conv2(blk.relu(blk.bn1(blk.conv1(h))))
        return (blk.bn2(a) if after_bn else a), identity

    def res_head(a: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        out = blk.relu((a if after_bn else blk.bn2(a)) + identity)
        return model.fc(torch.flatten(model.avgpool(out), 1))

    return Split(res_prefix, res_head)


# ------------------------------------------------------------------------------ capture
@dataclass
class Capture:
    """A batch's activation at the layer and three gradients with respect to it."""

    activation: torch.Tensor  # [B, N, H, W]
    g_logit: torch.Tensor  # d logit[c] / dA
    g_softmax: torch.Tensor  # d softmax[c] / dA
    g_loss: torch.Tensor  # d cross_entropy(logits, c) / dA
    logits: torch.Tensor  # [B, K]
    ctx: Any = None


def capture(split: Split, x: torch.Tensor, labels: torch.Tensor) -> Capture:
    """One forward (prefix without grad) and three gradients to the layer, per sample (in eval
    mode samples do not interact, so the gradient of a batch sum is each sample's own)."""
    with torch.no_grad():
        a, ctx = split.prefix(x)
    leaf = a.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = split.head(leaf, ctx)
        y = labels.view(-1, 1)
        g_logit, g_soft, g_loss = (
            torch.autograd.grad(s, leaf, retain_graph=i < 2)[0]
            for i, s in enumerate(
                (
                    logits.gather(1, y).sum(),
                    torch.softmax(logits, dim=1).gather(1, y).sum(),
                    nn.functional.cross_entropy(logits, labels, reduction="sum"),
                )
            )
        )
    return Capture(a.detach(), g_logit, g_soft, g_loss, logits.detach(), ctx)


def gradcampp_weights(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ filter weights ``[B, N]`` (the closed form pytorch-grad-cam uses)."""
    g2 = gradient.pow(2)
    g3 = g2 * gradient
    sum_a = activation.sum(dim=(2, 3), keepdim=True)
    aij = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    aij = torch.where(gradient != 0, aij, torch.zeros_like(aij))
    return (gradient.clamp(min=0) * aij).sum(dim=(2, 3))


def filter_scores(
    cap: Capture,
    method: str,
    generator: torch.Generator | None = None,
    taylor_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, N]`` importance of each filter for each image under ``method`` (higher = more).

    ``taylor`` needs ``taylor_total``: ``sum_images mean_hw(dL/dA * A)`` over the data set
    (:func:`taylor_total`).
    """
    a = cap.activation
    if method == "random":
        return torch.rand(a.shape[:2], generator=generator)
    if method == "l1":
        return a.abs().sum(dim=(2, 3))
    if method == "gradcam":
        return cap.g_logit.mean(dim=(2, 3))
    if method == "gradcampp":
        return gradcampp_weights(a, cap.g_logit)
    if method == "taylor":
        if taylor_total is None:
            raise ValueError("the taylor ranking needs taylor_total (one ranking per data set)")
        return taylor_total.abs().expand(a.shape[0], -1)
    if method == "taylor_class":
        return grad_amap(a, cap.g_softmax).abs()
    if method == "grad_amap":
        return grad_amap(a, cap.g_softmax)
    if method == "grad_amap_logit":
        return grad_amap(a, cap.g_logit)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def removal_correct(
    split: Split, cap: Capture, labels: torch.Tensor, scores: torch.Tensor, ks: Sequence[int]
) -> np.ndarray:
    """Bool ``[len(ks), B]``: is each image still classified right after zeroing its ``k``
    top-scored channels, for each k."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    out = []
    with torch.no_grad():
        for k in ks:
            keep = torch.ones_like(scores)
            keep.scatter_(1, order[:, :k], 0.0)
            logits = split.head(cap.activation * keep[:, :, None, None], cap.ctx)
            out.append((logits.argmax(dim=1) == labels).numpy())
    return np.stack(out)


def removal_counts(
    split: Split, cap: Capture, labels: torch.Tensor, scores: torch.Tensor, ks: Sequence[int]
) -> np.ndarray:
    """Correct predictions after zeroing each image's ``k`` top-scored channels, for each k."""
    return removal_correct(split, cap, labels, scores, ks).sum(axis=1)


def bootstrap_auc_se(
    frac: Sequence[float], correct: np.ndarray, n_boot: int = 500, seed: int = 0
) -> np.ndarray:
    """Bootstrap standard error (over images) of each method's removal-curve AUC.

    ``correct``: bool ``[M, K, N]`` (method, removal step, image); step 0 is the unpruned model,
    the normaliser of every curve. Returns ``[M]``."""
    m, k, n = correct.shape
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).T.astype(np.float32)
    counts = (correct.reshape(m * k, n).astype(np.float32) @ weights).reshape(m, k, n_boot)
    norm = counts / np.maximum(counts[:, :1, :], 1.0)
    x = np.asarray(frac, np.float64)[None, :, None]
    aucs = np.sum((x[:, 1:] - x[:, :-1]) * (norm[:, 1:] + norm[:, :-1]) / 2.0, axis=1)
    return aucs.std(axis=1, ddof=1)


def removal_steps(n_filters: int, increments: int = INCREMENTS) -> list[int]:
    """Filters removed at each point of the curve: 0, then ``increments`` equal steps to all."""
    step = max(1, n_filters // increments)
    ks = list(range(0, n_filters + 1, step))
    return ks if ks[-1] == n_filters else [*ks, n_filters]


def taylor_total(split: Split, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """``[N]``: ``sum_images mean_hw(dL/dA * A)`` (L: cross-entropy of the true class)."""
    total = None
    for i in range(0, len(x), batch):
        cap = capture(split, x[i : i + batch], y[i : i + batch])
        part = grad_amap(cap.activation, cap.g_loss).sum(dim=0)
        total = part if total is None else total + part
    assert total is not None
    return total


def run_ranking(
    setup: Setup,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int = 0,
    batch: int = 250,
    layer: str | None = None,
) -> dict[str, Any]:
    """The removal curves and AUCs (with bootstrap standard errors) of every method on
    ``(x, y)``, at ``layer`` (default: the table's, the final convolution)."""
    started = time.perf_counter()
    layer = layer or setup.table("train").layer
    split = split_model(setup.model, layer)
    taylor = taylor_total(split, x, y, batch)
    n_filters = int(taylor.shape[0])
    ks = removal_steps(n_filters)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        cap = capture(split, xb, yb)
        for m in METHODS:
            scores = filter_scores(cap, m, gen, taylor)
            parts[m].append(removal_correct(split, cap, yb, scores, ks))
    correct = np.stack([np.concatenate(parts[m], axis=1) for m in METHODS])  # [M, K, N]
    counts = correct.sum(axis=2)
    frac = [k / n_filters for k in ks]
    base = counts[0, 0]  # k = 0: the unpruned model, the same for every method
    se = bootstrap_auc_se(frac, correct, seed=seed)
    out: dict[str, Any] = {
        "layer": layer,
        "filters": n_filters,
        "images": len(x),
        "fraction_removed": frac,
        "accuracy": float(base / len(x)),
        "accuracy_all_removed": float(counts[0, -1] / len(x)),  # the same for every method
        "methods": {},
    }
    for j, m in enumerate(METHODS):
        norm = counts[j] / base
        out["methods"][m] = {
            "normalised_accuracy": norm.tolist(),
            "auc": curve_auc(frac, norm),
            "auc_se": float(se[j]),
        }
    out["seconds"] = time.perf_counter() - started
    return out


def plot(results: dict[str, Any]) -> str:
    """Figure 3's layout: normalised accuracy against filters removed, one panel per model."""
    fig = new_figure(5.2 * len(results), 4.0)
    for j, r in enumerate(results.values()):
        ax = fig.add_subplot(1, len(results), j + 1)
        x = np.asarray(r["fraction_removed"]) * 100
        for m in METHODS:
            res = r["methods"][m]
            ax.plot(
                x,
                np.asarray(res["normalised_accuracy"]) * 100,
                label=f"{TITLES[m]} ({res['auc']:.3f})",
                lw=2.2 if m.startswith("grad_amap") else 1.2,
            )
        ax.set_title(f"{r['title']}: {r['filters']} filters of {r['layer']}", fontsize=9)
        ax.set_xlabel("filters removed (%), most important first")
        ax.set_ylabel("normalised accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, "ranking").name


def markdown(results: dict[str, Any], figure: str | None = "ranking.png") -> str:
    """The section of the report: the table beside the paper's, and the figure."""
    archs = list(results)
    lines = [
        "| method | "
        + " | ".join(results[a]["title"] for a in archs)
        + " | paper VGG16 | paper ResNet18 |",
        "|---|" + "---:|" * (len(archs) + 2),
    ]
    for m in METHODS:
        ours = [_auc_cell(results[a]["methods"][m]) for a in archs]
        paper = PAPER_AUC.get(m)
        ref = [f"{v:.3f}" for v in paper] if paper else ["-", "-"]
        lines.append(f"| {TITLES[m]} | " + " | ".join(ours + ref) + " |")
    lines += [""]
    lines.append(
        "AUC of the normalised accuracy (accuracy / unpruned accuracy) against the fraction "
        "of filters removed, most important first (lower is better); +- one bootstrap "
        "standard error over the test images (500 resamples). With every filter "
        "removed the model predicts one class (about 10% right on CIFAR-10, against 0.1% on "
        "ImageNet), which lifts the tail of poor rankings' curves; a good ranking drives the "
        "accuracy below that level, towards 0, as on ImageNet."
    )
    lines.append("")
    for a in archs:
        r = results[a]
        lines.append(
            f"- {r['title']}: {r['images']} test images, unpruned accuracy "
            f"{r['accuracy']:.3f}, all filters removed {r['accuracy_all_removed']:.3f}, "
            f"{len(r['fraction_removed']) - 1} increments of "
            f"{r['filters'] // INCREMENTS} filters; {r.get('seconds', float('nan')):.0f} s."
        )
    lines += _after_bn_lines(results)
    if figure:
        lines += ["", f"![filter removal curves](figures/{figure})"]
    return "\n".join(lines)


def _after_bn_lines(results: dict[str, Any]) -> list[str]:
    """The table at the batch norm's output (:data:`AFTER_BN`), when the results have it."""
    archs = [a for a in results if "after_bn" in results[a]]
    if not archs:
        return []
    lines = [
        "",
        "The same experiment with the activation taken after the final convolution's batch "
        "norm (" + ", ".join(f"{results[a]['title']}: `{results[a]['after_bn']['layer']}`, "
        f"{results[a]['after_bn']['images']} test images" for a in archs) + "), where zeroing "
        "a channel removes the filter's contribution:",
        "",
        "| method | " + " | ".join(results[a]["title"] for a in archs)
        + " | paper VGG16 | paper ResNet18 |",
        "|---|" + "---:|" * (len(archs) + 2),
    ]  # fmt: skip
    for m in METHODS:
        ours = [_auc_cell(results[a]["after_bn"]["methods"][m]) for a in archs]
        ref = [f"{v:.3f}" for v in PAPER_AUC[m]] if m in PAPER_AUC else ["-", "-"]
        lines.append(f"| {TITLES[m]} | " + " | ".join(ours + ref) + " |")
    lines.append("")
    for a in archs:
        r = results[a]["after_bn"]
        lines.append(
            f"- {results[a]['title']}: unpruned accuracy {r['accuracy']:.3f}, all filters "
            f"removed {r['accuracy_all_removed']:.3f}; {r['seconds']:.0f} s."
        )
    return lines


def _auc_cell(res: dict[str, Any]) -> str:
    """``0.123 +- 0.004`` (the standard error when the results have one)."""
    se = res.get("auc_se")
    return f"{res['auc']:.3f}" + (f" +- {se:.3f}" if se is not None else "")


def run(setups: Sequence[Setup], n_test: int | None, seed: int = 0) -> dict[str, Any]:
    """Table 1 for each model on its first ``n_test`` test images (default: see
    :meth:`Setup.n_test`); for the strong models also at the output of the final
    convolution's batch norm (:data:`AFTER_BN`), on the first half of those images."""
    results = {}
    for s in setups:
        n = s.n_test(n_test)
        x, y = test_images(s.data_dir, 0, n)
        log(f"ranking: {s.arch} on {n} test images")
        results[s.arch] = {"title": s.title, **cached_ranking(s, x, y, seed=seed)}
        if s.arch in AFTER_BN:
            half = max(n // 2, 1)
            log(f"ranking: {s.arch} at {AFTER_BN[s.arch]} on {half} test images")
            results[s.arch]["after_bn"] = cached_ranking(
                s, x[:half], y[:half], seed=seed, layer=AFTER_BN[s.arch]
            )
    return results


def cached_ranking(
    setup: Setup, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, layer: str | None = None
) -> dict[str, Any]:
    """:func:`run_ranking`, its result cached by model weights, layer, image count and seed
    (the first ``len(x)`` test images)."""
    layer = layer or setup.table("train").layer
    fp = model_fingerprint(setup.model)[:12]
    path = cache_dir() / "paper" / "ranking" / f"{setup.arch}-{fp}-{layer}-{len(x)}-{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = run_ranking(setup, x, y, seed=seed, layer=layer)
    save_json(path, out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run Table 1, save the results and the figure, print the section."""
    args = parse(arg_parser(__doc__.splitlines()[0]), argv)
    setups = [load_setup(a, args.data_dir) for a in args.archs]
    results = store("ranking", run(setups, args.n_test, args.seed))
    plot(results)
    print(markdown(results))


if __name__ == "__main__":
    main()
