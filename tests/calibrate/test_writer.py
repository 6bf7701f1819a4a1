"""The calibration writer thread: order, bounded queue, overlap, errors; and calibration with
the statistics on the device (the torch path, here on the CPU) equal to numpy's."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from surprise_monitor.calibrate import builder, calibrate
from surprise_monitor.calibrate.options import RunOptions
from surprise_monitor.calibrate.writer import BatchWriter, PendingBatch
from tests._checks import assert_same_table
from tests._models import TinyCNN, class_dataset


def _batch(i: int) -> PendingBatch:
    alpha = torch.full((2, 3), float(i))
    return PendingBatch.start(alpha, torch.tensor([i, i]), torch.tensor(True), np.array([i, i]))


def test_batches_reach_the_sink_in_order_and_the_queue_is_bounded():
    seen, waiting = [], []
    gate = threading.Event()

    def sink(batch: PendingBatch) -> None:
        gate.wait()
        seen.append(int(batch.indices[0]))

    writer = BatchWriter(sink, depth=2)
    try:
        for i in range(3):  # one in the sink, two waiting
            writer.submit(_batch(i))
        blocked = threading.Thread(target=lambda: (writer.submit(_batch(3)), waiting.append(1)))
        blocked.start()
        time.sleep(0.2)
        assert not waiting  # the fourth waits for room: memory stays bounded
        gate.set()
        blocked.join(5)
        for i in range(4, 20):
            writer.submit(_batch(i))
        writer.drain()
        assert seen == list(range(20))
    finally:
        gate.set()
        writer.close()
    writer.close()  # idempotent


def test_submitting_does_not_wait_for_a_slow_sink():
    """The calibration thread goes on with the next batch while the writer works."""
    writer = BatchWriter(lambda b: time.sleep(0.3), depth=2)
    try:
        start = time.perf_counter()
        writer.submit(_batch(0))
        writer.submit(_batch(1))
        assert time.perf_counter() - start < 0.25
        writer.drain()
        assert time.perf_counter() - start >= 0.6
    finally:
        writer.close()


def test_the_first_error_stops_the_writer_and_is_raised_in_the_caller():
    seen = []

    def sink(batch: PendingBatch) -> None:
        if int(batch.indices[0]) == 2:
            raise ValueError("alpha is not finite for images 2..2")
        seen.append(int(batch.indices[0]))

    writer = BatchWriter(sink, depth=4)
    try:
        # Raised by the next submit once the writer has failed, else by drain (a race).
        with pytest.raises(ValueError, match="alpha is not finite for images 2..2"):
            for i in range(5):
                writer.submit(_batch(i))
            writer.drain()
        assert seen == [0, 1]  # nothing after the failed batch
        with pytest.raises(ValueError, match="not finite"):
            writer.submit(_batch(5))
    finally:
        writer.close()


def test_statistics_on_the_device_give_numpys_table(monkeypatch):
    """The whole calibration with the statistics in torch (on the CPU here, a GPU in
    production) gives the numpy table: percentiles equal, exemplars identical."""
    model = TinyCNN(num_classes=3).eval()
    data = class_dataset(90, 3, seed=4)
    expect = calibrate(model, data, progress=False, run=RunOptions(batch_size=16))
    monkeypatch.setattr(builder, "statistics_device", lambda dev: torch.device("cpu"))
    got = calibrate(model, data, progress=False, run=RunOptions(batch_size=16))
    assert torch.equal(got.quantiles, expect.quantiles)  # -0.0 == 0.0
    got.quantiles = expect.quantiles  # the rest bit for bit
    assert_same_table(got, expect)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_calibration_batch_never_syncs():
    from surprise_monitor.calibrate.alpha import BatchAlpha

    model = TinyCNN(num_classes=3).cuda().eval()
    x, y = (t.cuda() for t in class_dataset(8, 3).tensors)
    alpha = BatchAlpha(model, None, "logit", torch.device("cuda"), "auto", amp=False,
                       inference_mode=True)  # fmt: skip
    try:
        first = alpha(x, y, np.arange(8))  # layer choice, compilation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = alpha.compute(x, y, np.arange(8))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        pending.wait()
        np.testing.assert_array_equal(alpha.check(pending), first)
    finally:
        alpha.close()
