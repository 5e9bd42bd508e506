"""Parent side of the compute child: spawn it, watch the wall clock and the lease, read its status.

The child gets its own session: a Ctrl-C in the agent's terminal goes to the agent alone, which
decides whether the unit may finish (warm shutdown) or must die (cold).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import worker_agent
from worker_agent.jobfile import AGENT_PID_ENV, ChildJob, ChildStatus

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
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
    """The parent killed the child on purpose (the lease was lost); nothing is to be reported."""


@dataclass(frozen=True)
class ChildOutcome:
    ok: bool
    elapsed_seconds: float
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def run_child(job: ChildJob, workdir: Path, *, should_abort: Callable[[], str | None] = lambda: None) -> ChildOutcome:
    """Run one unit to completion, a limit, or an abort; the child is never left running."""
    job_path = workdir / "job.json"
    job.write(job_path)
    started = time.monotonic()
    with (workdir / "child.log").open("wb") as child_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker_agent.child", str(job_path)],
            stdin=subprocess.DEVNULL,
            stdout=child_log,
            stderr=child_log,
            env=child_env(),
            start_new_session=True,
        )
        try:
            timed_out = _wait(process, started + job.limits.seconds, should_abort)
        finally:
            _kill(process)  # no-op when it exited; on an exception (cold shutdown) it must not outlive us
    elapsed = time.monotonic() - started
    if timed_out:
        return ChildOutcome(False, elapsed, f"time limit of {job.limits.seconds:g} s exceeded; the child was killed")
    return _outcome(process.returncode, job, workdir, elapsed)


def child_env() -> dict[str, str]:
    env = {**os.environ, **CHILD_ENV, AGENT_PID_ENV: str(os.getpid())}
    # The child must import this very copy of worker_agent, installed or run from a checkout.
    package_root = str(Path(worker_agent.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _wait(process: subprocess.Popen[bytes], deadline: float, should_abort: Callable[[], str | None]) -> bool:
    """Wait for exit; True when the wall-clock deadline passed first. Raises ChildAborted."""
    while process.poll() is None:
        reason = should_abort()
        if reason is not None:
            _kill(process)
            raise ChildAborted(reason)
        if time.monotonic() >= deadline:
            _kill(process)
            return True
        time.sleep(POLL_SECONDS)
    return False


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: helpers the child spawned die too
    except ProcessLookupError:
        pass
    process.wait()


def _outcome(returncode: int, job: ChildJob, workdir: Path, elapsed: float) -> ChildOutcome:
    status = ChildStatus.read(Path(job.status_path))
    if returncode == 0 and status is not None and status.ok:
        if not Path(job.output_path).is_file():
            return ChildOutcome(False, elapsed, "the compute child reported success but wrote no output")
        return ChildOutcome(True, elapsed, metrics=status.metrics)
    if status is not None and not status.ok:
        return ChildOutcome(False, elapsed, status.error)
    return ChildOutcome(False, elapsed, _crash_message(returncode, job, workdir))


def _crash_message(returncode: int, job: ChildJob, workdir: Path) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        what = f"the compute child was killed by {name}"
        if name == "SIGXCPU":
            what += " (CPU time limit)"
        elif name in ("SIGKILL", "SIGSEGV", "SIGABRT", "SIGBUS"):
            what += f" (possibly the {job.limits.memory_mb} MB memory limit)"
    else:
        what = f"the compute child exited with status {returncode}"
    tail = _log_tail(workdir / "child.log")
    return f"{what}: {tail}" if tail else what


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())[-600:]
