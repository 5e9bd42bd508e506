"""Webhook fixtures: a real HTTP receiver on loopback that answers as a test scripts it, and endpoints
registered through the service (loopback allowed, as only tests and the demo may)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from marketplace.webhooks.services import endpoint_create


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers each POST with the next (status, seconds to wait first, body, extra headers) of `script`,
    then with 200; records every request it got."""

    port: int = 0
    script: list[tuple[int, float, bytes, dict[str, str]]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def answer(self, *answers: int | tuple) -> None:
        for answer in answers:
            status, delay, body, headers = (answer, 0.0, b"", {}) if isinstance(answer, int) else (*answer, {}, {})[:4]
            self.script.append((status, delay, body or f"answer {status}".encode(), headers or {}))


@pytest.fixture
def receiver():
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            state.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            status, delay, answer, headers = state.script.pop(0) if state.script else (200, 0.0, b"ok", {})
            if delay:
                time.sleep(delay)
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
            except OSError:  # the sender gave up waiting (a timeout test)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def loopback_allowed(settings):
    settings.IDLEGRID_WEBHOOKS_ALLOW_PRIVATE = True
    settings.IDLEGRID_WEBHOOKS_ALLOW_HTTP = True


@pytest.fixture
def register(loopback_allowed, receiver, submitter):
    """register(owner=submitter, url=receiver.url, event_types=()): an endpoint made by the service."""

    def make(owner=None, url=None, **options):
        return endpoint_create(owner_id=(owner or submitter).pk, url=url or receiver.url, **options)

    return make
