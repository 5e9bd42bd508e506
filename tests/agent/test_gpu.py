"""The GPU paths with NVML and torch.cuda faked (this machine has neither a GPU nor NVIDIA's driver):
the temperature and power caps, loading NVML without a driver, the pynvml wrapper's calls, which
device a unit runs on and what the child then says in its facts, and that a CPU-only agent never
imports pynvml."""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
import torch
from agent_models import MLP, inputs, payload, reference_forward, weights, write_safetensors
from safetensors.torch import load_file
from test_fedavg_child import in_process as fedavg_in_process
from test_fedavg_child import make_job as fedavg_job

from worker_agent import child, gpu
from worker_agent.gpu import FakeGpu, FakeNvml, GpuGuard, PynvmlNvml
from worker_agent.jobfile import ChildJob, Limits
from worker_agent.kinds import _device, fedavg, inference

REPO_ROOT = Path(__file__).resolve().parents[2]
CARD = SimpleNamespace(name="NVIDIA GeForce RTX 3090", total_memory=24 << 30, major=8, minor=6,
                       uuid="5a3c1a2e-0000-4000-8000-000000000001")


def guard(nvml: FakeNvml, *, power_max_w: float = 0) -> GpuGuard:
    return GpuGuard(nvml, 0, temp_max_c=83, temp_resume_c=78, power_max_w=power_max_w)


# --- the temperature cap ---------------------------------------------------------------------------

def test_the_guard_pauses_above_the_cap_and_resumes_only_once_cooled_to_the_resume_temperature():
    nvml = FakeNvml()
    caps = guard(nvml)
    seen = []
    for temperature in (70, 83, 84, 82, 79, 78, 80, 83, 83.5):
        nvml.gpus[0].temperature_c = temperature
        seen.append(caps.check().allowed)

    assert seen == [True, True, False, False, False, True, True, True, False]


def test_a_paused_verdict_says_why_and_when_it_resumes():
    nvml = FakeNvml([FakeGpu(temperature_c=90)])

    verdict = guard(nvml).check()

    assert not verdict.allowed
    assert verdict.reason == "GPU at 90 °C, over the 83 °C cap (resumes at 78 °C)"


def test_unreadable_sensors_pause_the_gpu_until_they_read_again():
    nvml = FakeNvml(failing=True)
    caps = guard(nvml)

    assert not caps.check().allowed
    assert "unreadable" in str(caps.check().reason)
    nvml.failing = False
    assert caps.check() == gpu.GpuVerdict(True, None, 1.0)


@pytest.mark.parametrize(("resume", "power", "message"), [
    (83, 0, "must be below gpu_temp_max_c"), (90, 0, "must be below"), (78, -1, "gpu_power_max_w"),
])
def test_caps_that_cannot_work_are_refused(resume, power, message):
    with pytest.raises(ValueError, match=message):
        GpuGuard(FakeNvml(), 0, temp_max_c=83, temp_resume_c=resume, power_max_w=power)


# --- the power cap ----------------------------------------------------------------------------------

def test_over_the_power_cap_the_share_falls_in_proportion():
    nvml = FakeNvml([FakeGpu(power_draw_w=400)])

    verdict = guard(nvml, power_max_w=200).check()

    assert verdict.allowed and verdict.share == pytest.approx(0.5)
    assert verdict.reason == "GPU power capped at 200 W (drawing 400 W): running 50% of the time"


def test_the_share_settles_where_the_average_draw_meets_the_cap_and_recovers_when_the_load_drops():
    """A card idling at 50 W and drawing 400 W flat out averages 50 + 350 * share under the duty cycle."""
    nvml = FakeNvml()
    caps = guard(nvml, power_max_w=200)
    for _ in range(20):
        nvml.gpus[0].power_draw_w = 50 + 350 * caps.share
        caps.check()
    settled = 50 + 350 * caps.share
    assert 0.9 * 200 <= settled <= 200 * (1 + 1e-9)

    shares = []
    for _ in range(20):  # a lighter unit: 150 W flat out
        nvml.gpus[0].power_draw_w = 50 + 100 * caps.share
        shares.append(caps.check().share)
    assert shares == sorted(shares)  # upward only, smoothly
    assert shares[0] <= settled / 200 * gpu.SHARE_RISE  # no jump
    assert shares[-1] == 1.0


