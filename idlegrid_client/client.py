"""A submitter's client of the REST API (docs/protocol.md; docs/api/client.md shows it in use).

    with Client("https://idlegrid.example", token) as client:
        weights = client.upload(Path("model.safetensors"))
        dataset = client.upload(Path("data.safetensors"))
        spec = {"model": {"architecture": "mlp", "config": {...}, "weights": weights}, "dataset": dataset}
        print(client.quote("inference", spec).cost_worst_case)
        job = client.wait(client.submit("inference", spec).id)
        client.download(job.id, Path("output.safetensors"))

Retries: a request that never reached the server (connection refused, connect timeout) is sent again
whatever it is; a `429` is sent again after its `Retry-After`; other failures (a timeout while waiting for
the answer, a dropped connection, a `5xx`) are sent again only when sending twice is harmless: reads,
uploads (artifacts are named by their sha256: the same bytes twice store one blob) and submissions, which
carry an `Idempotency-Key` (a uuid4 unless the caller gives one), so a retried submission makes one job.
Any other `4xx` is the server's considered answer and is raised at once as `ApiError`.

Answers are read bounded (size, nesting depth, items: worker_agent/safejson.py), downloads are written
to a temporary file beside the target, checked against the sha256 the server declares and only then
renamed into place, so a target file is either the whole, checked output or untouched.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar
from urllib.parse import parse_qs, urljoin, urlsplit, urlunsplit

import httpx

from idlegrid_client._version import __version__
from worker_agent import safejson
from worker_agent.client import read_capped, read_prefix

T = TypeVar("T")
# progress(bytes done, bytes in all or None when the server does not say): called as a transfer goes.
ProgressCallback = Callable[[int, int | None], None]

CHUNK_BYTES = 1 << 20
# Job lists are at most 200 jobs of a few KB each; a job's spec is bounded by the server's JSON limits.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
ANSWER_DEPTH = 64
ANSWER_ITEMS = 1_000_000
MAX_ERROR_BYTES = 64 * 1024
PAGE_SIZE_MAX = 200  # the list endpoint's `limit` bound
FINISHED_STATES = frozenset({"completed", "failed", "cancelled"})
# The request never left this machine, or never reached a server: sending it again cannot do anything twice.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
# Sent, and perhaps acted on, but no answer: sent again only when that is harmless.
MAYBE_SENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


# --- errors -----------------------------------------------------------------------------------------

class ClientError(Exception):
    """Something went wrong talking to the marketplace; the message is meant for a person."""


class ApiError(ClientError):
    """The server refused: its `{"error": {"code", "message", "fields"}}` answer, with the HTTP status."""

    def __init__(self, status: int, code: str, message: str, fields: Mapping[str, Any] | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.fields: dict[str, Any] = dict(fields or {})
        details = "; ".join(f"{name}: {_field_text(problem)}" for name, problem in self.fields.items())
        super().__init__(f"{message} (HTTP {status} {code})" + (f": {details}" if details else ""))

    @classmethod
    def from_answer(cls, status: int, content: bytes, reason: str = "") -> ApiError:
        try:
            error = _answer_json(content)["error"]
            return cls(status, str(error.get("code", "")), str(error["message"]), error.get("fields") or {})
        except (ValueError, KeyError, TypeError, AttributeError):
            text = content[:200].decode("utf-8", "replace").strip()
            return cls(status, "", text or reason or "the server refused the request")


class ServerUnreachable(ClientError):
    """No answer from the server (refused, timed out, dropped), after every retry that was safe."""


class ChecksumMismatch(ClientError):
    """A downloaded file's sha256 is not the one the server declared: it was not kept."""


class BadAnswer(ClientError):
    """The server's answer could not be read (not JSON, past a bound, or missing a field)."""


class WaitTimeout(ClientError):
    """wait() gave up before the job finished."""


def _field_text(problem: Any) -> str:
    if isinstance(problem, list):
        return ", ".join(str(p) for p in problem)
    return str(problem)


