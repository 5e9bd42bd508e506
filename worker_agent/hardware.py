"""Facts about this machine sent at enrolment, so the marketplace can match and price work.

Nothing here imports torch: its version comes from the installed package metadata.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import worker_agent

# The flags that change which kernels torch picks (and so, slightly, the floating-point results).
INTERESTING_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "sve")


def collect() -> dict[str, Any]:
    return {
        "os": platform.system().lower(),
        "os_release": platform.release(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "cpu_flags": cpu_flags(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "agent_version": worker_agent.__version__,
    }


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


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
