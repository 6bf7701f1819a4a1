"""A small HTTP inference service watched by the surprise monitor (FastAPI + uvicorn).

Run (a torch model, or an ONNX file with ``--onnx model.onnx`` instead of --model/--weights):

    python examples/serve.py --model resnet50 --weights resnet50.pt \\
        --table resnet50.safetensors --host 127.0.0.1 --port 8000

Endpoints:

- ``POST /predict`` with JSON ``{"inputs": B x C x H x W floats (preprocessed as for
  calibration), "labels": [B class indices or names] (optional), "surprise": true
  (optional)}`` answers ``{"predictions": [B], "classes": [B names], "logits": [B x K],
  "score": [B], "p_value": [B], "alarm": [B], "surprise": [B summaries] or null}``. ``score``
  is the input's atypicality (higher: more atypical), ``p_value`` its conformal p-value among
  the table's held-out images and ``alarm`` whether ``p_value <= --alarm-rate``; each is
  ``null`` for an input that was not judged on the request path (sampled out, async mode, or a
  monitoring failure: those are counted in the metrics), and ``p_value`` / ``alarm`` are also
  ``null`` with a table without held-out images. A summary is ``MonitorReport.sample()`` (the
  same three, beta, the most surprising and expected filters that explain an alarm).
- ``POST /predict/image`` with a PNG or JPEG file as the body (``curl --data-binary @cat.jpg
  -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8000/predict/image?surprise=true'``;
  ``?label=cat`` optional): the image gets the table's recorded preprocessing (resize, crop,
  mean, std, grayscale), and the answer is ``/predict``'s for one input.
- ``GET /alarms/``: the operator's page of recent alarms (newest first: thumbnail, class, score,
  p-value, the filters that explain each; filters by class and flag; a click opens the explanation
  figure), ``GET /alarms/alarms.json`` the same as JSON (:mod:`surprise_monitor.monitor.web`).
  ``--alarm-log N`` alarms are kept (0: no page), ``--alarm-audit FILE`` appends each to a JSONL
  audit file rotated at ``--alarm-audit-max-mb``. A request's ``X-Request-ID`` header (else a new
  id, returned as ``request_id``) is kept with its alarms.
- ``GET /metrics``: Prometheus metrics (the monitor's, plus the process's).
- ``GET /healthz``: ``{"status": "ok", "monitor": "sync" | "async" | "off"}``.

Limits: a body over ``--max-body-mb`` is answered 413 before it is read whole; more than
``--max-batch`` inputs, 413; inputs of another ``C x H x W`` than the table's, 422 (before the
model runs); an image over ``--max-image-pixels``, 413. ``--mode async`` answers from the plain
model and judges a copy of the inputs on a worker thread; ``--sample-every K`` judges one input
in K; ``--no-monitor`` serves the bare model (for comparison); ``--metrics-label model=resnet50``
adds constant labels to the monitor's series; ``--alarm-rate`` is the nominal false-alarm rate
(exported as ``surprise_monitor_alarm_rate_nominal``, which the alert rules read) and
``--metrics-window`` the inputs in the windowed alarm rate and drift gauges. The monitor never
turns a prediction into an error: an input the model itself cannot run is answered with HTTP
400 naming the problem.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from surprise_monitor.calibrate import CalibrationTable  # noqa: E402
from surprise_monitor.monitor import AlarmLog, MonitorReport, SurpriseMonitor  # noqa: E402
from surprise_monitor.monitor.advice import cli_message  # noqa: E402
from surprise_monitor.monitor.loading.images import Preprocessing  # noqa: E402
from surprise_monitor.monitor.loading.model_args import (  # noqa: E402
    HelpFormatter,
    add_model_arguments,
    model_from_args,
)

log = logging.getLogger("serve")
IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream")


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_body_bytes: int = 16 << 20
    max_batch: int = 64
    max_image_pixels: int = 25_000_000


class PredictRequest(BaseModel):
    inputs: list
    labels: list[int | str] | None = None
    surprise: bool = False
    max_filters: int = 5


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 as soon as its
    declared length or the bytes received so far exceed it; the app never sees it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Answer 413 naming the limit."""
        mb = self.max_bytes / (1 << 20)
        detail = f"request body over {self.max_bytes} bytes ({mb:g} MiB, --max-body-mb)"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def _replay(body: bytes, receive: Callable) -> Callable[[], Awaitable[dict]]:
    """An ASGI ``receive`` that gives ``body`` once, then defers to ``receive``."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def create_app(
    model: nn.Module,
    monitor: SurpriseMonitor | None,
    *,
    table: CalibrationTable | None = None,
    limits: Limits = Limits(),
    registry: CollectorRegistry = REGISTRY,
) -> FastAPI:
    """The service: ``model`` answers, ``monitor`` (if any) watches, ``table`` (the monitor's by
    default) gives the input size, the class names and the image preprocessing; ``close()``
    on shutdown. With the monitor's ``alarm_log`` the operator's page is mounted at
    ``/alarms``. Routes are added by small functions, so others can be added beside them."""
    table = table if table is not None else (monitor.table if monitor is not None else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if monitor is not None:
            monitor.close()
            if isinstance(monitor.alarm_log, AlarmLog):
                monitor.alarm_log.close()

    app = FastAPI(title="surprise-monitor example service", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    service = _Service(model, monitor, table, limits)
    _add_routes(app, service, registry)
    if monitor is not None and isinstance(monitor.alarm_log, AlarmLog):
        from surprise_monitor.monitor.web.app import alarm_app

        app.mount("/alarms", alarm_app(monitor.alarm_log, monitor))
    return app


def _add_routes(app: FastAPI, service: _Service, registry: CollectorRegistry) -> None:
    """``/healthz``, ``/metrics``, ``/predict`` and ``/predict/image``."""

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        mode = service.monitor.mode if service.monitor is not None else "off"
        return {"status": "ok", "monitor": mode}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    def predict(req: PredictRequest, request: Request) -> dict[str, Any]:  # a worker thread
        x = service.tensor(req.inputs)
        labels = None if req.labels is None else [service.label(v) for v in req.labels]
        return service.answer(x, labels, req.surprise, req.max_filters, _request_id(request))

    @app.post("/predict/image")
    async def predict_image(
        request: Request, label: str | None = None, surprise: bool = False, max_filters: int = 5
    ) -> dict[str, Any]:
        x = service.image(await request.body(), request.headers.get("content-type", ""))
        labels = None if label is None else [service.label(label)]
        return service.answer(x, labels, surprise, max_filters, _request_id(request))


def _request_id(request: Request) -> str:
    """The request's ``X-Request-ID`` header (at most 128 characters), else a new id."""
    given = request.headers.get("x-request-id", "")[:128]
    return given or uuid.uuid4().hex