# --- records ------------------------------------------------------------------------------------------

def _need(data: Mapping[str, Any], key: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadAnswer(f"the server's answer has {key}={value!r}, not a number")
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise BadAnswer(f"the server's answer has {key}={value!r}; expected {names}")
    return value


def _object(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise BadAnswer(f"the server sent {type(data).__name__} for {what}, expected an object")
    return data


def _amount(data: Mapping[str, Any], key: str) -> int:
    """Amounts are decimal strings of base units on the wire (exact past 2**53)."""
    value = _need(data, key, (str, int))
    try:
        return int(value)
    except ValueError:
        raise BadAnswer(f"the server's answer has {key}={value!r}, not an amount") from None


@dataclass(frozen=True)
class Job:
    """A job as `GET /api/v1/jobs/{id}/` shows it; `raw` keeps every field, those added later too."""

    id: int
    kind: str
    state: str
    spec: dict[str, Any]
    units_total: int
    units_done: int
    units_error: int
    results_valid: int
    results_invalid: int
    results_per_unit: float | None
    output_sha256: str | None
    error: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @classmethod
    def from_wire(cls, data: Any) -> Job:
        job = _object(data, "a job")
        return cls(
            id=_need(job, "id", int), kind=_need(job, "kind", str), state=_need(job, "state", str),
            spec=_need(job, "spec", dict), units_total=_need(job, "units_total", int),
            units_done=_need(job, "units_done", int), units_error=_need(job, "units_error", int),
            results_valid=_need(job, "results_valid", int), results_invalid=_need(job, "results_invalid", int),
            results_per_unit=_need(job, "results_per_unit", (int, float), optional=True),
            output_sha256=_need(job, "output_sha256", str, optional=True), error=_need(job, "error", str),
            created_at=_need(job, "created_at", str), started_at=_need(job, "started_at", str, optional=True),
            finished_at=_need(job, "finished_at", str, optional=True), raw=dict(job),
        )


@dataclass(frozen=True)
class Quote:
    """What a job would cost and take (`POST /api/v1/jobs/quote/`); amounts in base units."""

    kind: str
    units: int
    quorum: int
    price_per_result: int
    results_per_unit_expected: float
    results_per_unit_source: str
    cost_expected: int
    cost_worst_case: int  # the escrow a submission takes; what is unused returns when the job ends
    balance_available: int
    affordable: bool
    devices_active: int
    owners_active: int
    runnable: bool
    not_runnable_reason: str | None
    eta_seconds_p50: int | None
    eta_seconds_p90: int | None
    eta_reason: str | None
    spec: dict[str, Any]  # as a submission would store it, defaults filled in

    @classmethod
    def from_wire(cls, data: Any) -> Quote:
        quote = _object(data, "a quote")
        return cls(
            kind=_need(quote, "kind", str), units=_need(quote, "units", int), quorum=_need(quote, "quorum", int),
            price_per_result=_amount(quote, "price_per_result"),
            results_per_unit_expected=float(_need(quote, "results_per_unit_expected", (int, float))),
            results_per_unit_source=_need(quote, "results_per_unit_source", str),
            cost_expected=_amount(quote, "cost_expected"), cost_worst_case=_amount(quote, "cost_worst_case"),
            balance_available=_amount(quote, "balance_available"), affordable=_need(quote, "affordable", bool),
            devices_active=_need(quote, "devices_active", int), owners_active=_need(quote, "owners_active", int),
            runnable=_need(quote, "runnable", bool),
            not_runnable_reason=_need(quote, "not_runnable_reason", str, optional=True),
            eta_seconds_p50=_need(quote, "eta_seconds_p50", int, optional=True),
            eta_seconds_p90=_need(quote, "eta_seconds_p90", int, optional=True),
            eta_reason=_need(quote, "eta_reason", str, optional=True), spec=_need(quote, "spec", dict),
        )


@dataclass(frozen=True)
class Round:
    """One aggregated round of a federated (`fedavg`) job."""

    round: int
    weights_in_sha256: str
    weights_sha256: str
    updates: int
    samples: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    aggregated_at: str

    @classmethod
    def from_wire(cls, data: Any) -> Round:
        r = _object(data, "a round")
        return cls(
            round=_need(r, "round", int), weights_in_sha256=_need(r, "weights_in_sha256", str),
            weights_sha256=_need(r, "weights_sha256", str), updates=_need(r, "updates", int),
            samples=_need(r, "samples", int), train_loss=float(_need(r, "train_loss", (int, float))),
            eval_loss=float(_need(r, "eval_loss", (int, float))),
            eval_accuracy=float(_need(r, "eval_accuracy", (int, float))), aggregated_at=_need(r, "aggregated_at", str),
        )


@dataclass(frozen=True)
class Training:
    """The round being trained: how many of its units are decided."""

    round: int
    units_done: int
    units_total: int


@dataclass(frozen=True)
class Rounds:
    """`GET /api/v1/jobs/{id}/rounds/`: a federated job's rounds, oldest first."""

    rounds_planned: int
    rounds: tuple[Round, ...]
    training: Training | None
    privacy: dict[str, Any] | None
    target: dict[str, Any] | None

    @classmethod
    def from_wire(cls, data: Any) -> Rounds:
        body = _object(data, "rounds")
        training = _need(body, "training", dict, optional=True)
        return cls(
            rounds_planned=_need(body, "rounds_planned", int),
            rounds=tuple(Round.from_wire(r) for r in _need(body, "rounds", list)),
            training=None if training is None else Training(
                round=_need(training, "round", int), units_done=_need(training, "units_done", int),
                units_total=_need(training, "units_total", int)),
            privacy=_need(body, "privacy", dict, optional=True), target=_need(body, "target", dict, optional=True),
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a cursor-paginated list: `next` and `previous` are URLs, or None at either end."""

    results: list[T]
    next: str | None
    previous: str | None

    @property
    def next_cursor(self) -> str | None:
        """The cursor of the next page, for `jobs_page(cursor=...)`; None on the last page."""
        if self.next is None:
            return None
        return parse_qs(urlsplit(self.next).query).get("cursor", [None])[0]


@dataclass(frozen=True)
class TokenInfo:
    """A new API token (`POST /api/v1/auth/token/`): `token` is shown this once."""

    token: str
    expiry: str
    token_key: str


# --- retries ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_seconds: float = 0.5
    cap_seconds: float = 30.0
    # A 429 asking for a longer wait than this is raised instead of waited out (the caller decides).
    max_retry_after: float = 120.0

    def delay(self, retry: int, rng: random.Random) -> float:
        """Full jitter (uniform in [0, capped exponential]): clients that failed together retry apart."""
        return rng.uniform(0.0, min(self.cap_seconds, self.base_seconds * 2**retry))


NO_RETRY = RetryPolicy(attempts=1)


class _Retry(Exception):
    """This attempt failed in a way another attempt may not; `final` is what to raise after the last."""

    def __init__(self, final: ClientError, retry_after: float | None = None) -> None:
        super().__init__(str(final))
        self.final = final
        self.retry_after = retry_after


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _answer_json(content: bytes) -> Any:
    return safejson.loads(content, max_bytes=MAX_ANSWER_BYTES, max_depth=ANSWER_DEPTH, max_items=ANSWER_ITEMS)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def file_sha256(path: Path, *, progress: ProgressCallback | None = None) -> str:
    """The sha256 of a file, read in chunks (progress as it reads)."""
    digest, done, total = hashlib.sha256(), 0, path.stat().st_size
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


# --- the client ---------------------------------------------------------------------------------------

class Client:
    """A person's client of one marketplace: `Client(url, token)`; a context manager (closes its connections)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"User-Agent": f"idlegrid-client/{__version__}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Token {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self._retry = retry
        self._sleep = sleep
        self._rng = rng or random.Random()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- people -----------------------------------------------------------------------------------------

    def login(self, username: str, password: str) -> TokenInfo:
        """A new token for a username and password; this client uses it from now on. Not retried past a
        connection that failed to open: a retried login would make a second token."""
        body = _object(self._json("POST", "/api/v1/auth/token/", idempotent=False,
                                  json={"username": username, "password": password}), "a token")
        info = TokenInfo(token=_need(body, "token", str), expiry=_need(body, "expiry", str),
                         token_key=_need(body, "token_key", str))
        self._http.headers["Authorization"] = f"Token {info.token}"
        return info

    # --- artifacts --------------------------------------------------------------------------------------

    def upload(self, path: Path | str, *, progress: ProgressCallback | None = None,
               sha256: str | None = None) -> str:
        """Upload a file (streamed, never read whole into memory) and return its sha256, the name a spec
        gives it. The sha256 is computed first (pass it if known) and sent as X-Content-SHA256: the server
        refuses bytes that do not match it."""
        path = Path(path)
        sha256 = sha256 or file_sha256(path)
        size = path.stat().st_size

        def body() -> Iterator[bytes]:
            done = 0
            if progress is not None:
                progress(0, size)
            with path.open("rb") as source:
                while chunk := source.read(CHUNK_BYTES):
                    done += len(chunk)
                    yield chunk
                    if progress is not None:
                        progress(done, size)

        # An explicit Content-Length: the body streams without chunked encoding, which WSGI servers drop.
        headers = {"Content-Type": "application/octet-stream", "X-Content-SHA256": sha256, "Content-Length": str(size)}
        answer = _object(self._json("POST", "/api/v1/artifacts/", idempotent=True, content=body, headers=headers),
                         "an upload")
        stored = _need(answer, "sha256", str)
        if stored != sha256:
            raise ChecksumMismatch(f"the server stored {path} as {stored}, but its sha256 is {sha256}")
        return sha256

    def download_artifact(self, sha256: str, path: Path | str, *, progress: ProgressCallback | None = None) -> str:
        """Download an artifact you may read (one you uploaded, an output or a round's weights of your job)."""
        return self._download(f"/api/v1/artifacts/{sha256}/", Path(path), progress=progress, expected=sha256)

    # --- jobs -------------------------------------------------------------------------------------------

    def quote(self, kind: str, spec: Mapping[str, Any]) -> Quote:
        """What the job would cost and take; creates and escrows nothing (safe to send twice)."""
        return Quote.from_wire(self._json("POST", "/api/v1/jobs/quote/", idempotent=True,
                                          json={"kind": kind, "spec": dict(spec)}))

    def submit(self, kind: str, spec: Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Submit a job; its escrow is taken now. Sent with an Idempotency-Key (a new uuid4 unless given), so
        the retries here, or yours with the same key, make one job."""
        key = idempotency_key or str(uuid.uuid4())
        return Job.from_wire(self._json("POST", "/api/v1/jobs/", idempotent=True, json={"kind": kind, "spec": dict(spec)},
                                        headers={"Idempotency-Key": key}))

    def job(self, job_id: int) -> Job:
        return Job.from_wire(self._json("GET", f"/api/v1/jobs/{int(job_id)}/", idempotent=True))

    def jobs_page(self, *, state: str | Sequence[str] | None = None, kind: str | None = None,
                  created_after: str | None = None, created_before: str | None = None,
                  limit: int | None = None, cursor: str | None = None) -> Page[Job]:
        """One page of your jobs, newest first (`GET /api/v1/jobs/`); `state` may name several states."""
        params: list[tuple[str, str]] = [("state", s) for s in ([state] if isinstance(state, str) else state or [])]
        for name, value in (("kind", kind), ("created_after", created_after), ("created_before", created_before),
                            ("limit", limit), ("cursor", cursor)):
            if value is not None:
                params.append((name, str(value)))
        return self._job_page(f"{self.base_url}/api/v1/jobs/", params)

    def jobs(self, *, state: str | Sequence[str] | None = None, kind: str | None = None,
             created_after: str | None = None, created_before: str | None = None,
             limit: int | None = None, page_size: int = 50) -> Iterator[Job]:
        """Your jobs, newest first, page after page (following `next`) until the last or `limit` jobs."""
        if limit is not None and limit <= 0:
            return
        size = max(1, min(PAGE_SIZE_MAX, page_size, limit or PAGE_SIZE_MAX))
        page = self.jobs_page(state=state, kind=kind, created_after=created_after, created_before=created_before,
                              limit=size)
        given = 0
        while True:
            for job in page.results:
                yield job
                given += 1
                if limit is not None and given >= limit:
                    return
            if page.next is None or not page.results:
                return
            page = self._job_page(page.next, [])

    def cancel(self, job_id: int) -> Job:
        """Cancel a job (`POST /api/v1/jobs/{id}/cancel/`): it is `cancelling` until its leases are called back,
        then `cancelled`, and its unused escrow returns. `ApiError` 409 for a job that already finished.
        Sent with an Idempotency-Key, like a submission, so that a retry whose first answer was lost gets
        that answer again rather than a 409 for the job it cancelled."""
        return Job.from_wire(self._json("POST", f"/api/v1/jobs/{int(job_id)}/cancel/", idempotent=True,
                                        headers={"Idempotency-Key": str(uuid.uuid4())}))

    def rounds(self, job_id: int) -> Rounds:
        """A federated job's rounds with their held-out metrics (`ApiError` 409 for other kinds)."""
        return Rounds.from_wire(self._json("GET", f"/api/v1/jobs/{int(job_id)}/rounds/", idempotent=True))

    def download(self, job_id: int, path: Path | str, *, progress: ProgressCallback | None = None) -> str:
        """Download a completed job's merged output to `path`; returns its sha256 (checked against the server's
        X-Content-SHA256). `ApiError` 409 until the job completed."""
        return self._download(f"/api/v1/jobs/{int(job_id)}/output/", Path(path), progress=progress)

    def wait(self, job_id: int, *, timeout: float | None = None, poll: float = 0.5, max_poll: float = 10.0,
             on_update: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job finished (completed, failed or cancelled) and return it. Polls every `poll`
        seconds while it moves, backing off to `max_poll` while nothing changes; `on_update` sees every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, seen = poll, None
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job.finished:
                return job
            now = (job.state, job.units_done, job.units_error, job.results_valid, job.results_invalid)
            delay = poll if now != seen else min(max_poll, delay * 1.5)
            seen = now
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"job {job_id} is still {job.state} after {timeout:.0f}s")
                delay = min(delay, left)
            self._sleep(delay)

    # --- plumbing ---------------------------------------------------------------------------------------

    def _job_page(self, url: str, params: list[tuple[str, str]]) -> Page[Job]:
        # No params for a `next` link: httpx would replace the link's own query (its cursor) with them.
        query: dict[str, Any] = {"params": params} if params else {}
        body = _object(self._json("GET", self._here(url), idempotent=True, **query), "a page of jobs")
        results = _need(body, "results", list)
        following = [None if body.get(k) is None else urljoin(url, _need(body, k, str)) for k in ("next", "previous")]
        return Page(results=[Job.from_wire(job) for job in results], next=following[0], previous=following[1])

    def _here(self, url: str) -> str:
        """A link's path and query on this client's marketplace. The token goes to no other host, whatever a
        link names; and a server behind a TLS proxy that builds its links as http:// is still followed."""
        link, here = urlsplit(url), urlsplit(self.base_url)
        return urlunsplit((here.scheme, here.netloc, link.path, link.query, ""))

    def _json(self, method: str, url: str, *, idempotent: bool, **request: Any) -> Any:
        content = request.pop("content", None)

        def attempt() -> Any:
            # The body is rebuilt for every attempt: a retry sends it again from its first byte.
            body = content() if callable(content) else content
            try:
                response = self._http.send(self._http.build_request(method, url, content=body, **request), stream=True)
            except httpx.HTTPError as exc:
                raise self._transport_failure(method, url, exc, idempotent=idempotent) from exc
            try:
                self._check_status(response, idempotent=idempotent)
                data = read_capped(response, MAX_ANSWER_BYTES)
                if data is None:
                    raise BadAnswer(f"the server sent an answer larger than {MAX_ANSWER_BYTES} bytes")
            except httpx.HTTPError as exc:
                raise self._transport_failure(method, url, exc, idempotent=idempotent) from exc
            finally:
                response.close()
            if not data:
                return None
            try:
                return _answer_json(data)
            except safejson.JSONRefused as exc:
                raise BadAnswer(f"{method} {url}: the server's answer is refused: {exc}") from None

        return self._with_retries(attempt)

    def _download(self, url: str, path: Path, *, progress: ProgressCallback | None, expected: str | None = None) -> str:
        return self._with_retries(lambda: self._download_once(url, path, progress, expected))

    def _download_once(self, url: str, path: Path, progress: ProgressCallback | None, expected: str | None) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        sink = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".part", delete=False)
        try:
            with sink:
                try:
                    with self._http.stream("GET", url) as response:
                        self._check_status(response, idempotent=True)
                        declared = response.headers.get("X-Content-SHA256")
                        actual = _copy(response, sink, progress)
                except httpx.HTTPError as exc:
                    raise self._transport_failure("GET", url, exc, idempotent=True) from exc
            for name, wanted in (("the server declared", declared), ("was asked for", expected)):
                if wanted is not None and wanted != actual:
                    raise ChecksumMismatch(f"GET {url}: received bytes of sha256 {actual}, but {name} {wanted}; "
                                           f"{path} was not written")
            os.replace(sink.name, path)
            return actual
        finally:
            if os.path.exists(sink.name):
                os.unlink(sink.name)

    def _check_status(self, response: httpx.Response, *, idempotent: bool) -> None:
        status = response.status_code
        if status < 400:
            return
        error = ApiError.from_answer(status, read_prefix(response, MAX_ERROR_BYTES), response.reason_phrase)
        if status == 429:
            wait = _retry_after(response)
            if wait is not None and wait > self._retry.max_retry_after:
                raise error
            raise _Retry(error, wait)
        if status == 409 and error.code == "idempotency_key_in_flight":
            raise _Retry(error, 1.0)  # the first request with this key is still running: ask again shortly
        if status >= 500 and idempotent:
            raise _Retry(error)
        raise error

    def _transport_failure(self, method: str, url: str, exc: httpx.HTTPError, *, idempotent: bool) -> Exception:
        what = f"{method} {url}"
        if isinstance(exc, NOT_SENT_ERRORS):
            return _Retry(ServerUnreachable(f"cannot reach {self.base_url} ({what}): {_describe(exc)}"))
        if isinstance(exc, MAYBE_SENT_ERRORS):
            failure = ServerUnreachable(f"{what}: no answer from {self.base_url}: {_describe(exc)}")
            if idempotent:
                return _Retry(failure)
            return ServerUnreachable(f"{failure}; not sent again, since the server may have acted on it")
        return ClientError(f"{what}: {_describe(exc)}")

    def _with_retries(self, attempt: Callable[[], T]) -> T:
        policy = self._retry
        for number in range(1, policy.attempts + 1):
            try:
                return attempt()
            except _Retry as problem:
                if number == policy.attempts:
                    raise problem.final from None
                delay = policy.delay(number - 1, self._rng)
                if problem.retry_after is not None:
                    delay = max(delay, problem.retry_after)
                self._sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _copy(response: httpx.Response, sink: IO[bytes], progress: ProgressCallback | None) -> str:
    digest, done = hashlib.sha256(), 0
    length = response.headers.get("Content-Length")
    total = int(length) if length is not None and length.isdigit() else None
    if progress is not None:
        progress(0, total)
    for chunk in response.iter_bytes(CHUNK_BYTES):
        digest.update(chunk)
        sink.write(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    return digest.hexdigest()
