"""Train one of the benchmark's CIFAR-10 models of :mod:`bench.strong_models` on the CPU.

    OMP_NUM_THREADS=1 python -m bench.train_strong --arch vgg_bn|vgg_plain|mobilenet \\
        [--epochs 20] [--budget-min 600] [--resume] [--lr ...] [--width ...] [--batch 256] \\
        [--seed 0] > log 2>&1

Recipe, the same for every architecture but for the entries of :data:`RECIPES`: all 50,000 images
of ``cifar10_train.npz``; random crops with 4-pixel reflection padding and horizontal flips per
image; SGD with Nesterov momentum 0.9, weight decay 5e-4 on conv / linear weights only, one-cycle
learning rate (25% warm-up from a tenth of the peak, annealed to 1/2000 of it), batch 256, label
smoothing 0.1, 20 epochs; bf16 autocast on the CPU, one thread. Per architecture (:data:`RECIPES`):

- ``vgg_bn`` (:class:`~bench.strong_models.VGGBN`, width 48): peak learning rate 0.2, no gradient
  clipping (what :mod:`bench.train_vgg_bn` ran: 36 min, 89% test accuracy).
- ``vgg_plain`` (:class:`~bench.strong_models.VGGPlain`, width 48): peak 0.05 (without batch
  norm a VGG needs a lower rate than the VGG-BN's 0.2) and the gradient norm clipped at 2.0 (a
  guard against spikes: early in training it is 0.6-3 on batches of 64).
- ``mobilenet`` (:class:`~bench.strong_models.MobileNetCifar`, width 16): peak 0.1 (MobileNetV2's
  usual CIFAR rate), no clipping.

The weights (float32 safetensors) go to :func:`bench.strong_models.weights_path` (``bench/weights/
cifar10_{arch}_w{width}.safetensors``), with the record beside them (``.json``: arguments, the
clipping, per-epoch test accuracy on images 0..4,999 and mean training loss, test accuracy on test
images 0..4,999 and 5,000..9,999, minutes); each epoch prints one JSON line (flushed, for a log
file). The time budget stops training early (the schedule is then unfinished: rerun with fewer
epochs instead). After every epoch the whole training state (weights, optimiser, schedule, random
generator, log) is saved atomically in the cache (``{arch}.checkpoint.pt`` under
:func:`bench.cifar.cache_dir`: loaded with ``weights_only=True``); ``--resume`` continues from it,
to the same weights as one uninterrupted run, and refuses a checkpoint made with other settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.cifar import CifarSplit, cache_dir, load_cifar10, to_tensor
from bench.strong_models import (
    ARCHITECTURES,
    MOBILENET_WIDTH,
    VGG_PLAIN_WIDTH,
    VGG_WIDTH,
    weights_path,
)

#: Per-architecture defaults: peak learning rate, width, gradient-norm clipping (``None``: none).
RECIPES: dict[str, dict] = {
    "vgg_bn": {"lr": 0.2, "width": VGG_WIDTH, "clip": None},
    "vgg_plain": {"lr": 0.05, "width": VGG_PLAIN_WIDTH, "clip": 2.0},
    "mobilenet": {"lr": 0.1, "width": MOBILENET_WIDTH, "clip": None},
}
#: The settings a checkpoint must share with the run that resumes it.
RESUME_KEYS = ("epochs", "width", "batch", "lr", "seed")
#: The columns of the per-epoch log (in the checkpoint as a float64 tensor).
LOG_KEYS = ("epoch", "test_0_5000", "minutes", "train_loss")


@dataclass(frozen=True)
class Places:
    """Where a run reads its data and writes its weights and checkpoint (the callables are
    looked up when called, so a test can patch the functions they call)."""

    load: Callable[[str], CifarSplit]  # split name -> the split
    weights: Callable[[int], Path]  # width -> the safetensors path (the record beside it)
    checkpoint: Callable[[], Path]


def checkpoint_path(arch: str) -> Path:
    """Where the training state of ``arch`` is saved after each epoch (the cache, not
    committed)."""
    return cache_dir() / f"{arch}.checkpoint.pt"


def default_places(arch: str) -> Places:
    """The data folder, ``bench/weights/`` and the cache."""
    return Places(
        load=lambda split: load_cifar10(split),
        weights=lambda width: weights_path(arch, width),
        checkpoint=lambda: checkpoint_path(arch),
    )


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random 32x32 crop of the 4-pixel reflection-padded image, flipped half the time."""
    b = x.shape[0]
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (b,), generator=gen).tolist()
    dy = torch.randint(0, 9, (b,), generator=gen).tolist()
    flip = (torch.rand(b, generator=gen) < 0.5).tolist()
    out = torch.empty_like(x)
    for i in range(b):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on normalised images."""
    model.eval()
    hits = sum(int((model(x[s : s + 500]).argmax(1) == y[s : s + 500]).sum())
               for s in range(0, len(x), 500))  # fmt: skip
    return hits / len(x)


def optimiser(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD + Nesterov; weight decay on the conv / linear weights only."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def schedule(
    opt: torch.optim.Optimizer, lr: float, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.OneCycleLR:
    """One cycle: 25% warm-up from ``lr / 10`` to ``lr``, then annealed to ``lr / 2000``."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, div_factor=10, final_div_factor=200,
    )  # fmt: skip


