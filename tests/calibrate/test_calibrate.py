"""calibrate() end to end: alpha of every image, exact statistics, exemplars, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from surprise_monitor.calibrate import DEFAULT_LEVELS, calibrate, model_fingerprint
from surprise_monitor.calibrate.options import RunOptions, TableOptions
from tests._checks import autograd_alpha, spilled_alpha
from tests._models import TinyCNN, class_dataset, seeded


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = seeded(TinyCNN(num_classes=3))
    data = class_dataset(50, 3)
    spill = tmp_path_factory.mktemp("spill")
    loader = DataLoader(data, batch_size=8, shuffle=False)
    table = calibrate(
        model, loader, progress=False, table=TableOptions(top_k=6), run=RunOptions(spill_dir=spill)
    )
    return model, data, spill, table


def test_table_layout(setup):
    model, data, _, table = setup
    assert table.layer == "features"  # the map the head reads: the block, after its ReLU
    assert table.layer_reason.startswith("the feature map the classifier head reads: ")
    assert table.num_classes == 3 and table.num_filters == 16
    assert table.counts.tolist() == [17, 17, 16]
    assert table.input_shape == (3, 8, 8)
    assert table.model_fingerprint == model_fingerprint(model)
    assert set(DEFAULT_LEVELS) <= set(table.levels.tolist())
    assert table.class_names == ["0", "1", "2"]


def test_spilled_alpha_is_each_images_alpha_for_its_true_label(setup):
    model, data, spill, table = setup
    x, y = data.tensors
    oracle = autograd_alpha(model, table.layer, x, y).numpy()
    for c in range(3):
        stored = np.asarray(spilled_alpha(spill, c, 16))
        np.testing.assert_allclose(stored, oracle[(y == c).numpy()], rtol=1e-5, atol=1e-7)


def test_statistics_equal_numpy_on_stored_alpha(setup):
    _, data, spill, table = setup
    _, y = data.tensors
    levels = table.levels.numpy()
    for c in range(3):
        a = np.asarray(spilled_alpha(spill, c, 16))
        np.testing.assert_array_equal(
            table.quantiles[c].numpy(), np.percentile(a, levels, axis=0).T.astype(np.float32)
        )
        np.testing.assert_allclose(table.mean[c].numpy(), a.astype(np.float64).mean(0), rtol=1e-6)
        betas = (a.astype(np.float64) - a.astype(np.float64).mean(0)).mean(1)
        np.testing.assert_allclose(
            table.beta_quantiles[c].numpy(),
            np.percentile(betas, table.beta_levels.numpy()),
            atol=1e-6,
        )
        idx = np.nonzero((y == c).numpy())[0]
        for n in (0, 7, 15):
            best = idx[np.argsort(-a[:, n], kind="stable")[:6]]
            assert table.top_indices[c, n].tolist() == best.tolist()


def test_explicit_indices_and_shuffling():
    model = seeded(TinyCNN(num_classes=2))
    data = class_dataset(12, 2)

    class WithIndex(Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            x, y = data[i]
            return x, y, i

    shuffled = DataLoader(data, batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffles"):
        calibrate(model, shuffled, progress=False)
    backwards = DataLoader(data, batch_sampler=[[11, 10, 9], [8, 7, 6, 5, 4, 3, 2, 1, 0]])
    with pytest.raises(ValueError, match="custom sampler"):
        calibrate(model, backwards, progress=False)
    g = torch.Generator().manual_seed(0)
    with_index = DataLoader(WithIndex(), batch_size=4, shuffle=True, generator=g)
    a = calibrate(model, with_index, progress=False, table=TableOptions(top_k=3))
    b = calibrate(
        model, data, progress=False, table=TableOptions(top_k=3), run=RunOptions(batch_size=5)
    )
    assert torch.equal(a.top_indices, b.top_indices)
    torch.testing.assert_close(a.quantiles, b.quantiles)


def test_bad_inputs_are_named():
    model = seeded(TinyCNN(num_classes=2))
    x, y = class_dataset(6, 2).tensors
    with pytest.raises(ValueError, match="outside the model's 2 classes"):
        calibrate(model, torch.utils.data.TensorDataset(x, y + 1), progress=False)
    x_nan = x.clone()
    x_nan[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        calibrate(model, torch.utils.data.TensorDataset(x_nan, y), progress=False)
    with pytest.raises(ValueError, match="eval mode"):
        calibrate(TinyCNN(num_classes=2).train(), class_dataset(6, 2), progress=False)
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, torch.utils.data.TensorDataset(x[:0], y[:0]), progress=False)
    with pytest.raises(ValueError, match="3 class names for a model with 2 classes"):
        calibrate(
            model,
            class_dataset(6, 2),
            progress=False,
            table=TableOptions(class_names=["a", "b", "c"]),
        )


OLD_KEYWORDS = {
    "score": "table=TableOptions(class_output=...)",
    "class_output": "table=TableOptions(class_output=...)",
    "levels": "table=TableOptions(levels=...)",
    "beta_levels": "table=TableOptions(beta_levels=...)",
    "top_k": "table=TableOptions(top_k=...)",
    "class_names": "table=TableOptions(class_names=...)",
    "data_source": "table=TableOptions(data_source=...)",
    "heldout_source": "table=TableOptions(heldout_source=...)",
    "batch_size": "run=RunOptions(batch_size=...)",
    "num_workers": "run=RunOptions(num_workers=...)",
    "spill_dir": "run=RunOptions(spill_dir=...)",
    "memory_budget_bytes": "run=RunOptions(memory_budget_bytes=...)",
    "backend": "run=RunOptions(backend=...)",
    "amp": "run=RunOptions(amp=...)",
    "approximate": "run=RunOptions(approximate=...)",
    "inference_mode": "run=RunOptions(inference_mode=...)",
    "merge": "run=RunOptions(merge=...)",
    "checkpoint_dir": "checkpoint=CheckpointOptions(dir=...)",
    "resume": "checkpoint=CheckpointOptions(dir=..., resume=...)",
    "checkpoint_every": "checkpoint=CheckpointOptions(dir=..., every=...)",
    "profile_layers": "alarm=AlarmOptions(profile_layers=...)",
    "head_layer": "alarm=AlarmOptions(head_layer=...)",
    "reference_images": "alarm=AlarmOptions(reference_images=...)",
}


@pytest.mark.parametrize(("old", "new"), sorted(OLD_KEYWORDS.items()))
def test_the_keywords_of_0_1_name_their_new_spelling(old, new):
    model = seeded(TinyCNN(num_classes=2))
    with pytest.raises(TypeError) as err:
        calibrate(model, class_dataset(4, 2), progress=False, **{old: None})
    assert str(err.value) == f"calibrate(): {old}= is now {new}"


def test_calibrate_takes_at_most_ten_parameters_and_the_groups_whole():
    import inspect

    from surprise_monitor.calibrate.options import AlarmOptions, CheckpointOptions

    params = inspect.signature(calibrate).parameters
    assert list(params) == [
        "model", "data", "heldout", "layer", "device", "progress", "table", "run", "checkpoint",
        "alarm",
    ]  # fmt: skip
    assert params["table"].annotation == "TableOptions | None"
    model, data = seeded(TinyCNN(num_classes=2)), class_dataset(12, 2)
    with pytest.raises(TypeError, match="run= takes RunOptions, got TableOptions"):
        calibrate(model, data, run=TableOptions())
    with pytest.raises(TypeError, match="checkpoint= takes CheckpointOptions, got str"):
        calibrate(model, data, checkpoint="ckpt")
    with pytest.raises(TypeError, match="alarm must be AlarmOptions or a bool"):
        calibrate(model, data, alarm="none")
    table = calibrate(
        model, data, progress=False, table=TableOptions(top_k=2, class_names=["a", "b"]),
        run=RunOptions(batch_size=5), alarm=AlarmOptions(enabled=False),
    )  # fmt: skip
    assert table.top_k == 2 and table.class_names == ["a", "b"] and table.alarm is None
    bare_alarm = AlarmOptions(
        profile_layers="none", head_layer="none", score="gated-stage-energy-v1"
    )
    with pytest.raises(ValueError, match="needs profile or head layers.*fisher-profile-v2"):
        calibrate(model, data, progress=False, alarm=bare_alarm)
    bare_alarm = AlarmOptions(profile_layers="none", head_layer="none")  # auto: the Fisher score
    with_alarm = calibrate(model, data, progress=False, alarm=bare_alarm)
    assert with_alarm.alarm.score == "fisher-profile-v2"
    assert with_alarm.alarm.profile_layers == () and with_alarm.alarm.head_layer == ""
    torch.testing.assert_close(with_alarm.quantiles, table.quantiles)  # batch size: no effect
    assert CheckpointOptions("d").every == 100  # the defaults live in the groups only