def test_while_too_hot_the_share_is_kept_not_raised_by_the_paused_cards_idle_draw():
    nvml = FakeNvml([FakeGpu(power_draw_w=400)])
    caps = guard(nvml, power_max_w=200)
    caps.check()
    nvml.gpus[0].temperature_c, nvml.gpus[0].power_draw_w = 90, 30

    assert caps.check() == gpu.GpuVerdict(False, "GPU at 90 °C, over the 83 °C cap (resumes at 78 °C)", 0.5)


def test_the_share_never_falls_below_its_floor_and_no_cap_means_full_time():
    assert guard(FakeNvml([FakeGpu(power_draw_w=10_000)]), power_max_w=100).check().share == gpu.MIN_SHARE
    assert guard(FakeNvml([FakeGpu(power_draw_w=10_000)]), power_max_w=0).check() == gpu.GpuVerdict(True, None, 1.0)


# --- loading NVML ----------------------------------------------------------------------------------

@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_said", set())


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has NVIDIA's driver")
@pytest.mark.usefixtures("fresh_log")
def test_without_the_driver_the_real_pynvml_gives_no_nvml_and_says_so_once(caplog):
    with caplog.at_level(logging.INFO, logger="worker_agent.gpu"):
        assert gpu.load_nvml() is None
        assert gpu.load_nvml() is None

    assert [record.getMessage() for record in caplog.records] == ["no GPU caps: NVML did not start (NVML Shared Library Not Found)"]


@pytest.mark.usefixtures("fresh_log")
def test_without_nvidia_ml_py_there_is_no_nvml(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError

    with caplog.at_level(logging.INFO, logger="worker_agent.gpu"):
        assert gpu.load_nvml() is None
    assert "nvidia-ml-py is not installed" in caplog.text


@pytest.mark.usefixtures("fresh_log")
def test_an_nvml_that_sees_no_device_is_shut_down_and_not_used(monkeypatch):
    shut = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 0)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: shut.append(True))

    assert gpu.load_nvml() is None
    assert shut == [True]


def test_a_started_nvml_with_a_device_is_the_real_wrapper(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)

    nvml = gpu.load_nvml()

    assert isinstance(nvml, PynvmlNvml) and nvml.device_count() == 2


def test_the_wrapper_maps_each_reading_to_its_nvml_call_and_unit(monkeypatch):
    calls: list[tuple[Any, ...]] = []

    def fake(name: str, value: Any) -> None:
        def call(*args: Any) -> Any:
            calls.append((name, *args))
            return value
        monkeypatch.setattr(pynvml, name, call)

    fake("nvmlDeviceGetHandleByIndex", "handle-1")
    fake("nvmlDeviceGetName", b"NVIDIA A100")  # older bindings return bytes
    fake("nvmlDeviceGetUUID", "GPU-abc")
    fake("nvmlDeviceGetMemoryInfo", SimpleNamespace(total=40 << 30, used=1, free=2))
    fake("nvmlDeviceGetTemperature", 71)
    fake("nvmlDeviceGetPowerUsage", 123_456)  # milliwatts
    fake("nvmlDeviceGetEnforcedPowerLimit", 250_000)
    fake("nvmlDeviceGetUtilizationRates", SimpleNamespace(gpu=42, memory=7))
    nvml = PynvmlNvml(pynvml)

    readings = (nvml.name(1), nvml.uuid(1), nvml.memory_total_mb(1), nvml.temperature_c(1), nvml.power_draw_w(1),
                nvml.power_limit_w(1), nvml.utilization_percent(1))

    assert readings == ("NVIDIA A100", "GPU-abc", 40 << 10, 71.0, 123.456, 250.0, 42.0)
    assert calls[0] == ("nvmlDeviceGetHandleByIndex", 1)
    assert [call for call in calls if call[0] == "nvmlDeviceGetHandleByIndex"] == [calls[0]]  # handle kept
    assert ("nvmlDeviceGetTemperature", "handle-1", pynvml.NVML_TEMPERATURE_GPU) in calls


