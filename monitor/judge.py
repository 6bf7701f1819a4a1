"""The judge: a batch (and optional labels) in, a :class:`~monitor.report.MonitorReport` out.

Pure: it keeps no counters and no last report, samples nothing and never swallows an error (the
request path, :mod:`monitor.runtime`, does that around it). Three stages:

1. :meth:`Judge.validate` - every check that reads tensor values on the host (NaN / Inf inputs,
   label range) and the cheap ones (eval mode, shape, dtype, input size). The only stage with
   host syncs before the report.
2. :meth:`Judge.device_step` - probe (one forward, one partial backward) -> ``grad_amap`` ->
   ``percentile_lookup`` -> beta percentile, low beta, calibrated mask. Device tensors in, a
   :class:`DeviceReport` of device tensors out: no host copy, no sync, no Python branch on
   tensor values (the one value check it needs, finite alpha, is counted on the device and
   raised in stage 3).
3. :meth:`Judge.assemble` - copies the :class:`DeviceReport` to the host and builds the report.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import nn

from kernels import LookupTable, grad_amap, percentile_lookup, percentile_rank, prepare_lookup_table
from monitor.advice import advise
from monitor.fingerprint import layer_fingerprint, model_fingerprint
from monitor.loading.models import model_device, model_dtype
from monitor.probe.grad_amap_probe import GradAMapProbe, ModelRaised
from monitor.probe.hooks import get_module
from monitor.report import MonitorReport
from monitor.table import CalibrationTable


class TableMismatchError(ValueError):
    """The calibration table was not made for this model / layer."""


class InvalidInputError(ValueError):
    """An input batch or its labels cannot be monitored (shape, dtype, NaN/Inf, empty, range)."""


class TrainingModeError(ValueError):
    """The model is in training mode (batch statistics would couple the samples)."""


class NonFiniteAlphaError(ValueError):
    """The probe produced NaN or Inf alpha values."""


@dataclass(frozen=True)
class Batch:
    """A validated batch: ``x [B, C, H, W]`` floating point and finite, ``labels [B]`` int64 in
    ``[0, K)`` or ``None`` (judge against the predictions)."""

    x: torch.Tensor
    labels: torch.Tensor | None

    @property
    def labels_given(self) -> bool:
        """True when the inputs are judged against the caller's labels."""
        return self.labels is not None


@dataclass(frozen=True)
class DeviceReport:
    """The judge's results for a batch of B inputs, still on the model's device.

    Field for field what :class:`~monitor.report.MonitorReport` holds per input, plus
    ``nonfinite_alpha``, the count of NaN / Inf alpha values that :meth:`Judge.assemble`
    refuses.
    """

    logits: torch.Tensor  # [B, K] float32
    classes: torch.Tensor  # [B] int64: the label when given, else the prediction
    alpha: torch.Tensor  # [B, N] float32
    mu: torch.Tensor  # [B, N] the class means the inputs are compared with
    percentile: torch.Tensor  # [B, N] alpha's rank in the class's calibration alphas
    surprise: torch.Tensor  # [B, N] bool (False for uncalibrated classes)
    expectation: torch.Tensor  # [B, N] bool (False for uncalibrated classes)
    beta: torch.Tensor  # [B]
    beta_percentile: torch.Tensor  # [B]
    low_beta: torch.Tensor  # [B] bool (False for uncalibrated classes)
    calibrated: torch.Tensor  # [B] bool: the class had calibration images
    nonfinite_alpha: torch.Tensor  # [] int64

    def to_host(self) -> DeviceReport:
        """The same report with every tensor copied to the CPU (the one device-to-host copy
        of a judgement)."""
        return DeviceReport(**{f.name: getattr(self, f.name).cpu() for f in fields(self)})


@dataclass(frozen=True)
class DeviceStep:
    """What :meth:`Judge.device_step` produced: the model's own output and the device report."""

    output: Any
    report: DeviceReport


@dataclass(frozen=True)
class _DeviceTables:
    """The table's tensors the device step reads, prepared once per device."""

    lookup: LookupTable  # alpha grid, thresholds and guard (see kernels.prepare_lookup_table)
    beta_quantiles: torch.Tensor  # [K, Qb] float32
    beta_levels: torch.Tensor  # [Qb] float32
    beta_threshold: torch.Tensor  # [K] float32: the low_beta_pct-th percentile of beta
    calibrated: torch.Tensor  # [K] bool: counts > 0


