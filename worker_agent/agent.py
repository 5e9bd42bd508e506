"""The work loop: lease -> check the unit's signature -> fetch and verify inputs -> compute in the child
-> upload -> sign -> report.

Boring on purpose: one unit at a time in the main thread, one warm compute child (started with the
loop; the first lease request waits for it, since it carries the child's hardware facts), a heartbeat
thread renewing leases, and every lease that will not be computed is handed back so the server
reissues it at once.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker_agent import control, hardware, kinds, protocol
from worker_agent.artifacts import ArtifactCache, ArtifactError, file_sha256
from worker_agent.client import ONE_SHOT, AgentClient, AgentError, ApiError, ServerUnavailable
from worker_agent.heartbeat import Heartbeat, LeaseBook
from worker_agent.jobfile import ChildJob
from worker_agent.pinning import UnitSignatureInvalid, UnitVerifier
from worker_agent.runner import ChildAborted, ChildOutcome, ComputeChild
from worker_agent.shutdown import Shutdown
from worker_agent.signing import sign_result
from worker_agent.state import DeviceState, StateDir
from worker_agent.wire import Lease, LeaseBatch, PayloadError, Report, WireError, unit_payload_from_wire

log = logging.getLogger(__name__)

QUICK_GIVE_BACK_SECONDS = 5.0  # a cold shutdown must end promptly even if the server is gone
QUICK_CALL_TIMEOUT = 2.0
OUTPUT_FILE = "output.safetensors"


class LeaseLost(Exception):
    """The server took the lease back (heartbeat said so); the unit is dropped without a report."""


@dataclass(frozen=True)
class RunOptions:
    burst: bool = False
    max_units: int | None = None
    batch: int = 4
    poll_seconds: float = 5.0
    fault: str | None = None
    cache_max_bytes: int = 2 << 30


@dataclass
class Summary:
    done: int = 0  # computed, uploaded and accepted
    failed: int = 0  # reported to the server as failed (/fail)
    refused: int = 0  # computed, but the server refused the report (expired lease, bad signature...)
    lost: int = 0  # the lease was taken back while we worked; dropped silently
    given_back: int = 0  # never started; handed back at shutdown

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.refused

    def line(self) -> str:
        return (
            f"{self.done} done, {self.failed} failed, {self.refused} refused, "
            f"{self.lost} lost, {self.given_back} given back"
        )


class ManualPause:
    """The owner's pause (`idlegrid-agent pause`), set from the control thread, read by the loop."""

    def __init__(self, clock: Any = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._until: float | None = None  # wall-clock end; math.inf: until resumed
        self._reason = ""

    def pause(self, seconds: float | None, reason: str) -> None:
        with self._lock:
            self._until = math.inf if seconds is None else self._clock() + seconds
            self._reason = reason

    def resume(self) -> None:
        with self._lock:
            self._until, self._reason = None, ""

    def state(self) -> tuple[bool, float | None, str]:
        """(paused, until as a Unix time or None for 'until resumed', reason)."""
        with self._lock:
            if self._until is not None and self._clock() >= self._until:
                self._until, self._reason = None, ""  # the pause ran out
            if self._until is None:
                return False, None, ""
            return True, (None if self._until == math.inf else self._until), self._reason


@dataclass(frozen=True)
class CurrentUnit:
    label: str
    result_id: int
    started_at: float
    progress: float | None = None  # fraction done, once the child reports it (the resume part)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "result_id": self.result_id, "started_at": self.started_at,
                "progress": self.progress}


class DayCount:
    """Units done today (local date) by this run of the agent."""

    def __init__(self) -> None:
        self._day = time.strftime("%Y-%m-%d")
        self._count = 0

    def add(self) -> None:
        self._roll()
        self._count += 1

    def count(self) -> int:
        self._roll()
        return self._count

    def _roll(self) -> None:
        today = time.strftime("%Y-%m-%d")
        if today != self._day:
            self._day, self._count = today, 0