def test_an_nvml_error_in_a_reading_becomes_nvml_failed(monkeypatch):
    def lost(*_args: Any) -> Any:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: "handle")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", lost)

    with pytest.raises(gpu.NvmlFailed, match="nvmlDeviceGetTemperature"):
        PynvmlNvml(pynvml).temperature_c(0)


# --- which device, and the guard for it ------------------------------------------------------------

CPU_FACTS: dict[str, Any] = {"device_type": "cpu", "torch_version": "2.13.0+cpu"}
CUDA_FACTS: dict[str, Any] = {"device_type": "cuda", "gpu": {"name": "NVIDIA Test Card"},
                              "gpu_uuid": "00000000-0000-0000-0000-00000000000b"}


@pytest.mark.parametrize(("policy", "facts", "device"), [
    ("auto", CUDA_FACTS, "cuda:0"), ("off", CUDA_FACTS, "cpu"), ("auto", CPU_FACTS, "cpu"), ("auto", None, "cpu"),
])
def test_a_unit_runs_on_cuda_only_when_the_policy_allows_it_and_the_child_computes_there(policy, facts, device):
    assert gpu.child_device(policy, facts) == device


def test_an_unknown_gpu_policy_is_refused():
    with pytest.raises(ValueError, match="gpu must be one of auto, off"):
        gpu.child_device("on", CUDA_FACTS)


def test_no_guard_and_no_nvml_for_a_cpu_unit():
    def loader() -> Any:
        raise AssertionError("NVML loaded for a CPU unit")

    assert gpu.gpu_guard("auto", CPU_FACTS, temp_max_c=83, temp_resume_c=78, power_max_w=0, loader=loader) is None
    assert gpu.gpu_guard("off", CUDA_FACTS, temp_max_c=83, temp_resume_c=78, power_max_w=0, loader=loader) is None


def test_the_guard_watches_the_card_the_child_computes_on_found_by_uuid():
    nvml = FakeNvml([FakeGpu(uuid="GPU-00000000-0000-0000-0000-00000000000A", temperature_c=90),
                     FakeGpu(uuid="GPU-00000000-0000-0000-0000-00000000000B", temperature_c=40)])

    caps = gpu.gpu_guard("auto", CUDA_FACTS, temp_max_c=83, temp_resume_c=78, power_max_w=0, loader=lambda: nvml)

    assert caps is not None and caps.index == 1 and caps.check().allowed


def test_a_card_the_child_named_but_nvml_cannot_find_leaves_the_guard_on_device_0():
    assert gpu.nvml_index(FakeNvml([FakeGpu(uuid="GPU-other")]), "00000000-0000-0000-0000-00000000000b") == 0
    assert gpu.nvml_index(FakeNvml(failing=True), "00000000-0000-0000-0000-00000000000b") == 0


@pytest.mark.parametrize("device", ["cpu", "cuda:0", "cuda:7", "cuda:12"])
def test_a_child_job_carries_its_device_through_its_line(device):
    job = ChildJob(payload={}, artifacts={}, output_path="/tmp/out", device=device)

    assert ChildJob.from_line(job.to_line()).device == device


def test_a_child_job_line_without_a_device_runs_on_the_cpu():
    line = json.dumps({"payload": {}, "artifacts": {}, "output_path": "/tmp/out"}).encode()

    assert ChildJob.from_line(line).device == "cpu"


