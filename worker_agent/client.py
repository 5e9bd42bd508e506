"""The agent's side of the REST protocol (docs/protocol.md), with retries for transient failures.

Connect errors, timeouts, 5xx and 429 are retried with exponential backoff and full jitter; any
other 4xx is the server's considered answer and is raised at once as ApiError with its message.
Answers are read and parsed bounded (worker_agent/safejson.py): a server, or whatever answers in its
place, cannot make the agent hold an endless body or recurse through a deep one.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx

import worker_agent
from worker_agent import protocol, safejson, wire

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK_BYTES = 1 << 20
# Transport errors worth another try; UnsupportedProtocol and friends are configuration mistakes.
RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# A JSON answer: a lease batch of 64 units' payloads is kilobytes; these bounds leave room to grow.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
ANSWER_DEPTH = 64
ANSWER_ITEMS = 1_000_000
# An error answer is read this far for its message; the rest is dropped.
MAX_ERROR_BYTES = 64 * 1024


class AgentError(Exception):
    """Something the agent cannot fix by itself; the message is meant for the operator."""


class ApiError(AgentError):
    """A 4xx answer other than 429, carrying the server's `{"error": {...}}` body."""

    def __init__(self, status: int, code: str, message: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}

    @classmethod
    def from_response(cls, response: httpx.Response, body: bytes | None = None) -> ApiError:
        """From the answer's body (`body`, when read already, capped; else the response's content)."""
        content = response.content if body is None else body
        try:
            error = answer_json(content)["error"]
            return cls(response.status_code, str(error.get("code", "")), str(error["message"]), error.get("fields"))
        except (ValueError, KeyError, TypeError, AttributeError):
            text = content[:200].decode("utf-8", "replace").strip() or response.reason_phrase
            return cls(response.status_code, "", text)


def answer_json(content: bytes, *, max_bytes: int = MAX_ANSWER_BYTES) -> Any:
    """A server answer's JSON, bounded; raises safejson.JSONRefused (a ValueError) saying why not."""
    return safejson.loads(content, max_bytes=max_bytes, max_depth=ANSWER_DEPTH, max_items=ANSWER_ITEMS)


