"""The governor's decisions with fake samplers and a fake clock, and how it holds a (fake) child to them."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import pytest

from worker_agent.gpu import FakeGpu, FakeNvml, GpuGuard
from worker_agent.policy import conditions
from worker_agent.policy.config import Policy, load_policy
from worker_agent.policy.governor import (
    BATTERY_LOW,
    DUTY_PERIOD_SECONDS,
    GPU_HOT,
    GPU_UNREADABLE,
    MANUAL,
    ON_BATTERY,
    OTHER_BUSY,
    OUTSIDE_WINDOWS,
    RELEASE_SECONDS,
    USER_ACTIVE,
    Governor,
    Samplers,
)

GB = 1 << 30


class Machine:
    """Everything the governor samples, set by the test."""

    def __init__(self) -> None:
        self.idle: float | None = 1e9
        self.other_cpu = 0.0
        self.power = conditions.Power(on_battery=False, percent=None)
        self.now = datetime(2024, 1, 1, 12, 0)  # a Monday noon
        self.resident: int | None = 1 * GB
        self.name = "fake"

    def seconds_idle(self) -> float | None:
        return self.idle

    def samplers(self) -> Samplers:
        return Samplers(idle=self, other_cpu=lambda: self.other_cpu, power=lambda: self.power, now=lambda: self.now,
                        total_memory=lambda: 16 * GB, resident=lambda pid: self.resident)


class Child:
    def __init__(self, pid: int | None = 4242) -> None:
        self.pid = pid
        self.calls: list[str] = []
        self.killed: str | None = None
        self.retry: bool | None = None

    def unit_pid(self) -> int | None:
        return self.pid

    def pause(self) -> None:
        self.calls.append("stop")

    def resume(self) -> None:
        self.calls.append("cont")

    def kill_for(self, reason: str, *, retry: bool = False) -> None:
        self.killed, self.retry = reason, retry


def governor(machine: Machine, child: Child | None = None, wall: float = 1000.0, **policy: object) -> Governor:
    return Governor(dataclasses.replace(Policy(), **policy), machine.samplers(), child=child, clock=lambda: 0.0,
                    wall=lambda: wall)


def test_an_idle_quiet_plugged_in_machine_may_compute_at_the_cpu_cap() -> None:
    verdict = governor(Machine(), cpu_percent=40.0).tick(0.0)
    assert (verdict.allowed, verdict.reasons, verdict.cpu_share, verdict.memory_cap_percent) == (True, (), 0.4, 90)


def test_input_within_idle_minutes_pauses_at_once_and_idling_long_enough_resumes() -> None:
    machine = Machine()
    gov = governor(machine, idle_minutes=3.0)
    machine.idle = 5.0
    verdict = gov.tick(0.0)
    assert (verdict.allowed, verdict.reasons, verdict.cpu_share, verdict.memory_cap_percent) == (
        False, (USER_ACTIVE,), 0.0, 50)
    machine.idle = 179.0
    assert gov.tick(0.25).reasons == (USER_ACTIVE,)
    machine.idle = 180.0
    assert gov.tick(0.5).allowed


def test_an_unknown_idle_time_counts_as_idle() -> None:
    machine = Machine()
    machine.idle = None
    assert governor(machine).tick(0.0).allowed


def test_busy_programs_pause_on_their_average_and_must_stay_quiet_a_while_before_work_resumes() -> None:
    machine = Machine()
    gov = governor(machine, other_cpu_percent=25.0)
    machine.other_cpu = 90.0  # one blip over a window of quiet samples does not pause
    assert gov.tick(0.0).reasons == (OTHER_BUSY,)  # the first sample is the whole window
    machine.other_cpu = 0.0
    for step in range(1, 8):
        gov.tick(step * 0.25)
    assert gov.tick(2.0).reasons == (OTHER_BUSY,)  # quiet now, but not for RELEASE_SECONDS yet
    assert gov.tick(2.0 + RELEASE_SECONDS).allowed
    machine.other_cpu = 90.0
    assert gov.tick(7.25).allowed  # the mean over the window is still under 25%
    for step in range(2, 9):
        gov.tick(7.0 + step * 0.25)
    assert gov.tick(9.25).reasons == (OTHER_BUSY,)


def test_other_cpu_at_100_percent_never_pauses() -> None:
    machine = Machine()
    machine.other_cpu = 100.0
    assert governor(machine, other_cpu_percent=100.0).tick(0.0).allowed


def test_battery_pauses_unless_allowed_and_then_only_above_its_minimum() -> None:
    machine = Machine()
    machine.power = conditions.Power(on_battery=True, percent=80.0)
    assert governor(machine).tick(0.0).reasons == (ON_BATTERY,)
    assert governor(machine, run_on_battery=True).tick(0.0).allowed
    machine.power = conditions.Power(on_battery=True, percent=15.0)
    assert governor(machine, run_on_battery=True, battery_min_percent=20.0).tick(0.0).reasons == (BATTERY_LOW,)
    machine.power = conditions.Power(on_battery=False, percent=15.0)  # charging
    assert governor(machine, run_on_battery=True, battery_min_percent=20.0).tick(0.0).allowed


def test_outside_the_windows_it_pauses_and_inside_it_computes(tmp_path) -> None:
    machine = Machine()
    policy = load_policy(tmp_path, environ={}, flags={"windows": "mon-fri 18:00-08:00"})
    gov = Governor(policy, machine.samplers(), clock=lambda: 0.0)
    assert gov.tick(0.0).reasons == (OUTSIDE_WINDOWS,)
    machine.now = datetime(2024, 1, 2, 7, 30)
    assert gov.tick(0.25).allowed


def test_a_manual_pause_holds_until_its_time_or_a_resume() -> None:
    machine, wall = Machine(), [1000.0]
    gov = Governor(Policy(), machine.samplers(), clock=lambda: 0.0, wall=lambda: wall[0])
    gov.manual_pause(until=1060.0)
    assert gov.tick(0.0).reasons == (MANUAL,)
    wall[0] = 1060.0
    assert gov.tick(0.25).allowed
    gov.manual_pause(until=None)
    assert gov.tick(0.5).reasons == (MANUAL,)
    snapshot = gov.snapshot()
    assert (snapshot["state"], snapshot["reasons"], snapshot["manual_pause"]) == (
        "paused", [MANUAL], {"paused": True, "until": None})
    assert snapshot["policy"]["idle_minutes"] == 3.0 and snapshot["sources"] == {}
    gov.manual_resume()
    assert gov.tick(0.75).allowed


def test_several_reasons_are_all_given() -> None:
    machine = Machine()
    machine.idle, machine.power = 0.0, conditions.Power(on_battery=True, percent=50.0)
    assert governor(machine).tick(0.0).reasons == (USER_ACTIVE, ON_BATTERY)


def test_a_child_is_stopped_when_work_is_not_allowed_and_continued_when_it_is() -> None:
    machine, child = Machine(), Child()
    gov = governor(machine, child)
    gov.tick(0.0)
    gov._apply(0.0)
    assert child.calls == []
    machine.idle = 0.0
    gov.tick(0.25)
    for now in (0.25, 0.5, 0.75):
        gov._apply(now)
    assert child.calls == ["stop"]  # once, not at every look
    machine.idle = 1e9
    gov.tick(1.0)
    gov._apply(1.0)
    assert child.calls == ["stop", "cont"]


def test_a_child_between_units_is_never_left_stopped() -> None:
    machine, child = Machine(), Child()
    gov = governor(machine, child)
    machine.idle = 0.0
    gov.tick(0.0)
    gov._apply(0.0)
    child.pid = None  # the unit ended (or the child was replaced)
    gov._apply(0.25)
    assert child.calls == ["stop", "cont"]


@pytest.mark.parametrize("cpu_percent", [25.0, 50.0, 80.0])
def test_the_duty_cycle_runs_the_child_for_its_share_of_each_period(cpu_percent: float) -> None:
    machine, child = Machine(), Child()
    gov = governor(machine, child, cpu_percent=cpu_percent)
    gov.tick(0.0)
    switches, now = [], 0.0
    while now <= 3 * DUTY_PERIOD_SECONDS + 1e-9:
        calls = len(child.calls)
        next_switch = gov._apply(now)
        if len(child.calls) > calls:
            switches.append((round(now, 6), child.calls[-1]))
        now = next_switch
    share = cpu_percent / 100
    expected = [(round(period + step, 6), what) for period in range(3) for step, what in ((share, "stop"), (1.0, "cont"))]
    assert switches == expected


def test_a_child_over_the_memory_cap_is_killed_with_the_reason() -> None:
    machine, child = Machine(), Child()
    machine.resident = 9 * GB
    gov = governor(machine, child, memory_busy_percent=50.0, memory_idle_percent=90.0)
    gov.tick(0.0)
    assert child.killed is None  # 9 of 16 GB is under 90% while the user is away
    machine.idle = 0.0
    gov.tick(0.25)
    assert child.killed is not None and "memory cap" in child.killed and "50% of RAM (8192 MB)" in child.killed
    assert child.retry is True  # over the busy cap only: it runs again once the user is away


def test_a_child_over_the_idle_memory_cap_is_killed_for_good() -> None:
    machine, child = Machine(), Child()
    machine.resident = 15 * GB
    governor(machine, child, memory_busy_percent=50.0, memory_idle_percent=90.0).tick(0.0)
    assert child.killed is not None and "90% of RAM" in child.killed and child.retry is False


# --- a GPU device: the guard's caps, and gpu_when_busy (worker_agent/gpu.py behind its interface) ----------

def _gpu_governor(machine: Machine, card: FakeGpu, **policy: object) -> Governor:
    gov = governor(machine, Child(), **policy)
    guard = GpuGuard(FakeNvml([card]), 0, temp_max_c=83.0, temp_resume_c=78.0,
                     power_max_w=float(policy.get("gpu_power_max_w", 0.0)))  # type: ignore[arg-type]
    gov.set_gpu(device=True, guard=guard)
    return gov


def test_a_hot_gpu_pauses_the_unit_until_it_has_cooled_below_the_resume_temperature() -> None:
    machine, card = Machine(), FakeGpu(temperature_c=70.0)
    gov = _gpu_governor(machine, card)
    assert gov.tick(0.0).allowed
    card.temperature_c = 85.0
    assert gov.tick(1.0).reasons == (GPU_HOT,)
    card.temperature_c = 80.0  # under the cap, above the resume temperature: still held
    assert gov.tick(2.0).reasons == (GPU_HOT,)
    card.temperature_c = 77.0
    assert gov.tick(3.0).allowed


def test_a_gpu_over_its_power_cap_runs_a_share_of_the_time_on_top_of_the_cpu_cap() -> None:
    machine, card = Machine(), FakeGpu(power_draw_w=200.0)
    gov = _gpu_governor(machine, card, gpu_power_max_w=100.0, cpu_percent=80.0)
    gov.tick(0.0)  # the guard reads 200 W against a 100 W cap: half the time
    verdict = gov.tick(1.0)
    assert verdict.allowed and verdict.cpu_share == pytest.approx(0.8 * 0.5)


def test_gpu_when_busy_lets_a_gpu_device_compute_while_the_user_is_active_and_a_cpu_device_not() -> None:
    machine = Machine()
    machine.idle = 1.0
    assert _gpu_governor(machine, FakeGpu(), gpu_when_busy=True).tick(0.0).allowed
    assert _gpu_governor(machine, FakeGpu()).tick(0.0).reasons == (USER_ACTIVE,)
    cpu_only = governor(machine, Child(), gpu_when_busy=True)
    assert cpu_only.tick(0.0).reasons == (USER_ACTIVE,)


def test_unreadable_gpu_sensors_pause_the_unit() -> None:
    nvml = FakeNvml(failing=True)
    gov = governor(Machine(), Child())
    gov.set_gpu(device=True, guard=GpuGuard(nvml, 0, temp_max_c=83.0, temp_resume_c=78.0, power_max_w=0.0))
    assert gov.tick(0.0).allowed  # the guard is asked once a unit runs under a verdict that allows it
    assert gov.tick(1.0).reasons == (GPU_UNREADABLE,)
