"""The judge: a batch (and optional labels) in, a
:class:`~surprise_monitor.monitor.report.MonitorReport` out.

Pure: it keeps no counters and no last report, samples nothing and never swallows an error (the
request path, :mod:`surprise_monitor.monitor.runtime`, does that around it). Three stages:

1. :meth:`Judge.validate` - the checks that need no tensor values (eval mode, shape, dtype,
   input size), and the value checks (NaN / Inf inputs, label range) where they cost no host
   sync: for tensors already on the host. On a GPU those become device-side counts instead.
2. :meth:`Judge.device_step` - probe (one forward, one partial backward) -> ``grad_amap`` ->
   ``percentile_lookup`` (percentiles, flags, beta, its rank, low beta, calibrated mask, fused
   in the kernels). Device tensors in, a :class:`DeviceReport` of device tensors out: no host
   copy, no sync, no Python branch on tensor values; the value checks it needs (finite input,
   labels in range, finite alpha) are counted on the device and raised in stage 3.
   :meth:`Judge.step` replays it from a CUDA graph when the judge has them
   (:mod:`surprise_monitor.monitor.cuda_graphs`).
3. :meth:`Judge.assemble` - copies the :class:`DeviceReport` to the host in one packed copy
   (:mod:`surprise_monitor.monitor.host_copy`: the one host sync of a judgement), raises what the
   checks found, and builds the report.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from surprise_monitor.kernels import (
    LookupTable,
    grad_amap,
    percentile_lookup,
    percentile_rank,
    prepare_lookup_table,
)
from surprise_monitor.monitor.advice import advise
from surprise_monitor.monitor.atypicality import (
    ALPHA_COMPONENT,
    DEFAULT_EVIDENCE,
    Gate,
    HeadDistance,
    ScoreReference,
    StageDistance,
    components,
    energy,
    expectation_mass,
    fisher,
)
from surprise_monitor.monitor.conformal import (
    ClassConditionalNull,
    ConformalNull,
    conditional_level,
)
from surprise_monitor.monitor.cuda_graphs import StepGraphs
from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.families import (
    FAMILIES,
    FamilyNulls,
    family_columns,
    family_statistics,
)
from surprise_monitor.monitor.fingerprint import layer_fingerprint, model_fingerprint
from surprise_monitor.monitor.host_copy import to_host
from surprise_monitor.monitor.knn_distance import KnnDistance
from surprise_monitor.monitor.loading.models import model_device, model_dtype
from surprise_monitor.monitor.options import Execution, Thresholds, renamed_keywords
from surprise_monitor.monitor.probe.grad_amap_probe import GradAMapProbe, ModelRaised, ProbeResult
from surprise_monitor.monitor.probe.hooks import get_module
from surprise_monitor.monitor.probe.profiles import ProfileTap
from surprise_monitor.monitor.report import MonitorReport
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.monitor.table_alarm import AlarmCalibration

G = TypeVar("G")
N = TypeVar("N", ConformalNull, ClassConditionalNull, FamilyNulls)


class TableMismatchError(SurpriseMonitorError, ValueError):
    """The calibration table was not made for this model / layer."""


class InvalidInputError(SurpriseMonitorError, ValueError):
    """An input batch or its labels cannot be monitored (shape, dtype, NaN/Inf, empty, range)."""


class NonFiniteInputError(InvalidInputError):
    """Some input rows hold NaN or Inf values; ``rows`` names them (batch indices)."""

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its rows (e.g. across processes)."""
        return (type(self), (str(self), self.rows))


class TrainingModeError(SurpriseMonitorError, ValueError):
    """The model is in training mode (batch statistics would couple the samples)."""


class NonFiniteAlphaError(SurpriseMonitorError, ValueError):
    """The probe produced NaN or Inf alpha values."""


@dataclass(frozen=True)
class Batch:
    """A validated batch: ``x [B, C, H, W]`` floating point, ``labels [B]`` int64 on x's device
    or ``None`` (judge against the predictions). ``input_checked`` / ``labels_checked``: the
    values (finite input, labels in ``[0, K)``) were checked on the host; else the device step
    counts them and :meth:`Judge.assemble` raises."""

    x: torch.Tensor
    labels: torch.Tensor | None
    input_checked: bool = True
    labels_checked: bool = True

    @property
    def labels_given(self) -> bool:
        """True when the inputs are judged against the caller's labels."""
        return self.labels is not None


