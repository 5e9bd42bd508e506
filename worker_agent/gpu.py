"""The GPU, seen from the agent: which device a unit runs on, and NVML's temperature and power caps.

Nothing here imports torch or NVML at import time. torch lives in the compute child, which says in its
facts (`child.numerics_facts`) whether it sees a CUDA device; only then, and only when the policy's
`gpu` key is "auto", does the agent load NVML (`nvidia-ml-py`, module `pynvml`, the `gpu` extra) to read
the card's temperature and power. On a machine without a GPU none of it loads.

NVML sits behind the small `Nvml` interface: `PynvmlNvml` is the real one, `FakeNvml` the tests'.
`GpuGuard` turns its readings into a verdict for the policy's governor: pause above the temperature cap
until the card has cooled to the resume temperature (hysteresis, so it does not flap around one
degree), and, over the power cap, the fraction of time the child may run (a duty cycle the governor
enforces by SIGSTOP/SIGCONT, as it does the CPU cap: NVML's own power limit needs root).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

# The child reads this at start: "auto" lets it use a CUDA device torch sees, anything else keeps it on
# the CPU. The agent passes the policy's `gpu` key (runner.child_env: `child_gpu_env(policy.gpu)`).
CHILD_GPU_ENV = "IDLEGRID_CHILD_GPU"
GPU_POLICIES = ("auto", "off")
DEVICE_PATTERN = re.compile(r"cpu|cuda:(0|[1-9][0-9]{0,2})")
MIN_SHARE = 0.1  # under the power cap the child still runs a tenth of the time, so a unit always ends
SHARE_RISE = 1.2  # the share grows back by at most 20% a check, so recovery does not overshoot the cap
SHARE_HOLD = 0.95  # drawing within 5% under the cap: hold the share (no hunting around the cap)


class NvmlFailed(Exception):
    """An NVML call failed (the card fell off the bus, the driver was reloaded)."""


class Nvml(Protocol):
    """What the agent reads from NVML, by NVML device index."""

    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def uuid(self, index: int) -> str: ...
    def memory_total_mb(self, index: int) -> int: ...
    def temperature_c(self, index: int) -> float: ...
    def power_draw_w(self, index: int) -> float: ...
    def power_limit_w(self, index: int) -> float: ...
    def utilization_percent(self, index: int) -> float: ...


# --- the policy's choices ------------------------------------------------------------------------

def child_gpu_env(gpu_policy: str) -> dict[str, str]:
    """What runner.child_env adds to the child's environment for the policy's `gpu` key."""
    return {CHILD_GPU_ENV: _checked_policy(gpu_policy)}


def child_device(gpu_policy: str, facts: dict[str, Any] | None) -> str:
    """The ChildJob `device` for the next unit: "cuda:0" when the policy allows the GPU and the child
    said it computes on CUDA (its facts, hence the device's hardware class, are CUDA's), else "cpu".
    The unit must run where the facts say: it was leased under the class those facts make."""
    if _checked_policy(gpu_policy) == "auto" and facts is not None and facts.get("device_type") == "cuda":
        return "cuda:0"
    return "cpu"


def device_checked(device: Any) -> str:
    """A ChildJob device: "cpu" or "cuda:N"; ValueError otherwise."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"device must be 'cpu' or 'cuda:N', got {device!r}")
    return device


def _checked_policy(gpu_policy: str) -> str:
    if gpu_policy not in GPU_POLICIES:
        raise ValueError(f"gpu must be one of {', '.join(GPU_POLICIES)}, got {gpu_policy!r}")
    return gpu_policy


# --- loading NVML ----------------------------------------------------------------------------------

_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info("%s", message)


