"""Train the benchmark's second strong model, :class:`bench.strong_models.VGGBN`, on the CPU.

    python -m bench.train_vgg_bn [--epochs 20] [--budget-min 600]

Recipe (what produced the cached weights): all 50,000 images of ``cifar10_train.npz``; random
crops with 4-pixel reflection padding and horizontal flips per image; SGD with Nesterov momentum
0.9, weight decay 5e-4 on conv / linear weights only, one-cycle learning rate (peak 0.2,
25% warm-up, batch 256), label smoothing 0.1, 20 epochs; bf16 autocast on the CPU, one thread
(about 2 h 15 min on a shared 2-core EPYC). Test accuracy on test images 0..4,999 and
5,000..9,999 is written to the JSON beside the float32 safetensors weights. The time budget stops
training early (the schedule is then unfinished: rerun with fewer epochs instead).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import nn

from bench.cifar import load_cifar10, to_tensor
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


def train(args: argparse.Namespace) -> dict:
    """Train, save the weights atomically, return the record written beside them."""
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
    start, log = time.time(), []
    for epoch in range(args.epochs):
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
    record = train(ap.parse_args(argv))
    print(json.dumps({k: v for k, v in record.items() if k != "log"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
