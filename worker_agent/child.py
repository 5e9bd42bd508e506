"""The compute child: `python -m worker_agent.child serve WORKDIR` (or `facts`: print the facts and exit).

A long-lived process, so torch is imported once per child rather than once per unit (the import
costs ~2.5 s of CPU; a small unit ~10 ms). It limits itself, imports torch, sets the determinism
switches, says `{"ready": true, "facts": {...}}` on stdout (`numerics_facts`: what decides its
floating-point results, for the device's hardware class), then reads one `ChildJob` JSON line per unit
on stdin and answers each with one `ChildStatus` JSON line on stdout. End of stdin means stop
(exit 0). The parent (runner.py) kills and replaces the child whenever a unit runs out of time,
crashes it, or fails in a way that may have left it unhealthy (out of memory, an internal error).
Anything the unit's code prints goes to stderr (the parent's log file), never into the protocol.

Limits are set per unit as soft limits; the hard limits are left alone, so the next unit may raise
them again (a non-root process may raise a soft limit up to the hard one). No code from the network
runs here (architectures come from a registry, tensors from safetensors), so the soft limits guard
against runaway units, not hostile ones.

Memory: RLIMIT_AS caps address space, not resident memory, and torch maps ~600 MB of address space
just by importing (measured with torch 2.13.0+cpu on x86-64: VmSize 583-623 MB after
`import torch, safetensors.torch`, ~660-700 MB after the first conv/linear; resident ~280-380 MB).
A plain RLIMIT_AS = memory_mb would leave a 2048 MB unit only ~1.4 GB and break units under ~700 MB.
So the child warms torch up once (a tiny conv and linear map what the first real op would), and
before each unit sets the soft RLIMIT_AS to its VmSize at that moment + memory_mb: `memory_mb` is
what the unit itself may use (weights, inputs, activations, output) on top of the runtime. If the
idle child's VmSize drifts more than RECYCLE_GROWTH_MB above its ready-time size (heap kept by the
allocator, a leak), it asks to be replaced after the unit, so the drift stays bounded.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import importlib
import json
import math
import os
import resource
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from worker_agent import kinds
from worker_agent.architectures import ArchitectureError
from worker_agent.jobfile import AGENT_PID_ENV, MAX_THREADS, THREADS_ENV, ChildJob, ChildStatus, Limits, PayloadError
from worker_agent.kinds import _device
from worker_agent.kinds._checkpoint import clear_checkpoint_request, install_request_handler

EXIT_OK = 0
EXIT_FAILED = 3
EXIT_USAGE = 2
CPU_GRACE_SECONDS = 30  # the parent's wall clock acts first; RLIMIT_CPU is a backstop if it is gone
RECYCLE_GROWTH_MB = 512
PR_SET_PDEATHSIG = 1
# Bump when the agent changes how it computes a unit (batching, loading, output writing): results
# of two revisions may differ bitwise, so they must not share a hardware class.
NUMERICS_REVISION = 1
# Environment variables that steer which kernels ATen, oneDNN and MKL run (and so the last bits).
NUMERICS_ENV = (
    "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE",
    "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE",
)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[1] == "facts":
        protocol = _take_stdout()
        _prepare_torch()
        _send(protocol, json.dumps(numerics_facts(), sort_keys=True).encode() + b"\n")
        return EXIT_OK
    if len(argv) != 3 or argv[1] != "serve":
        print("usage: python -m worker_agent.child serve WORKDIR | facts", file=sys.stderr)
        return EXIT_USAGE
    install_request_handler()  # first: SIGUSR1's default action would end the child
    _die_with_parent()
    os.chdir(argv[2])  # stray relative paths land in the agent's scratch space
    _lower_hard_limit(resource.RLIMIT_CORE, 0)  # a crash must not dump weights and inputs to disk
    protocol = _take_stdout()
    _prepare_torch()
    baseline = address_space_bytes()
    _send(protocol, json.dumps({"ready": True, "facts": numerics_facts()}, sort_keys=True).encode() + b"\n")
    for line in sys.stdin.buffer:
        status = run_unit(ChildJob.from_line(line))
        now = address_space_bytes()
        if baseline is not None and now is not None and now - baseline > RECYCLE_GROWTH_MB << 20:
            status = dataclasses.replace(status, recycle=True)
        _send(protocol, status.to_line())
    # End of stdin: the agent is done with us. Nothing is left to flush or clean up, and a normal
    # interpreter exit would spend half a second tearing torch down.
    sys.stderr.flush()
    os._exit(EXIT_OK)


def run_unit(job: ChildJob) -> ChildStatus:
    try:
        kind = kinds.load(job.payload.get("kind"))
        with unit_limits(job.limits), unit_threads(job.threads):
            metrics = kind.execute(job)
    except BaseException as exc:  # noqa: BLE001 - everything becomes a status line for the parent
        status = status_for(exc, job.limits)
        print(f"unit failed: {status.error}", file=sys.stderr, flush=True)
        return status
    finally:
        clear_checkpoint_request()  # a request that came too late for this unit is not for the next
    return ChildStatus(ok=True, metrics=metrics)


def _take_stdout() -> IO[bytes]:
    """The protocol gets a private copy of stdout; fd 1 itself now points at stderr, so a print in a
    unit's code (or a library's warning) can never be mistaken for a status line."""
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


def _send(protocol: IO[bytes], line: bytes) -> None:
    protocol.write(line)
    protocol.flush()


def _prepare_torch() -> None:
    _device.cuda_env()  # before torch is imported: CUDA reads it once
    import torch

    # One thread: results must not depend on how many cores the volunteer has, and a unit is
    # sized for one core anyway. Interop threads are set before any parallel work can start them.
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already started (cannot happen in a fresh child, but never worth failing over)
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
    # Load now what a unit would otherwise load on its first call, so that neither its time nor
    # its address space is billed to whichever unit happens to come first.
    import safetensors.torch  # noqa: F401

    for module in kinds.KIND_MODULES.values():
        importlib.import_module(module)
    _device.cuda_prepare()  # on a CUDA device the agent allows: its switches and context
    with torch.inference_mode():
        torch.nn.functional.conv2d(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3))
        torch.nn.functional.linear(torch.zeros(1, 4), torch.zeros(2, 4))


def numerics_facts() -> dict[str, object]:
    """What decides this child's floating-point results (after `_prepare_torch`): the torch build,
    the CPU kernels ATen dispatches to, device and dtype, the determinism switches, the steering
    environment. The marketplace puts devices equal on these (and the agent's OS/CPU facts) in one
    hardware class, and compares their results bitwise."""
    import torch

    return {
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device_type": "cpu",
        "dtype": "float32",
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        # The threads a unit runs with (the agent's `cores`): the child idles on one, each unit sets its own.
        "num_threads": unit_thread_count(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "math_env": {name: os.environ[name] for name in NUMERICS_ENV if name in os.environ},
        "numerics_revision": NUMERICS_REVISION,
        **_device.cuda_facts(),  # on a CUDA device: device_type "cuda", the card and its switches
    }


def unit_thread_count() -> int:
    """The thread count the agent gave this child for its units (THREADS_ENV; 1 when unset)."""
    raw = os.environ.get(THREADS_ENV, "1")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise SystemExit(f"{THREADS_ENV} must be a whole number from 1 to {MAX_THREADS}, got {raw!r}")
    return value


@contextmanager
def unit_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads for one unit, back to one afterwards. A count other than 1 may change
    a result's last bits (reductions split differently), so it is in the numerics facts."""
    import torch

    saved = torch.get_num_threads()
    if threads != saved:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


@contextmanager
def unit_limits(limits: Limits) -> Iterator[None]:
    """Soft limits for one unit: CPU time and address space on top of what the child already uses.
    Restored afterwards, so the child can answer (and run the next unit) whatever this one left."""
    saved = {which: resource.getrlimit(which) for which in (resource.RLIMIT_CPU, resource.RLIMIT_AS)}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used_cpu = math.ceil(usage.ru_utime + usage.ru_stime)
    _set_soft_limit(resource.RLIMIT_CPU, used_cpu + math.ceil(limits.seconds) + CPU_GRACE_SECONDS)
    baseline = address_space_bytes()
    if baseline is not None:
        _set_soft_limit(resource.RLIMIT_AS, baseline + (limits.memory_mb << 20))
    try:
        yield
    finally:
        for which, (soft, _hard) in saved.items():
            _set_soft_limit(which, soft)


def address_space_bytes() -> int | None:
    """VmSize of this process (Linux), i.e. what RLIMIT_AS counts against."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _set_soft_limit(which: int, value: int) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY or value > hard):
        value = hard
    try:
        resource.setrlimit(which, (value, hard))
    except (ValueError, OSError) as exc:  # e.g. macOS refuses RLIMIT_AS; the wall clock still holds
        print(f"could not set resource limit {which}: {exc}", file=sys.stderr)


def _lower_hard_limit(which: int, value: int) -> None:
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError) as exc:
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
    # torch.cuda.OutOfMemoryError says "CUDA out of memory" (the unit's memory_fraction on the card).
    markers = ("can't allocate memory", "cannot allocate memory", "not enough memory", "cuda out of memory")
    return any(marker in text for marker in markers)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:500]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