def load_nvml() -> Nvml | None:
    """NVML, initialised, or None (logged once) when nvidia-ml-py is missing, the driver's library is
    absent or fails to start, or it sees no device. Never raises."""
    try:
        import pynvml
    except ImportError:
        _say_once("no GPU caps: nvidia-ml-py is not installed (pip install 'idlegrid[gpu]')")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        _say_once(f"no GPU caps: NVML did not start ({exc})")
        return None
    nvml = PynvmlNvml(pynvml)
    try:
        count = nvml.device_count()
    except NvmlFailed as exc:
        count, why = 0, f"NVML could not count devices ({exc})"
    else:
        why = "NVML sees no device"
    if count < 1:
        _say_once(f"no GPU caps: {why}")
        pynvml.nvmlShutdown()
        return None
    return nvml


def gpu_guard(gpu_policy: str, facts: dict[str, Any] | None, *, temp_max_c: float, temp_resume_c: float,
              power_max_w: float, loader: Callable[[], Nvml | None] = load_nvml) -> GpuGuard | None:
    """The guard for the unit's GPU, or None when units run on the CPU (nothing GPU is loaded then) or
    NVML is unavailable. `loader` (tests) replaces load_nvml."""
    if child_device(gpu_policy, facts) == "cpu":
        return None
    nvml = loader()
    if nvml is None:
        return None
    uuid = facts.get("gpu_uuid") if facts is not None else None
    return GpuGuard(nvml, nvml_index(nvml, uuid if isinstance(uuid, str) else None),
                    temp_max_c=temp_max_c, temp_resume_c=temp_resume_c, power_max_w=power_max_w)


def nvml_index(nvml: Nvml, uuid: str | None) -> int:
    """NVML's index of the card the child calls cuda:0. CUDA orders devices fastest first and NVML by
    PCI bus, so the child's UUID (torch's, without NVML's "GPU-" prefix) decides; 0 when unknown."""
    if uuid:
        wanted = uuid.lower().removeprefix("gpu-")
        try:
            for index in range(nvml.device_count()):
                if nvml.uuid(index).lower().removeprefix("gpu-") == wanted:
                    return index
        except NvmlFailed as exc:
            log.warning("NVML could not list the cards' UUIDs (%s); watching device 0", exc)
            return 0
        log.warning("NVML has no device with the child's UUID %s; watching device 0", uuid)
    return 0