class ServerUnavailable(AgentError):
    """Every retry failed: the server is down, overloaded or unreachable."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    base_seconds: float = 0.5
    cap_seconds: float = 30.0

    def delay(self, retry: int, rng: random.Random) -> float:
        """Full jitter (uniform in [0, capped exponential]): many agents never retry in lockstep."""
        return rng.uniform(0.0, min(self.cap_seconds, self.base_seconds * 2**retry))


ONE_SHOT = RetryPolicy(attempts=1)


class AgentClient:
    def __init__(
        self,
        server: str,
        *,
        device: tuple[int, str] | None = None,
        retry: RetryPolicy = RetryPolicy(),
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        headers = {"User-Agent": f"idlegrid-agent/{worker_agent.__version__}"}
        if device is not None:
            device_id, secret = device
            headers["Authorization"] = f"{protocol.DEVICE_AUTH_SCHEME} {device_id}:{secret}"
        self._http = httpx.Client(
            base_url=server.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )
        self._retry = retry
        self._timeout = timeout
        self._sleep = sleep
        self._rng = rng or random.Random()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- endpoints --------------------------------------------------------------------------

    def enroll(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.post_json("/api/v1/agent/enroll", body)

    def keys(self, *, retry: RetryPolicy | None = None) -> dict[str, Any]:
        return self._with_retries("GET /api/v1/agent/keys", lambda: self._json_once("GET", "/api/v1/agent/keys"), retry)

    def earnings(self, *, retry: RetryPolicy | None = None) -> dict[str, Any]:
        """The owner's held and settled amounts (decimal strings of base units), the token's symbol and
        decimals, and this device's units validated today (GET /api/v1/agent/earnings)."""
        return self._with_retries("GET /api/v1/agent/earnings", lambda: self._json_once("GET", "/api/v1/agent/earnings"),
                                  retry)

    def lease(self, max_units: int, *, hardware: dict[str, Any] | None = None,
              capabilities: wire.Capabilities | None = None, wait_seconds: int = 0) -> dict[str, Any]:
        # `hardware`: the device's facts, sent when they changed since last sent (None leaves them out).
        # `capabilities`: what the device can run now, sent with every request (hardware.capabilities).
        # `wait_seconds`: the long poll (docs/protocol.md, "Long poll"): the server may hold the request that
        # long, so the read timeout is the wait plus the usual one; 0 sends nothing (any server reads that).
        body = wire.LeaseRequest(max_units=max_units, hardware=hardware, capabilities=capabilities,
                                 wait_seconds=wait_seconds or None).to_wire()
        timeout = None
        if wait_seconds:
            timeout = httpx.Timeout(self._timeout + wait_seconds, connect=min(self._timeout, 10.0))
        return self.post_json("/api/v1/agent/lease", body, timeout=timeout)

    def heartbeat(self, result_ids: list[int], *, progress: dict[int, float] | None = None,
                  retry: RetryPolicy | None = None) -> dict[str, Any]:
        """Renew leases; `progress` (result id -> fraction done, for ids in result_ids) goes along when given."""
        fractions = {str(rid): fraction for rid, fraction in (progress or {}).items()} or None
        body = wire.HeartbeatRequest(result_ids=tuple(result_ids), progress=fractions).to_wire()
        return self.post_json("/api/v1/agent/heartbeat", body, retry=retry)

    def report(self, result_id: int, body: dict[str, Any]) -> dict[str, Any]:
        return self.post_json(f"/api/v1/agent/results/{result_id}/report", body)

    def reports(self, reports: list[wire.BatchedReport]) -> wire.ReportBatchAnswer:
        """Report many units in one request (POST /api/v1/agent/reports): one outcome per report, in order.
        Retried like any report (a report taken before answers already_reported). An answer that is not one
        outcome per report, for the same result ids in the same order, is an AgentError."""
        path = "/api/v1/agent/reports"
        raw = self.post_json(path, wire.ReportBatch(reports=tuple(reports)).to_wire())
        try:
            answer = wire.ReportBatchAnswer.from_wire(raw)
        except wire.WireError as exc:
            raise AgentError(f"POST {path}: the server's answer is refused: {exc}") from None
        if [outcome.result_id for outcome in answer.results] != [report.result_id for report in reports]:
            raise AgentError(f"POST {path}: the server's answer names other results than the reports sent")
        return answer

    def fail(
        self, result_id: int, error: str, *, retry: RetryPolicy | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        body = wire.Failure(error=error[:2000]).to_wire()
        return self.post_json(f"/api/v1/agent/results/{result_id}/fail", body, retry=retry, timeout=timeout)

    def release(
        self, result_id: int, *, retry: RetryPolicy | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Hand back a lease never started (shutting down): free, unlike `fail`, which costs a cool-down."""
        return self.post_json(f"/api/v1/agent/results/{result_id}/release", {}, retry=retry, timeout=timeout)

    def download(self, sha256: str, destination: Path) -> str:
        """Stream an artifact into `destination`; returns the sha256 of what actually arrived."""
        path = f"/api/v1/artifacts/{sha256}/"
        return self._with_retries(f"GET {path}", lambda: self._download_once(path, destination))

    def upload(self, source: Path, sha256: str) -> dict[str, Any]:
        headers = {"Content-Type": "application/octet-stream", "X-Content-SHA256": sha256}

        def attempt() -> dict[str, Any]:
            # Reopened per attempt: a retry must resend from the first byte. A real file gives
            # httpx a Content-Length, so the body streams without chunked encoding.
            with source.open("rb") as body:
                return self._json_once("POST", "/api/v1/artifacts/", content=body, headers=headers)

        return self._with_retries("POST /api/v1/artifacts/", attempt)

    # --- plumbing ---------------------------------------------------------------------------

    def post_json(
        self, path: str, body: dict[str, Any], *, retry: RetryPolicy | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> dict[str, Any]:
        return self._with_retries(
            f"POST {path}", lambda: self._json_once("POST", path, json=body, timeout=timeout), retry
        )

    def _with_retries(self, what: str, attempt: Callable[[], T], retry: RetryPolicy | None = None) -> T:
        policy = retry or self._retry
        for number in range(1, policy.attempts + 1):
            try:
                return attempt()
            except _Retryable as problem:
                if number == policy.attempts:
                    raise ServerUnavailable(f"{what}: {problem}; gave up after {number} attempt(s)") from None
                delay = policy.delay(number - 1, self._rng)
                if problem.retry_after is not None:
                    delay = max(delay, min(problem.retry_after, policy.cap_seconds))
                log.warning("%s: %s; retry %d/%d in %.1fs", what, problem, number, policy.attempts - 1, delay)
                self._sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _json_once(self, method: str, path: str, *, timeout: float | httpx.Timeout | None = None,
                   **kwargs: Any) -> dict[str, Any]:
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            response = self._http.send(self._http.build_request(method, path, **kwargs, **extra), stream=True)
            try:
                _raise_for_status(response)
                content = read_capped(response, MAX_ANSWER_BYTES)
            finally:
                response.close()
        except RETRYABLE_ERRORS as exc:
            raise _Retryable(_describe(exc)) from exc
        except httpx.HTTPError as exc:
            raise AgentError(f"{method} {path}: {_describe(exc)}") from exc
        if content is None:
            raise AgentError(f"{method} {path}: the server sent an answer larger than {MAX_ANSWER_BYTES} bytes")
        try:
            answer = answer_json(content)
        except safejson.JSONRefused as exc:
            raise AgentError(f"{method} {path}: the server's answer is refused: {exc}") from None
        if not isinstance(answer, dict):
            raise AgentError(f"{method} {path}: the server sent {type(answer).__name__}, expected an object")
        return answer

    def _download_once(self, path: str, destination: Path) -> str:
        digest = hashlib.sha256()
        try:
            with self._http.stream("GET", path) as response:
                _raise_for_status(response)
                with destination.open("wb") as sink:
                    _copy(response.iter_bytes(CHUNK_BYTES), sink, digest)
        except RETRYABLE_ERRORS as exc:
            raise _Retryable(_describe(exc)) from exc
        except httpx.HTTPError as exc:
            raise AgentError(f"GET {path}: {_describe(exc)}") from exc
        return digest.hexdigest()


def _copy(chunks: Any, sink: BinaryIO, digest: Any) -> None:
    for chunk in chunks:
        digest.update(chunk)
        sink.write(chunk)


def read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The (decoded) body, or None once it passes `limit` bytes: reading stops there (the submitter's
    client, idlegrid_client, reads its answers with this too)."""
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def read_prefix(response: httpx.Response, limit: int) -> bytes:
    """At most the first `limit` bytes of the body; the rest is not read."""
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        chunks.append(chunk[: limit - size])
        size += len(chunks[-1])
        if size >= limit:
            break
    return b"".join(chunks)


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status} {response.reason_phrase}", _retry_after(response))
    if status >= 400:
        raise ApiError.from_response(response, read_prefix(response, MAX_ERROR_BYTES))


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