@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:", "cuda:-1", "cuda:01", "CUDA:0", "cuda:0 ", 0, None])
def test_a_child_job_on_another_device_is_refused(device):
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda:N'"):
        ChildJob(payload={}, artifacts={}, output_path="/tmp/out", device=device)


# --- the child's side, with torch.cuda faked in this process ---------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[float, int]]]:
    """torch in this process sees one RTX 3090; yields the memory fractions set on it."""
    fractions: list[tuple[float, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: CARD)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: fractions.append((f, i)))
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    switches = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    try:
        yield fractions
    finally:  # the switches the child sets are this process's globals
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = switches


def test_with_cuda_allowed_the_facts_name_the_card_and_its_switches_and_units_go_to_cuda_0(monkeypatch, fake_cuda):
    monkeypatch.setenv(gpu.CHILD_GPU_ENV, "auto")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    _device.cuda_env()
    _device.cuda_switches()

    facts = child.numerics_facts()

    assert facts["device_type"] == "cuda"
    assert facts["gpu"] == {"name": "NVIDIA GeForce RTX 3090", "memory_mb": 24 << 10, "capability": "8.6", "cuda": "12.4"}
    assert facts["cuda_numerics"] == {"cudnn_version": 90100, "cudnn_deterministic": True, "cudnn_benchmark": False,
                                      "cudnn_allow_tf32": False, "matmul_allow_tf32": False,
                                      "cublas_workspace_config": ":4096:8"}
    assert facts["gpu_uuid"] == CARD.uuid
    assert gpu.child_device("auto", facts) == "cuda:0"


@pytest.mark.parametrize("setting", ["off", None])
def test_with_the_gpu_off_the_child_stays_on_the_cpu_though_torch_sees_cuda(monkeypatch, fake_cuda, setting):
    if setting is None:
        monkeypatch.delenv(gpu.CHILD_GPU_ENV, raising=False)
    else:
        monkeypatch.setenv(gpu.CHILD_GPU_ENV, setting)

    facts = child.numerics_facts()

    assert facts["device_type"] == "cpu" and "gpu" not in facts and "cuda_numerics" not in facts
    assert gpu.child_device("auto", facts) == "cpu"


