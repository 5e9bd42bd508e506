"""The policy's keys: a flag beats the environment beats config.toml beats the default; every bad value
is refused with the key and where it came from; the windows string becomes spans of the week."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from worker_agent.policy.conditions import in_windows
from worker_agent.policy.config import KEYS, Policy, PolicyError, describe, load_policy, parse_windows

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_config(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(text)
    return root


def test_with_nothing_set_every_key_has_its_default_and_says_so(tmp_path: Path) -> None:
    policy = load_policy(tmp_path, environ={})
    assert policy == Policy()
    assert (policy.idle_minutes, policy.other_cpu_percent, policy.cores, policy.cache_mb) == (3, 25, 1, 2048)
    assert set(policy.sources) == set(KEYS) and set(policy.sources.values()) == {"default"}


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    write_config(tmp_path, "idle_minutes = 10\ncores = 2\ncpu_percent = 80\nrun_on_battery = true\n")
    environ = {"IDLEGRID_AGENT_CORES": "3", "IDLEGRID_AGENT_CPU_PERCENT": "60"}
    policy = load_policy(tmp_path, environ=environ, flags={"cpu_percent": "40", "idle_minutes": None})
    assert (policy.idle_minutes, policy.cores, policy.cpu_percent, policy.run_on_battery) == (10, 3, 40, True)
    assert policy.sources["idle_minutes"] == "config.toml"
    assert policy.sources["cores"] == "env IDLEGRID_AGENT_CORES"
    assert policy.sources["cpu_percent"] == "flag --cpu-percent"
    assert policy.sources["memory_busy_percent"] == "default"


@pytest.mark.parametrize(("where", "expected"), [
    ({"file": "cpu_percent = 0"}, "policy key cpu_percent (from config.toml): must be between 1 and 100, got 0"),
    ({"file": "cores = 1.5"}, "policy key cores (from config.toml): must be a whole number"),
    ({"file": 'run_on_battery = "maybe"'}, "policy key run_on_battery (from config.toml): must be true or false"),
    ({"env": ("IDLEGRID_AGENT_IDLE_MINUTES", "soon")}, "policy key idle_minutes (from env IDLEGRID_AGENT_IDLE_MINUTES)"),
    ({"env": ("IDLEGRID_AGENT_IDLE_SOURCE", "x12")}, "must be one of auto, none, x11, logind, macos, windows or file:PATH"),
    ({"flag": ("windows", "weekdays 9-17")}, "policy key windows (from flag --windows): 'weekdays 9-17' is not"),
    ({"flag": ("gpu", "on")}, "policy key gpu (from flag --gpu): must be one of auto, off"),
    ({"file": "gpu_temp_resume_c = 90"}, "gpu_temp_resume_c (from config.toml) must be below gpu_temp_max_c"),
])
def test_a_bad_value_is_refused_naming_the_key_and_its_source(tmp_path: Path, where: dict, expected: str) -> None:
    if "file" in where:
        write_config(tmp_path, where["file"] + "\n")
    environ = dict([where["env"]]) if "env" in where else {}
    flags = dict([where["flag"]]) if "flag" in where else {}
    with pytest.raises(PolicyError) as refused:
        load_policy(tmp_path, environ=environ, flags=flags)
    assert expected in str(refused.value)


def test_an_unknown_key_in_the_file_is_an_error_that_lists_the_known_ones(tmp_path: Path) -> None:
    write_config(tmp_path, "idle_minute = 5\n")
    with pytest.raises(PolicyError, match=r"unknown key\(s\) idle_minute; known keys: idle_minutes, idle_source"):
        load_policy(tmp_path, environ={})


def test_a_file_that_is_not_toml_is_refused(tmp_path: Path) -> None:
    write_config(tmp_path, "idle_minutes = \n")
    with pytest.raises(PolicyError, match="is not valid TOML"):
        load_policy(tmp_path, environ={})


def at(day: str, hhmm: str) -> datetime:
    days = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 7}  # 2024-01-01 was a Monday
    hours, minutes = map(int, hhmm.split(":"))
    return datetime(2024, 1, days[day], hours, minutes)


def test_an_overnight_window_runs_from_its_day_into_the_next_morning() -> None:
    windows = parse_windows("mon-fri 18:00-08:00; sat,sun 00:00-24:00")
    assert in_windows(windows, at("mon", "18:00")) and in_windows(windows, at("tue", "07:59"))
    assert not in_windows(windows, at("tue", "08:00")) and not in_windows(windows, at("mon", "12:00"))
    assert in_windows(windows, at("sat", "07:00"))  # friday night into saturday, and saturday itself
    assert not in_windows(windows, at("mon", "07:00"))  # sunday's window ends at midnight


def test_a_sunday_night_window_wraps_into_monday_and_day_ranges_wrap_over_the_weekend() -> None:
    assert in_windows(parse_windows("sun 22:00-06:00"), at("mon", "05:59"))
    assert not in_windows(parse_windows("sun 22:00-06:00"), at("mon", "06:00"))
    weekend = parse_windows("fri-mon 09:00-17:00")
    assert [in_windows(weekend, at(day, "12:00")) for day in ("thu", "fri", "sat", "sun", "mon", "tue")] == [
        False, True, True, True, True, False]
    assert in_windows((), at("wed", "03:00"))  # no windows: always


@pytest.mark.parametrize("text", ["mon 25:00-26:00", "mon 09:60-10:00", "mon 10:00-10:00", "mon 24:00-08:00",
                                  "funday 09:00-17:00", "mon"])
def test_malformed_windows_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_windows(text)


def test_idlegrid_agent_config_prints_each_key_with_its_value_and_source(tmp_path: Path) -> None:
    write_config(tmp_path, "idle_minutes = 7\n")
    command = [sys.executable, "-m", "worker_agent", "config", "--state-dir", str(tmp_path), "--cores", "2"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "IDLEGRID_AGENT_RUN_ON_BATTERY": "yes"}
    text = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    lines = text.splitlines()
    assert len(lines) == len(KEYS) == len(describe(Policy()))
    assert "idle_minutes        = 7  (config.toml)" in lines
    assert "cores               = 2  (flag --cores)" in lines
    assert "run_on_battery      = true  (env IDLEGRID_AGENT_RUN_ON_BATTERY)" in lines
    as_json = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert json.loads(as_json.stdout)["cores"] == {"value": 2, "source": "flag --cores"}
    refused = subprocess.run([*command, "--cpu-percent", "150"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2
    assert "policy key cpu_percent (from flag --cpu-percent): must be between 1 and 100, got 150" in refused.stderr