class Agent:
    def __init__(
        self,
        *,
        client: AgentClient,
        device: DeviceState,
        key: Ed25519PrivateKey,
        state: StateDir,
        options: RunOptions = RunOptions(),
        shutdown: Shutdown | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.device = device
        self.key = key
        self.state = state
        self.options = options
        self.shutdown = shutdown or Shutdown()
        self.rng = rng or random.Random()
        self.book = LeaseBook()
        self.queue: deque[Lease] = deque()
        self.cache = ArtifactCache(state.cache_dir, client, max_bytes=options.cache_max_bytes)
        self.verifier = UnitVerifier(state=state, client=client)  # NotEnrolled without pinned keys
        self.summary = Summary()
        # A third of the lease: two beats can fail before the server reissues the unit.
        self.heartbeat = Heartbeat(client, self.book, interval=max(device.lease_seconds / 3, 0.05))
        self.child = ComputeChild(state.work_dir)
        self.facts = hardware.FactsReporter()  # sent with a lease request when they change
        self.manual = ManualPause()
        self.current: CurrentUnit | None = None
        self.today = DayCount()
        self._child_stopped = False
        self.control: control.ControlServer | None = None

    def run(self) -> Summary:
        self._prepare_state()
        self._start_control()
        self.heartbeat.start()
        self.child.start()
        try:
            self._refresh_keys()
            self._loop()
            self.child.stop()  # idle now: it exits cleanly
            self._give_back(self._queued_ids(), quick=False)
        except BaseException:
            # A cold shutdown (or a bug): the child dies at once, and everything still held goes
            # back, fast, to be reissued now.
            self.child.kill()
            self._give_back(self.book.held(), quick=True)
            raise
        finally:
            self.heartbeat.stop()
            self.child.kill()  # never left behind, whatever happened above
            if self.control is not None:
                self.control.stop()
        return self.summary

    # --- the control socket (worker_agent/control.py) ------------------------------------------
    # A stand-in until the policy part's Governor is wired in: a manual pause leases nothing new and
    # stops the child mid-unit (SIGSTOP to its process group, sent from the main thread while it
    # waits on the child), resume continues it. The unit's wall-clock limit keeps counting meanwhile.

    def status(self) -> dict[str, Any]:
        paused, until, reason = self.manual.state()
        current = self.current
        return {
            "running": True,
            "pid": os.getpid(),
            "device_id": self.device.device_id,
            "server": self.device.server,
            "state": "paused" if paused else ("working" if current is not None else "waiting for work"),
            "paused": paused,
            "pause_reasons": [reason or "paused by the owner"] if paused else [],
            "paused_until": until,
            "unit": current.to_dict() if current is not None else None,
            "units_done_this_run": self.summary.done,
            "units_done_today": self.today.count(),
            "summary": {"done": self.summary.done, "failed": self.summary.failed, "refused": self.summary.refused,
                        "lost": self.summary.lost, "given_back": self.summary.given_back},
            "policy": self.policy_in_force(),
        }

    def policy_in_force(self) -> dict[str, Any] | None:
        """The contributor policy this agent applies; None until the Governor is wired in (its snapshot())."""
        return None

    def pause(self, seconds: float | None, reason: str) -> dict[str, Any]:
        self.manual.pause(seconds, reason)
        log.info("paused by the owner%s%s", f" for {seconds:g}s" if seconds else "", f": {reason}" if reason else "")
        return self.status()

    def resume(self) -> dict[str, Any]:
        self.manual.resume()
        log.info("resumed by the owner")
        return self.status()

    def _start_control(self) -> None:
        try:
            server = control.ControlServer(control.socket_path(self.state.root), self)
            server.start()
        except control.ControlError as exc:
            log.warning("no control socket (status, pause and resume will not reach this agent): %s", exc)
            return
        self.control = server

    def _hold_while_paused(self) -> None:
        """Between units: lease nothing while paused (a warm shutdown still ends the wait)."""
        while self.manual.state()[0] and not self.shutdown.warm.is_set():
            self.shutdown.sleep(0.2)

    def _apply_pause_to_child(self) -> None:
        """Called every few tens of ms while the child computes: stop or continue it as the pause says.
        A warm shutdown continues it (the unit may finish); a cold one kills it, stopped or not."""
        want_stopped = self.manual.state()[0] and not self.shutdown.warm.is_set()
        pid = self.child.pid
        if pid is None or want_stopped == self._child_stopped:
            return
        try:
            os.killpg(pid, signal.SIGSTOP if want_stopped else signal.SIGCONT)
        except ProcessLookupError:
            pass
        self._child_stopped = want_stopped
        log.info("compute child %d %s", pid, "stopped (paused)" if want_stopped else "continued")

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.shutdown.warm.is_set() and not self._quota_reached():
            self._hold_while_paused()
            if self.shutdown.warm.is_set():
                return
            leases, retry_after = self._lease()
            if leases:
                self._work_through(leases)
            elif self.options.burst:
                log.info("no work available; exiting (--burst)")
                return
            else:
                self._idle(max(self.options.poll_seconds, retry_after))

    def _lease(self) -> tuple[list[Lease], float]:
        facts = self.facts.due(self.child, should_abort=lambda: "shutdown" if self.shutdown.warm.is_set() else None)
        try:
            answer = self.client.lease(self._wanted(), hardware=facts)
        except ServerUnavailable as exc:
            if self.options.burst:
                raise
            log.error("could not lease work: %s", exc)
            return [], self.options.poll_seconds
        self.facts.accepted(facts)
        try:
            batch = LeaseBatch.from_wire(answer)
        except WireError as exc:
            log.error("the server's lease answer is refused: %s", exc)
            return [], self.options.poll_seconds
        leases = self._parse_leases(batch.leases)
        if leases:
            log.info("leased %d unit%s", len(leases), "" if len(leases) == 1 else "s")
        return leases, float(batch.retry_after)

    def _parse_leases(self, raw: tuple[dict[str, Any], ...]) -> list[Lease]:
        leases: list[Lease] = []
        for entry in raw:
            try:
                leases.append(Lease.from_wire(entry))
            except WireError as exc:
                # Not even its ids could be read, so it cannot be handed back: it expires on the server.
                log.error("ignoring a lease: %s", exc)
        return leases

    def _work_through(self, leases: list[Lease]) -> None:
        self.book.hold(lease.result_id for lease in leases)
        self.queue.extend(leases)
        # The shutdown check comes after a unit, not before: a warm shutdown that lands while a
        # lease request is in flight still finishes the first unit of the batch it brings back.
        while self.queue:
            lease = self.queue.popleft()
            if self.book.is_lost(lease.result_id):
                log.warning("%s: lease lost before it started; skipped", lease.label)
                self.summary.lost += 1
            else:
                self._process(lease)
            self.book.release(lease.result_id)
            if self.shutdown.warm.is_set():
                return

    def _wanted(self) -> int:
        wanted = min(self.options.batch, protocol.MAX_LEASE_BATCH)
        if self.options.max_units is not None:
            wanted = min(wanted, self.options.max_units - self.summary.finished)
        return max(wanted, 1)

    def _quota_reached(self) -> bool:
        return self.options.max_units is not None and self.summary.finished >= self.options.max_units

    def _idle(self, seconds: float) -> None:
        # Jitter only ever lengthens the wait: the server's retry_after is a floor, not a hint.
        delay = seconds * self.rng.uniform(1.0, 1.25)
        log.debug("no work; polling again in %.1fs", delay)
        self.shutdown.sleep(delay)

    # --- one unit ---------------------------------------------------------------------------

    def _process(self, lease: Lease) -> None:
        workdir = self.state.work_dir / str(lease.result_id)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(mode=0o700, parents=True)
        self.current = CurrentUnit(label=lease.label, result_id=lease.result_id, started_at=time.time())
        try:
            outcome = self._compute(lease, workdir)
        except (LeaseLost, ChildAborted):
            log.warning("%s: lease lost; abandoned without a report", lease.label)
            self.summary.lost += 1
        except (UnitSignatureInvalid, PayloadError, ArtifactError, AgentError) as exc:
            self._fail(lease, str(exc))
        else:
            if outcome.ok:
                self._deliver(lease, workdir / OUTPUT_FILE, outcome)
            else:
                self._fail(lease, outcome.error)
        finally:
            self.current = None
            self._child_stopped = False  # a stopped child that was replaced or killed is gone
        shutil.rmtree(workdir, ignore_errors=True)
        self.cache.prune()

    def _compute(self, lease: Lease, workdir: Path) -> ChildOutcome:
        # First of all: nothing of a unit the marketplace did not sign is fetched, let alone run.
        self.verifier.check(
            unit_id=lease.unit_id, payload=lease.payload, key_id=lease.key_id, signature=lease.signature
        )
        unit = unit_payload_from_wire(lease.payload)  # only now: what is read of a unit must be signed first
        kinds.load(unit.kind)  # a kind the schema knows but this agent cannot run fails before any fetch
        artifacts = self._fetch(lease, unit.artifacts())
        job = ChildJob(
            payload=lease.payload,  # the signed members, as they came; the child parses them the same way
            artifacts=artifacts,
            output_path=str(workdir / OUTPUT_FILE),
            fault=self.options.fault,
            fault_seed=lease.result_id,  # a faulty agent's noise differs per result, like real faults
            limits=unit.limits,
        )
        log.info("%s: computing (limits %gs, %d MB)", lease.label, unit.limits.seconds, unit.limits.memory_mb)
        return self.child.run(job, should_abort=lambda: self._abort_reason(lease))

    def _fetch(self, lease: Lease, shas: list[str]) -> dict[str, str]:
        paths: dict[str, str] = {}
        for sha in shas:
            if self.book.is_lost(lease.result_id):
                raise LeaseLost()
            paths[sha] = str(self.cache.ensure(sha))
        return paths

    def _abort_reason(self, lease: Lease) -> str | None:
        self._apply_pause_to_child()
        return "lease lost" if self.book.is_lost(lease.result_id) else None

    def _deliver(self, lease: Lease, output: Path, outcome: ChildOutcome) -> None:
        if self.book.is_lost(lease.result_id):
            log.warning("%s: lease lost before the report; result dropped", lease.label)
            self.summary.lost += 1
            return
        sha = file_sha256(output)
        try:
            self.client.upload(output, sha)
        except AgentError as exc:
            self._fail(lease, f"output upload failed: {exc}")
            return
        if self._report(lease, sha, outcome):
            self.summary.done += 1
            self.today.add()
            log.info("%s done in %.2fs, reported", lease.label, outcome.elapsed_seconds)
        else:
            self.summary.refused += 1

    def _report(self, lease: Lease, sha: str, outcome: ChildOutcome) -> bool:
        signature = sign_result(
            self.key,
            result_id=lease.result_id,
            unit_id=lease.unit_id,
            device_id=self.device.device_id,
            output_sha256=sha,
        )
        body = Report(
            output_sha256=sha,
            signature=signature,
            elapsed_seconds=round(outcome.elapsed_seconds, 3),
            metrics=outcome.metrics,
        ).to_wire()
        try:
            self.client.report(lease.result_id, body)
        except ApiError as exc:
            if exc.code == "already_reported":
                # Only this device holds this result: an earlier attempt got through and its answer
                # was lost on the way back (a timeout, then a retry).
                log.info("%s: already reported by an earlier attempt", lease.label)
                return True
            # 409 lease_expired: the unit was reissued; the server has moved on, and so do we.
            level = logging.WARNING if exc.status == 409 else logging.ERROR
            log.log(level, "%s: the server refused the report: %s", lease.label, exc)
            if exc.status == 400:
                # The output itself was refused (NaN in it, say): give the lease up now rather than let it
                # sit until it expires; another owner's device gets the unit.
                self._give_up(lease, f"the server refused the output: {exc.message}")
            return False
        except AgentError as exc:
            log.error("%s: could not report: %s", lease.label, exc)
            return False
        return True

    def _fail(self, lease: Lease, error: str) -> None:
        log.warning("%s failed: %s", lease.label, error)
        self.summary.failed += 1
        self._give_up(lease, error)

    def _give_up(self, lease: Lease, error: str) -> None:
        try:
            self.client.fail(lease.result_id, error)
        except AgentError as exc:
            log.error("%s: could not report the failure: %s", lease.label, exc)

    # --- shutdown ---------------------------------------------------------------------------

    def _queued_ids(self) -> list[int]:
        return [lease.result_id for lease in self.queue]

    def _give_back(self, result_ids: list[int], *, quick: bool) -> None:
        deadline = time.monotonic() + QUICK_GIVE_BACK_SECONDS
        given = 0
        for result_id in result_ids:
            if quick and time.monotonic() > deadline:
                log.warning("no time left to give back result %d; it will expire on the server", result_id)
            elif self._give_back_one(result_id, quick=quick):
                given += 1
            self.book.release(result_id)
        self.queue.clear()
        self.summary.given_back += given
        if result_ids:
            log.info("gave back %d of %d unit(s)", given, len(result_ids))

    def _give_back_one(self, result_id: int, *, quick: bool) -> bool:
        # `release`, not `fail`: handing back at shutdown is no give-up, and costs the device nothing.
        try:
            if quick:
                self.client.release(result_id, retry=ONE_SHOT, timeout=QUICK_CALL_TIMEOUT)
            else:
                self.client.release(result_id)
        except AgentError as exc:
            log.warning("could not give back result %d: %s", result_id, exc)
            return False
        return True

    def _refresh_keys(self) -> None:
        """Learn of rotations and retirements at start; best effort, a unit by an unknown key asks again."""
        try:
            self.verifier.refresh(quick=True)
        except AgentError as exc:
            log.warning("could not refresh the marketplace keys: %s", exc)

    def _prepare_state(self) -> None:
        self.state.ensure()
        # Leftovers of a killed run: their leases are gone or will expire; the files are junk.
        for stale in self.state.work_dir.iterdir():
            shutil.rmtree(stale, ignore_errors=True)