@dataclass(frozen=True)
class DeviceReport:
    """The judge's results for a batch of B inputs, still on the model's device.

    Field for field what :class:`~surprise_monitor.monitor.report.MonitorReport` holds per input,
    plus the :attr:`CHECKS`: counts that :meth:`Judge.assemble` refuses when they are not zero.
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
    score: torch.Tensor  # [B] float32 atypicality (NaN without the table's score reference)
    p_value: torch.Tensor  # [B] float32 conformal p-value (NaN without the table's null)
    alarm: torch.Tensor  # [B] bool: p_value <= alarm_rate
    components: torch.Tensor  # [B, J] float32 the score's components (alarm.component_names())
    component_ranks: torch.Tensor  # [B, J] float32 their tail ranks (NaN: no reference)
    family_p_values: torch.Tensor  # [B, F] float32 per component family (NaN: no family null)
    nonfinite_input: torch.Tensor  # [] int64: input rows with NaN / Inf (device-side check)
    bad_labels: torch.Tensor  # [] int64: labels outside [0, K) (device-side check)
    nonfinite_alpha: torch.Tensor  # [] int64

    #: Fields that are checks, not results: not part of the MonitorReport.
    CHECKS: ClassVar[tuple[str, ...]] = ("nonfinite_input", "bad_labels", "nonfinite_alpha")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_host(self) -> DeviceReport:
        """The same report on the CPU, through one device-to-host copy of one packed buffer
        (the one host sync of a judgement; nothing is copied when it is on the CPU already)."""
        return DeviceReport(**to_host(self.tensors()))


@dataclass(frozen=True, eq=False)
class _AlarmTables:
    """The table's alarm part prepared on one device."""

    levels: torch.Tensor  # [Q] float32
    profile_grids: tuple[torch.Tensor, ...]  # per profile layer [C, Q] float32
    head: HeadDistance | None  # the head layer's distance to the class means
    reference: ScoreReference | None
    stage: StageDistance | None  # the gated score's stage distances (None: Fisher score)
    knn: KnnDistance | None  # the gated score's nearest-neighbour distance (None: no bank)
    gate: Gate | None  # the gated score's columns and threshold (None: Fisher score)
    null_predicted: ConformalNull | None
    null_labelled: ConformalNull | None
    class_null_predicted: ClassConditionalNull | None  # per class (Mondrian), or None
    class_null_labelled: ClassConditionalNull | None
    family_null_predicted: FamilyNulls | None  # per component family, or None
    family_null_labelled: FamilyNulls | None
    family_columns: tuple[torch.Tensor, ...]  # each family's component columns, int64
    level_predicted: torch.Tensor | None  # [K] float32: each class's p-value threshold
    level_labelled: torch.Tensor | None


@dataclass(frozen=True)
class DeviceStep:
    """What :meth:`Judge.device_step` produced: the model's own output, the device report, and
    the batch it judged (for the messages of failed checks)."""

    output: Any
    report: DeviceReport
    batch: Batch | None = None


def require_eval(model: nn.Module) -> None:
    """``ValueError`` when ``model`` is in training mode (batch statistics couple samples)."""
    if model.training:
        raise TrainingModeError(
            "the model is in training mode; call model.eval() before monitoring it "
            "(batch statistics would couple the samples of a batch)"
        )


#: The keywords of the 0.1 API, refused with their new spelling (the facade adds its own).
JUDGE_RENAMES: dict[str, str] = {
    "layer": "the table's: the monitored layer is table.layer (calibrate with another layer to "
    "change it)",
    **{k: f"thresholds=Thresholds({k}=...)" for k in (
        "surprise_pct", "expectation_pct", "low_beta_pct", "alarm_rate")},
    **{k: f"execution=Execution({k}=...)" for k in (
        "backend", "cuda_graphs", "max_graphs", "host_checks", "check_fingerprint",
        "strict_input_size")},
}  # fmt: skip


