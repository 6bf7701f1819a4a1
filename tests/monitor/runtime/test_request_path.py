"""The request path: threads, sampling, async mode, on_alarm callbacks, fail-open."""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from surprise_monitor.monitor import InvalidInputError, SurpriseMonitor
from surprise_monitor.monitor.options import Execution, Sampling
from surprise_monitor.monitor.runtime import AsyncWorker, Sampler
from tests._checks import run_in_threads
from tests._models import mixed_inputs


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def _assert_same_rows(report, rows, reference) -> None:
    """``report`` row j equals row ``rows[j]`` of ``reference`` (a serial inspect)."""
    rows = torch.as_tensor(rows)
    torch.testing.assert_close(report.alpha, reference.alpha[rows], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(report.beta, reference.beta[rows], rtol=1e-5, atol=1e-7)
    assert torch.equal(report.classes, reference.classes[rows])
    assert torch.equal(report.surprise, reference.surprise[rows])
    assert torch.equal(report.expectation, reference.expectation[rows])
    assert torch.equal(report.low_beta, reference.low_beta[rows])


def test_threads_match_serial_results_and_counters_add_up(calibrated):
    model, table = calibrated
    threads, calls = 8, 6
    batches = [[mixed_inputs(1 + (t + c) % 4, seed=100 * t + c) for c in range(calls)]
               for t in range(threads)]  # fmt: skip
    with SurpriseMonitor(model, table) as plain:
        serial = [[plain.inspect(x) for x in row] for row in batches]
    registry = CollectorRegistry()
    flagged_seen: list[int] = []
    lock = threading.Lock()

    def on_alarm(report):
        assert len(report) == 1 and bool(report.alarm[0])
        with lock:
            flagged_seen.append(1)

    results: dict[tuple[int, int], object] = {}
    barrier = threading.Barrier(threads)
    with SurpriseMonitor(model, table, metrics=registry, on_alarm=on_alarm) as monitor:

        def work(t: int) -> None:
            barrier.wait()
            for c, x in enumerate(batches[t]):
                results[(t, c)] = monitor.run(x)

        run_in_threads(work, threads, timeout=60)
        for t in range(threads):
            for c in range(calls):
                res, ref = results[(t, c)], serial[t][c]
                with torch.no_grad():
                    assert torch.equal(res.output, model(batches[t][c]))
                _assert_same_rows(res.report, range(len(ref)), ref)
        reports = [r for row in serial for r in row]
        n = sum(len(r) for r in reports)
        assert monitor.failures == {}
        assert _value(registry, "surprise_monitor_inputs_total") == n
        assert _value(registry, "surprise_monitor_inputs_monitored_total") == n
        expected = {
            "surprise": sum(int(r.surprise.any(1).sum()) for r in reports),
            "expectation": sum(int(r.expectation.any(1).sum()) for r in reports),
            "low_beta": sum(int(r.low_beta.sum()) for r in reports),
        }
        assert expected["low_beta"] > 0 and expected["surprise"] > 0
        for kind, count in expected.items():
            assert _value(registry, "surprise_monitor_inputs_flagged_total", kind=kind) == count
        alarms = sum(int(r.alarm.sum()) for r in reports)
        assert len(flagged_seen) == alarms > 0
        assert _value(registry, "surprise_monitor_inputs_alarmed_total") == alarms
        assert alarms < sum(int(r.flagged.sum()) for r in reports)  # on alarms, not on flags
        assert _value(registry, "surprise_monitor_beta_count") == n
        betas = torch.cat([r.beta for r in reports])
        for bound in monitor.metrics.beta_buckets:  # cumulative counts per bucket
            got = _value(registry, "surprise_monitor_beta_bucket", le=str(bound))
            assert got == int((betas <= bound).sum()), bound
        assert _value(registry, "surprise_monitor_added_latency_seconds_count") == threads * calls


def test_sample_every_k_monitors_exactly_one_in_k(calibrated):
    model, table = calibrated
    registry = CollectorRegistry()
    xs = [mixed_inputs(4, seed=s) for s in range(10)]
    with SurpriseMonitor(model, table, metrics=registry, sampling=Sampling(every=3)) as monitor:
        judged = 0
        for i, x in enumerate(xs):
            res = monitor.run(x)
            with torch.no_grad():
                assert torch.equal(res.output, model(x))  # every input is still answered
            positions = [4 * i + r for r in range(4)]
            expected_rows = [r for r, p in enumerate(positions) if p % 3 == 0]
            assert res.rows.tolist() == expected_rows
            if expected_rows:
                _assert_same_rows(res.report, range(len(expected_rows)),
                                  monitor.inspect(x[expected_rows]))  # fmt: skip
            else:
                assert res.report is None
            judged += len(expected_rows)
        assert judged == math.ceil(40 / 3) == 14
        assert _value(registry, "surprise_monitor_inputs_total") == 40
        assert _value(registry, "surprise_monitor_inputs_monitored_total") == 14
        skipped = _value(registry, "surprise_monitor_inputs_skipped_total", reason="sampled_out")
        assert skipped == 26


def test_sample_fraction_is_seeded_and_near_the_fraction():
    picks = [Sampler(Sampling(fraction=0.25, seed=3)).select(400) for _ in range(2)]
    assert torch.equal(picks[0], picks[1])
    assert 60 <= int(picks[0].sum()) <= 140  # Binomial(400, 0.25): mean 100, sd 8.7
    assert not torch.equal(picks[0], Sampler(Sampling(fraction=0.25, seed=4)).select(400))
    every_third = Sampler(Sampling(every=3))
    assert every_third.select(4).tolist() == [True, False, False, True]
    assert every_third.select(3).tolist() == [False, False, True]  # counted across calls
    assert Sampler().takes_all and Sampler().select(3).all()
    with pytest.raises(ValueError, match="not both"):
        Sampling(every=2, fraction=0.5)
    with pytest.raises(ValueError, match="sampling.every must be an integer >= 1"):
        Sampling(every=0)
    with pytest.raises(ValueError, match=r"sampling.fraction must be in \(0, 1\]"):
        Sampling(fraction=0.0)
    with pytest.raises(TypeError, match="Sampler takes a Sampling"):
        Sampler(3)  # type: ignore[arg-type]


def test_async_mode_judges_a_copy_off_the_request_path(calibrated):
    model, table = calibrated
    registry = CollectorRegistry()
    got: list[tuple[str, object]] = []
    x = mixed_inputs(8)
    original = x.clone()
    reference = None
    with SurpriseMonitor(model, table) as plain:
        reference = plain.inspect(original)
    with SurpriseMonitor(
        model, table, metrics=registry, sampling=Sampling(mode="async", queue_size=4),
        on_alarm=lambda r: got.append((threading.current_thread().name, r)),
    ) as monitor:  # fmt: skip
        res = monitor.run(x)
        x.zero_()  # the caller reuses its buffer at once: the worker has its own copy
        with torch.no_grad():
            assert torch.equal(res.output, model(original))
        assert res.report is None
        assert monitor.flush(30)
        assert _value(registry, "surprise_monitor_inputs_monitored_total") == 8
        assert monitor.last_report is not None
        _assert_same_rows(monitor.last_report, range(8), reference)
    flagged = torch.nonzero(reference.alarm).flatten().tolist()
    assert len(got) == len(flagged) > 0
    for (thread, one), row in zip(got, flagged, strict=True):
        assert thread == "surprise-monitor-worker"
        _assert_same_rows(one, [0], reference.select([row]))


def test_async_full_queue_drops_and_counts_without_blocking(calibrated):
    model, table = calibrated
    registry = CollectorRegistry()
    entered, release = threading.Event(), threading.Event()

    def slow(report):
        entered.set()
        release.wait(30)

    x = torch.zeros(1, 3, 8, 8)  # a blank image: it alarms, so the callback runs
    monitor = SurpriseMonitor(
        model,
        table,
        metrics=registry,
        sampling=Sampling(mode="async", queue_size=2),
        on_alarm=slow,
    )
    try:
        monitor(x)
        assert entered.wait(30)  # the worker holds batch 1 in the callback
        started = time.perf_counter()
        for _ in range(9):
            monitor(x)
        assert time.perf_counter() - started < 5.0  # never waited for the worker
        assert monitor.dropped == 7
        assert _value(registry, "surprise_monitor_queue_depth") == 2
        release.set()
        assert monitor.flush(30)
    finally:
        release.set()
        monitor.close()
    assert _value(registry, "surprise_monitor_inputs_total") == 0  # close() removed the series
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_async_counts_add_up_after_flush(calibrated):
    model, table = calibrated
    registry = CollectorRegistry()
    with SurpriseMonitor(
        model, table, metrics=registry, sampling=Sampling(every=2, mode="async", queue_size=1)
    ) as monitor:  # fmt: skip
        for s in range(20):
            monitor(mixed_inputs(3, seed=s))
        monitor(torch.full((2, 3, 8, 8), float("nan")))  # a counted skip, never queued
        assert monitor.flush(60)
        total = _value(registry, "surprise_monitor_inputs_total")
        parts = _value(registry, "surprise_monitor_inputs_monitored_total") + sum(
            _value(registry, "surprise_monitor_inputs_skipped_total", reason=r)
            for r in ("sampled_out", "queue_full", "failed")
        )
        assert total == 62 and parts == total
        assert _value(registry, "surprise_monitor_inputs_skipped_total", reason="sampled_out") == 31
        assert _value(registry, "surprise_monitor_inputs_skipped_total", reason="failed") == 1
        assert _value(registry, "surprise_monitor_failures_total", kind="invalid_input") == 1
        dropped = _value(registry, "surprise_monitor_inputs_skipped_total", reason="queue_full")
        assert dropped == monitor.dropped


def test_async_worker_flush_and_close_drain_the_queue():
    done: list[int] = []
    gate = threading.Event()

    def handle(i):
        gate.wait(10)
        done.append(i)

    worker = AsyncWorker(handle, maxsize=3)
    assert [worker.submit(i) for i in range(5)].count(True) >= 3
    assert not worker.flush(0.05)  # blocked in the handler
    gate.set()
    assert worker.flush(10)
    assert worker.submit(9)
    worker.close(10)
    assert done[-1] == 9 and not worker.submit(10)
    worker.close()  # idempotent


def test_async_worker_take_hands_over_several_items_in_order():
    handled: list[list[int]] = []
    depths: list[int] = []
    entered, gate = threading.Event(), threading.Event()

    def handle(items):
        entered.set()
        gate.wait(10)
        handled.append(items)

    worker = AsyncWorker(handle, maxsize=8, on_depth=depths.append, take=lambda queued: 3)
    assert worker.submit(0) and entered.wait(10)  # the worker holds [0]
    assert all(worker.submit(i) for i in range(1, 7))
    gate.set()
    assert worker.flush(10)
    assert handled == [[0], [1, 2, 3], [4, 5, 6]] and depths[-3:] == [6, 3, 0]
    worker.close(10)
    broken = AsyncWorker(handled.append, maxsize=4, take=lambda queued: 1 // 0)
    assert broken.submit(7) and broken.flush(10)  # a take that raises: one item at a time
    broken.close(10)
    assert handled[-1] == [7]


class _Recorder:
    """An alarm recorder that keeps ``(request_id, report)`` of each alarm."""

    def __init__(self) -> None:
        self.kept: list[tuple[str | None, object]] = []

    def record(self, report, x, request_id):
        self.kept.append((request_id, report))


def _gated_judge(monkeypatch, judge, fail_after: int | None = None):
    """Spy on ``judge``: the batch size of each judge call, the reports made; the first call
    waits for the returned gate (``entered`` is set once it does); calls after the first
    ``fail_after`` raise in assemble."""
    sizes: list[int] = []
    reports: list[object] = []
    entered, gate = threading.Event(), threading.Event()
    step, assemble = judge.step, judge.assemble

    def gated_step(batch):
        sizes.append(int(batch.x.shape[0]))
        entered.set()
        assert gate.wait(30)
        return step(batch)

    def kept(*args, **kwargs):
        if fail_after is not None and len(sizes) > fail_after:
            raise RuntimeError("coalesced call failed")
        reports.append(assemble(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(judge, "step", gated_step)
    monkeypatch.setattr(judge, "assemble", kept)
    return sizes, reports, entered, gate


def _requests() -> list[tuple[torch.Tensor, object]]:
    """Calls of 1-8 inputs, with and without labels (a tensor or a list), one of another size;
    the blank rows alarm."""
    x = mixed_inputs(24, seed=11)
    other = torch.nn.functional.pad(mixed_inputs(2, seed=12), (0, 1, 0, 1))  # 9 x 9
    return [
        (x[:1], None),  # held by the worker while the rest queue
        (x[1:3], None), (x[3:4], None), (x[4:6], None),  # 5 inputs: one call (judge_batch 6)
        (x[6:8], None),  # would make 7
        (x[8:10], torch.tensor([0, 1])), (x[10:11], [2]),  # labels: not joined with the above
        (other, None),  # another size: alone
        (x[11:14], None), (x[14:15], None),
        (x[15:23], None),  # more than judge_batch: judged alone, whole
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("judge_batch", "expected_sizes"),
    [(6, [1, 5, 2, 3, 2, 4, 8]), (1, [1, 2, 1, 2, 2, 2, 1, 2, 3, 1, 8])],
    ids=["joined", "one-at-a-time"],
)
def test_async_worker_joins_queued_calls_into_fewer_judge_calls(
    calibrated, monkeypatch, judge_batch, expected_sizes
):
    model, table = calibrated
    execution = Execution(strict_input_size=False)
    requests = _requests()
    with SurpriseMonitor(model, table, execution=execution) as plain:
        alone = [plain.inspect(x, labels) for x, labels in requests]
    registry, recorder = CollectorRegistry(), _Recorder()
    sampling = Sampling(mode="async", queue_size=16, judge_batch=judge_batch)
    with SurpriseMonitor(
        model, table, execution=execution, sampling=sampling, metrics=registry,
        alarm_log=recorder,
    ) as monitor:  # fmt: skip
        sizes, reports, entered, gate = _gated_judge(monkeypatch, monitor.judge)
        for i, (x, labels) in enumerate(requests):
            monitor.run(x, labels, request_id=f"req-{i}")
            if i == 0:
                assert entered.wait(30)
        assert _value(registry, "surprise_monitor_queue_depth") == len(requests) - 1
        gate.set()
        assert monitor.flush(60)
        assert _value(registry, "surprise_monitor_queue_depth") == 0
        n = sum(len(x) for x, _ in requests)
        assert sizes == expected_sizes and sum(sizes) == n
        assert _value(registry, "surprise_monitor_inspect_duration_seconds_count") == len(sizes)
        assert _value(registry, "surprise_monitor_inputs_total") == n
        assert _value(registry, "surprise_monitor_inputs_monitored_total") == n
        assert monitor.failures == {} and monitor.dropped == 0
    judged = [reports[c].select([j]) for c in range(len(reports)) for j in range(sizes[c])]
    reference = [r.select([j]) for r in alone for j in range(len(r))]
    for got, ref in zip(judged, reference, strict=True):
        _assert_same_rows(got, [0], ref)
        # float32 products of another batch size: the head distance (an expanded quadratic
        # form) moves by up to ~4e-5 relative, and the learned evidence the table chose reads it
        torch.testing.assert_close(got.score, ref.score, rtol=1e-4, atol=1e-6)
        # the interpolated p-value moves with the score across its gap (~1e-5 here)
        torch.testing.assert_close(got.p_value, ref.p_value, rtol=1e-4, atol=5e-5)
        assert torch.equal(got.alarm, ref.alarm) and got.labels_given == ref.labels_given
    expected = [(f"req-{i}", r.select([j])) for i, r in enumerate(alone)
                for j in torch.nonzero(r.alarm).flatten().tolist()]  # fmt: skip
    assert [rid for rid, _ in recorder.kept] == [rid for rid, _ in expected]
    assert {"req-1", "req-3"} <= {rid for rid, _ in expected}  # two calls' alarms, joined
    for (_, got), (_, ref) in zip(recorder.kept, expected, strict=True):
        torch.testing.assert_close(got.p_value, ref.p_value, rtol=1e-5, atol=1e-6)


def test_a_failed_joined_call_counts_all_its_inputs_failed(calibrated, monkeypatch):
    model, table = calibrated
    registry = CollectorRegistry()
    sampling = Sampling(mode="async", queue_size=8)
    with SurpriseMonitor(model, table, sampling=sampling, metrics=registry) as monitor:
        sizes, _, entered, gate = _gated_judge(monkeypatch, monitor.judge, fail_after=1)
        monitor(mixed_inputs(1))
        assert entered.wait(30)
        for rows in (2, 1, 3):
            monitor(mixed_inputs(rows, seed=rows))
        gate.set()
        assert monitor.flush(60)
        assert sizes == [1, 6]
        assert monitor.failures == {"RuntimeError": 1}
        assert _value(registry, "surprise_monitor_failures_total", kind="internal") == 1
        assert _value(registry, "surprise_monitor_inputs_skipped_total", reason="failed") == 6
        assert _value(registry, "surprise_monitor_inputs_monitored_total") == 1
        assert _value(registry, "surprise_monitor_inputs_total") == 7


def test_async_bad_labels_fail_alone_before_they_are_queued(calibrated):
    model, table = calibrated
    registry = CollectorRegistry()
    sampling = Sampling(mode="async", queue_size=8)
    with SurpriseMonitor(model, table, sampling=sampling, metrics=registry) as monitor:
        monitor(mixed_inputs(2), labels=[0, 1])
        monitor(mixed_inputs(2), labels=[0, 7])  # class 7 of 3: refused, never queued
        monitor(mixed_inputs(2), labels=torch.tensor([2, 1]))
        assert monitor.flush(60)
        assert monitor.failures == {"InvalidInputError": 1}
        assert _value(registry, "surprise_monitor_inputs_skipped_total", reason="failed") == 2
        assert _value(registry, "surprise_monitor_inputs_monitored_total") == 4


@pytest.mark.parametrize(
    ("make", "skipped"),
    [
        (lambda x: x * float("inf"), 3),
        (lambda x: x[:0], 0),
        (lambda x: torch.nn.functional.pad(x, (0, 1, 0, 1)), 3),  # another size: the model runs
    ],
)
def test_bad_inputs_are_counted_skips_and_the_output_is_returned(calibrated, make, skipped):
    model, table = calibrated
    registry = CollectorRegistry()
    x = make(mixed_inputs(3))
    with SurpriseMonitor(model, table, metrics=registry) as monitor:
        res = monitor.run(x)
        with torch.no_grad():
            expected = model(x)
        assert torch.equal(res.output.nan_to_num(), expected.nan_to_num())
        assert res.report is None
        assert sum(monitor.failures.values()) == 1
        assert _value(registry, "surprise_monitor_failures_total", kind="invalid_input") == 1
        assert _value(registry, "surprise_monitor_inputs_skipped_total", reason="failed") == skipped
        with pytest.raises(InvalidInputError):
            monitor.inspect(x)


def test_inputs_the_model_cannot_run_raise_the_models_own_error(calibrated):
    model, table = calibrated
    with SurpriseMonitor(model, table) as monitor:
        for bad in (mixed_inputs(3).to(torch.int64), mixed_inputs(3)[:, :1], mixed_inputs(3)[0]):
            with pytest.raises(RuntimeError):
                monitor(bad)
        assert sum(monitor.failures.values()) == 3  # each also counted as a monitor failure


def test_internal_failure_fails_open_and_logs_once(calibrated, monkeypatch, caplog):
    model, table = calibrated
    registry = CollectorRegistry()
    x = mixed_inputs(4)
    with SurpriseMonitor(model, table, metrics=registry) as monitor:

        def boom(*args, **kwargs):
            raise RuntimeError("kernel exploded")

        monkeypatch.setattr(monitor.judge, "assemble", boom)  # after the model ran
        with caplog.at_level(
            logging.WARNING, logger="surprise_monitor.monitor.runtime.request_path"
        ):
            outs = [monitor(x) for _ in range(3)]
        with torch.no_grad():
            assert all(torch.equal(o, model(x)) for o in outs)
        assert monitor.failures == {"RuntimeError": 3}
        assert _value(registry, "surprise_monitor_failures_total", kind="internal") == 3
        assert _value(registry, "surprise_monitor_inputs_skipped_total", reason="failed") == 12
        assert sum("kernel exploded" in r.getMessage() for r in caplog.records) == 1


def test_a_failing_callback_is_counted_not_raised(calibrated):
    model, table = calibrated

    def broken(report):
        raise KeyError("callback bug")

    with SurpriseMonitor(model, table, on_alarm=broken) as monitor:
        res = monitor.run(mixed_inputs(4))
        flagged = int(res.report.alarm.sum())
        assert flagged > 0 and monitor.failures == {"on_alarm:KeyError": flagged}


def test_runtime_options_are_checked(calibrated):
    model, table = calibrated
    with pytest.raises(ValueError, match="sampling.mode must be one of"):
        SurpriseMonitor(model, table, sampling=Sampling(mode="background"))
    with pytest.raises(ValueError, match="sampling.queue_size"):
        SurpriseMonitor(model, table, sampling=Sampling(mode="async", queue_size=0))
    with pytest.raises(TypeError, match="on_alarm must be callable"):
        SurpriseMonitor(model, table, on_alarm="print")
    with pytest.raises(ValueError, match="sampling.fraction"):
        SurpriseMonitor(model, table, sampling=Sampling(fraction=1.5))
    with pytest.raises(TypeError, match="sampling must be Sampling"):
        SurpriseMonitor(model, table, sampling={"every": 2})
    assert all(not m._forward_hooks for m in model.modules())  # nothing left behind


def test_last_report_is_each_threads_own(calibrated):
    """monitor(x) then monitor.last_report gives that call's report, with 40 threads at once."""
    model, table = calibrated
    threads, calls = 40, 6
    inputs = [mixed_inputs(1 + t % 5, seed=t) for t in range(threads)]
    with SurpriseMonitor(model, table) as plain:
        expected = [plain.inspect(x) for x in inputs]
    barrier = threading.Barrier(threads)
    wrong: list[tuple[int, int]] = []
    with SurpriseMonitor(model, table) as monitor:

        def work(t: int) -> None:
            barrier.wait()
            for c in range(calls):
                monitor(inputs[t])
                time.sleep(0.002)  # let the other threads' calls land in between
                report = monitor.last_report
                if len(report) != len(expected[t]) or not torch.allclose(
                    report.alpha, expected[t].alpha, rtol=1e-5, atol=1e-7
                ):
                    wrong.append((t, c))

        run_in_threads(work, threads, timeout=120)
        assert wrong == [], f"{len(wrong)} of {threads * calls} calls saw another thread's report"
        assert monitor.last_report is None  # this thread made no call


def _picky_monitor(calibrated, registry, **sampling):
    from tests._models import picky_copy

    model, table = calibrated
    picky = picky_copy(model)
    monitor = SurpriseMonitor(picky, table, metrics=registry, sampling=Sampling(**sampling))
    picky.calls = 0  # the constructor's shape check ran the model once
    return picky, monitor


@pytest.mark.parametrize(
    "options",
    [{}, {"every": 2}, {"mode": "async"}, {"mode": "async", "every": 3}],
    ids=["sync", "sync-sampled", "async", "async-sampled"],
)
def test_inputs_the_model_rejects_run_it_once_and_still_add_up(calibrated, options):
    registry = CollectorRegistry()
    picky, monitor = _picky_monitor(calibrated, registry, **options)
    bad = mixed_inputs(2) * 1e4  # PickyCNN raises its own ValueError on these
    with monitor:
        for call in range(4):  # 8 inputs the model rejects
            with pytest.raises(ValueError, match="PickyCNN rejects") as raised:
                monitor(bad)
            assert picky.calls == call + 1  # one forward pass per call, not two
            assert "surprise" not in str(raised.value)  # the model's own exception
        good = mixed_inputs(3)
        monitor(good)
        assert monitor.flush(60)
        assert monitor.failures == {}  # the model's errors are not monitoring failures
        total = _value(registry, "surprise_monitor_inputs_total")
        skipped = {
            r: _value(registry, "surprise_monitor_inputs_skipped_total", reason=r)
            for r in ("sampled_out", "queue_full", "failed", "model_error")
        }
        monitored = _value(registry, "surprise_monitor_inputs_monitored_total")
    assert total == 11 and monitored + sum(skipped.values()) == total, (monitored, skipped)
    every = options.get("every", 1)
    assert skipped["model_error"] == sum(1 for i in range(8) if i % every == 0)
    assert skipped["failed"] == 0


def test_inspect_raises_the_models_own_error(calibrated):
    picky, monitor = _picky_monitor(calibrated, None)
    with monitor, pytest.raises(ValueError, match="PickyCNN rejects"):
        monitor.inspect(mixed_inputs(2) * 1e4)
    assert picky.calls == 1


@pytest.mark.parametrize("mode", ["sync", "sample", "async"])
def test_one_nan_input_does_not_unjudge_its_neighbours(calibrated, mode):
    model, table = calibrated
    registry = CollectorRegistry()
    x = mixed_inputs(6)
    x[1, 0, 2, 2], x[4] = float("nan"), float("inf")
    sampling = {"sync": Sampling(), "sample": Sampling(), "async": Sampling(mode="async")}
    recorded: list[tuple[str | None, int]] = []

    class Recorder:
        def record(self, report, one, request_id):
            recorded.append((request_id, int(report.classes[0])))

    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with SurpriseMonitor(model, table, metrics=registry, sampling=sampling[mode],
                         alarm_log=Recorder()) as monitor:  # fmt: skip
        if mode == "sample":  # judged through the sampled-rows path: rows 0..5 but 3
            monitor.request_path.sampler.select = lambda n: torch.tensor([1, 1, 1, 0, 1, 1]).bool()
        res = monitor.run(x, labels=labels, request_id="r")
        assert monitor.flush(60)
        good = [0, 2, 5] if mode == "sample" else [0, 2, 3, 5]
        with torch.no_grad():
            expected_output = model(x)
        assert torch.equal(res.output.nan_to_num(), expected_output.nan_to_num())
        report = res.report if mode != "async" else monitor.last_report
        assert report is not None and len(report.score) == len(good)
        if mode != "async":
            assert res.rows.tolist() == good
        alone = monitor.inspect(x[good], labels=labels[good])
        for field in ("score", "p_value", "beta"):
            torch.testing.assert_close(getattr(report, field), getattr(alone, field))
        assert torch.equal(report.alarm, alone.alarm)
        assert monitor.failures == {"NonFiniteInputError": 1}
        assert _value(registry, "surprise_monitor_failures_total", kind="invalid_input") == 1
        assert _value(registry, "surprise_monitor_inputs_skipped_total", reason="failed") == 2
        assert _value(registry, "surprise_monitor_inputs_monitored_total") == len(good)
        alarmed = torch.nonzero(alone.alarm).flatten().tolist()
        assert recorded == [("r", int(alone.classes[j])) for j in alarmed]


class _Ids:
    """An alarm recorder that keeps each alarm's request id (thread-safe)."""

    def __init__(self) -> None:
        self.ids: list[str | None] = []
        self._lock = threading.Lock()

    def record(self, report, x, request_id):
        with self._lock:
            self.ids.append(request_id)


@pytest.mark.parametrize("mode", ["sync", "sampled", "async"])
def test_one_request_id_per_input_goes_with_each_alarm(calibrated, mode):
    """A batch joined from several requests (a serving engine's batcher) passes one id per
    input; each alarm is recorded with its own input's id, in every mode."""
    model, table = calibrated
    noise = -5.0 + 9.4 * torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ids = [f"req-{i}" for i in range(8)]
    sampling = {"sync": Sampling(), "sampled": Sampling(every=2),
                "async": Sampling(mode="async")}[mode]  # fmt: skip
    recorder = _Ids()
    with SurpriseMonitor(model, table, sampling=sampling, alarm_log=recorder) as monitor:
        result = monitor.run(noise, request_id=ids)
        monitor.flush()
        with pytest.raises(ValueError, match="request_id has 3 ids for 8 inputs"):
            monitor.run(noise, request_id=ids[:3])
    judged = list(range(0, 8, 2)) if mode == "sampled" else list(range(8))
    assert sorted(recorder.ids) == [ids[i] for i in judged]  # every noise input alarms
    if mode != "async":
        assert result.rows.tolist() == judged
