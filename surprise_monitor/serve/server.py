"""The service's HTTP server: uvicorn with deadlines on every connection and a bounded shutdown.

uvicorn alone has a keep-alive timeout between requests but none while a request's headers or
body arrive, and none before a connection's first request: one client sending a byte a second
holds a connection (and, on SIGTERM, the whole process) for as long as it likes.
:class:`DeadlineH11Protocol` adds two deadlines to uvicorn's h11 protocol:

- **headers**: from the moment a connection opens (or its next request's first byte arrives)
  until the request's headers are complete, ``header_timeout`` seconds;
- **body**: from the headers until the last byte of the body, ``body_timeout`` seconds in all
  (a total, so a trickle of bytes does not renew it).

A connection past a deadline is answered ``408 Request Timeout`` (when no response has started)
and closed. :func:`run_server` passes the rest to uvicorn: the keep-alive timeout, the concurrency
limit (``503`` beyond it) and ``timeout_graceful_shutdown``, after which requests still running
are cancelled, so SIGTERM exits within that bound whatever the clients do.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from surprise_monitor.serve.limits import ConnectionLimits

log = logging.getLogger("surprise_monitor.serve")


def _timeout_response(what: str, seconds: float) -> bytes:
    """A raw ``408`` response that closes the connection (written below h11's state machine:
    the connection is closed right after it)."""
    body = f"{what} not received within {seconds:g} s; closing the connection\n".encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a body deadline per request (set the
    class attributes, or use :func:`protocol_class`)."""

    header_timeout: float = ConnectionLimits.header_timeout
    body_timeout: float = ConnectionLimits.body_timeout

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""  # "headers", "body" or "" (no deadline running)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """A new connection: its first request's headers are due within the deadline."""
        super().connection_made(transport)
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        """Gone: no deadline left running."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Bytes in: h11 parses them, then the deadline follows the request's state."""
        super().data_received(data)
        self._follow_state()

    def on_response_complete(self) -> None:
        """A response sent: the keep-alive timer runs until the next request's bytes."""
        super().on_response_complete()
        if self._phase == "headers":  # the next request starts with the keep-alive timer
            self._disarm()
        self._follow_state()

    def _follow_state(self) -> None:
        """Arm or clear the deadline for where the client is: still sending headers (a new
        request's first bytes are buffered), sending the body, or done."""
        if self.transport is None or self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self.conn.trailing_data[0] and self._phase != "headers":
                self._arm("headers")  # part of the next request's head is here
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        else:
            self._disarm()

    def _arm(self, phase: str) -> None:
        """Start ``phase``'s deadline (replacing any running one)."""
        self._disarm()
        seconds = self.header_timeout if phase == "headers" else self.body_timeout
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired, phase, seconds)

    def _disarm(self) -> None:
        """Clear the running deadline."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, ""

    def _expired(self, phase: str, seconds: float) -> None:
        """The deadline passed: ``408`` if nothing was answered yet, then close."""
        self._deadline, self._phase = None, ""
        if self.transport is None or self.transport.is_closing():
            return
        answered = self.cycle is not None and self.cycle.response_started
        if not answered:
            what = "request headers" if phase == "headers" else "the whole request body"
            self.transport.write(_timeout_response(what, seconds))
        log.warning("closing a connection from %s: its %s took over %g s", self.client,
                    phase, seconds)  # fmt: skip
        self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[DeadlineH11Protocol]:
    """A :class:`DeadlineH11Protocol` subclass with ``limits``' deadlines."""
    return type(
        "DeadlineH11Protocol",
        (DeadlineH11Protocol,),
        {"header_timeout": limits.header_timeout, "body_timeout": limits.body_timeout},
    )


def uvicorn_config(app: Any, host: str, port: int, limits: ConnectionLimits) -> Any:
    """The uvicorn configuration of the service: deadlines, keep-alive, concurrency limit and
    the graceful-shutdown bound from ``limits``."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", http=protocol_class(limits),
        timeout_keep_alive=limits.keep_alive_timeout,
        timeout_graceful_shutdown=limits.shutdown_timeout,
        limit_concurrency=limits.max_connections,
    )  # fmt: skip


def run_server(app: Any, host: str, port: int, limits: ConnectionLimits) -> None:
    """Serve ``app`` until SIGINT / SIGTERM; exits at most ``limits.shutdown_timeout`` seconds
    (plus the app's own shutdown) after the signal."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host, port, limits)).run()