def _check_pct(name: str, value: float) -> float:
    """``value`` as a float, or ``ValueError`` when it is not a percentage."""
    value = float(value)
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be a percentage in [0, 100], got {value}")
    return value


def require_eval(model: nn.Module) -> None:
    """``ValueError`` when ``model`` is in training mode (batch statistics couple samples)."""
    if model.training:
        raise TrainingModeError(
            "the model is in training mode; call model.eval() before monitoring it "
            "(batch statistics would couple the samples of a batch)"
        )


class Judge:
    """Judges batches of ``model``'s inputs against a calibration ``table``.

    Args:
        model: the CNN (``nn.Module``) in eval mode; the judge adds one forward hook at the
            table's layer (removed by :meth:`close`).
        table: the calibration table (made for this model: layer, filters, classes, weights).
        layer: target layer; ``None`` uses the table's. Another name than the table's is refused.
        surprise_pct: a filter is surprising when ``alpha > P_cn(surprise_pct)``.
        expectation_pct: a filter is expected when ``alpha < P_cn(expectation_pct)`` and
            ``mu_cn > mean_n(mu_cn)``.
        low_beta_pct: an input has a low beta when its beta is below this percentile of the
            class's calibration betas.
        check_fingerprint: refuse a table whose model-weights fingerprint differs.
        output_to_logits: maps the model's output to ``[B, K]`` logits (default: identity).
        strict_input_size: refuse inputs whose H x W differ from the calibration images.
        backend: kernel backend, ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    def __init__(
        self,
        model: nn.Module,
        table: CalibrationTable,
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
        _check_table_fits(model, table, layer, check_fingerprint)
        self.model = model
        self.table = table
        self.surprise_pct = _check_pct("surprise_pct", surprise_pct)
        self.expectation_pct = _check_pct("expectation_pct", expectation_pct)
        self.low_beta_pct = _check_pct("low_beta_pct", low_beta_pct)
        self.strict_input_size = strict_input_size
        self.backend = backend
        self._beta_threshold = table.beta_value_at(self.low_beta_pct).float()  # [K]
        self._tables: dict[torch.device, _DeviceTables] = {}
        self._lock = threading.Lock()
        self.probe = GradAMapProbe(
            model, table.layer, score=table.score, output_to_logits=output_to_logits
        )
        if table.input_shape:
            try:  # fail fast on a table for another filter or class count
                self._check_shapes_on(torch.zeros(1, *table.input_shape))
            except BaseException:
                self.probe.close()
                raise

    @property
    def layer(self) -> str:
        """The monitored layer (the table's)."""
        return self.table.layer

    @property
    def output_to_logits(self) -> Callable[[Any], torch.Tensor] | None:
        """The caller's map from the model's output to its logits, if any."""
        return self.probe.output_to_logits

    def close(self) -> None:
        """Remove the judge's hook from the model (idempotent)."""
        self.probe.close()

    def _check_shapes_on(self, x: torch.Tensor) -> None:
        """Run the probe once on ``x`` (moved to the model's device and floating dtype: a
        ``model.half()`` takes float16) and check the filter and class counts."""
        try:
            res = self.probe.run(x.to(model_device(self.model), model_dtype(self.model)))
        except ModelRaised as exc:
            error = exc.error
        else:
            self._check_shapes(res.activation, res.logits)
            return
        raise error

    # ---------------------------------------------------------------- the stages
    def __call__(self, x: torch.Tensor, labels: Any = None) -> MonitorReport:
        """Judge a batch ``x`` against ``labels`` (else the predictions): all three stages.
        Raises on bad input (wrong shape, NaN/Inf, labels out of range), and the model's own
        exception when the model cannot run ``x``."""
        batch = self.validate(x, labels)
        try:
            step = self.device_step(batch)
        except ModelRaised as exc:
            error = exc.error  # raised below, outside this handler: as without the monitor
        else:
            return self.assemble(step, batch.labels_given)
        raise error

    def validate(self, x: Any, labels: Any = None) -> Batch:
        """Stage 1: the model is in eval mode, ``x`` is a finite floating ``[B, C, H, W]``
        batch of the calibration's channels (and size, when strict), ``labels`` are B class
        ids of the table. Raises :class:`InvalidInputError` (or ``TypeError``, ``ValueError``)."""
        require_eval(self.model)
        x = self.check_input(x)
        return Batch(x, self.check_labels(labels, int(x.shape[0])))

    def check_input(self, x: Any) -> torch.Tensor:
        """``x`` itself once it is a batch this judge can take (see :meth:`validate`)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise InvalidInputError(
                f"input must be a [B, C, H, W] batch, got shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise InvalidInputError("input batch is empty")
        if not x.dtype.is_floating_point:
            raise InvalidInputError(f"input must be floating point, got {x.dtype}")
        self._check_input_size(x)
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            rows = torch.nonzero(bad.flatten(1).any(dim=1)).flatten().tolist()
            raise InvalidInputError(f"input has NaN or Inf values (batch rows {rows[:10]})")
        return x

    def _check_input_size(self, x: torch.Tensor) -> None:
        """:class:`InvalidInputError` for another channel count, or (strict) another H x W,
        than the calibration images'."""
        expect = self.table.input_shape
        if not expect:
            return
        if x.shape[1] != expect[0] and x.shape[3] == expect[0]:
            raise InvalidInputError(
                f"input shape {tuple(x.shape)} looks like [B, H, W, C] (channels last); the "
                f"monitor takes [B, C, H, W] batches of {expect[0]} channels: pass "
                "x.permute(0, 3, 1, 2)"
            )
        if x.shape[1] != expect[0]:
            raise InvalidInputError(
                f"input has {x.shape[1]} channels; the table was calibrated on {expect[0]}"
            )
        if self.strict_input_size and tuple(x.shape[2:]) != tuple(expect[1:]):
            raise InvalidInputError(
                f"input size {tuple(x.shape[2:])} differs from the calibration size "
                f"{tuple(expect[1:])} (alpha depends on resolution; resize the input, or "
                "pass strict_input_size=False)"
            )

    def check_labels(self, labels: Any, batch: int) -> torch.Tensor | None:
        """``labels`` as ``[batch]`` int64 class ids of the table (``None`` stays ``None``)."""
        if labels is None:
            return None
        labels = labels_tensor(labels, self.table.class_names)
        if labels.ndim == 0:
            labels = labels.view(1)
        if labels.shape != (batch,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InvalidInputError(
                f"labels must be {batch} integers, got {tuple(labels.shape)} {labels.dtype}"
            )
        k = self.table.num_classes
        if bool(((labels < 0) | (labels >= k)).any()):
            raise InvalidInputError(f"labels must lie in [0, {k}), got {labels.tolist()}")
        return labels.long()

    def device_step(self, batch: Batch) -> DeviceStep:
        """Stage 2: the model's output and the :class:`DeviceReport` of a validated batch."""
        res = self.probe.run(batch.x, batch.labels, check_labels=False)
        self._check_shapes(res.activation, res.logits)
        alpha = grad_amap(res.activation, res.gradient, backend=self.backend)
        tables = self._tables_for(alpha.device)
        cls = res.classes.to(alpha.device)
        found = percentile_lookup(
            alpha, cls, tables.lookup, backend=self.backend, check_values=False
        )
        calibrated = tables.calibrated[cls]
        beta_pct = percentile_rank(found.beta, tables.beta_quantiles[cls], tables.beta_levels)
        report = DeviceReport(
            logits=res.logits.float(),
            classes=cls,
            alpha=alpha,
            mu=tables.lookup.mean[cls],
            percentile=found.percentile,
            surprise=found.surprise & calibrated[:, None],
            expectation=found.expectation & calibrated[:, None],
            beta=found.beta,
            beta_percentile=beta_pct,
            low_beta=(found.beta < tables.beta_threshold[cls]) & calibrated,
            calibrated=calibrated,
            nonfinite_alpha=(~torch.isfinite(alpha)).sum(),
        )
        return DeviceStep(res.output, report)

    def assemble(self, step: DeviceStep, labels_given: bool) -> MonitorReport:
        """Stage 3: the host report of a device step (``ValueError`` for non-finite alpha).

        Every :class:`DeviceReport` field but ``nonfinite_alpha`` becomes the
        :class:`~monitor.report.MonitorReport` field of the same name."""
        host = step.report.to_host()
        bad = int(host.nonfinite_alpha)
        if bad:
            raise NonFiniteAlphaError(f"percentile_lookup: alpha has {bad} non-finite values")
        per_input = {f.name: getattr(host, f.name) for f in fields(host)}
        del per_input["nonfinite_alpha"]
        return MonitorReport(
            **per_input,
            labels_given=labels_given,
            layer=self.layer,
            class_names=tuple(self.table.class_names),
        )

    # ------------------------------------------------------------------ helpers
    def _check_shapes(self, activation: torch.Tensor, logits: torch.Tensor) -> None:
        """:class:`TableMismatchError` when the layer's filters or the model's classes are not
        the table's (shapes only: no sync)."""
        n, k = activation.shape[1], logits.shape[1]
        if n != self.table.num_filters:
            raise TableMismatchError(
                f"layer {self.layer!r} has {n} filters but the table has {self.table.num_filters}"
            )
        if k != self.table.num_classes:
            raise TableMismatchError(
                f"the model has {k} classes but the table has {self.table.num_classes}"
            )

    def _tables_for(self, device: torch.device) -> _DeviceTables:
        """The table prepared on ``device`` (once per device, thread-safe)."""
        with self._lock:
            if device not in self._tables:
                t = self.table
                lookup = prepare_lookup_table(
                    t, surprise_pct=self.surprise_pct,
                    expectation_pct=self.expectation_pct, device=device,
                )  # fmt: skip
                self._tables[device] = _DeviceTables(
                    lookup=lookup,
                    beta_quantiles=t.beta_quantiles.to(device, torch.float32),
                    beta_levels=t.beta_levels.to(device, torch.float32),
                    beta_threshold=self._beta_threshold.to(device),
                    calibrated=(t.counts > 0).to(device),
                )
            return self._tables[device]


def labels_tensor(labels: Any, class_names: list[str] | tuple[str, ...] = ()) -> torch.Tensor:
    """``labels`` as a tensor; :class:`InvalidInputError` for class names or anything else that
    is not a class index (the message says how to get the index of a name)."""
    if isinstance(labels, torch.Tensor):
        return labels
    items = labels if isinstance(labels, list | tuple) else [labels]
    names = [v for v in items if isinstance(v, str)]
    if names:
        shown = ", ".join(repr(n) for n in list(class_names)[:20])
        raise InvalidInputError(
            f"labels must be class indices (integers), got the name {names[0]!r}; pass "
            f"table.class_names.index({names[0]!r}) (class names: {shown or 'none recorded'})"
        )
    try:
        return torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(f"labels must be a list or tensor of class indices: {exc}") from exc


class HasJudge(Protocol):
    """Anything that holds a judge (a :class:`~monitor.SurpriseMonitor`)."""

    @property
    def judge(self) -> Judge:
        """The judge it holds."""
        ...


def judge_of(target: Judge | HasJudge) -> Judge:
    """``target`` itself when it is a judge, else the judge it holds."""
    return target if isinstance(target, Judge) else target.judge


def _check_table_fits(
    model: nn.Module, table: CalibrationTable, layer: str | None, check_fingerprint: bool
) -> None:
    """Refuse a model that is not an eval-mode module, or a table made for another layer or
    other weights (:class:`TableMismatchError`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    require_eval(model)
    if layer is not None and layer != table.layer:
        raise TableMismatchError(
            f"the table was calibrated at layer {table.layer!r}, not {layer!r}; "
            "calibrate again at that layer"
        )
    module = get_module(model, table.layer)
    if check_fingerprint and table.model_fingerprint:
        found = model_fingerprint(model)
        if found != table.model_fingerprint:
            problem = (
                "the table was calibrated on a model with other weights (fingerprint "
                f"{table.model_fingerprint[:12]}, this model {found[:12]}); calibrate again, or "
            )
            raise advise(
                TableMismatchError(
                    problem + "pass check_fingerprint=False if the change is deliberate"
                ),
                cli=problem + "pass --no-fingerprint-check if the change is deliberate",
            )
    if check_fingerprint and table.layer_fingerprint:
        if layer_fingerprint(module) != table.layer_fingerprint:
            raise TableMismatchError(
                f"the table's statistics were not calibrated at this model's layer "
                f"{table.layer!r} (its layer fingerprint {table.layer_fingerprint[:12]} is "
                "another layer's); calibrate again at that layer"
            )
