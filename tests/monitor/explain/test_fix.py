"""``fix``: a planted distracting patch that a known filter responds to is found and removed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.morphology import dilation
from torch import nn
from torch.utils.data import TensorDataset

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.options import TableOptions
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.explain import fix, most_surprising_filter

SIZE = 40
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
BLUE, RED = (0.1, 0.2, 0.9), (0.9, 0.1, 0.1)
PATCH = (slice(24, 34), slice(22, 32))  # the planted red patch, 10 x 10


class PlantedNet(nn.Module):
    """Hand-set weights. The final conv's filter 0 fires on red, filter 1 on blue, filter 2 on
    brightness; after ReLU and global pooling, class 0 ("blue thing") reads mostly filter 1 and a
    little filter 0; class 1 reads filter 0 very strongly, so a red patch pulls a blue thing to
    class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            colour = torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0], [0.3, 0.3, 0.3]])
            self.conv.weight.copy_(colour[:, :, None, None].expand(3, 3, 3, 3) / 9.0)
            self.conv.bias.copy_(torch.tensor([-1.0, -1.0, 0.0]))
            self.fc.weight.copy_(torch.tensor([[0.2, 1.0, 0.0], [50.0, 0.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0.01]))  # a blank image is class 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def background(rng: np.random.Generator) -> np.ndarray:
    """Light grey with a smooth shading and mild texture, ``[SIZE, SIZE, 3]`` in [0, 1]."""
    shade = np.linspace(0.45, 0.65, SIZE)[None, :, None] + 0.05 * rng.random((1, 1, 3))
    return np.clip(shade + 0.02 * rng.standard_normal((SIZE, SIZE, 3)), 0, 1) * np.ones(
        (SIZE, 1, 1)
    )


def square(img: np.ndarray, top: int, left: int, side: int, colour) -> np.ndarray:
    img = img.copy()
    img[top : top + side, left : left + side] = colour
    return img


def to_input(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def training_set(n: int = 120, seed: int = 0) -> TensorDataset:
    """Class 0: blue squares; class 1: red squares; random sizes and places, no mixtures."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        side = int(rng.integers(10, 17))
        top, left = (int(v) for v in rng.integers(0, SIZE - side, 2))
        colour = BLUE if i % 2 == 0 else RED
        images.append(square(background(rng), top, left, side, colour))
        labels.append(i % 2)
    return TensorDataset(to_input(np.stack(images)), torch.tensor(labels))


@pytest.fixture(scope="module")
def planted():
    model = PlantedNet().eval()
    table = calibrate(
        model,
        training_set(),
        progress=False,
        table=TableOptions(
            class_names=["blue", "red"], data_source={"mean": list(MEAN), "std": list(STD)}
        ),
    )
    rng = np.random.default_rng(7)
    clean = square(background(rng), 5, 5, 13, BLUE)
    img = clean.copy()
    img[PATCH] = RED
    monitor = SurpriseMonitor(model, table)
    yield monitor, to_input(img[None]), to_input(clean[None])
    monitor.close()


def patch_mask() -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    m[PATCH] = True
    return m


def test_the_planted_patch_flips_the_class_and_surprises_the_red_filter(planted):
    monitor, x, clean = planted
    assert int(monitor.model(clean).argmax()) == 0
    assert int(monitor.model(x).argmax()) == 1
    report = monitor.inspect(x, labels=torch.tensor([0]))
    assert most_surprising_filter(report) == (0, "surprise")
    assert bool(report.surprise[0, 0]) and not bool(report.surprise[0, 2])


def test_fix_removes_the_planted_patch(planted):
    monitor, x, _ = planted
    res = monitor.fix(x, 0)
    assert res.fixed and (res.method, res.filter, res.filter_kind) == ("surprise", 0, "surprise")
    assert (res.label, res.prediction, res.fixed_prediction) == (0, 1, 0)
    patch = patch_mask()
    near = dilation(patch.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert (res.mask & patch).sum() >= 0.95 * patch.sum()  # the patch is gone ...
    assert not (res.mask & ~near).any()  # ... and nothing far from it was touched
    want = x.clone()
    want[:, :, torch.from_numpy(res.mask)] = 0.0
    torch.testing.assert_close(res.fixed_image, want)
    assert int(monitor.model(res.fixed_image).argmax()) == 0
    # The reported fix is the smallest one that works, among all attempts of the sweep.
    fixing = [a for a in res.attempts if a.fixed]
    assert min(a.removed_pixels for a in fixing) == int(res.mask.sum())
    assert {a.n_segments for a in res.attempts} == {10, 25, 50, 100}
    assert res.to_dict()["removed_pixels"] == int(res.mask.sum())
    with torch.inference_mode():  # a serving process may call it from inference mode
        again = monitor.fix(x.clone(), 0)
    np.testing.assert_array_equal(again.mask, res.mask)


def test_vanilla_gradients_point_at_the_object_instead(planted):
    """Through every filter, class 0's gradient is largest on the blue object: removing the top
    superpixel never fixes the image, while the surprise-filtered ranking does."""
    monitor, x, _ = planted
    vanilla = fix(monitor, x, 0, method="vanilla", remove=(1,))
    surprise = fix(monitor, x, 0, method="surprise", remove=(1,), n_segments=(10, 25))
    assert vanilla.filter is None and not vanilla.fixed
    assert all(a.prediction == 1 for a in vanilla.attempts)
    assert surprise.fixed


def test_random_ranking_is_seeded_and_fix_refuses_bad_calls(planted):
    monitor, x, clean = planted
    before = monitor.last_report
    a = fix(monitor, x, 0, method="random", seed=3)
    b = fix(monitor, x, 0, method="random", seed=3)
    assert a.attempts == b.attempts and a.filter is None
    with pytest.raises(ValueError, match="already classified as its label"):
        monitor.fix(clean, 0)
    with pytest.raises(ValueError, match="method must be one of"):
        monitor.fix(x, 0, method="lime")
    with pytest.raises(ValueError, match="outside the table's 2 classes"):
        monitor.fix(x, 2)
    with pytest.raises(ValueError, match="one image"):
        monitor.fix(torch.cat([x, x]), 0)
    assert monitor.last_report is before  # fixing does not overwrite the monitor's report
