"""Facts about this machine: sent at enrolment and with a lease request whenever they change, so the
marketplace can match and price work and put the device in a hardware class (results of one class
are compared bitwise; see docs/protocol.md, "Hardware facts").

Nothing here imports torch. The agent's own facts (os, CPU, memory) come from the OS; the facts only
torch knows (its build, the kernels it dispatches to, the determinism switches) come from the compute
child, which reports them in its ready line (`child.numerics_facts`) or, for enrolment, from a
short-lived `python -m worker_agent.child facts`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import worker_agent
from worker_agent import wire
from worker_agent.kinds import KIND_MODULES

if TYPE_CHECKING:
    from worker_agent.runner import ComputeChild

log = logging.getLogger(__name__)

# The flags that change which kernels torch, oneDNN and MKL pick (and so, slightly, the floating-point
# results): x86 (avx512f/dq/bw/vl make oneDNN's avx512_core) and AArch64.
INTERESTING_CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    "neon", "asimddp", "i8mm", "bf16", "sve", "sve2",
)
FACTS_SECONDS = 120.0  # importing torch takes seconds; a facts child silent this long is stuck


def collect(numerics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The agent's facts, plus the compute child's (`numerics`) when known; the child's win a tie
    (its torch_version is the imported build, ours the installed package's metadata)."""
    vendor, model = cpu_identity()
    facts = {
        "os": platform.system().lower(),
        "os_release": platform.release(),
        "machine": platform.machine(),
        "cpu_vendor": vendor,
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "cpu_flags": cpu_flags(),
        "libc": libc(),
        "python": platform.python_version(),
        "torch_version": package_version("torch"),
        "agent_version": worker_agent.__version__,
    }
    return {**facts, **(numerics or {})}


def memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    found: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                found.update(value.split())
    except OSError:
        pass
    if "asimd" in found or platform.machine().lower() in ("arm64", "aarch64"):
        found.add("neon")  # AArch64 always has Advanced SIMD; /proc calls it asimd
    return [flag for flag in INTERESTING_CPU_FLAGS if flag in found]


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str | None, str | None]:
    """(vendor, model) of the first CPU: x86 `vendor_id` and `model name`; on ARM, where those are
    missing, the implementer and part numbers. Elsewhere platform.processor()."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, sep, value = line.partition(":")
            key = key.strip().lower()
            if sep and key not in fields:
                fields[key] = value.strip()
    except OSError:
        return None, platform.processor() or None
    vendor = fields.get("vendor_id") or fields.get("cpu implementer")
    model = fields.get("model name") or (
        f"part {fields['cpu part']} variant {fields.get('cpu variant', '?')}" if "cpu part" in fields else None
    )
    return vendor, model


def libc() -> str | None:
    name, version = platform.libc_ver()
    return f"{name} {version}" if name else None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# --- the compute child's facts ---------------------------------------------------------------------

_facts_cache: dict[tuple[str, ...], dict[str, Any] | None] = {}


def numerics_facts() -> dict[str, Any] | None:
    """The compute child's facts, from a short-lived `python -m worker_agent.child facts` run in the
    environment a serving child gets. None (logged) when it cannot run. Remembered per environment
    for the life of this process (enrolment asks once; a running agent reads its warm child's)."""
    from worker_agent.jobfile import AGENT_PID_ENV
    from worker_agent.runner import child_env  # the same environment as a serving child

    env = child_env()
    key = (sys.executable, *sorted(f"{k}={v}" for k, v in env.items() if k != AGENT_PID_ENV))
    if key not in _facts_cache:
        _facts_cache[key] = _run_facts_child(env)
    return _facts_cache[key]


def _run_facts_child(env: dict[str, str]) -> dict[str, Any] | None:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker_agent.child", "facts"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=FACTS_SECONDS, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not ask the compute child for its facts: %s", exc)
        return None
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        facts = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except ValueError:
        facts = None
    if not isinstance(facts, dict):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        log.warning("the compute child gave no facts (exit %s) %s", done.returncode, " ".join(tail))
        return None
    return facts


