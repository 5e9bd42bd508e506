"""The compute child: `python -m worker_agent.child JOB.json`.

One process per unit, so a crash, a leak or a runaway model costs one unit and never the agent.
It limits itself, imports torch, runs the unit's kind and writes a status file for the parent.
Exit 0 means the output file is written; 3 means the status file says why not; anything else
(a signal, an abort) is a crash the parent words from the exit status.

Memory: RLIMIT_AS caps address space, not resident memory, and torch maps ~600 MB of address space
just by importing (measured with torch 2.13.0+cpu on x86-64: VmSize 583-623 MB after
`import torch, safetensors.torch`, ~660-700 MB after the first conv/linear; resident ~280-380 MB).
A plain RLIMIT_AS = memory_mb would leave a 2048 MB unit only ~1.4 GB and break units under ~700 MB.
So the limit is set in two steps: first memory_mb + RUNTIME_ALLOWANCE_MB (bounds the import
itself), then, once torch is loaded, lowered to the measured VmSize + memory_mb. `memory_mb` is thus
what the unit itself may use (weights, inputs, activations, output) on top of the runtime.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys
from pathlib import Path

from worker_agent import kinds
from worker_agent.architectures import ArchitectureError
from worker_agent.jobfile import AGENT_PID_ENV, ChildJob, ChildStatus, Limits, PayloadError

EXIT_OK = 0
EXIT_FAILED = 3
RUNTIME_ALLOWANCE_MB = 1024  # measured ~700 MB peak for interpreter + torch; see the module docstring
CPU_GRACE_SECONDS = 30  # the parent's wall clock acts first; RLIMIT_CPU is a backstop if it is gone
PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m worker_agent.child JOB.json", file=sys.stderr)
        return 2
    job = ChildJob.read(Path(argv[1]))
    _die_with_parent()
    set_initial_limits(job.limits)
    try:
        metrics = run(job)
    except BaseException as exc:  # noqa: BLE001 - everything becomes a status line for the parent
        status = status_for(exc, job.limits)
        status.write(Path(job.status_path))
        print(f"unit failed: {status.error}", file=sys.stderr)
        return EXIT_FAILED
    ChildStatus(ok=True, metrics=metrics).write(Path(job.status_path))
    return EXIT_OK


def run(job: ChildJob) -> dict[str, float]:
    kind = kinds.load(job.payload.get("kind"))
    _prepare_torch()
    tighten_memory_limit(job.limits.memory_mb)
    return kind.execute(job)


def _prepare_torch() -> None:
    import torch

    # One thread: results must not depend on how many cores the volunteer has, and a unit is
    # sized for one core anyway. Interop threads are set before any parallel work can start them.
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already started (cannot happen in a fresh child, but never worth failing a unit over)
    # torch.use_deterministic_algorithms(True) also imports torch._inductor (measured ~1.2 s of a
    # ~3.7 s child start) only to set a compiler flag this eager-mode child never reads; the C
    # switch below is the same setting for eager ops. Fall back to the public call if it moves.
    set_deterministic = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_deterministic is not None:
        set_deterministic(True)
    else:
        torch.use_deterministic_algorithms(True)
    if not torch.are_deterministic_algorithms_enabled():
        raise RuntimeError("could not enable torch's deterministic algorithms")


def set_initial_limits(limits: Limits) -> None:
    _lower_limit(resource.RLIMIT_CORE, 0)  # a crash must not dump weights and inputs to disk
    _lower_limit(resource.RLIMIT_CPU, int(limits.seconds) + CPU_GRACE_SECONDS)
    _lower_limit(resource.RLIMIT_AS, (limits.memory_mb + RUNTIME_ALLOWANCE_MB) << 20)


def tighten_memory_limit(memory_mb: int) -> None:
    baseline = address_space_bytes()
    if baseline is not None:
        _lower_limit(resource.RLIMIT_AS, baseline + (memory_mb << 20))


def address_space_bytes() -> int | None:
    """VmSize of this process (Linux), i.e. what RLIMIT_AS counts against."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _lower_limit(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    try:
        # Hard = soft: the unit's code cannot raise it back.
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError) as exc:  # e.g. macOS refuses RLIMIT_AS; the wall clock still holds
        print(f"could not set resource limit {which}: {exc}", file=sys.stderr)


def _die_with_parent() -> None:
    # The child has its own session (a terminal's Ctrl-C must reach only the agent, so a warm
    # shutdown can let the unit finish); this keeps it from outliving an agent that was killed.
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    agent_pid = os.environ.get(AGENT_PID_ENV)
    if agent_pid and os.getppid() != int(agent_pid):  # the agent died before prctl took effect
        os._exit(EXIT_FAILED)


def status_for(exc: BaseException, limits: Limits) -> ChildStatus:
    if isinstance(exc, kinds.JobError | PayloadError | ArchitectureError):
        return ChildStatus(ok=False, error=str(exc), code="bad_input")
    if is_out_of_memory(exc):
        detail = _first_line(exc)
        return ChildStatus(ok=False, error=f"memory limit of {limits.memory_mb} MB exceeded ({detail})", code="memory")
    return ChildStatus(ok=False, error=f"{type(exc).__name__}: {_first_line(exc)}", code="internal")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    text = str(exc).lower()
    # torch's CPU allocator raises RuntimeError("... can't allocate memory ...") when mmap fails;
    # safetensors reports the OS error text.
    return any(marker in text for marker in ("can't allocate memory", "cannot allocate memory", "not enough memory"))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:500]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
