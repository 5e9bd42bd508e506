"""A stub marketplace speaking the agent half of docs/protocol.md, kept in memory.

`StubMarketplace.handle` is an httpx.MockTransport handler; `serve_http` puts the same handler
behind a real socket so the agent can be run as a separate process. Like the marketplace, the stub
signs every unit it hands out with its key (`marketplace_key`, pinned by the `enrolled` fixture) and
serves its keys at /api/v1/agent/keys; `rotate` makes a new key endorsed by the current one.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from worker_agent import protocol, wire

RESULT_PATH = re.compile(r"^/api/v1/agent/results/(\d+)/(report|fail|release)$")
ARTIFACT_PATH = re.compile(r"^/api/v1/artifacts/([0-9a-f]{64})/$")


def error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "fields": {}}})


def public_b64(key: Ed25519PrivateKey) -> str:
    return protocol.b64encode(key.public_key().public_bytes_raw())


def key_record(key_id: str, key: Ed25519PrivateKey, *, endorser: tuple[str, Ed25519PrivateKey] | None = None,
               retired: bool = False) -> dict[str, Any]:
    """A marketplace key as the wire carries it, endorsed by `endorser` (its id and private key) if given."""
    endorsement = None
    if endorser is not None:
        message = protocol.key_endorsement_message(key_id=key_id, public_key_b64=public_b64(key))
        endorsement = protocol.b64encode(endorser[1].sign(message))
    return {"key_id": key_id, "public_key": public_b64(key), "endorsed_by": endorser[0] if endorser else None,
            "endorsement": endorsement, "retired": retired}


def sign_unit(key: Ed25519PrivateKey, *, unit_id: int, payload: dict[str, Any]) -> str:
    return protocol.b64encode(key.sign(protocol.unit_message(unit_id=unit_id, payload=payload)))


@dataclass
class StubMarketplace:
    device_id: int = 7
    device_secret: str = "not-a-real-secret"
    public_key: Ed25519PublicKey | None = None
    lease_seconds: float = 60.0
    artifacts: dict[str, bytes] = field(default_factory=dict)
    pending: deque[dict[str, Any]] = field(default_factory=deque)
    leased: dict[int, dict[str, Any]] = field(default_factory=dict)
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    releases: list[int] = field(default_factory=list)  # handed back unstarted (`release`, at shutdown)
    heartbeats: list[list[int]] = field(default_factory=list)
    progress: list[dict[str, float]] = field(default_factory=list)  # each heartbeat's `progress`, when it had one
    lose_on_heartbeat: set[int] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)
    batched_reports: bool = True  # False: a server predating POST /api/v1/agent/reports (it answers 404)
    inline_outputs: list[int] = field(default_factory=list)  # result ids whose output came inline in a batch
    batches: list[list[int]] = field(default_factory=list)  # each batched report's result ids, in order
    lock: threading.Lock = field(default_factory=threading.Lock)
    marketplace_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    key_id: str = "mk-stub-1"
    keys: list[dict[str, Any]] = field(default_factory=list)  # what /api/v1/agent/keys answers

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys.append(key_record(self.key_id, self.marketplace_key))

    def rotate(self, key_id: str) -> Ed25519PrivateKey:
        """A new signing key, endorsed by the current one; units added from now on are signed by it."""
        key = Ed25519PrivateKey.generate()
        self.keys.append(key_record(key_id, key, endorser=(self.key_id, self.marketplace_key)))
        self.key_id, self.marketplace_key = key_id, key
        return key

    def add_artifact(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.artifacts[sha] = data
        return sha

    def add_unit(self, payload: dict[str, Any], *, result_id: int, unit_id: int, **lease: Any) -> None:
        """Queue a lease, signed by the current key; `lease` overrides any of its fields (signature, key_id)."""
        self.pending.append({"result_id": result_id, "unit_id": unit_id, "payload": payload,
                             "expires_at": "2099-01-01T00:00:00Z", "key_id": self.key_id,
                             "signature": sign_unit(self.marketplace_key, unit_id=unit_id, payload=payload), **lease})

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(f"{request.method} {request.url.path}")
            if request.url.path != "/api/v1/agent/enroll" and not self._authorised(request):
                return error(401, "not_authenticated", "bad device credentials")
            return self._route(request)

    def _authorised(self, request: httpx.Request) -> bool:
        expected = f"{protocol.DEVICE_AUTH_SCHEME} {self.device_id}:{self.device_secret}"
        return bool(request.headers.get("Authorization") == expected)

    def _route(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/agent/keys" and request.method == "GET":
            return httpx.Response(200, json={"marketplace_keys": self.keys})
        if path == "/api/v1/agent/lease":
            return self._lease(json.loads(request.content))
        if path == "/api/v1/agent/heartbeat":
            return self._heartbeat(json.loads(request.content))
        if path == "/api/v1/artifacts/" and request.method == "POST":
            return self._upload(request)
        if path == "/api/v1/agent/reports" and request.method == "POST" and self.batched_reports:
            return self._reports(json.loads(request.content))
        if match := ARTIFACT_PATH.match(path):
            data = self.artifacts.get(match.group(1))
            return httpx.Response(200, content=data) if data is not None else error(404, "not_found", "no such artifact")
        if match := RESULT_PATH.match(path):
            result_id, action = int(match.group(1)), match.group(2)
            body = json.loads(request.content)
            if action == "release":
                return self._release(result_id)
            return self._report(result_id, body) if action == "report" else self._fail(result_id, body)
        return error(404, "not_found", f"no route {path}")

    def _lease(self, body: dict[str, Any]) -> httpx.Response:
        wire.LeaseRequest.from_wire(body)  # what the agent sends reads as the marketplace reads it, strictly
        leases: list[dict[str, Any]] = []
        while self.pending and len(leases) < body["max_units"]:
            lease = self.pending.popleft()
            self.leased[lease["result_id"]] = lease
            leases.append(lease)
        return httpx.Response(200, json={"leases": leases, "retry_after": 0.01})

    def _heartbeat(self, body: dict[str, Any]) -> httpx.Response:
        ids = body["result_ids"]
        self.heartbeats.append(ids)
        if "progress" in body:
            self.progress.append(body["progress"])
        lost = [rid for rid in ids if rid in self.lose_on_heartbeat or rid not in self.leased]
        for rid in lost:
            self.leased.pop(rid, None)
        renewed = [rid for rid in ids if rid not in lost]
        return httpx.Response(200, json={"renewed": renewed, "lost": lost, "expires_at": "2099-01-01T00:00:00Z"})

    def _upload(self, request: httpx.Request) -> httpx.Response:
        data = request.read()
        sha = hashlib.sha256(data).hexdigest()
        if request.headers.get("X-Content-SHA256") != sha:
            return error(400, "invalid", "declared sha256 differs")
        existed = sha in self.artifacts
        self.artifacts[sha] = data
        return httpx.Response(200 if existed else 201, json={"sha256": sha, "size": len(data)})

    def _reports(self, body: dict[str, Any]) -> httpx.Response:
        """The batched report: the envelope read as the marketplace reads it, each report judged on its own
        (an inline output is stored as an upload would be, once its bytes match their hash)."""
        try:
            items = wire.ReportBatch.items_from_wire(body)
        except wire.WireError as exc:
            return error(400, "invalid", str(exc))
        self.batches.append([result_id for result_id, _ in items])
        results: list[dict[str, Any]] = []
        for result_id, report in items:
            if isinstance(report, wire.WireError):
                results.append({"result_id": result_id, "error": {"code": "invalid", "message": str(report)}})
                continue
            single = report.to_wire()
            inline = single.pop("output", None)
            if inline is not None and result_id in self.leased:
                data = protocol.b64decode(inline)
                if hashlib.sha256(data).hexdigest() != report.output_sha256:
                    results.append({"result_id": result_id,
                                    "error": {"code": "invalid", "message": "inline output differs from its hash"}})
                    continue
                self.artifacts[report.output_sha256] = data
                self.inline_outputs.append(result_id)
            answer = self._report(result_id, single)
            payload = json.loads(answer.read())
            results.append({"result_id": result_id, **({"state": payload["state"]} if answer.status_code == 200
                                                       else {"error": payload["error"]})})
        return httpx.Response(200, json={"results": results})

    def _report(self, result_id: int, body: dict[str, Any]) -> httpx.Response:
        lease = self.leased.pop(result_id, None)
        if lease is None:
            return error(409, "lease_expired", f"the lease on result {result_id} expired")
        if body["output_sha256"] not in self.artifacts:
            self.leased[result_id] = lease
            return error(400, "invalid", "output not uploaded")
        message = protocol.result_message(result_id=result_id, unit_id=lease["unit_id"], device_id=self.device_id,
                                          output_sha256=body["output_sha256"])
        try:
            assert self.public_key is not None
            self.public_key.verify(protocol.b64decode(body["signature"]), message)
        except InvalidSignature:
            return error(400, "invalid", "bad signature")
        self.reports[result_id] = body
        return httpx.Response(200, json={"state": "reported"})

    def _fail(self, result_id: int, body: dict[str, Any]) -> httpx.Response:
        if self.leased.pop(result_id, None) is None:
            return error(409, "lease_expired", f"the lease on result {result_id} expired")
        self.failures[result_id] = body["error"]
        return httpx.Response(200, json={"state": "client_error"})

    def _release(self, result_id: int) -> httpx.Response:
        if self.leased.pop(result_id, None) is None:
            return error(409, "lease_expired", f"the lease on result {result_id} expired")
        self.releases.append(result_id)
        return httpx.Response(200, json={"state": "released"})


@contextmanager
def serve_http(stub: StubMarketplace) -> Iterator[str]:
    """Serve the stub on 127.0.0.1; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._relay()

        def do_POST(self) -> None:
            self._relay()

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = httpx.Request(self.command, f"http://stub{self.path}", headers=dict(self.headers.items()),
                                    content=self.rfile.read(length))
            response = stub.handle(request)
            body = response.read()
            self.send_response(response.status_code)
            self.send_header("Content-Type", response.headers.get("Content-Type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
