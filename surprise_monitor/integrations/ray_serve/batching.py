"""Requests joined into one monitored call, and each request's part of the answer.

Serve's ``@serve.batch`` hands a replica the requests that arrived together
(:class:`~.deployment.MonitoredModel`); :class:`BatchedService` runs them as one batch through
the monitor (one forward pass, each input with its own request's id) and gives each request its
own logits, report and rows, the same as if it had been run alone. Nothing here needs Ray.
"""

from __future__ import annotations

from typing import Any

import torch
from fastapi import HTTPException

from surprise_monitor.monitor.report import MonitorReport
from surprise_monitor.serve.app import PredictionService

#: Seconds a batch waits for more requests by default: about one monitored forward and
#: backward pass of a small batch on a CPU core, the most a lone request is delayed.
DEFAULT_BATCH_WAIT_S = 0.005
#: One request's part of a batch: inputs, labels (or None), request id.
Item = tuple[torch.Tensor, "list[int] | None", "str | None"]
#: One request's answer from a batch: logits on the CPU, its report, the rows it covers.
Answer = tuple[torch.Tensor, "MonitorReport | None", "list[int]"]


def split_answer(
    logits: torch.Tensor, report: MonitorReport | None, rows: list[int], start: int, stop: int
) -> Answer:
    """The part of a joined batch's answer that belongs to inputs ``start:stop``: their logits,
    the report of their judged rows and those rows renumbered from 0."""
    mine = [j for j, r in enumerate(rows) if start <= r < stop]
    sub = report.select(mine) if report is not None and mine else None
    return logits[start:stop], sub, [rows[j] - start for j in mine] if sub is not None else []


def join_runs(items: list[Item]) -> list[list[int]]:
    """The items as runs that can be judged in one call, in order: consecutive items of the
    same per-input shape with labels for all or for none."""
    runs: list[list[int]] = []
    for i, (x, labels, _) in enumerate(items):
        if runs:
            first = items[runs[-1][0]]
            if first[0].shape[1:] == x.shape[1:] and (first[1] is None) == (labels is None):
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


class BatchedService(PredictionService):
    """The service whose requests go through the replica's ``@serve.batch`` method."""

    def __init__(self, *args: Any, batched: Any) -> None:
        super().__init__(*args)
        self.batched = batched

    async def answer_async(
        self, x: torch.Tensor, labels: list[int] | None, surprise: bool, max_filters: int,
        request_id: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The request through the replica's batcher, then its JSON answer."""
        result = await self.batched((x, labels, request_id))
        if isinstance(result, Exception):
            raise result
        logits, report, rows = result
        return self.body(logits, report, rows, surprise, max_filters, request_id)

    def run_joined(self, items: list[Item]) -> list[Answer | Exception]:
        """Run the items, joined into as few monitored calls as :func:`join_runs` allows; a
        run the model cannot run is retried item by item (the bad one gets its 400 alone)."""
        out: list[Answer | Exception] = [None] * len(items)  # type: ignore[list-item]
        for run in join_runs(items):
            try:
                out_run = self._run_one(run, items)
            except HTTPException:
                out_run = [self._run_alone(items[i]) for i in run]
            for i, answer in zip(run, out_run, strict=True):
                out[i] = answer
        return out

    def _run_one(self, run: list[int], items: list[Item]) -> list[Answer]:
        """One joined call for the items of ``run``; each item's part of the answer."""
        xs = [items[i][0] for i in run]
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        labels = None if items[run[0]][1] is None else [v for i in run for v in items[i][1]]
        ids = [items[i][2] for i in run for _ in range(len(items[i][0]))]
        logits, report, rows = self.run(x, labels, ids)
        answers, start = [], 0
        for part in xs:
            answers.append(split_answer(logits, report, rows, start, start + len(part)))
            start += len(part)
        return answers

    def _run_alone(self, item: Item) -> Answer | Exception:
        """One item on its own: its answer, or the HTTP error of an input the model cannot run."""
        try:
            return self.run(item[0], item[1], item[2])
        except HTTPException as exc:
            return exc