def test_without_cuda_the_facts_are_the_cpus(monkeypatch):
    monkeypatch.setenv(gpu.CHILD_GPU_ENV, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    facts = child.numerics_facts()

    assert facts["device_type"] == "cpu" and "gpu" not in facts
    assert gpu.child_device("auto", facts) == "cpu"


def test_a_cuda_unit_caps_the_cards_memory_at_its_memory_limit(monkeypatch, fake_cuda):
    monkeypatch.setenv(gpu.CHILD_GPU_ENV, "auto")
    job = ChildJob(payload={}, artifacts={}, output_path="/tmp/out", device="cuda:0", limits=Limits(memory_mb=6144))

    assert _device.torch_device(job) == torch.device("cuda:0")
    assert fake_cuda == [(0.25, 0)]


def test_a_cuda_unit_in_a_child_without_the_gpu_is_refused_clearly(monkeypatch, fake_cuda):
    monkeypatch.setenv(gpu.CHILD_GPU_ENV, "off")
    job = ChildJob(payload={}, artifacts={}, output_path="/tmp/out", device="cuda:0")

    with pytest.raises(RuntimeError, match="no usable CUDA device for cuda:0 .*gpu policy is 'off'"):
        _device.torch_device(job)
    assert fake_cuda == []


def test_a_cuda_unit_on_a_card_the_child_does_not_have_is_refused(monkeypatch, fake_cuda):
    monkeypatch.setenv(gpu.CHILD_GPU_ENV, "auto")
    job = ChildJob(payload={}, artifacts={}, output_path="/tmp/out", device="cuda:1")

    with pytest.raises(RuntimeError, match="sees 1 CUDA device"):
        _device.torch_device(job)


@pytest.mark.usefixtures("single_thread_torch")
def test_the_inference_kind_moves_the_model_and_rows_to_the_units_device_and_saves_from_the_cpu(tmp_path, monkeypatch):
    """The device path a CUDA machine takes, here on "cpu": both go through torch_device, and the
    output is the reference computation's, bit for bit."""
    arch, config = MLP
    state, x = weights(arch, config), inputs(arch, config, 10)
    job = ChildJob(
        payload=payload(arch, config, weights_sha="a" * 64, x_sha="b" * 64, rows=10, batch_size=4),
        artifacts={"a" * 64: str(write_safetensors(tmp_path / "w", state)),
                   "b" * 64: str(write_safetensors(tmp_path / "x", {"x": x}))},
        output_path=str(tmp_path / "out.safetensors"), device="cpu",
    )
    placed = []
    real = _device.torch_device
    monkeypatch.setattr(_device, "torch_device", lambda job: placed.append(job.device) or real(job))

    inference.execute(job)

    assert placed == ["cpu", "cpu"]
    # The reference reads the same files the child read: a tensor's memory alignment picks the SIMD path
    # for the last bits (seen here: in-memory inputs gave 3e-8 apart on this machine's CPU).
    loaded_state, loaded_x = load_file(job.artifacts["a" * 64]), load_file(job.artifacts["b" * 64])["x"]
    assert torch.equal(load_file(job.output_path)["y"], reference_forward(arch, config, loaded_state, loaded_x, 4))


@pytest.mark.usefixtures("single_thread_torch")
def test_the_fedavg_kind_trains_on_the_units_device_and_saves_from_the_cpu(tmp_path, monkeypatch):
    job = fedavg_job(tmp_path, "unit")
    placed = []
    real = _device.torch_device
    monkeypatch.setattr(_device, "torch_device", lambda job: placed.append(job.device) or real(job))

    fedavg.execute(job)

    assert placed == ["cpu", "cpu"]
    expected, _loss = fedavg_in_process(job)
    saved = load_file(job.output_path)
    assert all(torch.equal(saved[name], tensor) for name, tensor in expected.items())


# --- a CPU agent never loads NVML ------------------------------------------------------------------

def test_a_cpu_agent_runs_a_unit_without_ever_importing_pynvml_or_torch(tmp_path):
    """torch itself imports pynvml when it is installed (torch/cuda/__init__.py), so this holds for the
    agent's process, where torch never is: the unit's files are written here, not in the agent."""
    arch, config = MLP
    job = ChildJob(
        payload=payload(arch, config, weights_sha="a" * 64, x_sha="b" * 64, rows=4, batch_size=2),
        artifacts={"a" * 64: str(write_safetensors(tmp_path / "w", weights(arch, config))),
                   "b" * 64: str(write_safetensors(tmp_path / "x", {"x": inputs(arch, config, 4)}))},
        output_path=str(tmp_path / "out"),
    )
    script = textwrap.dedent(f"""
        import dataclasses, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import worker_agent.agent, worker_agent.cli, worker_agent.gpu as gpu
        from pathlib import Path
        from worker_agent.jobfile import ChildJob
        from worker_agent.runner import ComputeChild

        with ComputeChild(Path({str(tmp_path)!r})) as child:
            facts = child.wait_facts()
            device = gpu.child_device("auto", facts)
            guard = gpu.gpu_guard("auto", facts, temp_max_c=83, temp_resume_c=78, power_max_w=100)
            job = dataclasses.replace(ChildJob.from_line(sys.stdin.buffer.readline()), device=device)
            outcome = child.run(job)
        print(outcome.ok, device, guard, "pynvml" in sys.modules, "torch" in sys.modules)
    """)
    env = {**os.environ, gpu.CHILD_GPU_ENV: "auto"}  # the default policy; torch here sees no CUDA device
    done = subprocess.run([sys.executable, "-c", script], input=job.to_line(), env=env, capture_output=True,
                          timeout=120, check=False)

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.decode().split() == ["True", "cpu", "None", "False", "False"]