class _Service:
    """What the routes do: check inputs against the limits and the table, run the monitored
    model, shape the answer."""

    def __init__(
        self,
        model: nn.Module,
        monitor: SurpriseMonitor | None,
        table: CalibrationTable | None,
        limits: Limits,
    ) -> None:
        self.model, self.monitor, self.table, self.limits = model, monitor, table, limits
        self.names = list(table.class_names) if table is not None else []

    def tensor(self, inputs: list) -> torch.Tensor:
        """The JSON inputs as a float32 batch, checked (422 / 413 otherwise)."""
        try:
            x = torch.tensor(inputs, dtype=torch.float32)
        except (ValueError, TypeError) as exc:
            raise HTTPException(
                422, f"inputs must be a rectangular array of numbers: {exc}"
            ) from exc
        if x.ndim != 4 or x.shape[0] == 0:
            raise HTTPException(422, f"inputs must be a non-empty B x C x H x W array, got "
                                     f"shape {list(x.shape)}")  # fmt: skip
        self.check_shape(x)
        return x

    def check_shape(self, x: torch.Tensor) -> None:
        """413 for too many inputs; 422 for inputs of another size than the table's."""
        if x.shape[0] > self.limits.max_batch:
            raise HTTPException(
                413, f"{x.shape[0]} inputs in one request; at most {self.limits.max_batch} "
                "(--max-batch)",
            )  # fmt: skip
        expect = tuple(self.table.input_shape) if self.table is not None else ()
        if expect and tuple(x.shape[1:]) != expect:
            raise HTTPException(
                422, f"each input must be C x H x W = {list(expect)} (the calibration images' "
                f"size), got {list(x.shape[1:])}",
            )  # fmt: skip

    def label(self, value: int | str) -> int:
        """A label as a class index: an index, or a class name of the table (422 otherwise)."""
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            return int(value)
        if value in self.names:
            return self.names.index(value)
        raise HTTPException(
            422, f"label {value!r} is not a class of this model; classes: {', '.join(self.names)}"
        )

    def image(self, body: bytes, content_type: str) -> torch.Tensor:
        """A PNG / JPEG body preprocessed as the table records: ``[1, C, H, W]``."""
        from PIL import Image, UnidentifiedImageError

        if content_type.split(";")[0].strip() not in IMAGE_TYPES:
            raise HTTPException(
                415, f"send a PNG or JPEG file as the body ({', '.join(IMAGE_TYPES)})"
            )
        if self.table is None or not self.table.input_shape:
            raise HTTPException(422, "this service has no table to preprocess images with")
        try:
            steps = self._preprocessing()
            with Image.open(io.BytesIO(body)) as im:
                if im.width * im.height > self.limits.max_image_pixels:
                    raise HTTPException(
                        413, f"image of {im.width}x{im.height} pixels; at most "
                        f"{self.limits.max_image_pixels} (--max-image-pixels)",
                    )  # fmt: skip
                img = im.convert("L" if steps.grayscale else "RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise HTTPException(422, f"not a readable PNG or JPEG image: {exc}") from exc
        x = steps.transform(self.table.input_shape[1:])(img).unsqueeze(0)
        self.check_shape(x)
        return x

    def _preprocessing(self) -> Preprocessing:
        """The table's recorded preprocessing (422 when it records none)."""
        one_channel = self.table.input_shape[0] == 1
        try:
            return Preprocessing.from_source(
                self.table.data_source, grayscale=True if one_channel else None
            )
        except ValueError as exc:
            raise HTTPException(422, f"this service cannot preprocess images: {exc}") from exc

    def answer(
        self, x: torch.Tensor, labels: list[int] | None, surprise: bool, max_filters: int,
        request_id: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Predictions, class names, logits and (when asked) surprise summaries for ``x``."""
        try:
            if self.monitor is not None:
                result = self.monitor.run(x, labels, request_id=request_id)
                output, report, rows = result.output, result.report, result.rows.tolist()
            else:
                with torch.no_grad():
                    output, report, rows = self.model(x), None, []
        except Exception as exc:  # the model itself cannot run this input
            raise HTTPException(400, f"the model cannot run this input: {exc}") from exc
        logits = output.float()
        predictions = logits.argmax(dim=1).tolist()
        body: dict[str, Any] = {
            "predictions": predictions,
            "classes": [self.names[p] if p < len(self.names) else str(p) for p in predictions],
            "logits": [[v if math.isfinite(v) else None for v in row] for row in logits.tolist()],
            **_alarm_fields(report, rows, len(x)),
            "request_id": request_id,
            "surprise": None,
        }
        if surprise:
            body["surprise"] = _summaries(report, rows, len(x), max_filters)
        return body


def _alarm_fields(report: MonitorReport | None, rows: list[int], n: int) -> dict[str, list]:
    """``score``, ``p_value`` and ``alarm`` per input (``None`` where not judged, and p-value
    and alarm ``None`` without a held-out null: NaN p-value)."""
    out: dict[str, list] = {"score": [None] * n, "p_value": [None] * n, "alarm": [None] * n}
    if report is not None:
        scores, p_values = report.score.tolist(), report.p_value.tolist()
        alarms = report.alarm.tolist()
        for j, row in enumerate(rows):
            known = math.isfinite(p_values[j])
            out["score"][row] = scores[j] if math.isfinite(scores[j]) else None
            out["p_value"][row] = p_values[j] if known else None
            out["alarm"][row] = bool(alarms[j]) if known else None
    return out


def _summaries(
    report: MonitorReport | None, rows: list[int], n: int, max_filters: int
) -> list[dict[str, Any] | None]:
    """``MonitorReport.sample`` per judged input, ``None`` for the others."""
    out: list[dict[str, Any] | None] = [None] * n
    if report is not None:
        for j, row in enumerate(rows):
            out[row] = report.sample(j, max_filters=max_filters)
    return out


def metrics_labels(values: Sequence[str]) -> dict[str, str]:
    """``--metrics-label KEY=VALUE`` options as a dict."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"serve.py: --metrics-label takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=HelpFormatter
    )
    add_model_arguments(p)
    p.add_argument("--table", help="calibration table (.safetensors); required with the monitor")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--mode", choices=["sync", "async"], default="sync", help="monitor mode")
    p.add_argument("--sample-every", type=int, default=1, help="judge one input in K")
    p.add_argument("--queue-size", type=int, default=64, help="async mode: batches queued")
    p.add_argument("--no-monitor", action="store_true", help="serve the bare model")
    p.add_argument(
        "--no-fingerprint-check", action="store_true",
        help="use the table with a model whose weights changed since calibration (deliberately)",
    )  # fmt: skip
    p.add_argument(
        "--metrics-label", action="append", default=[], metavar="KEY=VALUE",
        help="a constant label on the monitor's metrics (repeatable), e.g. model=resnet50",
    )  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (MiB)")
    p.add_argument("--max-batch", type=int, default=64, help="most inputs in one request")
    p.add_argument(
        "--max-image-pixels", type=int, default=25_000_000, help="largest uploaded image"
    )
    p.add_argument(
        "--alarm-rate", type=float, default=0.01,
        help="nominal false-alarm rate: an input alarms when its p-value is at most this",
    )  # fmt: skip
    p.add_argument(
        "--metrics-window", type=int, default=1000,
        help="judged inputs in the windowed alarm rate and the KS drift gauge",
    )  # fmt: skip
    p.add_argument("--per-class-metrics", action="store_true",
                   help="a class label on the monitored / flagged / alarmed counters")  # fmt: skip
    p.add_argument("--log-flags", action="store_true", help="log each input that alarms")
    p.add_argument(
        "--alarm-log", type=int, default=500, metavar="N",
        help="recent alarms kept for the operator's page at /alarms/ (0: no page)",
    )  # fmt: skip
    p.add_argument("--alarm-audit", metavar="FILE",
                   help="append each alarm to this JSONL audit file (rotated by size)")  # fmt: skip
    p.add_argument("--alarm-audit-max-mb", type=float, default=16.0,
                   help="rotate the audit file at this size (MiB; 5 older files kept)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = metrics_labels(args.metrics_label)
    if not args.no_monitor and not args.table:
        raise SystemExit("serve.py: --table is required unless --no-monitor")
    if not 0.0 < args.alarm_rate < 1.0:
        raise SystemExit(
            f"serve.py: --alarm-rate must be in (0, 1), e.g. 0.01; got {args.alarm_rate}"
        )
    if args.alarm_log < 0 or (args.alarm_audit and args.alarm_log == 0):
        raise SystemExit("serve.py: --alarm-log must be >= 1 with --alarm-audit (0: no log)")
    if args.alarm_audit_max_mb <= 0:
        raise SystemExit(
            f"serve.py: --alarm-audit-max-mb must be > 0; got {args.alarm_audit_max_mb}"
        )
    if args.metrics_window < 1:
        raise SystemExit(f"serve.py: --metrics-window must be >= 1; got {args.metrics_window}")
    try:
        model = model_from_args(args, None, "serve.py")
        table = CalibrationTable.load(args.table, exemplars=False) if args.table else None
        monitor = None if args.no_monitor else _monitor(model, table, args, labels)
    except (ValueError, TypeError, OSError) as exc:
        raise SystemExit(f"serve.py: error: {cli_message(exc)}") from None
    limits = Limits(int(args.max_body_mb * (1 << 20)), args.max_batch, args.max_image_pixels)
    app = create_app(model, monitor, table=table, limits=limits)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _monitor(
    model: nn.Module, table: CalibrationTable, args: argparse.Namespace, labels: dict[str, str]
) -> SurpriseMonitor:
    """The service's monitor, with metrics in the global registry."""

    def on_flag(report: MonitorReport) -> None:
        log.info("alarm: %s", report.to_json(max_filters=3))

    alarm_log = None
    if args.alarm_log:
        alarm_log = AlarmLog(
            args.alarm_log, sink=args.alarm_audit,
            sink_max_bytes=max(1, int(args.alarm_audit_max_mb * (1 << 20))),
        )  # fmt: skip
    return SurpriseMonitor(
        model, table, metrics=True, metrics_labels=labels or None, mode=args.mode,
        alarm_log=alarm_log,
        alarm_rate=args.alarm_rate, metrics_window=args.metrics_window,
        per_class_metrics=args.per_class_metrics,
        sample_every=args.sample_every, queue_size=args.queue_size,
        on_flag=on_flag if args.log_flags else None,
        check_fingerprint=not args.no_fingerprint_check,
    )  # fmt: skip


if __name__ == "__main__":
    main()
