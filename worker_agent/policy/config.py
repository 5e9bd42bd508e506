"""The policy's keys, their defaults, and where each value came from.

Precedence: a `run` flag > an IDLEGRID_AGENT_<KEY> environment variable > `config.toml` in the state
directory > the default. Every value is checked here, once, with an error that names the key and the
place it came from; the rest of the agent reads a frozen `Policy` and never re-validates.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.toml"
ENV_PREFIX = "IDLEGRID_AGENT_"
MAX_CONFIG_BYTES = 64 << 10  # a policy is a dozen lines; anything bigger is not one
IDLE_SOURCES = ("auto", "none", "x11", "logind", "macos", "windows")  # and "file:PATH"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY


class PolicyError(ValueError):
    """A policy value is invalid; the message names the key and where the value came from."""


@dataclass(frozen=True)
class Window:
    """A span of the week in minutes from Monday 00:00; `end` may pass the week's end (Sunday night into
    Monday morning), and is then read modulo a week."""

    start: int
    end: int

    def contains(self, minute_of_week: int) -> bool:
        if self.start <= minute_of_week < self.end:
            return True
        return self.end > MINUTES_PER_WEEK and minute_of_week < self.end - MINUTES_PER_WEEK


@dataclass(frozen=True)
class Policy:
    idle_minutes: float = 3.0
    idle_source: str = "auto"
    other_cpu_percent: float = 25.0
    cores: int = 1
    cpu_percent: float = 100.0
    memory_busy_percent: float = 50.0
    memory_idle_percent: float = 90.0
    cache_mb: int = 2048
    run_on_battery: bool = False
    battery_min_percent: float = 20.0
    windows: str = ""
    gpu: str = "auto"
    gpu_when_busy: bool = False
    gpu_temp_max_c: float = 83.0
    gpu_temp_resume_c: float = 78.0
    gpu_power_max_w: float = 0.0
    # key -> "default" | "config.toml" | "env IDLEGRID_AGENT_X" | "flag --x"; not part of the policy's value.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def window_spans(self) -> tuple[Window, ...]:
        return parse_windows(self.windows)

    def values(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in KEYS}


def parse_windows(text: str) -> tuple[Window, ...]:
    """`mon-fri 18:00-08:00; sat,sun 00:00-24:00` -> spans of the week. An end before the start runs
    overnight into the next day (Friday 18:00 to Saturday 08:00). "" means always (no spans)."""
    spans: list[Window] = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        match = re.fullmatch(r"([a-z,\- ]+?)\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})", entry.lower())
        if match is None:
            raise ValueError(f"{entry!r} is not `<days> HH:MM-HH:MM` (e.g. `mon-fri 18:00-08:00`)")
        start, end = _minute(match[2], match[3], entry), _minute(match[4], match[5], entry)
        if start == MINUTES_PER_DAY:
            raise ValueError(f"{entry!r}: a window cannot start at 24:00")
        if start == end:
            raise ValueError(f"{entry!r}: the window is empty (use 00:00-24:00 for a whole day)")
        length = end - start if end > start else MINUTES_PER_DAY - start + end
        for day in _days(match[1].replace(" ", ""), entry):
            spans.append(Window(day * MINUTES_PER_DAY + start, day * MINUTES_PER_DAY + start + length))
    return tuple(spans)


def _minute(hours: str, minutes: str, entry: str) -> int:
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > MINUTES_PER_DAY:
        raise ValueError(f"{entry!r}: {hours}:{minutes} is not a time of day (00:00-24:00)")
    return value


def _days(text: str, entry: str) -> list[int]:
    days: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"{entry!r}: {part!r} is not a day or a range of days ({', '.join(DAYS)})")
        a, b = DAYS.index(first), DAYS.index(last or first)
        days.extend((a + i) % 7 for i in range((b - a) % 7 + 1))  # fri-mon wraps over the weekend
    return days


# --- parsing one value --------------------------------------------------------------------------

def _number(low: float, high: float, *, integer: bool = False) -> Callable[[Any], Any]:
    def parse(raw: Any) -> Any:
        if isinstance(raw, bool):
            raise ValueError("must be a number, not true/false")
        if isinstance(raw, str):
            try:
                raw = int(raw) if integer else float(raw)
            except ValueError:
                raise ValueError(f"must be {'a whole number' if integer else 'a number'}, got {raw!r}") from None
        if integer and not isinstance(raw, int) or not isinstance(raw, int | float):
            raise ValueError(f"must be {'a whole number' if integer else 'a number'}, got {raw!r}")
        if not low <= raw <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, got {raw:g}")
        return raw if integer else float(raw)
    return parse


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(raw, str) and raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _idle_source(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a string, got {raw!r}")
    if raw in IDLE_SOURCES or (raw.startswith("file:") and len(raw) > len("file:")):
        return raw
    raise ValueError(f"must be one of {', '.join(IDLE_SOURCES)} or file:PATH, got {raw!r}")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        if raw not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return str(raw)
    return parse


def _windows(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a string, got {raw!r}")
    parse_windows(raw)
    return raw.strip()


PARSERS: dict[str, Callable[[Any], Any]] = {
    "idle_minutes": _number(0, 24 * 60),
    "idle_source": _idle_source,
    "other_cpu_percent": _number(1, 100),  # 100: never suspended for other programs
    "cores": _number(1, 1024, integer=True),
    "cpu_percent": _number(1, 100),
    "memory_busy_percent": _number(1, 100),
    "memory_idle_percent": _number(1, 100),
    "cache_mb": _number(1, 1 << 24, integer=True),
    "run_on_battery": _boolean,
    "battery_min_percent": _number(0, 100),
    "windows": _windows,
    "gpu": _choice("auto", "off"),
    "gpu_when_busy": _boolean,
    "gpu_temp_max_c": _number(30, 120),
    "gpu_temp_resume_c": _number(20, 120),
    "gpu_power_max_w": _number(0, 10_000),  # 0: no cap
}
KEYS = tuple(f.name for f in dataclasses.fields(Policy) if f.name != "sources")
assert set(KEYS) == set(PARSERS)


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def load_policy(
    state_root: Path, *, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Policy:
    """The policy in force: `flags` (key -> value, None = not given) over the environment over the file.
    Raises PolicyError."""
    environ = os.environ if environ is None else environ
    chosen: dict[str, tuple[Any, str]] = dict.fromkeys(KEYS, (None, "default"))
    chosen.update(read_config_file(state_root / CONFIG_FILE))
    for key in KEYS:
        if env_name(key) in environ:
            chosen[key] = (environ[env_name(key)], f"env {env_name(key)}")
        if flags and flags.get(key) is not None:
            chosen[key] = (flags[key], f"flag {flag_name(key)}")
    values: dict[str, Any] = {}
    for key, (raw, source) in chosen.items():
        if source != "default":
            try:
                values[key] = PARSERS[key](raw)
            except ValueError as exc:
                raise PolicyError(f"policy key {key} (from {source}): {exc}") from None
    policy = Policy(**values, sources={key: source for key, (_raw, source) in chosen.items()})
    _check_together(policy)
    return policy


def read_config_file(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise PolicyError(f"{path} is larger than {MAX_CONFIG_BYTES >> 10} KB; it is not a policy file")
    try:
        table = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise PolicyError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(KEYS)}")
    return {key: (value, CONFIG_FILE) for key, value in table.items()}


def _check_together(policy: Policy) -> None:
    if policy.gpu_temp_resume_c >= policy.gpu_temp_max_c:
        raise PolicyError(
            f"policy key gpu_temp_resume_c (from {policy.sources.get('gpu_temp_resume_c')}) must be below "
            f"gpu_temp_max_c ({policy.gpu_temp_resume_c:g} >= {policy.gpu_temp_max_c:g})"
        )


def describe(policy: Policy) -> list[str]:
    """One line per key: `key = value  (source)`, as `idlegrid-agent config` prints them."""
    width = max(len(key) for key in KEYS)
    return [f"{key:<{width}} = {_show(getattr(policy, key))}  ({policy.sources.get(key, 'default')})" for key in KEYS]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return f"{value:g}" if isinstance(value, float) else str(value)
