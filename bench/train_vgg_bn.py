"""Train the benchmark's second strong model, :class:`bench.strong_models.VGGBN`, on the CPU.

    python -m bench.train_vgg_bn [--epochs 20] [--budget-min 600] [--resume]

The same as ``python -m bench.train_strong --arch vgg_bn`` (:mod:`bench.train_strong` trains, to
the same weights as this script did before it moved there), but for where the weights go
(:func:`bench.strong_models.vgg_weights_path`, whatever ``--width``).

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

import sys
from pathlib import Path

from bench import train_strong
from bench.cifar import cache_dir, load_cifar10
from bench.strong_models import vgg_weights_path

# What this module offered before the trainer moved to bench.train_strong.
from bench.train_strong import RESUME_KEYS, accuracy, augment, optimiser  # noqa: F401


def checkpoint_path() -> Path:
    """Where the training state is saved after each epoch (the cache, not committed)."""
    return cache_dir() / "vgg_bn.checkpoint.pt"


def places() -> train_strong.Places:
    """This module's data, weights path and checkpoint (looked up when used: tests patch them)."""
    return train_strong.Places(
        load=lambda split: load_cifar10(split),
        weights=lambda width: vgg_weights_path(),
        checkpoint=lambda: checkpoint_path(),
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--arch" or a.startswith("--arch=") for a in argv):
        raise SystemExit("bench.train_vgg_bn trains the VGG-BN; use bench.train_strong --arch")
    return train_strong.main(["--arch", "vgg_bn", *argv], places())


if __name__ == "__main__":
    raise SystemExit(main())
