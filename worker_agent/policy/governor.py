"""The governor: samples the machine four times a second, decides whether the child may compute,
and holds the compute child to it.

Decisions (`tick`) and their effect on the child (`_apply`) are separate, so tests drive decisions with
fake samplers and a fake clock, and the process-level tests watch the real child stop and continue.

The child is stopped by SIGSTOP of its process group and continued by SIGCONT (ComputeChild.pause /
resume): nothing of the unit is lost, and the wall-clock limit does not count the time it spent
stopped. A CPU cap under 100% is a duty cycle, as in BOINC: each DUTY_PERIOD_SECONDS the child runs
for cpu_percent of it and is stopped for the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from worker_agent.policy import conditions
from worker_agent.policy.config import Policy
from worker_agent.policy.idle import IdleSource, open_idle_source

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.25  # input must stop the child within a second: four looks a second, with room
# With no unit in the child there is nothing to stop: once a second is enough to decide when to lease
# again, and keeps an agent waiting for work (most of its life) near zero CPU.
IDLE_SAMPLE_SECONDS = 2.0
DUTY_PERIOD_SECONDS = 1.0
CPU_WINDOW_SAMPLES = 8  # other programs' CPU is judged on its mean over the last ~2 s, not one blip
RELEASE_SECONDS = 5.0  # busy programs / battery must have been quiet this long before computing again
POWER_SECONDS = 5.0  # the battery changes slowly, and reading it is most of an idle tick's cost
IN_USE_SECONDS = 60.0  # with idle_minutes = 0, "the user is busy" (memory cap) still means recent input

USER_ACTIVE = "user active"
OTHER_BUSY = "other programs busy"
ON_BATTERY = "on battery"
BATTERY_LOW = "battery low"
OUTSIDE_WINDOWS = "outside the allowed hours"
MANUAL = "paused by the owner"
GPU_HOT = "GPU too hot"
GPU_UNREADABLE = "GPU sensors unreadable"
GPU_CHECK_SECONDS = 1.0  # the GPU guard's check: once per duty-cycle period (worker_agent/gpu.py)


class GpuCheck(Protocol):
    """What the governor needs of worker_agent.gpu.GpuGuard (kept structural: no GPU code is imported here)."""

    hot: bool

    def check(self) -> Any: ...  # a GpuVerdict: allowed, reason, share


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reasons: tuple[str, ...]
    cpu_share: float  # of the child's time it may run, 0-1 (0 when not allowed)
    memory_cap_percent: int  # of the machine's RAM the child may hold now


class ChildControl(Protocol):
    """What the governor needs of the compute child (worker_agent.runner.ComputeChild)."""

    def unit_pid(self) -> int | None:
        """The child's pid while it runs (or starts) a unit; None when it is idle or absent."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def kill_for(self, reason: str, *, retry: bool = False) -> None:
        """Kill the child; the running unit fails with `reason`."""
        ...


@dataclass
class Samplers:
    idle: IdleSource
    other_cpu: Callable[[], float]
    power: Callable[[], conditions.Power] = conditions.power
    now: Callable[[], datetime] = datetime.now  # local time, for the windows
    total_memory: Callable[[], int] = conditions.total_memory_bytes
    resident: Callable[[int], int | None] = conditions.resident_bytes

    @classmethod
    def for_policy(cls, policy: Policy, *, own_pids: Callable[[], list[int]]) -> Samplers:
        """The real machine's samplers (opens the idle source: may raise IdleSourceUnavailable)."""
        return cls(idle=open_idle_source(policy.idle_source), other_cpu=conditions.OtherCpu(own_pids).sample)


@dataclass
class _Readings:
    idle_seconds: float | None = None
    other_cpu_percent: float = 0.0
    power: conditions.Power = field(default_factory=lambda: conditions.Power(False, None))


