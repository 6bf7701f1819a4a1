"""The HTTP inference service watched by the surprise monitor (FastAPI): :func:`create_app`.

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
  figure), ``GET /alarms/alarms.json`` the same as JSON (:mod:`surprise_monitor.monitor.web`),
  mounted when the monitor has an :class:`~surprise_monitor.monitor.AlarmLog`. A request's
  ``X-Request-ID`` header (else a new id, returned as ``request_id``) is kept with its alarms.
- ``GET /metrics``: Prometheus metrics (the monitor's, plus the process's).
- ``GET /healthz``: ``{"status": "ok", "monitor": "sync" | "async" | "off"}``.

Limits (:class:`~surprise_monitor.serve.limits.Limits`): a body over ``max_body_bytes`` is
answered 413 before it is read whole; more than ``max_batch`` inputs, 413; inputs of another
``C x H x W`` than the table's, 422 (before the model runs); an image over ``max_image_pixels``,
413. The monitor never turns a prediction into an error: an input the model itself cannot run is
answered with HTTP 400 naming the problem. The command line is
:mod:`surprise_monitor.serve.cli` (``surprise-serve``).
"""

from __future__ import annotations

import io
import itertools
import math
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from torch import nn

from surprise_monitor.monitor import AlarmLog, MonitorReport, SurpriseMonitor
from surprise_monitor.monitor.loading.images import Preprocessing
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.serve.limits import Limits

IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream")
#: The image formats decoded (whatever the content type says).
IMAGE_FORMATS = ("PNG", "JPEG")
#: The most filters a summary lists.
MAX_FILTERS = 1000
#: The most digits a class index may have (longer strings are refused before ``int()``).
MAX_LABEL_DIGITS = 9


