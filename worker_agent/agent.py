"""The work loop: lease -> check the unit's signature -> fetch and verify inputs -> compute in the child
-> sign -> report (small outputs inline in a batched report, larger ones uploaded first).

Boring on purpose: one unit at a time in the main thread, one warm compute child (started with the
loop; the first lease request waits for it, since it carries the child's hardware facts), a heartbeat
thread renewing leases, and every lease that will not be computed is handed back so the server
reissues it at once. With a policy, a governor thread (worker_agent/policy/) decides when the machine
may compute: the loop leases nothing while it says no, and it stops and continues the running child
itself; the heartbeat goes on meanwhile, so a paused unit keeps its lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker_agent import control, gpu, hardware, kinds, protocol, safejson
from worker_agent.artifacts import ArtifactCache, ArtifactError, file_sha256
from worker_agent.client import ONE_SHOT, AgentClient, AgentError, ApiError, ServerUnavailable
from worker_agent.heartbeat import Heartbeat, LeaseBook
from worker_agent.jobfile import ChildJob
from worker_agent.pinning import UnitSignatureInvalid, UnitVerifier
from worker_agent.policy.config import Policy
from worker_agent.policy.governor import MANUAL as MANUAL_REASON
from worker_agent.policy.governor import Governor, Samplers
from worker_agent.runner import ChildAborted, ChildOutcome, ComputeChild
from worker_agent.shutdown import Shutdown, WaitInterrupted
from worker_agent.signing import sign_result
from worker_agent.state import DeviceState, StateDir
from worker_agent.wire import (
    BatchedReport,
    Capabilities,
    HeartbeatAnswer,
    Lease,
    LeaseBatch,
    PayloadError,
    Report,
    WireError,
    unit_payload_from_wire,
)

log = logging.getLogger(__name__)

QUICK_GIVE_BACK_SECONDS = 5.0  # a cold shutdown must end promptly even if the server is gone
QUICK_CALL_TIMEOUT = 2.0
OUTPUT_FILE = "output.safetensors"
# The policy of an Agent given none: compute whenever there is work (the owner's pause still works).
UNCONDITIONAL = Policy(idle_minutes=0, idle_source="none", other_cpu_percent=100, run_on_battery=True,
                       battery_min_percent=0, memory_busy_percent=100, memory_idle_percent=100)
# After a long poll the server held to its end (retry_after 0): ask again after this, jittered, not at once, so a
# server that answers every wait at once by mistake cannot make the agent spin.
AFTER_WAIT_SECONDS = 0.25
ALLOWED_POLL_SECONDS = 0.5  # how soon a waiting loop notices a warm shutdown (a verdict change wakes it at once)
LEASE_FILE = "lease.json"  # in a unit's work dir: the lease as received, so a restarted agent can resume it
CHECKPOINT_FILE = "checkpoint.safetensors"  # written by the child (worker_agent/kinds/_checkpoint.py)
PROGRESS_FILE = "progress.json"  # likewise: {"fraction": 0..1}
MAX_LEASE_FILE_BYTES = 1 << 20
MAX_PROGRESS_FILE_BYTES = 4096
PARK_SECONDS = 5.0  # a warm stop waits this long for the running unit's checkpoint
PARKED = "warm stop: checkpointed, lease kept"


class LeaseLost(Exception):
    """The server took the lease back (heartbeat said so); the unit is dropped without a report."""


@dataclass(frozen=True)
class RunOptions:
    burst: bool = False
    max_units: int | None = None
    batch: int = 4
    poll_seconds: float = 5.0
    # The long poll: when idle (the last lease brought nothing), ask the server to hold the next lease request
    # up to this long and answer as soon as work comes (docs/protocol.md, "Long poll"); 0: poll as before.
    wait_seconds: int = protocol.MAX_LEASE_WAIT_SECONDS
    fault: str | None = None
    cache_max_bytes: int = 2 << 30
    threads: int = 1  # torch threads per unit (the policy's `cores`); also the cores reported to the marketplace
    # The memory cap (percent of RAM) reported with each lease request when no governor is running; with
    # one, the cap in force (busy or idle) is the governor's.
    memory_cap_percent: float = hardware.DEFAULT_MEMORY_CAP_PERCENT
    checkpoint_seconds: float = 60.0  # how often a running unit checkpoints (and on request, at a warm stop)


@dataclass
class Summary:
    done: int = 0  # computed, uploaded and accepted
    failed: int = 0  # reported to the server as failed (/fail)
    refused: int = 0  # computed, but the server refused the report (expired lease, bad signature...)
    lost: int = 0  # the lease was taken back while we worked; dropped silently
    given_back: int = 0  # never started; handed back at shutdown
    kept: int = 0  # checkpointed at a warm stop, lease kept: the next run resumes it

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.refused

    def add(self, what: str) -> None:
        """One more of `what`; the courier thread counts too (a unit it delivers is done or refused)."""
        with _SUMMARY_LOCK:
            setattr(self, what, getattr(self, what) + 1)

    def line(self) -> str:
        return (
            f"{self.done} done, {self.failed} failed, {self.refused} refused, "
            f"{self.lost} lost, {self.given_back} given back, {self.kept} kept"
        )


@dataclass(frozen=True)
class CurrentUnit:
    label: str
    result_id: int
    started_at: float
    workdir: Path

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "result_id": self.result_id, "started_at": self.started_at,
                "progress": _read_progress(self.workdir / PROGRESS_FILE)}


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


_SUMMARY_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Finished:
    """A computed unit on its way to the marketplace: its lease, work dir (the output in it) and outcome."""

    lease: Lease
    workdir: Path
    outcome: ChildOutcome


class _Courier:
    """Delivers finished units on its own thread while the child computes the next ones, so the marketplace's
    answer times overlap computing. Units that finish while a delivery is in flight wait for the next one and
    go together, in one batched report (group commit: nothing waits for a batch to fill, a lone unit goes
    alone). At most protocol.MAX_REPORT_BATCH wait; `send` blocks past that. The loop waits for the courier
    before it asks for more work (the lease quota counts a unit until it is reported) and before it stops.
    A daemon thread: a cold shutdown never waits for it."""

    def __init__(self, deliver: Callable[[list[_Finished]], None], *, limit: int = protocol.MAX_REPORT_BATCH) -> None:
        self._deliver = deliver
        self._limit = limit
        self._pending: list[_Finished] = []
        self._busy = False  # a thread is running (delivering, or about to take what is pending)
        self._changed = threading.Condition()

    def send(self, finished: _Finished) -> None:
        with self._changed:
            while len(self._pending) >= self._limit:
                self._changed.wait()
            self._pending.append(finished)
            if not self._busy:
                self._busy = True
                threading.Thread(target=self._run, name="courier", daemon=True).start()

    def wait(self) -> None:
        """Until everything sent is delivered."""
        with self._changed:
            while self._busy:
                self._changed.wait()

    def _run(self) -> None:
        while True:
            with self._changed:
                batch, self._pending = self._pending[:self._limit], self._pending[self._limit:]
                if not batch:
                    self._busy = False
                    self._changed.notify_all()
                    return
                self._changed.notify_all()  # room for a blocked send
            try:
                self._deliver(batch)
            except Exception:  # noqa: BLE001 - a bug here must not end the agent; the leases expire on the server
                log.exception("delivering %d unit(s) failed", len(batch))


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
        policy: Policy | None = None,
        samplers: Samplers | None = None,
    ) -> None:
        """Without a policy the agent computes whenever it has work (tests, and nothing else: the CLI
        always passes one). `samplers` defaults to the real machine's (Samplers.for_policy)."""
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
        self.heartbeat = Heartbeat(client, self.book, interval=max(device.lease_seconds / 3, 0.05),
                                   progress=self._progress)
        # Without a policy (tests, embedding) the governor still runs, with nothing to hold the agent back:
        # the owner's pause through the control socket works the same either way.
        policy = policy or UNCONDITIONAL
        self.policy = policy
        self.child = ComputeChild(state.work_dir, threads=options.threads, gpu_policy=policy.gpu)
        self._gpu_facts: dict[str, object] | None = None  # the child facts the GPU guard was set up for
        samplers = samplers or Samplers.for_policy(policy, own_pids=self._child_pids)
        self.governor: Governor | None = Governor(policy, samplers, child=self.child)
        self.child.on_unit_start = self.governor.wake
        self._pause_reason = ""
        self.facts = hardware.FactsReporter()  # sent with a lease request when they change
        self._idle_now = False  # the last lease brought nothing: the next one long-polls
        self._long_poll_refused = False  # the server answered wait_seconds with a 400: never sent again
        self.leftovers: list[Lease] = []  # leases of an earlier run with work dirs (lease.json) left behind
        self._parking: _Parking | None = None
        self._computing: int | None = None  # the result id whose unit is in the child now
        self.current: CurrentUnit | None = None  # the unit being worked on (fetched, computed, reported)
        self.today = DayCount()
        self.started_at = time.time()
        self.courier = _Courier(self._deliver_and_clean)
        self._batched_reports = True  # until the server answers /agent/reports with a 404: then one by one
        self.control: control.ControlServer | None = None

    def run(self) -> Summary:
        self._prepare_state()
        self._start_control()
        self.heartbeat.start()
        self.child.start()
        if self.governor is not None:
            self.governor.start()
        try:
            self._refresh_keys()
            self._resume_leftovers()
            self._loop()
            self.courier.wait()
            self.child.stop()  # idle now: it exits cleanly
            self._give_back(self._queued_ids(), quick=False)
        except BaseException:
            # A cold shutdown (or a bug): the child dies at once, and everything still held goes
            # back, fast, to be reissued now.
            self.child.kill()
            self._give_back(self.book.held(), quick=True)
            raise
        finally:
            if self.governor is not None:
                self.governor.stop()  # leaves the child running: it is killed next, or already gone
            self.heartbeat.stop()
            self.child.kill()  # never left behind, whatever happened above
            if self.control is not None:
                self.control.stop()
        return self.summary

    # --- the control socket (worker_agent/control.py): status, pause, resume ------------------------

    def status(self) -> dict[str, Any]:
        """What `idlegrid-agent status` shows: called from the control thread, reads only."""
        assert self.governor is not None
        snapshot = self.governor.snapshot()
        manual = snapshot["manual_pause"]
        current = self.current
        paused = snapshot["state"] != "running"
        reasons = list(snapshot["reasons"])
        if manual["paused"] and self._pause_reason:
            reasons = [f"{r}: {self._pause_reason}" if r == MANUAL_REASON else r for r in reasons]
        return {
            "running": True,
            "pid": os.getpid(),
            "device_id": self.device.device_id,
            "server": self.device.server,
            "started_at": self.started_at,
            "state": "paused" if paused else ("working" if current is not None else "waiting for work"),
            "paused": paused,
            "pause_reasons": reasons,
            "paused_until": manual["until"],
            "unit": current.to_dict() if current is not None else None,
            "units_done_this_run": self.summary.done,
            "units_done_today": self.today.count(),
            "summary": {"done": self.summary.done, "failed": self.summary.failed, "refused": self.summary.refused,
                        "lost": self.summary.lost, "given_back": self.summary.given_back, "kept": self.summary.kept},
            "policy": self.policy_in_force(),
        }

    def policy_in_force(self) -> dict[str, Any]:
        """The contributor policy this agent applies, with what the governor reads now."""
        assert self.governor is not None
        snapshot = self.governor.snapshot()
        return {**snapshot["policy"], "idle_source_in_use": snapshot["idle_source"],
                "idle_seconds": snapshot["idle_seconds"], "other_cpu_percent_now": snapshot["other_cpu_percent"],
                "on_battery": snapshot["on_battery"], "battery_percent": snapshot["battery_percent"],
                "cpu_share": snapshot["cpu_share"], "memory_cap_percent_now": snapshot["memory_cap_percent"]}

    def pause(self, seconds: float | None, reason: str) -> dict[str, Any]:
        """The owner's pause (`idlegrid-agent pause [--for D]`): nothing is leased and the unit in hand is
        stopped (SIGSTOP, by the governor) until `resume` or the time runs out; leases stay alive."""
        assert self.governor is not None
        self._pause_reason = reason
        self.governor.manual_pause(None if seconds is None else time.time() + seconds)
        self._await_manual(True)
        log.info("paused by the owner%s%s", f" for {seconds:g}s" if seconds else "", f": {reason}" if reason else "")
        return self.status()

    def resume(self) -> dict[str, Any]:
        assert self.governor is not None
        self._pause_reason = ""
        self.governor.manual_resume()
        self._await_manual(False)
        log.info("resumed by the owner")
        return self.status()

    def _await_manual(self, paused: bool, timeout: float = 1.0) -> None:
        """Wait (briefly: the governor decides within a tick) until its verdict shows the owner's pause or
        its end, so that the answer to `pause`/`resume` already says what happened."""
        assert self.governor is not None
        deadline = time.monotonic() + timeout
        while (MANUAL_REASON in self.governor.verdict().reasons) != paused and time.monotonic() < deadline:
            time.sleep(0.01)

    def _start_control(self) -> None:
        try:
            server = control.ControlServer(control.socket_path(self.state.root), self)
            server.start()
        except control.ControlError as exc:
            log.warning("no control socket (status, pause and resume will not reach this agent): %s", exc)
            return
        self.control = server

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.shutdown.warm.is_set():
            self.courier.wait()  # the last unit reported first: the quota (ours, and the server's) counts it
            if self._quota_reached():
                return
            if not self._wait_until_allowed():
                return
            wait = self._wait_seconds()
            leases, retry_after = self._lease(wait)
            self._idle_now = not leases
            if leases and wait and self.shutdown.warm.is_set():
                # Work came while the agent waited for it, after it was told to stop: none of it was started,
                # so all of it goes back (run() hands back what is queued).
                self.book.hold(lease.result_id for lease in leases)
                self.queue.extend(leases)
                return
            if leases and wait and self.governor is not None and not self.governor.verdict().allowed:
                # ... or after the policy (the owner's pause, the keyboard) said no: back at once, for others.
                self.book.hold(lease.result_id for lease in leases)
                self._give_back([lease.result_id for lease in leases], quick=False)
                continue
            if leases:
                self._work_through(leases)
            elif self.options.burst:
                log.info("no work available; exiting (--burst)")
                return
            elif wait and retry_after == 0:
                self._idle(AFTER_WAIT_SECONDS)  # the server held the request: its wait was the pause
            else:
                self._idle(max(self.options.poll_seconds, retry_after))

    def _wait_seconds(self) -> int:
        """What the next lease request asks the server to wait: the long poll once idle, never with --burst
        (which stops at the first empty answer), nor once the server refused the field."""
        if self.options.burst or not self._idle_now or self._long_poll_refused:
            return 0
        return min(self.options.wait_seconds, protocol.MAX_LEASE_WAIT_SECONDS)

    def _wait_until_allowed(self) -> bool:
        """Block while the policy says no (waking within half a second of a change or a shutdown);
        False when a warm shutdown came first."""
        if self.governor is None:
            return True
        logged = False
        while not self.governor.wait_allowed(ALLOWED_POLL_SECONDS):
            if not logged:
                log.info("not leasing work: %s", ", ".join(self.governor.verdict().reasons))
                logged = True
            if self.shutdown.warm.is_set():
                return False
        return not self.shutdown.warm.is_set()

    def _child_pids(self) -> list[int]:
        pid = self.child.pid
        return [pid] if pid is not None else []

    def _lease(self, wait: int = 0) -> tuple[list[Lease], float]:
        facts = self.facts.due(self.child, should_abort=lambda: "shutdown" if self.shutdown.warm.is_set() else None)
        try:
            try:
                with self.shutdown.interruptible() if wait else contextlib.nullcontext():
                    answer = self.client.lease(self._wanted(), hardware=facts, capabilities=self._capabilities(),
                                               wait_seconds=wait)
            except WaitInterrupted:
                return [], 0.0  # stopping: the loop ends on the warm flag
            except ApiError as exc:
                if not (wait and exc.status == 400 and "wait_seconds" in exc.fields):
                    raise
                # A server that reads its requests strictly and predates the long poll: poll as before.
                log.warning("the server refuses wait_seconds (%s); polling every %.0fs instead", exc.message,
                            self.options.poll_seconds)
                self._long_poll_refused = True
                answer = self.client.lease(self._wanted(), hardware=facts, capabilities=self._capabilities())
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

    def _capabilities(self) -> Capabilities:
        """What this device can run now (free memory changes between requests, so every request says)."""
        cap = self.options.memory_cap_percent
        if self.governor is not None:
            cap = float(self.governor.verdict().memory_cap_percent)
        return hardware.capabilities(self.child.facts, memory_cap_percent=cap, cores=self.options.threads)

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
                self.summary.add("lost")
                self.book.release(lease.result_id)
            elif not self._process(lease):  # True: handed to the courier, which releases it once reported
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

    def _process(self, lease: Lease) -> bool:
        """Compute one unit and report it; True when its delivery went to the courier (which then cleans up
        and releases it), False when it is settled here."""
        workdir = self._workdir(lease)
        self.current = CurrentUnit(label=lease.label, result_id=lease.result_id, started_at=time.time(), workdir=workdir)
        try:
            outcome = self._compute(lease, workdir)
            while outcome.retry_later:  # stopped by the policy, not failed: again, from its checkpoint
                log.info("%s: %s; it runs again from its checkpoint when the policy allows", lease.label, outcome.error)
                self._wait_for_room(lease)
                outcome = self._compute(lease, workdir)
        except (LeaseLost, ChildAborted) as exc:
            if self._parking is not None:
                self._park_done(lease, exc)
                return False  # the lease and its work dir are kept: the next run resumes from the checkpoint
            log.warning("%s: lease lost; abandoned without a report", lease.label)
            self.summary.add("lost")
        except (UnitSignatureInvalid, PayloadError, ArtifactError, AgentError) as exc:
            self._fail(lease, str(exc))
        else:
            if outcome.ok:
                self.courier.send(_Finished(lease, workdir, outcome))
                self.current = None
                self.cache.prune()
                # A warm stop after this unit: the loop returns and run() waits for the courier.
                return True
            self._fail(lease, outcome.error)
        finally:
            self.current = None
        shutil.rmtree(workdir, ignore_errors=True)
        self.cache.prune()
        return False

    def _deliver_and_clean(self, batch: list[_Finished]) -> None:
        """The courier's part (its own thread): report the units, then forget them."""
        try:
            self._deliver(batch)
        finally:
            for finished in batch:
                shutil.rmtree(finished.workdir, ignore_errors=True)
                self.book.release(finished.lease.result_id)

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
            threads=self.options.threads,
            device=self._device(),
            checkpoint_dir=str(workdir),
            checkpoint_seconds=self.options.checkpoint_seconds,
        )
        if self.shutdown.warm.is_set():  # stopping: the unit waits for the next run, with its lease
            self._parking = _Parking(before=None, deadline=0.0)
            raise ChildAborted(PARKED)
        log.info("%s: computing (limits %gs, %d MB)", lease.label, unit.limits.seconds, unit.limits.memory_mb)
        self._computing = lease.result_id
        try:
            return self.child.run(job, should_abort=lambda: self._abort_reason(lease, workdir))
        finally:
            self._computing = None

    def _wait_for_room(self, lease: Lease) -> None:
        """After the policy stopped a unit for the memory cap of a machine in use: wait, with the lease kept
        alive, until work is allowed under the idle cap. A warm stop parks the unit (lease and checkpoint
        kept); a lost lease drops it."""
        assert self.governor is not None
        idle_cap = int(self.policy.memory_idle_percent)
        while True:
            verdict = self.governor.verdict()
            if verdict.allowed and verdict.memory_cap_percent >= idle_cap:
                return
            if self.book.is_lost(lease.result_id):
                raise LeaseLost()
            if self.shutdown.warm.is_set():
                self._parking = _Parking(before=None, deadline=0.0)
                raise ChildAborted(PARKED)
            self.governor.wait_allowed(ALLOWED_POLL_SECONDS)
            if self.governor.verdict().allowed:
                self.shutdown.sleep(ALLOWED_POLL_SECONDS)  # allowed, but under the busy cap still

    def _device(self) -> str:
        """Where the next unit computes ("cuda:0" when the child reported CUDA and the policy allows the GPU,
        else "cpu"), and the governor told of it once per child facts: a GPU's caps load only here."""
        facts = self.child.facts
        device = gpu.child_device(self.policy.gpu, facts)
        if self.governor is not None and facts is not self._gpu_facts:
            self._gpu_facts = facts
            guard = gpu.gpu_guard(self.policy.gpu, facts, temp_max_c=self.policy.gpu_temp_max_c,
                                  temp_resume_c=self.policy.gpu_temp_resume_c, power_max_w=self.policy.gpu_power_max_w)
            self.governor.set_gpu(device=device != "cpu", guard=guard)
        return device

    def _fetch(self, lease: Lease, shas: list[str]) -> dict[str, str]:
        paths: dict[str, str] = {}
        for sha in shas:
            if self.book.is_lost(lease.result_id):
                raise LeaseLost()
            paths[sha] = str(self.cache.ensure(sha))
        return paths

    def _abort_reason(self, lease: Lease, workdir: Path) -> str | None:
        if self.book.is_lost(lease.result_id):
            return "lease lost"
        if self.shutdown.warm.is_set():
            return self._park(workdir)
        return None

    # --- checkpoints, warm stops and resuming -------------------------------------------------

    def _workdir(self, lease: Lease) -> Path:
        """The unit's work dir, with its lease.json. One left by an earlier run for this very lease is kept
        (its checkpoint is the point); anything else there is cleared."""
        workdir = self.state.work_dir / str(lease.result_id)
        if _read_lease(workdir) != lease:
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(mode=0o700, parents=True)
            _write_lease(workdir, lease)
        return workdir

    def _park(self, workdir: Path) -> str | None:
        """A warm stop with a unit in the child: ask it to checkpoint (SIGUSR1), then abort the unit once
        the checkpoint is on disk or PARK_SECONDS have passed; None while still waiting."""
        checkpoint = workdir / CHECKPOINT_FILE
        if self._parking is None and self.child.is_paused():
            # The policy holds the child stopped (the owner is at the keyboard, say): it keeps its last
            # periodic checkpoint rather than being woken to write one now.
            self._parking = _Parking(before=_stamp(checkpoint), deadline=time.monotonic())
            log.info("warm stop: the unit in hand is paused; it resumes from its last checkpoint")
            return PARKED
        if self._parking is None:
            asked = self.child.request_checkpoint()
            self._parking = _Parking(before=_stamp(checkpoint), deadline=time.monotonic() + (PARK_SECONDS if asked else 0))
            log.info("warm stop: asked the unit in hand to checkpoint")
        if _stamp(checkpoint) != self._parking.before:
            return PARKED
        if time.monotonic() >= self._parking.deadline:
            log.warning("warm stop: no checkpoint within %gs; the unit will resume from its last one", PARK_SECONDS)
            return PARKED
        return None

    def _park_done(self, lease: Lease, exc: Exception) -> None:
        self.summary.add("kept")  # the rest of the queue is given back as at any warm stop (run() does it)
        log.info("%s: checkpointed at a warm stop; lease kept, the next run resumes it (%s)", lease.label, exc)

    def _progress(self) -> dict[int, float]:
        """For the heartbeat: the fraction done of the unit in the child, as the child last wrote it."""
        current, computing = self.current, self._computing
        if current is None or computing != current.result_id:
            return {}
        fraction = _read_progress(current.workdir / PROGRESS_FILE)
        return {} if fraction is None else {current.result_id: fraction}

    def _resume_leftovers(self) -> None:
        """Units an earlier run left with their lease (a warm stop, a crash): those whose lease is still
        this device's are computed first, from their checkpoints; the others are deleted."""
        if not self.leftovers:
            return
        leases, self.leftovers = self.leftovers, []
        ids = [lease.result_id for lease in leases]
        try:
            alive = set(HeartbeatAnswer.from_wire(self.client.heartbeat(ids)).renewed)
        except (AgentError, WireError) as exc:
            log.warning("could not ask which earlier leases are still ours (%s); starting them over is safe", exc)
            alive = set()
        resumable = [lease for lease in leases if lease.result_id in alive]
        for lease in leases:
            if lease.result_id not in alive:
                log.info("%s: left by an earlier run, its lease is gone; deleted", lease.label)
                shutil.rmtree(self.state.work_dir / str(lease.result_id), ignore_errors=True)
        if resumable:
            log.info("resuming %d unit%s left by an earlier run", len(resumable), "" if len(resumable) == 1 else "s")
            self._work_through(resumable)

    def _deliver(self, batch: list[_Finished]) -> None:
        """Report the batch in one request (docs/protocol.md, "Batched reports"): outputs up to
        protocol.MAX_INLINE_OUTPUT_BYTES travel inline, larger ones are uploaded first. A server without the
        batched report (404) is sent each unit on its own from then on, as is a batch the server would not
        take as a whole (a 4xx for the envelope, an answer that does not match it): a report already taken
        answers already_reported, so nothing is counted twice."""
        ready: list[tuple[_Finished, BatchedReport]] = []
        for finished in batch:
            lease = finished.lease
            if self.book.is_lost(lease.result_id):
                log.warning("%s: lease lost before the report; result dropped", lease.label)
                self.summary.add("lost")
                continue
            output = finished.workdir / OUTPUT_FILE
            sha = file_sha256(output)
            inline = self._batched_reports and output.stat().st_size <= protocol.MAX_INLINE_OUTPUT_BYTES
            if not inline:
                try:
                    self.client.upload(output, sha)
                except AgentError as exc:
                    self._fail(lease, f"output upload failed: {exc}")
                    continue
            signature = sign_result(self.key, result_id=lease.result_id, unit_id=lease.unit_id,
                                    device_id=self.device.device_id, output_sha256=sha)
            ready.append((finished, BatchedReport(
                result_id=lease.result_id, output_sha256=sha, signature=signature,
                elapsed_seconds=round(finished.outcome.elapsed_seconds, 3), metrics=finished.outcome.metrics,
                output=protocol.b64encode(output.read_bytes()) if inline else None)))
        if ready and self._batched_reports:
            self._report_batch(ready)
        elif ready:
            self._report_each(ready)

    def _report_batch(self, ready: list[tuple[_Finished, BatchedReport]]) -> None:
        try:
            answer = self.client.reports([report for _, report in ready])
        except ApiError as exc:
            if exc.status in (404, 405):
                log.info("the server has no batched report (%s); reporting each unit on its own", exc.message)
                self._batched_reports = False
            else:
                log.warning("the server refused a batch of %d report(s) (%s); reporting each on its own",
                            len(ready), exc)
            self._report_each(ready)
            return
        except ServerUnavailable as exc:
            for finished, _ in ready:
                log.error("%s: could not report: %s", finished.lease.label, exc)
                self.summary.add("refused")
            return
        except AgentError as exc:  # an answer that is not a batch answer
            log.warning("the batched report's answer is refused (%s); reporting each unit on its own", exc)
            self._report_each(ready)
            return
        for (finished, _), outcome in zip(ready, answer.results, strict=True):
            lease = finished.lease
            if outcome.error is None:
                self._counted(lease, True, finished.outcome)
                continue
            reported = self._refused(lease, outcome.code, str(outcome.error.get("message", "")),
                                     output_refused=outcome.code == "invalid")
            self._counted(lease, reported, finished.outcome)

    def _report_each(self, ready: list[tuple[_Finished, BatchedReport]]) -> None:
        """The batch, one unit at a time: inline outputs are uploaded first."""
        for finished, report in ready:
            lease = finished.lease
            if report.output is not None:
                try:
                    self.client.upload(finished.workdir / OUTPUT_FILE, report.output_sha256)
                except AgentError as exc:
                    self._fail(lease, f"output upload failed: {exc}")
                    continue
            self._counted(lease, self._report(lease, report), finished.outcome)

    def _counted(self, lease: Lease, reported: bool, outcome: ChildOutcome) -> None:
        if reported:
            self.summary.add("done")
            self.today.add()
            log.info("%s done in %.2fs, reported", lease.label, outcome.elapsed_seconds)
        else:
            self.summary.add("refused")

    def _report(self, lease: Lease, report: BatchedReport) -> bool:
        """The single report (POST /agent/results/{id}/report) of an uploaded output."""
        body = Report(output_sha256=report.output_sha256, signature=report.signature,
                      elapsed_seconds=report.elapsed_seconds, metrics=report.metrics).to_wire()
        try:
            self.client.report(lease.result_id, body)
        except ApiError as exc:
            return self._refused(lease, exc.code, exc.message, output_refused=exc.status == 400)
        except AgentError as exc:
            log.error("%s: could not report: %s", lease.label, exc)
            return False
        return True

    def _refused(self, lease: Lease, code: str, message: str, *, output_refused: bool) -> bool:
        """A report the server answered with an error, single or in a batch; True when it counts as reported."""
        if code == "already_reported":
            # Only this device holds this result: an earlier attempt got through and its answer was lost on
            # the way back (a timeout, then a retry).
            log.info("%s: already reported by an earlier attempt", lease.label)
            return True
        # lease_expired: the unit was reissued; the server has moved on, and so do we.
        level = logging.WARNING if code in ("lease_expired", "lease_cancelled") else logging.ERROR
        log.log(level, "%s: the server refused the report: %s: %s", lease.label, code, message)
        if output_refused:
            # The output itself was refused (NaN in it, say): give the lease up now rather than let it sit
            # until it expires; another owner's device gets the unit.
            self._give_up(lease, f"the server refused the output: {message}")
        return False

    def _fail(self, lease: Lease, error: str) -> None:
        log.warning("%s failed: %s", lease.label, error)
        self.summary.add("failed")
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
        # Leftovers of an earlier run: a unit dir whose lease.json reads is kept for _resume_leftovers
        # (it asks the server which are still ours); anything else is junk.
        for stale in sorted(self.state.work_dir.iterdir()):
            lease = _read_lease(stale) if stale.is_dir() and not stale.is_symlink() else None
            if lease is not None and stale.name == str(lease.result_id):
                self.leftovers.append(lease)
            elif stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@dataclass
