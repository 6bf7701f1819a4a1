"""CUDA graphs of the device step: the static-buffer plumbing, the cache, the eager fallback,
fail-open and thread safety, on the CPU with a fake capture that has a CUDA graph's contract
(the replay re-runs the recorded step over the static inputs and overwrites the static outputs
in place); and the real thing where there is a GPU."""

from __future__ import annotations

import pytest
import torch

from surprise_monitor.monitor import Judge, SurpriseMonitor
from surprise_monitor.monitor.cuda_graphs import StepGraphs, signature
from surprise_monitor.monitor.options import Execution
from tests._checks import run_in_threads
from tests._models import mixed_inputs

FIELDS = ("logits", "classes", "alpha", "mu", "percentile", "surprise", "expectation", "beta",
          "beta_percentile", "low_beta", "calibrated")  # fmt: skip


def _overwrite(static, fresh) -> None:
    """Copy a fresh result tree into the static one, in place (what a graph replay does)."""
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif isinstance(static, tuple | list):
        for s, f in zip(static, fresh, strict=True):
            _overwrite(s, f)
    elif isinstance(static, dict):
        for k in static:
            _overwrite(static[k], fresh[k])


class FakeCapture:
    """A capture on the CPU: records ``fn``; a replay re-runs it over the same static inputs
    and writes into the same static outputs."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.captured = 0
        self.replayed = 0

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        out = fn()

        def replay() -> None:
            self.replayed += 1
            _overwrite(out, fn())

        return replay, out


def _graphed(judge: Judge, *, fail: bool = False, max_graphs: int = 2) -> FakeCapture:
    """Give ``judge`` CPU graphs with a fake capture."""
    fake = FakeCapture(fail=fail)
    judge.graphs = StepGraphs(
        judge._graph_step, capture=fake, device_types=("cpu",), max_graphs=max_graphs
    )
    return fake


@pytest.fixture()
def judges(calibrated):
    model, table = calibrated
    eager, graphed = Judge(model, table), Judge(model, table)
    yield eager, graphed
    eager.close()
    graphed.close()


def _same(a, b) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.labels_given == b.labels_given


def test_replays_give_the_eager_results_and_own_their_memory(judges):
    eager, graphed = judges
    fake = _graphed(graphed)
    inputs = [mixed_inputs(4, seed=s) for s in range(4)]
    reports = [graphed(x) for x in inputs]  # call 1 eager, 2 captures + replays, 3-4 replay
    assert fake.captured == 1 and fake.replayed == 3 and graphed.graphs.replays == 3
    for x, report in zip(inputs, reports, strict=True):
        _same(report, eager(x))  # earlier results not overwritten by later replays
    labels = torch.tensor([2, 1, 0, 2])
    for _ in range(3):
        _same(graphed(inputs[0], labels), eager(inputs[0], labels))
    assert fake.captured == 2  # labels given: another signature


def test_the_output_is_the_models_and_a_copy(calibrated, judges):
    model, _ = calibrated
    _, graphed = judges
    _graphed(graphed)
    x = mixed_inputs(3)
    batch = graphed.validate(x)
    first = [graphed.step(batch) for _ in range(3)][-1]
    with torch.no_grad():
        assert torch.equal(first.output, model(x))
    graphed.step(graphed.validate(mixed_inputs(3, seed=2)))
    with torch.no_grad():
        assert torch.equal(first.output, model(x))  # not the static buffer


def test_bounded_lru_cache_and_eager_fallback_for_new_signatures(judges):
    eager, graphed = judges
    fake = _graphed(graphed, max_graphs=2)
    sizes = (1, 2, 3)
    for b in sizes:
        for _ in range(2):  # eager, then captured
            graphed(mixed_inputs(b))
    assert fake.captured == 3 and len(graphed.graphs) == 2  # the batch-1 graph was dropped
    graphed(mixed_inputs(2))  # used: now the most recent
    graphed(mixed_inputs(1))  # eager again (a new signature once more)
    assert fake.captured == 3
    graphed(mixed_inputs(1))
    assert fake.captured == 4 and len(graphed.graphs) == 2
    for b in sizes:
        _same(graphed(mixed_inputs(b, seed=5)), eager(mixed_inputs(b, seed=5)))


def test_a_failed_capture_turns_graphs_off_and_the_monitor_runs_eagerly(calibrated, caplog):
    model, table = calibrated
    with SurpriseMonitor(model, table) as monitor, SurpriseMonitor(model, table) as plain:
        _graphed(monitor.judge, fail=True)
        x = mixed_inputs(4)
        outs = [monitor(x) for _ in range(3)]
        assert monitor.judge.graphs.disabled.startswith("RuntimeError")
        assert "CUDA graph capture failed" in caplog.text
        assert not monitor.failures  # nothing broke: eager results
        _same(monitor.last_report, plain.inspect(x))
        with torch.no_grad():
            assert all(torch.equal(o, model(x)) for o in outs)


def test_bad_inputs_are_refused_from_a_replay_too(judges):
    from surprise_monitor.monitor import InvalidInputError

    _, graphed = judges
    _graphed(graphed)
    graphed.execution = Execution(host_checks=False)  # as for a GPU input: checked on the device
    for _ in range(2):
        graphed(mixed_inputs(3), torch.tensor([0, 1, 2]))
    x = mixed_inputs(3)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(InvalidInputError, match=r"NaN or Inf values \(batch rows \[1\]\)"):
        graphed(x, torch.tensor([0, 1, 2]))
    with pytest.raises(InvalidInputError, match=r"labels must lie in \[0, 3\)"):
        graphed(mixed_inputs(3), torch.tensor([0, 5, 2]))
    assert graphed.graphs.replays == 3  # both came from the captured graph


def test_threads_get_their_own_results(judges):
    """Eight threads replaying one graph with their own inputs each get their own results."""
    eager, graphed = judges
    _graphed(graphed)
    for _ in range(2):
        graphed(mixed_inputs(4))
    inputs = [mixed_inputs(4, seed=s) for s in range(8)]
    expected = [eager(x) for x in inputs]
    got: dict[int, list] = {i: [] for i in range(8)}

    def work(i: int) -> None:
        for _ in range(3):
            got[i].append(graphed(inputs[i]))

    run_in_threads(work, 8)
    for i in range(8):
        for report in got[i]:
            _same(report, expected[i])


def test_the_signature_covers_shape_layout_dtype_labels_and_autocast():
    x = torch.zeros(2, 3, 4, 4)
    base = signature(x, None)
    assert signature(torch.ones(2, 3, 4, 4), None) == base  # values do not matter
    others = [
        signature(torch.zeros(3, 3, 4, 4), None),
        signature(x.contiguous(memory_format=torch.channels_last), None),
        signature(x.double(), None),
        signature(x, torch.zeros(2, dtype=torch.long)),
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        others.append(signature(x, None))
    assert len({base, *others}) == 6


def test_max_graphs_is_checked():
    with pytest.raises(ValueError, match="max_graphs must be an integer >= 1"):
        StepGraphs(lambda x, y: (x, {}), max_graphs=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_real_cuda_graphs_equal_the_eager_step(calibrated, autocast):
    model, table = calibrated
    gpu = type(model)(num_classes=3).cuda().eval()
    gpu.load_state_dict(model.state_dict())
    with (
        SurpriseMonitor(gpu, table, execution=Execution(cuda_graphs=True)) as graphed,
        SurpriseMonitor(gpu, table) as eager,
        torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast),
    ):
        for seed in range(4):
            x = mixed_inputs(4, seed=seed).cuda()
            _same(graphed.inspect(x), eager.inspect(x))
        assert graphed.judge.graphs.disabled is None
        assert graphed.judge.graphs.captures == 1 and graphed.judge.graphs.replays == 3


def test_a_step_under_autocast_is_captured_under_autocast(judges):
    """A caller's autocast is part of the signature and holds during the capture (its cast
    cache off); the replays give the eager results under the same autocast."""
    eager, graphed = judges
    fake = _graphed(graphed)
    seen = []
    step = graphed.graphs.step

    def spy(x, labels):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))
        return step(x, labels)

    graphed.graphs.step = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reports = [graphed(mixed_inputs(3, seed=s)) for s in range(3)]
        expected = [eager(mixed_inputs(3, seed=s)) for s in range(3)]
    graphed(mixed_inputs(3))  # outside autocast: another signature, eager
    assert fake.captured == 1
    assert seen[0] == (True, False)  # the capture: autocast on, cache off
    for got, want in zip(reports, expected, strict=True):
        _same(got, want)