class FactsReporter:
    """Which facts to send with the next lease request: all of them, on a run's first request and
    whenever they differ from what the server last accepted (a replaced child with another torch or
    environment). The first request waits for the child's facts: units are stamped with the device's
    hardware class when they are leased, so the class must be current before the first one is."""

    def __init__(self) -> None:
        self._sent: dict[str, Any] | None = None
        self._machine: dict[str, Any] | None = None

    def due(self, child: ComputeChild, *, should_abort: Callable[[], str | None] = lambda: None) -> dict[str, Any] | None:
        numerics = child.wait_facts(should_abort) if self._sent is None else child.facts
        if numerics is None:
            return None
        if self._machine is None:
            self._machine = collect()
        facts = {**self._machine, **numerics}
        return None if facts == self._sent else facts

    def accepted(self, facts: dict[str, Any] | None) -> None:
        """The server took the lease request that carried `facts` (None: nothing was sent)."""
        if facts is not None:
            self._sent = facts


# --- capabilities: what this device can run now (sent with every lease request) -------------------

DEFAULT_MEMORY_CAP_PERCENT = 90.0  # BOINC's "use at most 90% of memory when idle"; the policy passes its own


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Memory the kernel could give a new process now (MemAvailable: free plus reclaimable cache)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def free_memory_mb(*, cap_percent: float = DEFAULT_MEMORY_CAP_PERCENT, meminfo: Path = Path("/proc/meminfo")) -> int:
    """Memory a unit may take now, in MB: what is available, and never more than the cap (a percent of
    RAM) leaves. 0 when the machine will not say: the marketplace then leases only units that need no
    stated memory, never a large one on a guess."""
    total, available = memory_bytes(meminfo), available_memory_bytes(meminfo)
    if available is None:
        return 0
    budget = available if total is None else min(available, int(total * max(0.0, min(cap_percent, 100.0)) / 100))
    return max(0, budget >> 20)


def capabilities(
    numerics: dict[str, Any] | None, *, memory_cap_percent: float = DEFAULT_MEMORY_CAP_PERCENT,
    cores: int | None = None, meminfo: Path = Path("/proc/meminfo"),
) -> wire.Capabilities:
    """This device's capabilities now: free memory under the cap, the cores the child may use (`cores`:
    the policy's; default every CPU), the CUDA device the child reported in its numerics facts (worker_agent/gpu.py:
    "device_type": "cuda", "gpu": {"name", "memory_mb", ...}), the torch it imported, the kinds shipped."""
    numerics = numerics or {}
    gpu = numerics.get("gpu") if numerics.get("device_type") == "cuda" else None
    gpu_mb = gpu.get("memory_mb") if isinstance(gpu, dict) else None
    gpu_name = gpu.get("name") if isinstance(gpu, dict) else None
    cuda = isinstance(gpu_mb, int) and not isinstance(gpu_mb, bool) and 0 < gpu_mb <= wire.MAX_MEMORY_MB
    torch_version = numerics.get("torch_version") or package_version("torch")
    return wire.Capabilities(
        memory_mb=min(free_memory_mb(cap_percent=memory_cap_percent, meminfo=meminfo), wire.MAX_MEMORY_MB),
        cores=max(1, min(cores or os.cpu_count() or 1, wire.MAX_CORES)),
        device_type="cuda" if cuda else "cpu",
        gpu_name=gpu_name[: wire.MAX_NAME] if cuda and isinstance(gpu_name, str) and gpu_name else None,
        gpu_memory_mb=gpu_mb if cuda and isinstance(gpu_mb, int) else 0,
        torch_version=torch_version[:64] if isinstance(torch_version, str) and torch_version else None,
        kinds=tuple(sorted(KIND_MODULES)),
    )
