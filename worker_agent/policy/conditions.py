"""Samplers of the rest of the machine: other programs' CPU, memory, battery, the time windows.

psutil does the platform work (Linux, macOS, Windows alike). Each sampler is cheap enough to call four
times a second: the CPU sampler reads the machine's counters and one process's times, never the
process table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import psutil

from worker_agent.policy.config import MINUTES_PER_DAY, Window


class OtherCpu:
    """The share of the whole machine's CPU (0-100) used since the last call by processes other than
    the agent and its compute child: our own work must never count as the owner being busy.

    The child's helpers (if a kind ever spawned any) would count as "other"; the child runs torch in
    threads, which its own times include, and walking the process table 4 times a second would cost
    more than this whole sampler."""

    def __init__(
        self,
        own_pids: Callable[[], Iterable[int]],
        *,
        machine: Callable[[], tuple[float, float]] | None = None,
        process_cpu: Callable[[int], float | None] | None = None,
    ) -> None:
        self._own_pids = own_pids
        self._machine = machine or machine_cpu_seconds
        self._process_cpu = process_cpu or process_cpu_seconds
        self._last_busy, self._last_total = self._machine()
        self._last_own: dict[int, float] = {}

    def sample(self) -> float:
        busy, total = self._machine()
        own = self._own()
        busy_delta, total_delta = busy - self._last_busy, total - self._last_total
        own_delta = sum(min(used - self._last_own.get(pid, 0.0), busy_delta) for pid, used in own.items())
        self._last_busy, self._last_total, self._last_own = busy, total, own
        if total_delta <= 0:
            return 0.0
        return max(0.0, min(100.0, 100.0 * (busy_delta - max(own_delta, 0.0)) / total_delta))

    def _own(self) -> dict[int, float]:
        used: dict[int, float] = {}
        for pid in {os.getpid(), *self._own_pids()}:
            seconds = self._process_cpu(pid)
            if seconds is not None:
                used[pid] = seconds
        return used


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, since boot. Linux counts guest time
    inside user time as well, so it is taken out once."""
    times = psutil.cpu_times()
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - times.idle - getattr(times, "iowait", 0.0), total


_processes: dict[int, psutil.Process] = {}  # a psutil.Process costs a few /proc reads to make; keep ours


def process_cpu_seconds(pid: int) -> float | None:
    process = _processes.get(pid)
    try:
        if process is None:
            if len(_processes) > 16:  # children come and go; a handful is all we ever watch
                _processes.clear()
            process = _processes[pid] = psutil.Process(pid)
        times = process.cpu_times()
    except psutil.Error:
        _processes.pop(pid, None)
        return None
    return float(times.user + times.system)


def total_memory_bytes() -> int:
    return int(psutil.virtual_memory().total)


def resident_bytes(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


@dataclass(frozen=True)
class Power:
    on_battery: bool
    percent: float | None  # None: no battery at all


def power() -> Power:
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    if battery is None:
        return Power(on_battery=False, percent=None)
    return Power(on_battery=not battery.power_plugged, percent=float(battery.percent))


def minute_of_week(moment: datetime) -> int:
    return moment.weekday() * MINUTES_PER_DAY + moment.hour * 60 + moment.minute


def in_windows(windows: tuple[Window, ...], moment: datetime) -> bool:
    """No windows means always; otherwise `moment` (local time) must fall in one of them."""
    if not windows:
        return True
    minute = minute_of_week(moment)
    return any(window.contains(minute) for window in windows)