class Governor(threading.Thread):
    def __init__(
        self,
        policy: Policy,
        samplers: Samplers,
        *,
        child: ChildControl | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        interval: float = SAMPLE_SECONDS,
    ) -> None:
        super().__init__(name="governor", daemon=True)
        self.policy = policy
        self.samplers = samplers
        self.child = child
        self.clock = clock
        self.wall = wall
        self.interval = interval
        self._windows = policy.window_spans
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stopping = False
        self._cpu: deque[float] = deque(maxlen=CPU_WINDOW_SAMPLES)
        self._last_true: dict[str, float] = {}
        self._manual: tuple[bool, float | None] = (False, None)  # paused?, until (time.time()) or None
        self._readings = _Readings()
        self._verdict = Verdict(False, ("starting",), 0.0, int(policy.memory_busy_percent))
        self._duty_start = clock()
        self._duty_pid: int | None = None
        self._stopped_pid: int | None = None
        self._idle_unknown_logged = False
        self._power = conditions.Power(on_battery=False, percent=None)
        self._power_due = -float("inf")
        self._gpu_device = False  # the child computes on CUDA (its facts say so)
        self._gpu_guard: GpuCheck | None = None
        self._gpu_verdict: Any = None  # the guard's last GpuVerdict
        self._gpu_due = -float("inf")

    # --- what others call -------------------------------------------------------------------------

    def verdict(self) -> Verdict:
        with self._lock:
            return self._verdict

    def wait_allowed(self, timeout: float) -> bool:
        """True as soon as computing is allowed; False after `timeout` seconds of not."""
        with self._changed:
            self._changed.wait_for(lambda: self._verdict.allowed or self._stopping, timeout)
            return self._verdict.allowed

    def wake(self) -> None:
        """A unit just started (ComputeChild.on_unit_start): look now, and four times a second from now on."""
        self._wake.set()

    def set_gpu(self, *, device: bool, guard: GpuCheck | None) -> None:
        """The child computes on a GPU (`device`), capped by `guard` (None: no NVML, no caps). On a GPU device
        `gpu_when_busy` lets units run while the user is active; the guard pauses and throttles the child."""
        with self._lock:
            self._gpu_device, self._gpu_guard, self._gpu_verdict = device, guard, None
        self._wake.set()

    def manual_pause(self, until: float | None) -> None:
        """Pause until `until` (time.time() seconds), or until manual_resume when None."""
        with self._lock:
            self._manual = (True, until)
        self._wake.set()

    def manual_resume(self) -> None:
        with self._lock:
            self._manual = (False, None)
        self._wake.set()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            verdict, readings, (paused, until) = self._verdict, self._readings, self._manual
        return {
            "state": "running" if verdict.allowed else "paused",
            "reasons": list(verdict.reasons),
            "cpu_share": verdict.cpu_share,
            "memory_cap_percent": verdict.memory_cap_percent,
            "idle_source": self.samplers.idle.name,
            "idle_seconds": readings.idle_seconds,
            "other_cpu_percent": round(readings.other_cpu_percent, 1),
            "on_battery": readings.power.on_battery,
            "battery_percent": readings.power.percent,
            "manual_pause": {"paused": paused, "until": until},
            "gpu": None if not self._gpu_device else {
                "capped": self._gpu_guard is not None,
                "note": getattr(self._gpu_verdict, "reason", None),
            },
            "policy": self.policy.values(),
            "sources": dict(self.policy.sources),
        }

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._wake.set()
        if self.is_alive():
            self.join(timeout=5)

    # --- the thread -------------------------------------------------------------------------------

    def run(self) -> None:
        next_sample = self.clock()
        try:
            while not self._stopping:
                now = self.clock()
                if now >= next_sample or self._wake.is_set():
                    self._wake.clear()
                    self.tick(now)
                    busy = self.child is not None and self.child.unit_pid() is not None
                    # Between units nothing is to be stopped: a look every IDLE_SAMPLE_SECONDS decides when to
                    # lease again, and a unit that starts wakes the thread at once (wake()).
                    next_sample = now + (self.interval if busy else max(self.interval, IDLE_SAMPLE_SECONDS))
                switch = self._apply(now)
                delay = min(next_sample, switch) - self.clock()
                self._wake.wait(max(delay, 0.005))
        finally:
            self._release_child()

    def tick(self, now: float) -> Verdict:
        """Sample everything once and decide. Public for tests (with fake samplers and clock)."""
        if now >= self._power_due:
            self._power, self._power_due = self.samplers.power(), now + POWER_SECONDS
        readings = _Readings(self._idle_seconds(), self.samplers.other_cpu(), self._power)
        self._cpu.append(readings.other_cpu_percent)
        self._check_gpu(now)
        verdict = self._decide(now, readings)
        with self._changed:
            if verdict.reasons != self._verdict.reasons:
                log.info("policy: %s", "work allowed" if verdict.allowed else "work paused: " + ", ".join(verdict.reasons))
            self._verdict, self._readings = verdict, readings
            self._changed.notify_all()
        self._check_memory(verdict)
        return verdict

    # --- deciding ---------------------------------------------------------------------------------

    def _decide(self, now: float, readings: _Readings) -> Verdict:
        policy = self.policy
        idle = readings.idle_seconds
        gpu = self._gpu_verdict
        conditions_now = {
            USER_ACTIVE: idle is not None and idle < policy.idle_minutes * 60
            and not (self._gpu_device and policy.gpu_when_busy),
            OTHER_BUSY: policy.other_cpu_percent < 100
            and sum(self._cpu) / len(self._cpu) > policy.other_cpu_percent,
            ON_BATTERY: readings.power.on_battery and not policy.run_on_battery,
            BATTERY_LOW: readings.power.on_battery and readings.power.percent is not None
            and readings.power.percent < policy.battery_min_percent,
            OUTSIDE_WINDOWS: not conditions.in_windows(self._windows, self.samplers.now()),
            MANUAL: self._manual_paused(),
            GPU_HOT: gpu is not None and not gpu.allowed and self._gpu_guard is not None and self._gpu_guard.hot,
            GPU_UNREADABLE: gpu is not None and not gpu.allowed and not (self._gpu_guard is not None and self._gpu_guard.hot),
        }
        held = (OTHER_BUSY, ON_BATTERY, BATTERY_LOW)  # these do not flap: they must stay off a while
        reasons = []
        for reason, true_now in conditions_now.items():
            if true_now:
                self._last_true[reason] = now
            recent = reason in held and now - self._last_true.get(reason, -1e18) < RELEASE_SECONDS
            if true_now or recent:
                reasons.append(reason)
        in_use = idle is not None and idle < max(policy.idle_minutes * 60, IN_USE_SECONDS)
        memory = policy.memory_busy_percent if in_use else policy.memory_idle_percent
        allowed = not reasons
        share = policy.cpu_percent / 100 * (gpu.share if gpu is not None and gpu.allowed else 1.0)
        return Verdict(allowed, tuple(reasons), share if allowed else 0.0, int(memory))

    def _check_gpu(self, now: float) -> None:
        """Ask the GPU guard once a period while a unit is on the card: while it runs (temperature, power
        share) or while the guard itself holds it (to see it cool), never while it is paused for another
        reason (the card's idle draw would raise the share)."""
        guard = self._gpu_guard
        if guard is None or now < self._gpu_due:
            return
        unit = self.child.unit_pid() if self.child is not None else None
        held_by_guard = self._gpu_verdict is not None and not self._gpu_verdict.allowed
        if unit is None or not (self._verdict.allowed or held_by_guard):
            return
        self._gpu_verdict, self._gpu_due = guard.check(), now + GPU_CHECK_SECONDS

    def _idle_seconds(self) -> float | None:
        seconds = self.samplers.idle.seconds_idle()
        if seconds is None and not self._idle_unknown_logged:
            # Unknown is not "active": a broken reading must not stop a machine nobody uses for good.
            log.warning("idle source %s cannot tell how long the user has been away; counting as idle",
                        self.samplers.idle.name)
            self._idle_unknown_logged = True
        return seconds

    def _manual_paused(self) -> bool:
        paused, until = self._manual
        if paused and until is not None and self.wall() >= until:
            self._manual = (False, None)
            return False
        return paused

    # --- holding the child to it ------------------------------------------------------------------

    def _apply(self, now: float) -> float:
        """Stop or continue the child as the verdict and the duty cycle say; returns when to look again."""
        pid = self.child.unit_pid() if self.child is not None else None
        verdict = self.verdict()
        switch = float("inf")
        if pid is None:
            self._duty_pid = None  # between units: the next one starts a fresh duty period
        if pid is None or (verdict.allowed and verdict.cpu_share >= 1):
            want_running = True
        elif not verdict.allowed:
            want_running = False
        else:
            if pid != self._duty_pid:  # a new unit (or child): its first period starts with a run slice
                self._duty_pid, self._duty_start = pid, now
            phase = (now - self._duty_start) % DUTY_PERIOD_SECONDS
            run_slice = verdict.cpu_share * DUTY_PERIOD_SECONDS
            want_running = phase < run_slice - 1e-6  # at the switch itself (float dust), stop
            switch = now + ((run_slice - phase) if want_running else (DUTY_PERIOD_SECONDS - phase))
        self._hold(pid, want_running)
        return switch

    def _hold(self, pid: int | None, want_running: bool) -> None:
        assert self.child is not None or pid is None
        if want_running and self._stopped_pid is not None:
            self._stopped_pid = None
            if self.child is not None:
                self.child.resume()
        elif not want_running and pid is not None and self._stopped_pid != pid:
            self._stopped_pid = pid
            assert self.child is not None
            self.child.pause()

    def _release_child(self) -> None:
        if self.child is not None and self._stopped_pid is not None:
            self._stopped_pid = None
            self.child.resume()

    def _check_memory(self, verdict: Verdict) -> None:
        pid = self.child.unit_pid() if self.child is not None else None
        if pid is None or self.child is None:
            return
        resident, total = self.samplers.resident(pid), self.samplers.total_memory()
        cap = total * verdict.memory_cap_percent // 100
        if resident is not None and resident > cap:
            # Over the cap of a machine in use, the unit may still fit the idle cap: it runs again from
            # its checkpoint once the owner is away (as BOINC does). Over the idle cap it never fits.
            busy_cap = verdict.memory_cap_percent < self.policy.memory_idle_percent
            self.child.kill_for(
                f"memory cap: the unit held {resident >> 20} MB, over the {verdict.memory_cap_percent}% of "
                f"RAM ({cap >> 20} MB) the policy allows now; the child was stopped", retry=busy_cap,
            )

