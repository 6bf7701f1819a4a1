"""The operator's page as an ASGI app (Starlette): mount it in any ASGI application.

The log is read on worker threads, never on the event loop, so ``log`` may be an
:class:`~surprise_monitor.monitor.alarms.AlarmLog` or anything with its reading methods that
blocks (e.g. a view of an alarm log held by another process,
:class:`surprise_monitor.integrations.ray_serve.alarms.RemoteAlarmView`).

    from surprise_monitor.monitor.web import alarm_app
    app.mount("/alarms", alarm_app(alarm_log, monitor))   # FastAPI / Starlette

Routes, under the mount point: ``/`` the recent alarms (``?class=NAME&kind=surprise``),
``/alarms.json`` the same as JSON, ``/{id}`` one alarm with its explanation,
``/{id}/thumbnail.png``, ``/{id}/explanation.png`` (computed on the log's worker thread on
first request, then cached; 404 when the alarm's input is no longer kept) and
``/{id}/explanation.json``. Needs ``starlette`` (``pip install surprise-monitor[web]``; FastAPI
brings it); the rest of the library does not.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from surprise_monitor.monitor.alarms.log import KINDS, AlarmLog, AlarmRecord
from surprise_monitor.monitor.web.page import detail_page, list_page

#: The most digits an alarm id in a URL may have.
MAX_ID_DIGITS = 18


def status_of(log: Any, monitor: Any | None) -> dict[str, Any]:
    """The header's figures: the nominal alarm rate, the metrics window's alarm rate, size and
    KS distance (``None`` without metrics), and the alarms recorded."""
    out: dict[str, Any] = {"alarm_rate": None, "window_alarm_rate": None, "window_size": None,
                           "ks_distance": None, "recorded": log.recorded}  # fmt: skip
    if monitor is not None:
        out["alarm_rate"] = monitor.thresholds.alarm_rate
        metrics = getattr(monitor, "metrics", None)
        if metrics is not None:
            m, rate, ks = metrics.window.stats()
            out["window_size"] = m
            out["window_alarm_rate"] = None if math.isnan(rate) else rate
            out["ks_distance"] = None if math.isnan(ks) else ks
    return out


def alarm_app(
    log: AlarmLog | Any, monitor: Any | None = None, explain_timeout: float = 300.0
) -> Starlette:
    """The page's ASGI app over ``log``; ``monitor`` (a ``SurpriseMonitor``) gives the header
    its alarm rate; an explanation taking longer than ``explain_timeout`` s is answered 504."""

    def record_of(request: Request) -> AlarmRecord:
        alarm_id = parse_alarm_id(request.path_params["alarm_id"])
        rec = log.get(alarm_id) if alarm_id is not None else None
        if rec is None:
            raise _NotFound("no such alarm (or it left the log: it keeps the newest "
                            f"{log.capacity})")  # fmt: skip
        return rec

    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    async def index(request: Request) -> Response:
        cls = request.query_params.get("class") or None
        kind = request.query_params.get("kind") or None
        if kind is not None and kind not in KINDS:
            return PlainTextResponse(f"kind must be one of {', '.join(KINDS)}", status_code=400)

        def page() -> str:
            return list_page(log.recent(cls, kind), status_of(log, monitor), base(request),
                             log.class_names(), cls, kind)  # fmt: skip

        return HTMLResponse(await run_in_threadpool(page))

    async def as_json(request: Request) -> Response:
        def listed() -> dict[str, Any]:
            records = [r.summary() for r in log.recent()]
            return {"status": status_of(log, monitor), "alarms": records}

        return JSONResponse(await run_in_threadpool(listed))

    async def detail(request: Request) -> Response:
        def page() -> str:
            rec = record_of(request)
            return detail_page(rec, base(request), log.explanation_if_ready(rec.id))

        return HTMLResponse(await run_in_threadpool(page))

    async def thumbnail(request: Request) -> Response:
        rec = await run_in_threadpool(record_of, request)
        return Response(rec.thumbnail, media_type="image/png")

    async def explained(request: Request) -> tuple[bytes, dict[str, Any]]:
        rec = await run_in_threadpool(record_of, request)
        future = await run_in_threadpool(log.explanation, rec.id)
        if future is None:
            raise _NotFound(f"the input of alarm {rec.id} is no longer kept (the log keeps the "
                            f"newest {log.keep_inputs} inputs)")  # fmt: skip
        return await asyncio.wait_for(asyncio.wrap_future(future), explain_timeout)

    async def figure(request: Request) -> Response:
        png, _ = await explained(request)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def summary(request: Request) -> Response:
        _, data = await explained(request)
        return JSONResponse(data)

    routes = [
        Route("/", index), Route("/alarms.json", as_json),
        Route("/{alarm_id}", detail), Route("/{alarm_id}/thumbnail.png", thumbnail),
        Route("/{alarm_id}/explanation.png", figure),
        Route("/{alarm_id}/explanation.json", summary),
    ]  # fmt: skip
    handlers = {_NotFound: _not_found, TimeoutError: _timed_out, Exception: _failed}
    return Starlette(routes=routes, exception_handlers=handlers)


def parse_alarm_id(text: str) -> int | None:
    """An alarm id from a URL: at most ``MAX_ID_DIGITS`` ASCII digits, else ``None`` (the page
    answers 404 without converting a long string)."""
    if text.isascii() and text.isdigit() and len(text) <= MAX_ID_DIGITS:
        return int(text)
    return None


class _NotFound(LookupError):
    """An alarm or its input that the log no longer holds (404)."""


async def _not_found(request: Request, exc: Exception) -> Response:
    """404 naming what is missing."""
    return PlainTextResponse(str(exc), status_code=404)


async def _timed_out(request: Request, exc: Exception) -> Response:
    """504: the explanation is still being computed."""
    return PlainTextResponse("the explanation is still being computed; try again", 504)


async def _failed(request: Request, exc: Exception) -> Response:
    """500 naming the failure (plain text: nothing from it is rendered as HTML), e.g. an
    explanation that cannot be computed."""
    return PlainTextResponse(f"the alarm page failed: {type(exc).__name__}: {exc}", 500)