def option_group(value: Any, cls: type[G], name: str) -> G:
    """``value`` when it is a ``cls`` (``None``: the defaults), else ``TypeError``."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be {cls.__name__}(...) or None, got {type(value).__name__}")
    return value


class Judge:
    """Judges batches of ``model``'s inputs against a calibration ``table``.

    Args:
        model: the CNN (``nn.Module``) in eval mode; the judge adds one forward hook at the
            table's layer (the monitored layer) and one at each activation-profile layer and at
            the head layer of the table's alarm part (removed by :meth:`close`).
        table: the calibration table (made for this model: layer, filters, classes, weights).
        thresholds: what counts as surprising, expected, low beta and an alarm
            (:class:`~surprise_monitor.monitor.options.Thresholds`; ``None``: its defaults).
        execution: backend, CUDA graphs, where values are checked, what is refused
            (:class:`~surprise_monitor.monitor.options.Execution`; ``None``: its defaults).
        output_to_logits: maps the model's output to ``[B, K]`` logits (default: identity).
    """

    @renamed_keywords(JUDGE_RENAMES)
    def __init__(
        self,
        model: nn.Module,
        table: CalibrationTable,
        *,
        thresholds: Thresholds | None = None,
        execution: Execution | None = None,
        output_to_logits: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.thresholds = option_group(thresholds, Thresholds, "thresholds")
        self.execution = option_group(execution, Execution, "execution")
        _check_table_fits(model, table, self.execution.check_fingerprint)
        self.model = model
        self.table = table
        self._tables: dict[torch.device, LookupTable] = {}
        self._alarm_tables: dict[torch.device, _AlarmTables] = {}
        self._lock = threading.Lock()
        run = self.execution
        self.graphs = (
            StepGraphs(self._graph_step, max_graphs=run.max_graphs) if run.cuda_graphs else None
        )
        self.probe = GradAMapProbe(
            model, table.layer, class_output=table.class_output, output_to_logits=output_to_logits
        )
        layers = table.alarm.tap_layers if table.alarm is not None else ()
        try:
            self.profiles = ProfileTap(model, layers) if layers else None
        except BaseException:
            self.probe.close()
            raise
        if table.input_shape:
            try:  # fail fast on a table for another filter or class count
                self._check_shapes_on(torch.zeros(1, *table.input_shape))
            except BaseException:
                self.close()
                raise

    @property
    def layer(self) -> str:
        """The monitored layer (the table's)."""
        return self.table.layer

    @property
    def component_names(self) -> tuple[str, ...]:
        """The names of ``report.components``' columns."""
        alarm = self.table.alarm
        return (ALPHA_COMPONENT,) if alarm is None else tuple(alarm.component_names())

    @property
    def output_to_logits(self) -> Callable[[Any], torch.Tensor] | None:
        """The caller's map from the model's output to its logits, if any."""
        return self.probe.output_to_logits

    def close(self) -> None:
        """Remove the judge's hook from the model and drop its CUDA graphs (idempotent)."""
        self.probe.close()
        if self.profiles is not None:
            self.profiles.close()
        if self.graphs is not None:
            self.graphs.clear()

    def _check_shapes_on(self, x: torch.Tensor) -> None:
        """Run the probe once on ``x`` (moved to the model's device and floating dtype: a
        ``model.half()`` takes float16) and check the filter and class counts."""
        try:
            res, means = self._probe(x.to(model_device(self.model), model_dtype(self.model)))
        except ModelRaised as exc:
            error = exc.error
        else:
            self._check_shapes(res.activation, res.logits, means)
            return
        raise error

    def _probe(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, check_labels: bool = True
    ) -> tuple[ProbeResult, list[torch.Tensor]]:
        """The probe's pass over ``x`` and, when the table has profile or head layers, their
        channel means (``[B, C]`` float32 each, profile layers then head) from the same pass."""
        if self.profiles is None:
            return self.probe.run(x, labels, check_labels=check_labels), []
        with self.profiles.armed() as record:
            res = self.probe.run(x, labels, check_labels=check_labels)
        return res, self.profiles.means(record)

    # ---------------------------------------------------------------- the stages
    def __call__(self, x: torch.Tensor, labels: Any = None) -> MonitorReport:
        """Judge a batch ``x`` against ``labels`` (else the predictions): all three stages.
        Raises on bad input (wrong shape, NaN/Inf, labels out of range), and the model's own
        exception when the model cannot run ``x``."""
        batch = self.validate(x, labels)
        try:
            step = self.step(batch)
        except ModelRaised as exc:
            error = exc.error  # raised below, outside this handler: as without the monitor
        else:
            return self.assemble(step)
        raise error

    def validate(self, x: Any, labels: Any = None) -> Batch:
        """Stage 1: the model is in eval mode, ``x`` is a floating ``[B, C, H, W]`` batch of the
        calibration's channels (and size, when strict), ``labels`` are B integers. Values
        (finite input, labels in range) are checked here where that needs no host sync (see
        ``execution.host_checks``), else by the device step. Raises :class:`InvalidInputError` (or
        ``TypeError``, ``ValueError``)."""
        require_eval(self.model)
        input_on_host = self.checks_on_host(x)
        x = self.check_input(x, values=input_on_host)
        labels_on_host = labels is None or self.checks_on_host(labels)
        found = self.check_labels(labels, int(x.shape[0]), values=labels_on_host)
        if found is not None and found.device != x.device:
            pinned = found.pin_memory() if x.device.type == "cuda" else found
            found = pinned.to(x.device, non_blocking=True)
        return Batch(x, found, input_on_host, labels_on_host)

    def checks_on_host(self, t: Any) -> bool:
        """Whether the values of ``t`` are checked on the host (see ``execution.host_checks``)."""
        if self.execution.host_checks is not None:
            return self.execution.host_checks
        return not isinstance(t, torch.Tensor) or t.device.type == "cpu"

    def check_input(self, x: Any, *, values: bool = True) -> torch.Tensor:
        """``x`` itself once it is a batch this judge can take (see :meth:`validate`);
        ``values=False`` leaves the NaN / Inf check to the device step."""
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
        if values:
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                rows = torch.nonzero(bad.flatten(1).any(dim=1)).flatten().tolist()
                raise NonFiniteInputError(
                    f"input has NaN or Inf values (batch rows {rows[:10]})", rows
                )
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
        if self.execution.strict_input_size and tuple(x.shape[2:]) != tuple(expect[1:]):
            raise InvalidInputError(
                f"input size {tuple(x.shape[2:])} differs from the calibration size "
                f"{tuple(expect[1:])} (alpha depends on resolution; resize the input, or "
                "pass execution=Execution(strict_input_size=False))"
            )

    def check_labels(self, labels: Any, batch: int, *, values: bool = True) -> torch.Tensor | None:
        """``labels`` as ``[batch]`` int64 class ids of the table (``None`` stays ``None``);
        ``values=False`` leaves the range check to the device step."""
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
        if values and bool(((labels < 0) | (labels >= k)).any()):
            raise InvalidInputError(f"labels must lie in [0, {k}), got {labels.tolist()}")
        return labels.long()

    def step(self, batch: Batch) -> DeviceStep:
        """Stage 2 from a CUDA graph when the judge has one for the batch's signature (its
        report is then on the host already), else :meth:`device_step`."""
        if self.graphs is not None:
            found = self.graphs(batch.x, batch.labels)
            if found is not None:
                output, host = found
                return DeviceStep(output, DeviceReport(**host), batch)
        return self.device_step(batch)

    def _graph_step(
        self, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """The device step as :class:`~surprise_monitor.monitor.cuda_graphs.StepGraphs` records it:
        every value
        check on the device (one graph serves host-checked and unchecked inputs alike)."""
        step = self.device_step(Batch(x, labels, input_checked=False, labels_checked=False))
        return step.output, step.report.tensors()

    def device_step(self, batch: Batch) -> DeviceStep:
        """Stage 2: the model's output and the :class:`DeviceReport` of a validated batch."""
        x, labels = batch.x, batch.labels
        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        nonfinite_input = zero
        if not batch.input_checked:
            nonfinite_input = (~torch.isfinite(x)).flatten(1).any(dim=1).sum()
        bad_labels = zero
        if labels is not None and not batch.labels_checked:
            k = self.table.num_classes
            bad_labels = ((labels < 0) | (labels >= k)).sum()
            labels = labels.clamp(0, k - 1)  # never index out of range on the device
        res, means = self._probe(x, labels, check_labels=False)
        self._check_shapes(res.activation, res.logits, means)
        alpha = grad_amap(res.activation, res.gradient, backend=self.execution.backend)
        tables = self._tables_for(alpha.device)
        cls = res.classes.to(alpha.device)
        found = percentile_lookup(
            alpha, cls, tables, backend=self.execution.backend, check_values=False
        )
        alarm = self._alarm(found.percentile, means, labels is not None, cls, res.logits)
        report = DeviceReport(
            logits=res.logits.float(),
            classes=cls,
            alpha=alpha,
            mu=tables.mean.index_select(0, cls),
            percentile=found.percentile,
            surprise=found.surprise,
            expectation=found.expectation,
            beta=found.beta,
            beta_percentile=found.beta_percentile,
            low_beta=found.low_beta,
            calibrated=found.calibrated,
            **alarm,
            nonfinite_input=nonfinite_input,
            bad_labels=bad_labels,
            nonfinite_alpha=(~torch.isfinite(alpha)).sum(),
        )
        return DeviceStep(res.output, report, batch)

    def assemble(self, step: DeviceStep, labels_given: bool | None = None) -> MonitorReport:
        """Stage 3: the host report of a device step. Raises :class:`InvalidInputError` for
        input or labels the device step found bad, ``ValueError`` for non-finite alpha.

        Every :class:`DeviceReport` field but the :attr:`DeviceReport.CHECKS` becomes the
        :class:`~surprise_monitor.monitor.report.MonitorReport` field of the same name."""
        host = step.report.to_host()
        if labels_given is None:
            labels_given = step.batch is not None and step.batch.labels_given
        self._raise_checks(host, step.batch)
        per_input = {f.name: getattr(host, f.name) for f in fields(host)}
        for name in DeviceReport.CHECKS:
            del per_input[name]
        return MonitorReport(
            **per_input,
            labels_given=labels_given,
            layer=self.layer,
            class_names=tuple(self.table.class_names),
            alarm_rate=self.thresholds.alarm_rate,
            component_names=self.component_names,
            learned=None if self.table.alarm is None else self.table.alarm.learned,
            evidence=(self.table.alarm.evidence if self.table.alarm else "") or DEFAULT_EVIDENCE,
        )

    def _raise_checks(self, host: DeviceReport, batch: Batch | None) -> None:
        """Raise what the device-side checks found, with the host checks' messages (reading
        the batch again: a host sync, on the error path only)."""
        if int(host.nonfinite_input):
            if batch is not None:
                self.check_input(batch.x)
            raise InvalidInputError(
                f"input has NaN or Inf values in {int(host.nonfinite_input)} rows"
            )
        if int(host.bad_labels):
            if batch is not None and batch.labels is not None:
                self.check_labels(batch.labels.cpu(), int(batch.x.shape[0]))
            raise InvalidInputError(f"labels must lie in [0, {self.table.num_classes})")
        bad = int(host.nonfinite_alpha)
        if bad:
            raise NonFiniteAlphaError(f"percentile_lookup: alpha has {bad} non-finite values")

    def _alarm(
        self,
        alpha_percentile: torch.Tensor,
        means: list[torch.Tensor],
        labels_given: bool,
        classes: torch.Tensor,
        logits: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The score's components, the score, its p-value and the alarm of a batch (device
        tensors; NaN / NaN / False where the table lacks the reference or the null; the gated
        score adds energy and the stage distances to the components). The
        p-value is taken among the held-out scores of the input's class (``classes``: the
        label when given, else the prediction) when the table has per-class nulls and that
        class enough held-out images, else among all of them. With the table's family nulls,
        the p-value of each component family's statistic
        (:mod:`~surprise_monitor.monitor.families`) among the held-out images', else NaN."""
        b, dev = alpha_percentile.shape[0], alpha_percentile.device
        nan = torch.full((b,), float("nan"), device=dev)
        no = torch.zeros(b, dtype=torch.bool, device=dev)
        if self.table.alarm is None:
            parts = expectation_mass(alpha_percentile)[:, None]
            return _alarm_fields(nan, nan, no, parts, torch.full_like(parts, float("nan")))
        alarm = self._alarm_tables_for(dev)
        stages = [
            percentile_rank(m, grid, alarm.levels)
            for m, grid in zip(means[: len(alarm.profile_grids)], alarm.profile_grids, strict=True)
        ]
        head = None
        if alarm.head is not None:
            head = alarm.head(means[-1])
        parts = components(alpha_percentile, stages, head)
        if alarm.stage is not None:
            extra = [energy(logits).to(dev)[:, None], alarm.stage(means)]
            if alarm.knn is not None:
                extra.append(alarm.knn(means[-1])[:, None])
            parts = torch.cat([parts, *extra], dim=1)
        if alarm.reference is None:
            return _alarm_fields(nan, nan, no, parts, torch.full_like(parts, float("nan")))
        ranks = alarm.reference.ranks(parts)
        score = fisher(ranks) if alarm.gate is None else alarm.gate.score(ranks)
        null = alarm.null_labelled if labels_given else alarm.null_predicted
        if null is None:
            return _with_families(_alarm_fields(score, nan, no, parts, ranks), alarm, labels_given)
        between = self.thresholds.interpolated
        p = null.p_values(score, interpolated=between)
        per_class = alarm.class_null_labelled if labels_given else alarm.class_null_predicted
        if per_class is not None:
            p = per_class.p_values(score, classes, fallback=p, interpolated=between)
        level = alarm.level_labelled if labels_given else alarm.level_predicted
        assert level is not None
        found = _alarm_fields(score, p, p <= level[classes], parts, ranks)
        return _with_families(found, alarm, labels_given)

    # ------------------------------------------------------------------ helpers
    def _check_shapes(
        self, activation: torch.Tensor, logits: torch.Tensor, means: list[torch.Tensor]
    ) -> None:
        """:class:`TableMismatchError` when the layer's filters, the model's classes or the
        profile and head layers' channels are not the table's (shapes only: no sync)."""
        n, k = activation.shape[1], logits.shape[1]
        if n != self.table.num_filters:
            raise TableMismatchError(
                f"layer {self.layer!r} has {n} filters but the table has {self.table.num_filters}"
            )
        if k != self.table.num_classes:
            raise TableMismatchError(
                f"the model has {k} classes but the table has {self.table.num_classes}"
            )
        alarm = self.table.alarm
        if alarm is None:
            return
        wanted = [g.shape[0] for g in alarm.profile_quantiles]
        if alarm.head_means is not None:
            wanted.append(alarm.head_means.shape[1])
        for layer, m, channels in zip(alarm.tap_layers, means, wanted, strict=True):
            if m.shape[1] != channels:
                kind = "head" if layer == alarm.head_layer else "profile"
                raise TableMismatchError(
                    f"{kind} layer {layer!r} has {m.shape[1]} channels but the table {channels}"
                )

    def _alarm_tables_for(self, device: torch.device) -> _AlarmTables:
        """The table's alarm part prepared on ``device`` (once per device, thread-safe)."""
        with self._lock:
            if device not in self._alarm_tables:
                a = self.table.alarm
                assert a is not None
                self._alarm_tables[device] = _AlarmTables(
                    levels=self.table.levels.to(device, torch.float32),
                    profile_grids=tuple(g.to(device, torch.float32) for g in a.profile_quantiles),
                    head=_head_on(a, device),
                    reference=None if a.reference is None else a.reference.to(device),
                    stage=_stage_on(a, device),
                    knn=None if a.knn is None else a.knn.to(device),
                    gate=_gate_on(a, device),
                    null_predicted=_on(a.null_predicted, device),
                    null_labelled=_on(a.null_labelled, device),
                    class_null_predicted=_on(a.class_null_predicted, device),
                    class_null_labelled=_on(a.class_null_labelled, device),
                    family_null_predicted=_on(a.family_null_predicted, device),
                    family_null_labelled=_on(a.family_null_labelled, device),
                    family_columns=tuple(
                        torch.tensor(c, dtype=torch.int64, device=device)
                        for c in family_columns(a.component_names())
                    ),
                    level_predicted=self._levels(a, False, device),
                    level_labelled=self._levels(a, True, device),
                )
            return self._alarm_tables[device]

    def _levels(
        self, alarm: AlarmCalibration, labels_given: bool, device: torch.device
    ) -> torch.Tensor | None:
        """``[K]`` float32 p-value thresholds, one per class: ``alarm_rate`` (the marginal
        guarantee), or with ``alarm_confidence`` the calibration-conditional level of the null
        each class's p-values come from (its own, or the pooled one)
        (:func:`~surprise_monitor.monitor.conformal.conditional_level`)."""
        sizes = alarm.null_sizes(labels_given, self.table.num_classes)
        if not sizes:
            return None
        t = self.thresholds
        levels = [conditional_level(n, t.alarm_rate, t.alarm_confidence) for n in sizes]
        return torch.tensor(levels, dtype=torch.float32, device=device)

    def _tables_for(self, device: torch.device) -> LookupTable:
        """The table prepared on ``device`` (once per device, thread-safe): the alpha grid,
        thresholds, guard, calibrated mask, beta grid and low-beta threshold."""
        with self._lock:
            if device not in self._tables:
                t = self.thresholds
                self._tables[device] = prepare_lookup_table(
                    self.table, surprise_pct=t.surprise_pct, expectation_pct=t.expectation_pct,
                    low_beta_pct=t.low_beta_pct, device=device,
                )  # fmt: skip
            return self._tables[device]


def _alarm_fields(
    score: torch.Tensor,
    p_value: torch.Tensor,
    alarm: torch.Tensor,
    parts: torch.Tensor,
    ranks: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The :class:`DeviceReport` fields of the alarm, by name (the family p-values NaN: the
    caller fills them where the table has family nulls)."""
    family = torch.full((score.shape[0], len(FAMILIES)), float("nan"), device=score.device)
    return {"score": score, "p_value": p_value, "alarm": alarm, "components": parts,
            "component_ranks": ranks, "family_p_values": family}  # fmt: skip


def _with_families(
    found: dict[str, torch.Tensor], tables: _AlarmTables, labels_given: bool
) -> dict[str, torch.Tensor]:
    """``found`` (:meth:`Judge._alarm`'s fields) with each component family's p-value among
    the family nulls of ``tables`` (the alarm part on the batch's device), where it has them
    (:mod:`~surprise_monitor.monitor.families`)."""
    family = tables.family_null_labelled if labels_given else tables.family_null_predicted
    if family is not None:
        stats = family_statistics(found["component_ranks"], tables.family_columns)
        found["family_p_values"] = family.p_values(stats)
    return found


def _head_on(alarm: AlarmCalibration, device: torch.device) -> HeadDistance | None:
    """The alarm part's head distance on ``device`` (``None`` without a head)."""
    if alarm.head_means is None or alarm.head_precision is None:
        return None
    return HeadDistance.of(
        alarm.head_means.to(device, torch.float32), alarm.head_precision.to(device, torch.float32)
    )


def _stage_on(alarm: AlarmCalibration, device: torch.device) -> StageDistance | None:
    """The gated score's stage distances on ``device`` (``None`` for the Fisher score)."""
    if not alarm.gated:
        return None
    return StageDistance.of(
        [m.to(device, torch.float32) for m in alarm.stage_means],
        [p.to(device, torch.float32) for p in alarm.stage_precisions],
    )


def _gate_on(alarm: AlarmCalibration, device: torch.device) -> Gate | None:
    """The gated score's gate, its learned evidence on ``device`` (``None`` for Fisher's)."""
    gate = alarm.gate()
    return None if gate is None else gate.to(device)


def _on(null: N | None, device: torch.device) -> N | None:
    """``null`` on ``device`` (``None`` stays ``None``)."""
    return None if null is None else null.to(device)


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
    """Anything that holds a judge (a :class:`~surprise_monitor.monitor.SurpriseMonitor`)."""

    @property
    def judge(self) -> Judge:
        """The judge it holds."""
        ...


def judge_of(target: Judge | HasJudge) -> Judge:
    """``target`` itself when it is a judge, else the judge it holds."""
    return target if isinstance(target, Judge) else target.judge


def _check_table_fits(model: nn.Module, table: CalibrationTable, check_fingerprint: bool) -> None:
    """Refuse a model that is not an eval-mode module, or a table made for other weights or
    whose layer statistics are another layer's (:class:`TableMismatchError`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    require_eval(model)
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
                    problem + "pass execution=Execution(check_fingerprint=False) if the change "
                    "is deliberate"
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
