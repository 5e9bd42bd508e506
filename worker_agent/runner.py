"""Parent side of the compute child: keep one warm child, send it units, watch the clock and the lease.

The child (child.py) is started once and serves unit after unit over its stdin/stdout pipes, one
JSON line each way, so torch is imported once per child and not once per unit. Every unit still
gets its own wall-clock limit, counted from the moment it is sent. A unit that runs out of time, is
abandoned (lost lease), crashes the child or fails in a way that may have left it unhealthy costs
that unit only: the child's process group is killed and a fresh child is started for the next one.

The child gets its own session: a Ctrl-C in the agent's terminal goes to the agent alone, which
decides whether the unit may finish (warm shutdown) or must die (cold).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import worker_agent
from worker_agent import gpu
from worker_agent.jobfile import AGENT_PID_ENV, THREADS_ENV, ChildJob, ChildStatus

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
STARTUP_SECONDS = 120.0  # importing torch takes a few seconds; a child silent this long is stuck
STOP_SECONDS = 5.0  # an idle child told to stop exits at once; this is how long it gets
LOG_KEEP_BYTES = 1 << 20  # the child's log is emptied between units once it is this big
KEEP_CHILD_AFTER = ("bad_input",)  # failures that leave the child healthy; any other one replaces it
# Math libraries size thread pools and per-thread buffers from the core count at import time;
# pinning them to one keeps the child's address space (and its results) the same on every machine.
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
    "PYTHONUNBUFFERED": "1",
}


class ChildAborted(Exception):
    """The unit was abandoned on purpose (the lease was lost); nothing is to be reported."""


@dataclass(frozen=True)
class ChildOutcome:
    ok: bool
    elapsed_seconds: float
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    child_pid: int = 0
    # Stopped by the policy (kill_for with retry): the unit is no failure and runs again, from its
    # checkpoint, once the policy allows it (the memory cap of a machine in use, say).
    retry_later: bool = False


class _ChildGone(Exception):
    """The child closed its end of the pipes (it exited or was killed)."""


class ComputeChild:
    """One warm compute child, replaced whenever a unit leaves it dead or unhealthy.

    Used from the agent's main thread (PR_SET_PDEATHSIG fires when the thread that started the child
    ends), except `pause`, `resume`, `unit_pid` and `kill_for`, which the governor's thread calls: they
    only signal the current child, under a lock that `kill` takes to forget it. `start` returns at
    once; the child imports torch meanwhile.

    Time the child spends stopped (pause) does not count against a unit's wall-clock limit or its
    elapsed time, nor against the startup deadline.
    """

    def __init__(self, workdir: Path, *, threads: int = 1, gpu_policy: str = "auto") -> None:
        self.workdir = workdir
        self.threads = threads  # torch threads per unit (the `cores` policy key); a numerics fact
        self.gpu_policy = gpu_policy  # the `gpu` policy key: "auto" lets the child compute on CUDA
        self._signal_lock = threading.Lock()
        self._paused_at: float | None = None
        self._paused_total = 0.0
        self._in_unit = False
        # Called (from the agent's thread) when a unit starts: the governor wakes at once to watch it.
        self.on_unit_start: Callable[[], None] = lambda: None
        self._kill_reason: str | None = None
        self._kill_retry = False
        self._process: subprocess.Popen[bytes] | None = None
        self._log_fd: int | None = None
        self._buffer = b""
        self._ready = False
        self._fresh = True  # no unit sent yet: a crash's log tail includes the startup output
        self._started = 0.0
        # What the last child that became ready reported about its numerics (child.numerics_facts);
        # kept across restarts until the next child says otherwise.
        self.facts: dict[str, object] | None = None

    def __enter__(self) -> ComputeChild:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.stop()
        else:
            self.kill()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start a child unless one is running (it may be still importing torch)."""
        if self._process is not None:
            return
        fd, path = tempfile.mkstemp(prefix="idlegrid-child-", suffix=".log")
        os.unlink(path)  # nothing to clean up, however the agent ends
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)  # truncating is safe
        self._log_fd = fd
        self._process = subprocess.Popen(
            [sys.executable, "-m", "worker_agent.child", "serve", str(self.workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=fd,
            env={**child_env(self.gpu_policy), THREADS_ENV: str(self.threads)},
            start_new_session=True,
        )
        self._buffer, self._ready, self._fresh = b"", False, True
        self._kill_reason, self._kill_retry = None, False
        self._started = time.monotonic()
        log.debug("compute child %d started", self._process.pid)

    def run(self, job: ChildJob, *, should_abort: Callable[[], str | None] = lambda: None) -> ChildOutcome:
        """Run one unit to completion, its time limit, or an abort (ChildAborted). A child that might
        be unhealthy afterwards is replaced; on any other exception (a cold shutdown) it is killed."""
        self._in_unit = True
        self.on_unit_start()
        try:
            return self._run(job, should_abort)
        finally:
            self._in_unit = False

    def _run(self, job: ChildJob, should_abort: Callable[[], str | None]) -> ChildOutcome:
        if job.threads == 1 and self.threads != 1:
            job = dataclasses.replace(job, threads=self.threads)
        self.start()
        try:
            if not self._await_ready(should_abort):
                return self._crashed(job, 0.0, during="while starting")
        except ChildAborted:
            raise  # the unit never reached the child, which stays as it is
        except BaseException:
            self.kill()
            raise
        process = self._process
        assert process is not None and process.stdin is not None
        log_mark = self._mark_log()
        started, paused_mark = time.monotonic(), self.paused_seconds()
        try:
            process.stdin.write(job.to_line())
            process.stdin.flush()
            line = self._read_line(started + job.limits.seconds, should_abort)
        except (_ChildGone, BrokenPipeError):
            return self._crashed(job, self._running_since(started, paused_mark), log_mark=log_mark)
        except ChildAborted:
            self.restart()
            raise
        except BaseException:
            self.kill()
            raise
        elapsed = self._running_since(started, paused_mark)
        if line is None:
            self.restart()
            return ChildOutcome(False, elapsed, f"time limit of {job.limits.seconds:g} s exceeded; the child was killed",
                                child_pid=process.pid)
        try:
            status = ChildStatus.from_line(line)
        except ValueError:
            self.restart()
            return ChildOutcome(False, elapsed, f"the compute child sent an unreadable answer: {line[:200]!r}",
                                child_pid=process.pid)
        return self._judge(status, job, elapsed, process.pid)

    def wait_facts(self, should_abort: Callable[[], str | None] = lambda: None) -> dict[str, object] | None:
        """The child's numerics facts, waiting for a starting child to be ready. None when it died or
        hung while starting (the next unit finds out and replaces it) or should_abort said stop."""
        self.start()
        try:
            self._await_ready(should_abort)
        except (ChildAborted, _ChildGone):
            pass
        return self.facts

    def _running_since(self, started: float, paused_mark: float) -> float:
        return time.monotonic() - started - (self.paused_seconds() - paused_mark)

    # --- called from the governor's thread as well ----------------------------------------------

    def unit_pid(self) -> int | None:
        """The child's pid while a unit runs (or waits for the child to start); None otherwise."""
        process = self._process
        return process.pid if process is not None and self._in_unit else None

    def pause(self) -> None:
        """SIGSTOP the child's process group; no-op without a child or when already stopped."""
        with self._signal_lock:
            if self._process is None or self._paused_at is not None:
                return
            if self._signal(signal.SIGSTOP):
                self._paused_at = time.monotonic()

    def resume(self) -> None:
        """SIGCONT the child's process group; no-op without a child or when it is not stopped."""
        with self._signal_lock:
            if self._paused_at is None:
                return
            self._paused_total += time.monotonic() - self._paused_at
            self._paused_at = None
            if self._process is not None:
                self._signal(signal.SIGCONT)

    def paused_seconds(self) -> float:
        """Seconds children have spent stopped so far, a stop under way included."""
        with self._signal_lock:
            ongoing = time.monotonic() - self._paused_at if self._paused_at is not None else 0.0
            return self._paused_total + ongoing

    def kill_for(self, reason: str, *, retry: bool = False) -> None:
        """Kill the child at once; the unit it runs fails with `reason` (not a crash message), or with
        `retry` is to run again later (ChildOutcome.retry_later)."""
        with self._signal_lock:
            if self._process is None or self._kill_reason is not None:
                return
            self._kill_reason, self._kill_retry = reason, retry
            self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> bool:
        assert self._process is not None  # the caller holds the lock, so it is not reaped meanwhile
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def is_paused(self) -> bool:
        """Whether the child is stopped now (by the governor's pause or its duty cycle)."""
        with self._signal_lock:
            return self._paused_at is not None

    def request_checkpoint(self) -> bool:
        """Ask a ready child to checkpoint its unit at the next safe point (SIGUSR1; see
        kinds/_checkpoint.py). False when there is no ready child to ask."""
        if self._process is None or not self._ready or self._process.poll() is not None:
            return False
        try:
            os.kill(self._process.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return False
        return True

    def restart(self) -> None:
        """Kill the child and start the next one now, so its import overlaps with other work."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Stop an idle child cleanly (end of its stdin), killing it if it does not exit promptly."""
        process = self._process
        if process is None:
            return
        self.resume()  # a stopped child cannot read the end of its stdin
        try:
            if process.stdin is not None:
                try:
                    process.stdin.close()
                except BrokenPipeError:
                    pass
            if self._ready:  # still importing torch: not worth waiting for
                process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("compute child %d did not stop; killing it", process.pid)
        finally:
            self.kill()  # no-op on the process if it exited; reaps it and closes our ends either way

    def kill(self) -> None:
        """Kill the child's whole process group (helpers it spawned die too) and forget it."""
        with self._signal_lock:
            process, self._process = self._process, None
            if self._paused_at is not None:  # the next child starts running
                self._paused_total += time.monotonic() - self._paused_at
                self._paused_at = None
        if process is not None:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()
            for pipe in (process.stdin, process.stdout):
                try:
                    if pipe is not None:
                        pipe.close()
                except OSError:
                    pass
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        self._buffer, self._ready = b"", False

    # --- talking to the child -----------------------------------------------------------------

    def _await_ready(self, should_abort: Callable[[], str | None]) -> bool:
        """Wait until the child has imported torch; False when it died or hung instead."""
        if self._ready:
            return True
        try:
            line = self._read_line(time.monotonic() + STARTUP_SECONDS, should_abort)
        except _ChildGone:
            return False
        try:
            hello = json.loads(line) if line is not None else None
        except ValueError:
            hello = None
        self._ready = isinstance(hello, dict) and hello.get("ready") is True
        if self._ready and isinstance(hello, dict) and isinstance(hello.get("facts"), dict):
            self.facts = hello["facts"]
        if self._ready:
            log.info("compute child %s ready after %.1fs", self.pid, time.monotonic() - self._started)
        return self._ready

    def _read_line(self, deadline: float, should_abort: Callable[[], str | None]) -> bytes | None:
        """The child's next line; None when the deadline passed first. Raises ChildAborted, _ChildGone."""
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        poller = select.poll()  # not select.select: that breaks on descriptors above 1023
        poller.register(fd, select.POLLIN)
        paused_mark = self.paused_seconds()
        while (end := self._buffer.find(b"\n")) < 0:
            reason = should_abort()
            if reason is not None:
                raise ChildAborted(reason)
            # The deadline moves on by the time the child spent stopped: a paused unit is not a slow one.
            remaining = deadline + (self.paused_seconds() - paused_mark) - time.monotonic()
            if remaining <= 0:
                return None
            if poller.poll(max(1, round(min(POLL_SECONDS, remaining) * 1000))):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise _ChildGone()
                self._buffer += chunk
        line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        return line

    def _judge(self, status: ChildStatus, job: ChildJob, elapsed: float, pid: int) -> ChildOutcome:
        if status.ok and not Path(job.output_path).is_file():
            self.restart()
            return ChildOutcome(False, elapsed, "the compute child reported success but wrote no output", child_pid=pid)
        if status.ok:
            outcome = ChildOutcome(True, elapsed, metrics=status.metrics, child_pid=pid)
        else:
            outcome = ChildOutcome(False, elapsed, status.error, child_pid=pid)
        if status.recycle:
            log.info("compute child %d asked to be replaced (its address space drifted); starting a fresh one", pid)
            self.stop()
            self.start()
        elif not status.ok and status.code not in KEEP_CHILD_AFTER:
            self.restart()  # out of memory or an internal error: do not trust this interpreter again
        return outcome

    def _crashed(self, job: ChildJob, elapsed: float, *, log_mark: int = 0, during: str = "") -> ChildOutcome:
        process = self._process
        assert process is not None
        try:
            process.wait(1.0)  # it closed its pipes, so it is exiting, unless it hangs or babbles
            what = self._kill_reason or _crash_message(process.returncode, job)
            retry = self._kill_reason is not None and self._kill_retry
        except subprocess.TimeoutExpired:
            what, retry = "the compute child stopped answering and was killed", False
        tail = self._log_tail(log_mark)
        self.restart()
        if during:
            what = f"{what} {during}"
        if retry:
            return ChildOutcome(False, elapsed, what, child_pid=process.pid, retry_later=True)
        return ChildOutcome(False, elapsed, f"{what}: {tail}" if tail else what, child_pid=process.pid)

    # --- the child's log (its stderr: an unlinked temporary file) -----------------------------

    def _mark_log(self) -> int:
        """Where this unit's part of the log starts (the child is idle now: nothing is writing)."""
        if self._log_fd is None:
            return 0
        if self._fresh:
            self._fresh = False
            return 0
        size = os.fstat(self._log_fd).st_size
        if size > LOG_KEEP_BYTES:
            os.ftruncate(self._log_fd, 0)
            return 0
        return size

    def _log_tail(self, start: int, lines: int = 3) -> str:
        if self._log_fd is None:
            return ""
        size = os.fstat(self._log_fd).st_size
        start = max(start, size - (1 << 16))
        text = os.pread(self._log_fd, max(size - start, 0), start).decode(errors="replace")
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())[-600:]


def child_env(gpu_policy: str = "auto") -> dict[str, str]:
    """The compute child's environment; `gpu_policy` is the policy's `gpu` key (the child looks for CUDA
    only with "auto")."""
    env = {**os.environ, **CHILD_ENV, **gpu.child_gpu_env(gpu_policy), AGENT_PID_ENV: str(os.getpid())}
    # The child must import this very copy of worker_agent, installed or run from a checkout.
    package_root = str(Path(worker_agent.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _crash_message(returncode: int, job: ChildJob) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        what = f"the compute child was killed by {name}"
        if name == "SIGXCPU":
            what += " (CPU time limit)"
        elif name in ("SIGKILL", "SIGSEGV", "SIGABRT", "SIGBUS"):
            what += f" (possibly the {job.limits.memory_mb} MB memory limit)"
        return what
    return f"the compute child exited with status {returncode}"