class _Parking:
    """A warm stop in progress with a unit in hand: the checkpoint's stamp when it was asked for, and until when
    to wait for a newer one."""

    before: tuple[int, int] | None
    deadline: float


def _stamp(path: Path) -> tuple[int, int] | None:
    """Which version of a file this is (a rename makes a new inode), or None when absent."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _write_lease(workdir: Path, lease: Lease) -> None:
    """lease.json, atomically: the lease as received (payload, signature, key id), re-verified when resumed."""
    data = json.dumps({"result_id": lease.result_id, "unit_id": lease.unit_id, "lease": lease.to_wire()}).encode()
    temporary = workdir / f".{LEASE_FILE}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, workdir / LEASE_FILE)


def _read_lease(workdir: Path) -> Lease | None:
    """The lease in a work dir's lease.json; None when absent or unreadable (the dir is then junk)."""
    try:
        with open(workdir / LEASE_FILE, "rb") as handle:
            raw = safejson.loads(handle.read(MAX_LEASE_FILE_BYTES + 1), max_bytes=MAX_LEASE_FILE_BYTES)
        lease = Lease.from_wire(raw["lease"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if raw.get("result_id") != lease.result_id or raw.get("unit_id") != lease.unit_id:
        return None
    return lease


def _read_progress(path: Path) -> float | None:
    try:
        with open(path, "rb") as handle:
            raw = safejson.loads(handle.read(MAX_PROGRESS_FILE_BYTES + 1), max_bytes=MAX_PROGRESS_FILE_BYTES)
        fraction = raw["fraction"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
        return None
    return float(fraction)