def train_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
    data: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator, batch: int,
    clip: float | None = None,
) -> float:  # fmt: skip
    """One epoch over the training images ``data`` (normalised images, labels) in the order
    ``gen`` draws, augmented, under bf16 autocast; the mean training loss."""
    xtr, ytr = data
    model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    perm = torch.randperm(len(xtr), generator=gen)
    total, steps = 0.0, 0
    for s in range(0, len(xtr), batch):
        idx = perm[s : s + batch]
        xb = augment(xtr[idx], gen).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(xb), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        total, steps = total + float(loss.detach()), steps + 1
    return total / max(steps, 1)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write the training state atomically."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(args: argparse.Namespace, path: Path) -> dict | None:
    """The saved training state when ``--resume`` and one exists (``SystemExit`` when it was
    made with other settings); else ``None``."""
    if not args.resume or not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    theirs = dict(zip(RESUME_KEYS, state["settings"].tolist(), strict=True))
    ours = {k: float(getattr(args, k)) for k in RESUME_KEYS}
    if theirs != ours:
        raise SystemExit(f"--resume: {path} was made with {theirs}, not {ours}")
    return state


def _log_rows(log: torch.Tensor) -> list[dict]:
    """The per-epoch log of a checkpoint (rows of :data:`LOG_KEYS`; a checkpoint of the first
    VGG-BN script has no training loss)."""
    rows = [{k: v for k, v in zip(LOG_KEYS, row, strict=False) if not math.isnan(v)}
            for row in log.tolist()]  # fmt: skip
    return [{**r, "epoch": int(r["epoch"])} for r in rows]


def _checkpoint_state(
    model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator, log: list[dict], args: argparse.Namespace,
) -> dict:  # fmt: skip
    """The training state saved after an epoch: tensors and plain containers only (loadable with
    ``weights_only=True``)."""
    return {
        "model": model.state_dict(), "optimiser": opt.state_dict(),
        "schedule": sched.state_dict(), "generator": gen.get_state(),
        "log": torch.tensor([[r.get(k, math.nan) for k in LOG_KEYS] for r in log],
                            dtype=torch.float64),
        "settings": torch.tensor([float(getattr(args, k)) for k in RESUME_KEYS],
                                 dtype=torch.float64),
    }  # fmt: skip


def train(args: argparse.Namespace, places: Places | None = None) -> dict:
    """Train (from the checkpoint with ``--resume``), save the weights atomically, return the
    record written beside them."""
    places = places or default_places(args.arch)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_split, test_split = places.load("train"), places.load("test")
    xtr, ytr = to_tensor(train_split.images), torch.from_numpy(train_split.labels)
    xte, yte = to_tensor(test_split.images), torch.from_numpy(test_split.labels)
    model = ARCHITECTURES[args.arch](args.width).to(memory_format=torch.channels_last)
    opt = optimiser(model, args.lr)
    sched = schedule(opt, args.lr, args.epochs, math.ceil(len(xtr) / args.batch))
    clip = RECIPES[args.arch]["clip"]
    start, log, first = time.time(), [], 0
    print(f"{args.arch}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{vars(args)}, clip {clip}", flush=True)  # fmt: skip
    state = load_checkpoint(args, places.checkpoint())
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimiser"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        log = _log_rows(state["log"])
        first = len(log)
        start -= 60 * (log[-1]["minutes"] if log else 0.0)
        print(f"resumed after epoch {first}", flush=True)
    for epoch in range(first, args.epochs):
        train_loss = train_epoch(model, opt, sched, (xtr, ytr), gen, args.batch, clip)
        minutes = (time.time() - start) / 60
        log.append({"epoch": epoch + 1, "test_0_5000": accuracy(model, xte[:5000], yte[:5000]),
                    "minutes": round(minutes, 1), "train_loss": round(train_loss, 4)})  # fmt: skip
        print(json.dumps(log[-1]), flush=True)
        save_checkpoint(_checkpoint_state(model, opt, sched, gen, log, args), places.checkpoint())
        if minutes > args.budget_min and epoch + 1 < args.epochs:
            print("time budget spent: stopping before the schedule ended", flush=True)
            break
    model = model.to(memory_format=torch.contiguous_format).eval()
    record = {
        "architecture": f"bench.strong_models.{type(model).__name__}(width={args.width})",
        "epochs_done": len(log), "args": vars(args), "clip_grad_norm": clip, "log": log,
        "test_accuracy_0_5000": accuracy(model, xte[:5000], yte[:5000]),
        "test_accuracy_5000_10000": accuracy(model, xte[5000:], yte[5000:]),
        "minutes": round((time.time() - start) / 60, 1),
    }  # fmt: skip
    save(model, record, places.weights(args.width))
    return record


def save(model: nn.Module, record: dict, path: Path) -> None:
    """Write the weights (float32 safetensors) to ``path`` and the record beside them
    (``.json``), each atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    meta = path.with_suffix(".json")
    tmp_meta = meta.with_suffix(f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(record, indent=1))
    os.replace(tmp_meta, meta)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring), ``--lr`` and ``--width`` defaulting to the
    architecture's :data:`RECIPES` entry."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=tuple(RECIPES), required=True)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="peak; default: the recipe's")
    ap.add_argument("--budget-min", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint of an interrupted run")  # fmt: skip
    args = ap.parse_args(argv)
    for key in ("width", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, RECIPES[args.arch][key])
    return args


def main(argv: list[str] | None = None, places: Places | None = None) -> int:
    """Command line: see the module docstring."""
    record = train(parse_args(sys.argv[1:] if argv is None else argv), places)
    print(json.dumps({k: v for k, v in record.items() if k != "log"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
