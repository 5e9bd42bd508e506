"""Hardware facts: the agent's own (no torch), the compute child's (torch build, kernels, determinism),
and sending them with a lease request when they change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from agent_models import MLP, inputs, payload, safetensors_bytes, weights
from agent_stub import StubMarketplace
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker_agent import hardware, wire
from worker_agent.agent import Agent, RunOptions
from worker_agent.client import AgentClient
from worker_agent.jobfile import THREADS_ENV
from worker_agent.kinds import KIND_MODULES
from worker_agent.runner import ComputeChild
from worker_agent.state import DeviceState, StateDir

REPO_ROOT = Path(__file__).resolve().parents[2]
# What the marketplace hashes into the hardware class (marketplace.workers.services.HARDWARE_CLASS_FACTS;
# these tests run without Django, so the list is spelled out, and a marketplace test checks the match).
AGENT_CLASS_FACTS = {"os", "machine", "cpu_vendor", "cpu_model", "cpu_flags", "libc"}
CHILD_CLASS_FACTS = {"torch_version", "cpu_capability", "device_type", "dtype", "deterministic", "num_threads",
                     "matmul_precision", "math_env", "numerics_revision"}


@pytest.fixture
def child(tmp_path: Path):
    (tmp_path / "scratch").mkdir()
    with ComputeChild(tmp_path / "scratch") as compute_child:
        yield compute_child


def test_the_agents_own_facts_name_the_machine_without_importing_torch() -> None:
    code = "import json, sys; from worker_agent import hardware; print(json.dumps([hardware.collect(), 'torch' in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    facts, torch_imported = json.loads(done.stdout)

    assert not torch_imported
    assert AGENT_CLASS_FACTS <= set(facts)
    assert facts["os"] == "linux" and facts["machine"] and facts["cpu_model"] and facts["libc"].startswith("glibc")
    assert facts["torch_version"] == torch.__version__  # from the package metadata, until the child says


def test_the_warm_child_reports_its_numerics_in_its_ready_line(child: ComputeChild) -> None:
    facts = child.wait_facts()

    assert facts is not None and CHILD_CLASS_FACTS <= set(facts)
    assert facts["torch_version"] == torch.__version__
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # this process: no override
    assert (facts["device_type"], facts["dtype"]) == ("cpu", "float32")
    assert (facts["deterministic"], facts["num_threads"]) == (True, 1)


def test_an_instruction_set_override_makes_another_class_on_the_same_machine(
    child: ComputeChild, monkeypatch: pytest.MonkeyPatch
) -> None:
    native = child.wait_facts()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # the child's environment is the agent's
    child.restart()

    scalar = child.wait_facts()

    assert native is not None and scalar is not None
    assert scalar["cpu_capability"] == "DEFAULT" != native["cpu_capability"]
    assert scalar["math_env"] == {"ATEN_CPU_CAPABILITY": "default"}


def test_a_thread_count_other_than_one_makes_another_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "2")  # what ComputeChild(threads=2), the policy's `cores`, gives its child
    threaded = hardware.numerics_facts()
    assert threaded is not None and threaded["num_threads"] == 2


def test_a_unit_runs_with_its_thread_count_and_the_child_goes_back_to_one() -> None:
    from worker_agent.child import unit_threads

    before = torch.get_num_threads()
    with unit_threads(before + 2):
        assert torch.get_num_threads() == before + 2
    assert torch.get_num_threads() == before


def test_the_facts_mode_gives_the_same_facts_as_a_serving_child(child: ComputeChild) -> None:
    assert hardware.numerics_facts() == child.wait_facts()


def test_collect_with_the_childs_facts_has_every_class_fact() -> None:
    facts = hardware.collect(hardware.numerics_facts())

    assert AGENT_CLASS_FACTS | CHILD_CLASS_FACTS <= set(facts)
    assert facts["cpu_capability"] is not None


class FakeChild:
    def __init__(self, facts: dict[str, Any] | None) -> None:
        self.facts = facts
        self.waits = 0

    def wait_facts(self, should_abort: Any = None) -> dict[str, Any] | None:
        self.waits += 1
        return self.facts


def test_facts_are_due_on_the_first_lease_and_again_only_when_they_change() -> None:
    reporter, child = hardware.FactsReporter(), FakeChild({"cpu_capability": "AVX512", "torch_version": "2.13.0+cpu"})

    first = reporter.due(child)  # type: ignore[arg-type]
    assert first is not None and first["cpu_capability"] == "AVX512" and "os" in first and child.waits == 1
    assert reporter.due(child) == first  # type: ignore[arg-type]  # not accepted yet (the request failed): again
    reporter.accepted(first)
    assert reporter.due(child) is None  # type: ignore[arg-type]

    child.facts = {"cpu_capability": "AVX512", "torch_version": "2.14.0+cpu"}  # a replaced child, a new torch
    changed = reporter.due(child)  # type: ignore[arg-type]
    assert changed is not None and changed["torch_version"] == "2.14.0+cpu"
    reporter.accepted(changed)
    assert reporter.due(child) is None  # type: ignore[arg-type]
    assert child.waits == 2  # only until the server has the facts once


def test_without_the_childs_facts_nothing_is_due() -> None:
    assert hardware.FactsReporter().due(FakeChild(None)) is None  # type: ignore[arg-type]


def test_the_agent_sends_its_facts_with_the_first_lease_request_only(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir
) -> None:
    arch, config = MLP
    weights_sha = stub.add_artifact(safetensors_bytes(weights(arch, config)))
    x_sha = stub.add_artifact(safetensors_bytes({"x": inputs(arch, config, 8)}))
    unit = payload(arch, config, weights_sha=weights_sha, x_sha=x_sha, rows=8, batch_size=4)
    for result_id in (50, 51):
        stub.add_unit(unit, result_id=result_id, unit_id=result_id)
    bodies: list[dict[str, Any]] = []
    serve = stub.handle

    def record(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/agent/lease":
            bodies.append(json.loads(request.content))
        return serve(request)

    client = AgentClient("http://stub", device=(enrolled.device_id, enrolled.device_secret),
                         transport=httpx.MockTransport(record), sleep=lambda _: None)
    agent = Agent(client=client, device=enrolled, key=device_key, state=state, options=RunOptions(burst=True, batch=1))

    summary = agent.run()

    assert summary.done == 2
    assert len(bodies) == 3  # unit 50, unit 51, then nothing left (--burst)
    sent = bodies[0]["hardware"]
    assert AGENT_CLASS_FACTS | CHILD_CLASS_FACTS <= set(sent)
    assert sent["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert ["hardware" in body for body in bodies] == [True, False, False]
    # Capabilities go with every request (free memory changes), from the warm child's facts.
    capabilities = [wire.Capabilities.from_wire(body["capabilities"]) for body in bodies]
    assert [c.kinds for c in capabilities] == [tuple(sorted(KIND_MODULES))] * 3
    assert {(c.device_type, c.gpu_memory_mb, c.torch_version) for c in capabilities} == {("cpu", 0, torch.__version__)}
    assert all(0 < c.memory_mb <= (hardware.memory_bytes() or 0) >> 20 for c in capabilities)


MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:   12288000 kB\n"


def test_capabilities_report_available_memory_bounded_by_the_cap(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)  # 16,000 MiB of RAM, 12,000 MiB available

    assert hardware.capabilities(None, meminfo=meminfo).memory_mb == 12_000  # under 90% of RAM
    assert hardware.capabilities(None, memory_cap_percent=50, meminfo=meminfo).memory_mb == 8_000
    assert hardware.capabilities(None, memory_cap_percent=0, meminfo=meminfo).memory_mb == 0
    assert hardware.capabilities(None, meminfo=tmp_path / "absent").memory_mb >= 0  # sysconf, or 0 when unknown


def test_capabilities_take_the_gpu_from_the_childs_cuda_facts_only(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    gpu = {"name": "NVIDIA GeForce RTX 3060", "memory_mb": 12288, "capability": "8.6", "cuda": "12.6"}

    on_cuda = hardware.capabilities({"device_type": "cuda", "gpu": gpu, "torch_version": "2.13.0+cu126"},
                                    cores=3, meminfo=meminfo)
    on_cpu = hardware.capabilities({"device_type": "cpu", "gpu": gpu}, meminfo=meminfo)
    odd = hardware.capabilities({"device_type": "cuda", "gpu": {"name": 5, "memory_mb": "lots"}}, meminfo=meminfo)

    assert (on_cuda.device_type, on_cuda.gpu_name, on_cuda.gpu_memory_mb) == ("cuda", gpu["name"], 12288)
    assert (on_cuda.cores, on_cuda.torch_version) == (3, "2.13.0+cu126")
    assert (on_cpu.device_type, on_cpu.gpu_memory_mb, on_cpu.gpu_name) == ("cpu", 0, None)
    assert (odd.device_type, odd.gpu_memory_mb) == ("cpu", 0)  # a child's odd facts never make a bad request
    assert len(json.dumps(on_cuda.to_wire())) < 400  # small: it goes with every lease request
