"""Train the benchmark's second strong model, :class:`bench.strong_models.VGGBN`, on the CPU.

    python -m bench.train_vgg_bn [--epochs 20] [--budget-min 600] [--resume]

Recipe (what produced the cached weights): all 50,000 images of ``cifar10_train.npz``; random crops
with 4-pixel reflection padding and horizontal flips per image; SGD with Nesterov momentum 0.9,
weight decay 5e-4 on conv / linear weights only, one-cycle learning rate (peak 0.2, 25% warm-up,
batch 256), label smoothing 0.1, 20 epochs; bf16 autocast on the CPU, one thread (36 min on the
2-core x86_64 machine of 2026-12-06; earlier 2 h 15 min on a busier 2-core EPYC). The weights and
their record are committed in ``bench/weights/`` (its README). Test accuracy on test images 0..4,999
and 5,000..9,999 is written to the JSON beside the float32 safetensors weights. The time budget
stops training early (the schedule is then unfinished: rerun with fewer epochs instead). After every
epoch the whole training state (weights, optimiser, schedule, random generator, log) is saved
atomically in the cache (``vgg_bn.checkpoint.pt`` under :func:`bench.cifar.cache_dir`: loaded with
``weights_only=True``); ``--resume`` continues from it, to the same weights as one uninterrupted
run, and refuses a checkpoint made with other settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from bench.cifar import cache_dir, load_cifar10, to_tensor
from bench.strong_models import VGG_WIDTH, VGGBN, vgg_weights_path


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


#: The settings a checkpoint must share with the run that resumes it.
RESUME_KEYS = ("epochs", "width", "batch", "lr", "seed")


def checkpoint_path() -> Path:
    """Where the training state is saved after each epoch (the cache, not committed)."""
    return cache_dir() / "vgg_bn.checkpoint.pt"


def save_checkpoint(state: dict) -> None:
    """Write the training state atomically."""
    path = checkpoint_path()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(args: argparse.Namespace) -> dict | None:
    """The saved training state when ``--resume`` and one exists (``SystemExit`` when it was
    made with other settings); else ``None``."""
    path = checkpoint_path()
    if not args.resume or not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    theirs = dict(zip(RESUME_KEYS, state["settings"].tolist(), strict=True))
    ours = {k: float(getattr(args, k)) for k in RESUME_KEYS}
    if theirs != ours:
        raise SystemExit(f"--resume: {path} was made with {theirs}, not {ours}")
    return state


def train(args: argparse.Namespace) -> dict:
    """Train (from the checkpoint with ``--resume``), save the weights atomically, return the
    record written beside them."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_split, test_split = load_cifar10("train"), load_cifar10("test")
    xtr, ytr = to_tensor(train_split.images), torch.from_numpy(train_split.labels)
    xte, yte = to_tensor(test_split.images), torch.from_numpy(test_split.labels)
    model = VGGBN(args.width).to(memory_format=torch.channels_last)
    opt = optimiser(model, args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=math.ceil(len(xtr) / args.batch),
        pct_start=0.25, div_factor=10, final_div_factor=200,
    )  # fmt: skip
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    start, log, first = time.time(), [], 0
    state = load_checkpoint(args)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimiser"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        log = [dict(zip(("epoch", "test_0_5000", "minutes"), row, strict=True))
               for row in state["log"].tolist()]  # fmt: skip
        log = [{**r, "epoch": int(r["epoch"])} for r in log]
        first = len(log)
        start -= 60 * (log[-1]["minutes"] if log else 0.0)
        print(f"resumed after epoch {first}", flush=True)
    for epoch in range(first, args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for s in range(0, len(xtr), args.batch):
            idx = perm[s : s + args.batch]
            xb = augment(xtr[idx], gen).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        minutes = (time.time() - start) / 60
        log.append({"epoch": epoch + 1, "test_0_5000": accuracy(model, xte[:5000], yte[:5000]),
                    "minutes": round(minutes, 1)})  # fmt: skip
        print(json.dumps(log[-1]), flush=True)
        save_checkpoint({
            "model": model.state_dict(), "optimiser": opt.state_dict(),
            "schedule": sched.state_dict(), "generator": gen.get_state(),
            "log": torch.tensor([[r["epoch"], r["test_0_5000"], r["minutes"]] for r in log],
                                dtype=torch.float64),
            "settings": torch.tensor([float(getattr(args, k)) for k in RESUME_KEYS],
                                     dtype=torch.float64),
        })  # fmt: skip
        if minutes > args.budget_min and epoch + 1 < args.epochs:
            print("time budget spent: stopping before the schedule ended", flush=True)
            break
    model = model.to(memory_format=torch.contiguous_format).eval()
    record = {
        "architecture": f"bench.strong_models.VGGBN(width={args.width})",
        "epochs_done": len(log), "args": vars(args), "log": log,
        "test_accuracy_0_5000": accuracy(model, xte[:5000], yte[:5000]),
        "test_accuracy_5000_10000": accuracy(model, xte[5000:], yte[5000:]),
        "minutes": round((time.time() - start) / 60, 1),
    }  # fmt: skip
    save(model, record)
    return record


def save(model: nn.Module, record: dict) -> None:
    """Write the weights (float32 safetensors) and the record, each atomically."""
    from safetensors.torch import save_file

    path = vgg_weights_path()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    meta = path.with_suffix(".json")
    tmp_meta = meta.with_suffix(f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(record, indent=1))
    os.replace(tmp_meta, meta)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=VGG_WIDTH)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--budget-min", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint of an interrupted run")  # fmt: skip
    record = train(ap.parse_args(argv))
    print(json.dumps({k: v for k, v in record.items() if k != "log"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
