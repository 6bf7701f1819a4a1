"""Training images named by a table's data_source: ImageFolder's index order, read safely from a
folder an untrusted (re-signed) table names: no '..', no symlinks out, bounded scans, cached."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torchvision.datasets import ImageFolder

from surprise_monitor.monitor.loading import (
    Preprocessing,
    SourceError,
    source_dataset,
    source_images,
    sources,
)
from surprise_monitor.monitor.loading.sources import folder_index

STEPS = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture()
def tree(photo_folder, tmp_path):
    """An ImageFolder with nested folders and a symlink that stays inside it, beside a folder
    outside it holding a 'secret' image."""
    root = photo_folder({"astronaut": 3, "coffee": 2, "rocket": 2}, seed=4)
    (root / "coffee" / "b-sub").mkdir()
    (root / "coffee" / "b" / "deeper").mkdir(parents=True)
    for i, target in enumerate(["b-sub/x.png", "b/deeper/y.PNG", "b/z.jpg"]):
        os.link(root / "astronaut" / f"{i}.png", root / "coffee" / target)
    (root / "rocket" / "inside").symlink_to(root / "coffee" / "b")  # stays in the root
    (root / "rocket" / "notes.txt").write_text("not an image")
    outside = tmp_path / "outside_SECRET_FOLDER"
    outside.mkdir()
    os.link(root / "coffee" / "0.png", outside / "secret.png")
    return root, outside


def test_the_index_is_imagefolders(tree):
    root, _ = tree
    index = folder_index(root)
    reference = ImageFolder(str(root))
    assert list(index.files) == [p for p, _ in reference.samples]
    assert list(index.targets) == reference.targets and list(index.classes) == reference.classes
    images = source_dataset(STEPS.source(root))
    mine = torch.stack([images[i][0] for i in range(len(images))])
    theirs = ImageFolder(str(root), transform=STEPS.transform())
    torch.testing.assert_close(mine, torch.stack([x for x, _ in theirs]), rtol=0, atol=0)
    assert images.path(3) == reference.samples[3][0]


@pytest.mark.parametrize(
    ("root", "match"),
    [
        ("relative/images", "relative path"),
        ("{root}/../outside_SECRET_FOLDER", r"contains '\.\.'"),
        ("/", "system folder"),
        ("/proc", "system folder"),
        ("/proc/self", "system folder"),
        ("/sys/kernel", "system folder"),
    ],
)
def test_roots_a_table_must_not_name_are_refused_at_once(tree, root, match):
    base, _ = tree
    source = {**STEPS.source(base), "root": root.format(root=base)}
    started = time.monotonic()
    with pytest.raises(SourceError, match=match) as raised:
        source_images(source, [0])
    assert time.monotonic() - started < 2.0
    assert "dataset=" in str(raised.value)  # says what to do instead


def test_symlinks_out_of_the_root_are_refused_not_followed(tree):
    root, outside = tree
    (root / "coffee" / "escape").symlink_to(outside)
    with pytest.raises(SourceError, match="symlink leading out") as raised:
        source_images(STEPS.source(root), [0])
    assert "SECRET" not in str(raised.value)  # no name from the scan leaks into the error
    (root / "coffee" / "escape").unlink()
    (root / "astronaut" / "link.png").symlink_to(outside / "secret.png")  # a file, too
    with pytest.raises(SourceError, match="symlink leading out"):
        folder_index(root)
    trusted = folder_index(root, trusted=True)  # the caller's own folder: followed
    assert str(root / "astronaut" / "link.png") in trusted.files


def test_loops_and_huge_trees_are_bounded(tree, tmp_path):
    root, _ = tree
    (root / "coffee" / "b" / "loop").symlink_to(root / "coffee")
    started = time.monotonic()
    with pytest.raises(SourceError, match="symlink loop"):
        folder_index(root)
    big = tmp_path / "big"
    for c in range(3):
        (big / f"class_SECRET_{c}").mkdir(parents=True)
        for i in range(200):
            (big / f"class_SECRET_{c}" / f"{i}.png").touch()
    with pytest.raises(SourceError, match="too large to index") as raised:
        folder_index(big, max_entries=100)
    assert "SECRET" not in str(raised.value)
    with pytest.raises(SourceError, match="too large to index"):
        folder_index(big, max_seconds=0.0)
    assert time.monotonic() - started < 10.0


def test_the_index_is_cached(tree, monkeypatch):
    root, _ = tree
    source = STEPS.source(root)
    source_images(source, [0])
    calls = []
    real = os.scandir
    monkeypatch.setattr(sources.os, "scandir", lambda p: calls.append(p) or real(p))
    for i in range(3):
        source_images(source, [i])
    assert calls == []  # one scan per process and root


def test_a_file_swapped_for_a_symlink_after_the_scan_is_refused(tree):
    root, outside = tree
    images = source_dataset(STEPS.source(root))
    victim = images.path(0)
    os.unlink(victim)
    os.symlink(outside / "secret.png", victim)
    with pytest.raises(SourceError, match="outside"):
        images[0]
