"""The service's connections over loopback: slow headers, slow bodies and idle connections are
answered 408 and closed at their deadlines while normal requests keep working; connections
beyond the limit get 503; SIGTERM with a slow client still attached exits within the shutdown
bound."""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import pytest

from bench._serve_process import start_service, stop_process

HEADER_S, BODY_S = 1.5, 2.5


@pytest.fixture(scope="module")
def service(saved_tiny_model, tmp_path_factory):
    _, _, args = saved_tiny_model
    flags = ["--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S),
             "--keep-alive-timeout", "1", "--max-connections", "8"]  # fmt: skip
    proc, url = start_service([*args, *flags], tmp_path_factory.mktemp("c") / "serve.log")
    try:
        yield url
    finally:
        stop_process(proc)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def trickle_until_closed(
    sock: socket.socket, data: bytes, every: float = 0.25
) -> tuple[bytes, float]:
    """Send ``data`` a byte at a time until the server closes the connection (or 20 s pass):
    what the server answered and when the connection closed, from the start."""
    start = time.monotonic()
    answer = b""
    sock.settimeout(every)
    for i in range(len(data) * 4):
        try:
            sock.sendall(data[i % len(data) : i % len(data) + 1])
        except OSError:  # reset by the server
            break
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            chunk = None
        except OSError:
            break
        if chunk == b"":
            break
        answer += chunk or b""
        if time.monotonic() - start > 20:
            break
    return answer, time.monotonic() - start


def test_slow_headers_are_cut_at_the_header_deadline(service):
    with connect(service) as sock:
        answer, took = trickle_until_closed(
            sock, b"POST /predict HTTP/1.1\r\nX-Slow: " + b"a" * 200
        )
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"request headers not received within 1.5 s" in answer
    assert HEADER_S - 0.3 < took < HEADER_S + 1.5


def test_a_slow_body_is_cut_at_the_body_deadline_however_it_trickles(service):
    with connect(service) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")  # fmt: skip
        answer, took = trickle_until_closed(sock, b"[" * 1000)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"the whole request body not received within 2.5 s" in answer
    assert BODY_S - 0.3 < took < BODY_S + 1.5


def test_an_idle_connection_is_closed_before_its_first_request(service):
    with connect(service) as sock:
        start = time.monotonic()
        answer = sock.recv(4096)  # blocks until the server writes or closes
        took = time.monotonic() - start
        rest = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and rest == b""
    assert took < HEADER_S + 1.5


def test_normal_requests_work_while_slow_clients_hang_on(service):
    slow = [connect(service) for _ in range(3)]
    try:
        for sock in slow:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n[")
        for _ in range(5):
            assert httpx.get(service + "/healthz", timeout=5).status_code == 200
        with httpx.Client(timeout=5) as client:  # one kept-alive connection, several requests
            assert [client.get(service + "/healthz").status_code for _ in range(3)] == [200] * 3
    finally:
        for sock in slow:
            sock.close()


def test_connections_beyond_the_limit_are_answered_503(service):
    time.sleep(HEADER_S + 1)  # earlier tests' connections are gone
    held = [connect(service) for _ in range(8)]
    try:
        time.sleep(0.3)
        assert httpx.get(service + "/healthz", timeout=5).status_code == 503
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(service + "/healthz", timeout=5).status_code == 200


def test_sigterm_with_a_slow_client_attached_exits_within_the_shutdown_bound(
    saved_tiny_model, tmp_path
):
    _, _, args = saved_tiny_model
    flags = ["--body-timeout", "120", "--shutdown-timeout", "2"]
    proc, url = start_service([*args, *flags], tmp_path / "serve.log")
    stop = threading.Event()
    try:
        sock = connect(url)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\n[")

        def trickle() -> None:
            while not stop.wait(0.3):
                try:
                    sock.sendall(b"[")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(1.0)
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        took = time.monotonic() - start
        assert took < 2 + 1.0, f"exited {took:.1f} s after SIGTERM"
    finally:
        stop.set()
        stop_process(proc) if proc.poll() is None else None