class PynvmlNvml:
    """The real NVML, through nvidia-ml-py (`pynvml`, passed in: imported only by load_nvml)."""

    def __init__(self, pynvml: Any) -> None:
        self._nvml = pynvml
        self._handles: dict[int, Any] = {}

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._nvml, name)(*args)
        except self._nvml.NVMLError as exc:
            raise NvmlFailed(f"{name}: {exc}") from None

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = self._call("nvmlDeviceGetHandleByIndex", index)
        return self._handles[index]

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def name(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetName", self._handle(index)))

    def uuid(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetUUID", self._handle(index)))

    def memory_total_mb(self, index: int) -> int:
        return int(self._call("nvmlDeviceGetMemoryInfo", self._handle(index)).total) >> 20

    def temperature_c(self, index: int) -> float:
        return float(self._call("nvmlDeviceGetTemperature", self._handle(index), self._nvml.NVML_TEMPERATURE_GPU))

    def power_draw_w(self, index: int) -> float:
        return float(self._call("nvmlDeviceGetPowerUsage", self._handle(index))) / 1000  # NVML says mW

    def power_limit_w(self, index: int) -> float:
        return float(self._call("nvmlDeviceGetEnforcedPowerLimit", self._handle(index))) / 1000

    def utilization_percent(self, index: int) -> float:
        return float(self._call("nvmlDeviceGetUtilizationRates", self._handle(index)).gpu)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)  # old bindings: bytes


@dataclass
class FakeGpu:
    name: str = "NVIDIA Test Card"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    memory_mb: int = 8192
    temperature_c: float = 50.0
    power_draw_w: float = 100.0
    power_limit_w: float = 250.0
    utilization_percent: float = 0.0


@dataclass
class FakeNvml:
    """NVML for tests: set the readings on `gpus`; `failing` makes every reading raise NvmlFailed."""

    gpus: list[FakeGpu] = field(default_factory=lambda: [FakeGpu()])
    failing: bool = False

    def _gpu(self, index: int) -> FakeGpu:
        if self.failing:
            raise NvmlFailed("the fake GPU fell off the bus")
        return self.gpus[index]

    def device_count(self) -> int:
        return len(self.gpus)

    def name(self, index: int) -> str:
        return self._gpu(index).name

    def uuid(self, index: int) -> str:
        return self._gpu(index).uuid

    def memory_total_mb(self, index: int) -> int:
        return self._gpu(index).memory_mb

    def temperature_c(self, index: int) -> float:
        return self._gpu(index).temperature_c

    def power_draw_w(self, index: int) -> float:
        return self._gpu(index).power_draw_w

    def power_limit_w(self, index: int) -> float:
        return self._gpu(index).power_limit_w

    def utilization_percent(self, index: int) -> float:
        return self._gpu(index).utilization_percent


# --- the guard -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuVerdict:
    """allowed: whether the child may run now (False: pause it); share: the fraction of time it may run
    while allowed (1.0 unless over the power cap); reason: why it is paused or throttled, else None."""

    allowed: bool
    reason: str | None
    share: float


class GpuGuard:
    """The temperature and power caps of one GPU. Call `check()` once per duty-cycle period (about a
    second) while a GPU unit runs or is held by this guard, not while it is paused for another reason
    (the card's idle draw would raise the share); it keeps the hysteresis and the share between calls.
    The share assumes the draw NVML reports is averaged over the period (it is, over about a second, on
    recent drivers): the average draw of a duty-cycled card scales with its share."""

    def __init__(self, nvml: Nvml, index: int, *, temp_max_c: float, temp_resume_c: float, power_max_w: float) -> None:
        if not temp_resume_c < temp_max_c:
            raise ValueError(f"gpu_temp_resume_c ({temp_resume_c:g}) must be below gpu_temp_max_c ({temp_max_c:g})")
        if power_max_w < 0:
            raise ValueError(f"gpu_power_max_w must be 0 (no cap) or more, got {power_max_w:g}")
        self.nvml, self.index = nvml, index
        self.temp_max_c, self.temp_resume_c, self.power_max_w = temp_max_c, temp_resume_c, power_max_w
        self.hot = False
        self.share = 1.0

    def check(self) -> GpuVerdict:
        try:
            temperature = self.nvml.temperature_c(self.index)
            draw = self.nvml.power_draw_w(self.index) if self.power_max_w > 0 else 0.0
        except NvmlFailed as exc:  # a cap that cannot be read cannot be kept: stay paused until it can
            return GpuVerdict(False, f"GPU sensors unreadable ({exc})", self.share)
        if temperature > self.temp_max_c:
            self.hot = True
        elif temperature <= self.temp_resume_c:
            self.hot = False
        if self.power_max_w > 0 and not self.hot:  # a paused card's idle draw says nothing of the unit's
            self.share = self._next_share(draw)
        if self.hot:
            return GpuVerdict(False, f"GPU at {temperature:g} °C, over the {self.temp_max_c:g} °C cap "
                              f"(resumes at {self.temp_resume_c:g} °C)", self.share)
        if self.share < 1.0:
            return GpuVerdict(True, f"GPU power capped at {self.power_max_w:g} W (drawing {draw:g} W): "
                              f"running {self.share:.0%} of the time", self.share)
        return GpuVerdict(True, None, 1.0)

    def _next_share(self, draw: float) -> float:
        """Proportional: the draw, averaged over the duty cycle, scales with the share, so share *
        cap/draw is where it meets the cap. Down at once (over the cap), up by at most SHARE_RISE."""
        if draw > self.power_max_w:
            ratio = self.power_max_w / draw
        elif draw >= SHARE_HOLD * self.power_max_w:
            ratio = 1.0
        else:
            ratio = SHARE_RISE if draw <= 0 else min(self.power_max_w / draw, SHARE_RISE)
        return min(1.0, max(MIN_SHARE, self.share * ratio))
