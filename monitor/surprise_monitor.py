"""``SurpriseMonitor``: wraps a CNN and judges each input against the calibration table."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrate.fingerprint import model_fingerprint
from calibrate.table import CalibrationTable
from kernels import LookupTable, grad_amap, percentile_lookup, prepare_lookup_table
from kernels.reference import percentile_rank
from monitor.layers import get_module
from monitor.probe import GradAMapProbe, ProbeResult
from monitor.report import MonitorReport

log = logging.getLogger(__name__)


class TableMismatchError(ValueError):
    """The calibration table was not made for this model / layer."""


def _check_pct(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be a percentage in [0, 100], got {value}")
    return value


class SurpriseMonitor:
    """Watches a CNN at inference time: surprise, expectation and beta per input.

    Args:
        model: the CNN (``nn.Module``) in eval mode; it is not modified, and :meth:`close`
            removes the one forward hook the monitor adds.
        table: a :class:`~calibrate.CalibrationTable` or the path of a saved one.
        layer: target layer; ``None`` uses the table's. Another name than the table's is refused.
        surprise_pct: a filter is surprising when ``alpha > P_cn(surprise_pct)``.
        expectation_pct: a filter is expected when ``alpha < P_cn(expectation_pct)`` and
            ``mu_cn > mean_n(mu_cn)``.
        low_beta_pct: an input has a low beta when its beta is below this percentile of the
            class's calibration betas.
        check_fingerprint: refuse a table whose model-weights fingerprint differs (turn off for a
            deliberately changed model).
        output_to_logits: maps the model's output to ``[B, K]`` logits (default: identity).
        strict_input_size: refuse inputs whose H x W differ from the calibration images.
        backend: kernel backend, ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    def __init__(
        self,
        model: nn.Module,
        table: CalibrationTable | str | Path,
        *,
        layer: str | None = None,
        surprise_pct: float = 99.9,
        expectation_pct: float = 0.1,
        low_beta_pct: float = 1.0,
        check_fingerprint: bool = True,
        output_to_logits: Callable[[Any], torch.Tensor] | None = None,
        strict_input_size: bool = True,
        backend: str = "auto",
    ) -> None:
        if not isinstance(table, CalibrationTable):  # exemplars stay on disk until explained
            table = CalibrationTable.load(table, exemplars=False)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
        self._require_eval(model)
        if layer is not None and layer != table.layer:
            raise TableMismatchError(
                f"the table was calibrated at layer {table.layer!r}, not {layer!r}; "
                "calibrate again at that layer"
            )
        get_module(model, table.layer)
        if check_fingerprint and table.model_fingerprint:
            found = model_fingerprint(model)
            if found != table.model_fingerprint:
                raise TableMismatchError(
                    "the table was calibrated on a model with other weights (fingerprint "
                    f"{table.model_fingerprint[:12]}, this model {found[:12]}); calibrate again, "
                    "or pass check_fingerprint=False if the change is deliberate"
                )
        self.model = model
        self.table = table
        self.surprise_pct = _check_pct("surprise_pct", surprise_pct)
        self.expectation_pct = _check_pct("expectation_pct", expectation_pct)
        self.low_beta_pct = _check_pct("low_beta_pct", low_beta_pct)
        self.strict_input_size = strict_input_size
        self.backend = backend
        self.failures: Counter[str] = Counter()
        self.last_report: MonitorReport | None = None
        self._lock = threading.Lock()
        self._logged_failures: set[str] = set()
        self._tables: dict[torch.device, tuple[LookupTable, dict[str, torch.Tensor]]] = {}
        self._beta_threshold = table.beta_value_at(self.low_beta_pct).float()  # [K]
        self.probe = GradAMapProbe(
            model, table.layer, score=table.score, output_to_logits=output_to_logits
        )
        if table.input_shape:
            try:  # fail fast on a table for another filter or class count
                device = next(iter(model.parameters()), torch.empty(0)).device
                self._check_shapes(
                    self.probe.run(torch.zeros(1, *table.input_shape, device=device))
                )
            except BaseException:
                self.probe.close()
                raise

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove the monitor's hook from the model (idempotent)."""
        self.probe.close()

    def __enter__(self) -> SurpriseMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def layer(self) -> str:
        return self.table.layer

    # ----------------------------------------------------------- validation
    @staticmethod
    def _require_eval(model: nn.Module) -> None:
        if model.training:
            raise ValueError(
                "the model is in training mode; call model.eval() before monitoring it "
                "(batch statistics would couple the samples of a batch)"
            )

    def _check_shapes(self, res: ProbeResult) -> None:
        n, k = res.activation.shape[1], res.logits.shape[1]
        if n != self.table.num_filters:
            raise TableMismatchError(
                f"layer {self.layer!r} has {n} filters but the table has {self.table.num_filters}"
            )
        if k != self.table.num_classes:
            raise TableMismatchError(
                f"the model has {k} classes but the table has {self.table.num_classes}"
            )

    def _validate_input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"input must be a [B, C, H, W] batch, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("input batch is empty")
        if not x.dtype.is_floating_point:
            raise ValueError(f"input must be floating point, got {x.dtype}")
        expect = self.table.input_shape
        if expect:
            if x.shape[1] != expect[0]:
                raise ValueError(
                    f"input has {x.shape[1]} channels; the table was calibrated on {expect[0]}"
                )
            if self.strict_input_size and tuple(x.shape[2:]) != tuple(expect[1:]):
                raise ValueError(
                    f"input size {tuple(x.shape[2:])} differs from the calibration size "
                    f"{tuple(expect[1:])} (alpha depends on resolution; resize the input, or "
                    "pass strict_input_size=False)"
                )
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            rows = torch.nonzero(bad.flatten(1).any(dim=1)).flatten().tolist()
            raise ValueError(f"input has NaN or Inf values (batch rows {rows[:10]})")
        return x

    def _validate_labels(self, labels: Any, batch: int) -> torch.Tensor | None:
        if labels is None:
            return None
        labels = torch.as_tensor(labels)
        if labels.ndim == 0:
            labels = labels.view(1)
        if labels.shape != (batch,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be {batch} integers, got {tuple(labels.shape)} {labels.dtype}"
            )
        k = self.table.num_classes
        if bool(((labels < 0) | (labels >= k)).any()):
            raise ValueError(f"labels must lie in [0, {k}), got {labels.tolist()}")
        return labels.long()

    # ----------------------------------------------------------- inspection
    def _tables_for(self, device: torch.device) -> tuple[LookupTable, dict[str, torch.Tensor]]:
        with self._lock:
            if device not in self._tables:
                t = self.table
                lookup = prepare_lookup_table(
                    t, surprise_pct=self.surprise_pct,
                    expectation_pct=self.expectation_pct, device=device,
                )  # fmt: skip
                extra = {
                    "beta_quantiles": t.beta_quantiles.to(device, torch.float32),
                    "beta_levels": t.beta_levels.to(device, torch.float32),
                    "beta_threshold": self._beta_threshold.to(device),
                    "calibrated": (t.counts > 0).to(device),
                }
                self._tables[device] = (lookup, extra)
            return self._tables[device]

    def _report(self, res: ProbeResult, labels_given: bool) -> MonitorReport:
        self._check_shapes(res)
        alpha = grad_amap(res.activation, res.gradient, backend=self.backend)
        lookup, extra = self._tables_for(alpha.device)
        cls = res.classes.to(alpha.device)
        found = percentile_lookup(alpha, cls, lookup, backend=self.backend)
        calibrated = extra["calibrated"][cls]
        beta_pct = percentile_rank(found.beta, extra["beta_quantiles"][cls], extra["beta_levels"])
        low_beta = (found.beta < extra["beta_threshold"][cls]) & calibrated
        return MonitorReport(
            logits=res.logits.float().cpu(),
            classes=cls.cpu(),
            labels_given=labels_given,
            alpha=alpha.cpu(),
            mu=lookup.mean[cls].cpu(),
            percentile=found.percentile.cpu(),
            surprise=(found.surprise & calibrated[:, None]).cpu(),
            expectation=(found.expectation & calibrated[:, None]).cpu(),
            beta=found.beta.cpu(),
            beta_percentile=beta_pct.cpu(),
            low_beta=low_beta.cpu(),
            calibrated=calibrated.cpu(),
            layer=self.layer,
            class_names=tuple(self.table.class_names),
        )

    def _run(self, x: Any, labels: Any, sink: list) -> MonitorReport:
        self._require_eval(self.model)
        x = self._validate_input(x)
        labels = self._validate_labels(labels, x.shape[0])
        res = self.probe.run(x, labels)
        sink.append(res.output)
        report = self._report(res, labels_given=labels is not None)
        self.last_report = report
        return report

    def inspect(self, x: torch.Tensor, labels: Any = None) -> MonitorReport:
        """Monitor a batch ``x`` and return the per-sample :class:`MonitorReport`.

        Each input is judged against ``labels[b]`` when given, else its predicted class.
        Raises on bad input (wrong shape, NaN/Inf, labels out of range).
        """
        return self._run(x, labels, [])

    def __call__(self, x: torch.Tensor, labels: Any = None) -> Any:
        """Drop-in for ``model(x)``: returns the model's output (detached); the report is kept
        in :attr:`last_report`. If monitoring fails, the output is still returned and the
        failure is counted in :attr:`failures` (logged once per kind)."""
        sink: list = []
        try:
            self._run(x, labels, sink)
            return sink[0]
        except Exception as exc:  # fail open: never break the inference being watched
            self._count_failure(exc)
            if sink:
                return sink[0]
            with torch.no_grad():
                return self.model(x)

    def _count_failure(self, exc: Exception) -> None:
        kind = type(exc).__name__
        with self._lock:
            self.failures[kind] += 1
            first = kind not in self._logged_failures
            self._logged_failures.add(kind)
        if first:
            log.warning(
                "surprise monitor failed (%s: %s); the model's output is returned", kind, exc
            )