class PredictRequest(BaseModel):
    """The JSON body of ``POST /predict`` (booleans are refused as labels)."""

    inputs: list
    labels: list[StrictInt | StrictStr] | None = None
    surprise: StrictBool = False
    max_filters: StrictInt = Field(5, ge=0, le=MAX_FILTERS)


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
    limits: Limits | None = None,
    registry: CollectorRegistry | None = REGISTRY,
    service: PredictionService | None = None,
    alarm_view: Any | None = None,
) -> FastAPI:
    """The service: ``model`` answers, ``monitor`` (if any) watches, ``table`` (the monitor's by
    default) gives the input size, the class names and the image preprocessing; ``close()``
    on shutdown; ``limits``: the defaults of :class:`~surprise_monitor.serve.limits.Limits`
    when not given. With the monitor's ``alarm_log`` (or ``alarm_view``, something with its
    reading methods) the operator's page is mounted at ``/alarms``; ``registry=None`` leaves
    out ``/metrics`` (metrics exported another way). ``service`` replaces the default
    :class:`PredictionService` (e.g. one that batches requests). Routes are added by small
    functions, so others can be added beside them."""
    limits = limits if limits is not None else Limits()
    table = table if table is not None else (monitor.table if monitor is not None else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if monitor is not None:
            monitor.close()
            if isinstance(monitor.alarm_log, AlarmLog):
                monitor.alarm_log.close()

    app = FastAPI(title="surprise-monitor service", lifespan=lifespan)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    service = service if service is not None else PredictionService(model, monitor, table, limits)
    _add_routes(app, service, registry)
    if alarm_view is None and monitor is not None and isinstance(monitor.alarm_log, AlarmLog):
        alarm_view = monitor.alarm_log
    if alarm_view is not None:
        from surprise_monitor.monitor.web.app import alarm_app

        app.mount("/alarms", alarm_app(alarm_view, monitor))
    return app


def _add_routes(
    app: FastAPI, service: PredictionService, registry: CollectorRegistry | None
) -> None:
    """``/healthz``, ``/metrics`` (with a registry), ``/predict`` and ``/predict/image``."""

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        mode = service.monitor.sampling.mode if service.monitor is not None else "off"
        return {"status": "ok", "monitor": mode}

    if registry is not None:

        @app.get("/metrics")
        def metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(req: PredictRequest, request: Request) -> dict[str, Any]:
        def parse() -> tuple[torch.Tensor, list[int] | None]:  # off the event loop
            x = service.tensor(req.inputs)
            return x, service.labels(req.labels, len(x))

        x, labels = await run_in_threadpool(parse)
        rid = _request_id(request)
        return await service.answer_async(x, labels, req.surprise, req.max_filters, rid)

    @app.post("/predict/image")
    async def predict_image(
        request: Request,
        label: str | None = None,
        surprise: bool = False,
        max_filters: int = Query(5, ge=0, le=MAX_FILTERS),
    ) -> dict[str, Any]:
        body, content_type = await request.body(), request.headers.get("content-type", "")

        def decode() -> tuple[torch.Tensor, list[int] | None]:  # off the event loop
            x = service.image(body, content_type)
            return x, None if label is None else service.labels([label], 1)

        x, labels = await run_in_threadpool(decode)
        rid = _request_id(request)
        return await service.answer_async(x, labels, surprise, max_filters, rid)


_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings swaps process-wide state


def _open_image(body: bytes) -> Any:
    """``Image.open`` of a PNG / JPEG body (only its header is read here), with Pillow's
    decompression-bomb warning raised as an error (like its ``DecompressionBombError``)."""
    from PIL import Image

    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(body), formats=IMAGE_FORMATS)


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's answer to an ``HTTPException``, with the reason a body could not be parsed
    (FastAPI says only "There was an error parsing the body", e.g. for a 5,000-digit number)."""
    from fastapi.exception_handlers import http_exception_handler

    assert isinstance(exc, StarletteHTTPException)
    if (
        exc.status_code == 400
        and exc.__cause__ is not None
        and "parsing the body" in str(exc.detail)
    ):
        cause = f"{type(exc.__cause__).__name__}: {exc.__cause__}"[:300]
        return JSONResponse(
            {"detail": f"the body could not be parsed as JSON ({cause})"}, status_code=400
        )
    return await http_exception_handler(request, exc)


def _leaves(nested: list) -> Any:
    """The leaves of a rectangular 4-D nested list (checked by ``torch.tensor`` first)."""
    chain = itertools.chain.from_iterable
    return chain(chain(chain(nested)))


def check_finite(x: torch.Tensor) -> None:
    """422 naming the inputs that hold NaN or Inf: the model cannot be judged on them (the
    library's wrapper counts such inputs and answers them anyway; the service refuses)."""
    bad = (~torch.isfinite(x)).flatten(1).any(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise HTTPException(
            422, f"inputs {shown} hold NaN or Inf values ({len(rows)} of {len(x)}); send "
            "finite numbers",
        )  # fmt: skip


def _request_id(request: Request) -> str:
    """The request's ``X-Request-ID`` header (at most 128 characters), else a new id."""
    given = request.headers.get("x-request-id", "")[:128]
    return given or uuid.uuid4().hex


class PredictionService:
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
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def tensor(self, inputs: list) -> torch.Tensor:
        """The JSON inputs as a float32 batch, checked (422 / 413 otherwise): rectangular,
        ``B x C x H x W`` of the table's size, numbers (not booleans), finite."""
        try:
            x = torch.tensor(inputs, dtype=torch.float32)
        except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
            raise HTTPException(
                422, f"inputs must be a rectangular array of numbers: {exc}"
            ) from exc
        if x.ndim != 4 or x.shape[0] == 0:
            raise HTTPException(422, f"inputs must be a non-empty B x C x H x W array, got "
                                     f"shape {list(x.shape)}")  # fmt: skip
        self.check_shape(x)
        if bool in set(map(type, _leaves(inputs))):
            raise HTTPException(422, "inputs must be numbers; true / false are not pixel values")
        check_finite(x)
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

    def labels(self, values: list[int | str] | None, batch: int) -> list[int] | None:
        """The labels as class indices, one per input (422 otherwise)."""
        if values is None:
            return None
        if len(values) != batch:
            raise HTTPException(
                422, f"labels has {len(values)} entries for {batch} inputs (one per input)"
            )
        return [self.label(v) for v in values]

    def label(self, value: int | str) -> int:
        """A label as a class index: an index in ``[0, K)`` (an int, or a string of ASCII
        digits) or a class name of the table (422 otherwise)."""
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise HTTPException(422, f"a label is a class index or name, got {value!r}")
        if isinstance(value, str) and value in self.names:
            return self.names.index(value)
        index = value
        if isinstance(value, str):
            digits = value.isascii() and value.isdigit() and len(value) <= MAX_LABEL_DIGITS
            index = int(value) if digits else -1
        k = len(self.names) or self._num_classes()
        if isinstance(index, int) and 0 <= index < (k or 10**MAX_LABEL_DIGITS):
            return index  # any index when no table gives the classes (nothing is judged)
        shown = value if len(str(value)) <= 40 else f"{str(value)[:40]}..."
        names = f"; classes: {', '.join(self.names)}" if self.names else ""
        raise HTTPException(
            422, f"label {shown!r} is not a class of this model (an index in [0, {k}) or a "
            f"class name){names}",
        )  # fmt: skip

    def _num_classes(self) -> int:
        """The model's classes when the table names none (its table's K)."""
        return self.table.num_classes if self.table is not None else 0

    def image(self, body: bytes, content_type: str) -> torch.Tensor:
        """A PNG / JPEG body preprocessed as the table records: ``[1, C, H, W]``."""
        from PIL import Image, UnidentifiedImageError

        if content_type.split(";")[0].strip() not in IMAGE_TYPES:
            raise HTTPException(
                415, f"send a PNG or JPEG file as the body ({', '.join(IMAGE_TYPES)})"
            )
        if self.table is None or not self.table.input_shape:
            raise HTTPException(422, "this service has no table to preprocess images with")
        steps = self._preprocessing()
        try:
            with _open_image(body) as im:
                if im.width * im.height > self.limits.max_image_pixels:
                    raise HTTPException(
                        413, f"image of {im.width}x{im.height} pixels; at most "
                        f"{self.limits.max_image_pixels} (--max-image-pixels)",
                    )  # fmt: skip
                img = im.convert("L" if steps.grayscale else "RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise HTTPException(
                413, f"image refused as a decompression bomb: {exc} (--max-image-pixels is "
                f"{self.limits.max_image_pixels})",
            ) from exc  # fmt: skip
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
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

    def run(
        self, x: torch.Tensor, labels: list[int] | None, request_id: str | Sequence[str] | None
    ) -> tuple[torch.Tensor, MonitorReport | None, list[int]]:
        """The model's output for ``x`` (on the CPU, float), the monitor's report and the batch
        rows it covers; HTTP 400 when the model itself cannot run the input."""
        try:
            x = x.to(self.device)
            if self.monitor is not None:
                result = self.monitor.run(x, labels, request_id=request_id)
                output, report, rows = result.output, result.report, result.rows.tolist()
            else:
                with torch.no_grad():
                    output, report, rows = self.model(x), None, []
        except Exception as exc:  # the model itself cannot run this input
            raise HTTPException(400, f"the model cannot run this input: {exc}") from exc
        return output.float().cpu(), report, rows

    def answer(
        self, x: torch.Tensor, labels: list[int] | None, surprise: bool, max_filters: int,
        request_id: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Predictions, class names, logits and (when asked) surprise summaries for ``x``."""
        logits, report, rows = self.run(x, labels, request_id)
        return self.body(logits, report, rows, surprise, max_filters, request_id)

    async def answer_async(
        self, x: torch.Tensor, labels: list[int] | None, surprise: bool, max_filters: int,
        request_id: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """:meth:`answer` on a worker thread (a batching service overrides this)."""
        return await run_in_threadpool(self.answer, x, labels, surprise, max_filters, request_id)

    def body(
        self, logits: torch.Tensor, report: MonitorReport | None, rows: list[int],
        surprise: bool, max_filters: int, request_id: str | None,
    ) -> dict[str, Any]:  # fmt: skip
        """The JSON answer for one request: ``logits`` ``[B, K]`` on the CPU, ``report`` of
        the batch ``rows`` it covers."""
        predictions = logits.argmax(dim=1).tolist()
        n = len(predictions)
        body: dict[str, Any] = {
            "predictions": predictions,
            "classes": [self.names[p] if p < len(self.names) else str(p) for p in predictions],
            "logits": [[v if math.isfinite(v) else None for v in row] for row in logits.tolist()],
            **_alarm_fields(report, rows, n),
            "request_id": request_id,
            "surprise": None,
        }
        if surprise:
            body["surprise"] = _summaries(report, rows, n, max_filters)
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
