"""Requests joined into one monitored call get the answers they would get alone."""

from __future__ import annotations

import pytest
import torch
from fastapi import HTTPException
from torch import nn

from surprise_monitor.integrations.ray_serve.batching import BatchedService, join_runs
from surprise_monitor.monitor import AlarmLog, SurpriseMonitor
from surprise_monitor.serve.app import PredictionService
from surprise_monitor.serve.limits import Limits
from tests._models import heldout_dataset


def _noise(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -5.0 + 9.4 * torch.rand(n, 3, 8, 8, generator=g)


def _items() -> list[tuple]:
    x = heldout_dataset(12, start=8000).tensors[0]
    return [
        (torch.cat([x[:1], _noise(1, 0)]), None, "a"),
        (x[2:5], None, "b"),
        (x[5:7], [0, 2], "c"),  # labels: a run of its own
        (torch.cat([_noise(2, 1), x[7:8]]), [1, 1, 0], "d"),
        (x[8:9], None, "e"),
    ]


def test_join_runs_keeps_order_and_never_mixes_labelled_with_unlabelled():
    items = _items()
    assert join_runs(items) == [[0, 1], [2, 3], [4]]
    odd = [(torch.zeros(1, 1, 8, 8), None, "z")]  # another input size: a run of its own
    assert join_runs(items[:2] + odd + items[4:]) == [[0, 1], [2], [3]]


def test_joined_answers_equal_each_request_run_alone(calibrated):
    model, table = calibrated
    items = _items()
    alone_log, joined_log = AlarmLog(), AlarmLog()
    with SurpriseMonitor(model, table, alarm_log=alone_log) as monitor:
        plain = PredictionService(model, monitor, table, Limits())
        alone = [plain.run(*item) for item in items]
    with SurpriseMonitor(model, table, alarm_log=joined_log) as monitor:
        batched = BatchedService(model, monitor, table, Limits(), batched=None)
        joined = batched.run_joined(items)
    assert len(joined) == len(items)
    for (logits, report, rows), (ref, ref_report, ref_rows) in zip(joined, alone, strict=True):
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
        assert rows == ref_rows
        torch.testing.assert_close(report.p_value, ref_report.p_value)
        assert torch.equal(report.alarm, ref_report.alarm)
        assert torch.equal(report.classes, ref_report.classes)  # labels kept per request
    ids = sorted(r.request_id for r in joined_log.recent())
    assert ids == sorted(r.request_id for r in alone_log.recent()) and "a" in ids and "d" in ids


def _refuse_huge(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook: the model cannot run an input holding a value over 1e3."""
    if bool((args[0].abs() > 1e3).any()):
        raise ValueError("value out of range")


def test_a_request_the_model_cannot_run_fails_alone(calibrated):
    model, table = calibrated
    items = _items()[:2]
    items.insert(1, (torch.full((1, 3, 8, 8), 1e4), None, "bad"))
    hook = model.register_forward_pre_hook(_refuse_huge)
    try:
        with SurpriseMonitor(model, table) as monitor:
            service = BatchedService(model, monitor, table, Limits(), batched=None)
            answers = service.run_joined(items)
    finally:
        hook.remove()
    assert isinstance(answers[1], HTTPException) and answers[1].status_code == 400
    assert "value out of range" in answers[1].detail
    for answer, item in zip([answers[0], answers[2]], [items[0], items[2]], strict=True):
        assert answer[0].shape == (len(item[0]), 3)


@pytest.mark.anyio
async def test_answer_async_goes_through_the_batcher(calibrated):
    model, table = calibrated
    calls = []

    async def batched(item):
        calls.append(item)
        return service.run_joined([item])[0]

    with SurpriseMonitor(model, table) as monitor:
        service = BatchedService(model, monitor, table, Limits(), batched=batched)
        body = await service.answer_async(_noise(2, 3), None, True, 3, "req-1")
    assert len(calls) == 1 and calls[0][2] == "req-1"
    assert body["request_id"] == "req-1" and body["alarm"] == [True, True]
    assert len(body["surprise"]) == 2
