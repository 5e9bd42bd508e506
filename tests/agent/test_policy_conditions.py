"""The samplers of the rest of the machine: other programs' CPU without our own, and the real readings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from worker_agent.jobfile import ChildJob, PayloadError
from worker_agent.policy import conditions
from worker_agent.policy.conditions import OtherCpu
from worker_agent.runner import ComputeChild


class Counters:
    def __init__(self) -> None:
        self.busy, self.total = 100.0, 400.0
        self.process = {os.getpid(): 5.0, 77: 10.0}

    def machine(self) -> tuple[float, float]:
        return self.busy, self.total

    def process_cpu(self, pid: int) -> float | None:
        return self.process.get(pid)


def test_the_agent_and_its_child_are_not_other_programs() -> None:
    counters = Counters()
    sampler = OtherCpu(lambda: [77], machine=counters.machine, process_cpu=counters.process_cpu)
    sampler.sample()  # the first call learns what our processes had used so far
    counters.busy, counters.total = 100.0 + 1.5, 400.0 + 2.0  # 2 cores for 1 s, 1.5 core-seconds busy
    counters.process[77] += 1.0  # the child used a whole core
    counters.process[os.getpid()] += 0.1
    assert sampler.sample() == pytest.approx(100 * 0.4 / 2.0)  # what is left: other programs' 20%
    counters.busy, counters.total = counters.busy + 2.0, counters.total + 2.0
    counters.process[77] += 2.0  # our child used everything (it cannot, but never below zero)
    assert sampler.sample() == 0.0


def test_a_replaced_child_is_counted_from_its_start_but_never_beyond_the_window() -> None:
    counters = Counters()
    pids = [77]
    sampler = OtherCpu(lambda: pids, machine=counters.machine, process_cpu=counters.process_cpu)
    sampler.sample()
    pids[:] = [78]
    counters.process[78] = 50.0  # a child we never saw: its whole life is more than this window
    counters.busy, counters.total = counters.busy + 1.0, counters.total + 2.0
    assert sampler.sample() == 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_real_samplers_answer_on_this_machine() -> None:
    sampler = OtherCpu(lambda: [])
    assert 0.0 <= sampler.sample() <= 100.0
    assert conditions.total_memory_bytes() > 1 << 20
    assert (conditions.resident_bytes(os.getpid()) or 0) > 1 << 20
    assert isinstance(conditions.power().on_battery, bool)


def test_pausing_and_resuming_without_a_child_is_harmless(tmp_path: Path) -> None:
    child = ComputeChild(tmp_path)
    child.pause()
    child.resume()
    child.kill_for("no child")
    assert (child.unit_pid(), child.paused_seconds()) == (None, 0.0)


def test_a_job_line_carries_its_thread_count_and_old_lines_mean_one() -> None:
    job = ChildJob(payload={}, artifacts={}, output_path="out", threads=4)
    assert ChildJob.from_line(job.to_line()).threads == 4
    assert ChildJob.from_line(b'{"payload": {}, "artifacts": {}, "output_path": "out"}').threads == 1
    for bad in (0, 2000, True, "2"):
        with pytest.raises(PayloadError, match="threads must be a whole number from 1 to 1024"):
            ChildJob(payload={}, artifacts={}, output_path="out", threads=bad)  # type: ignore[arg-type]
