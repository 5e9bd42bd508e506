"""`idlegrid-agent status`: what the agent is doing, gathered from its control socket and the marketplace.

`status_gather` makes one plain dict (printed as is by `--json`); `render` draws it with rich. rich is
imported inside `render` only: `run` never loads it.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from worker_agent import control
from worker_agent.client import ONE_SHOT, AgentClient, AgentError
from worker_agent.state import NotEnrolled, StateDir

EARNINGS_TIMEOUT = 5.0


def status_gather(state: StateDir) -> dict[str, Any]:
    """{"state_dir", "device" (None when not enrolled), "agent" ({"running": False, "why"} when none answers),
    "earnings" (the marketplace's answer, or {"error": "..."})}."""
    out: dict[str, Any] = {"state_dir": str(state.root), "device": None, "agent": _agent(state), "earnings": None}
    try:
        device = state.load_device()
    except NotEnrolled as exc:
        out["earnings"] = {"error": str(exc)}
        return out
    out["device"] = {"device_id": device.device_id, "name": device.name, "server": device.server}
    try:
        with AgentClient(device.server, device=(device.device_id, device.device_secret), retry=ONE_SHOT,
                         timeout=EARNINGS_TIMEOUT) as client:
            out["earnings"] = client.earnings()
    except AgentError as exc:
        out["earnings"] = {"error": str(exc)}
    return out


def _agent(state: StateDir) -> dict[str, Any]:
    try:
        return control.ControlClient(control.socket_path(state.root)).status()
    except control.AgentNotRunning:
        return {"running": False, "why": "no agent is running with this state directory"}
    except control.ControlError as exc:
        return {"running": False, "why": str(exc)}


def token_amount(base_units: str, decimals: int) -> str:
    """'1234500000000000000', 18 -> '1.2345' (exact, integers only: amounts exceed a float's and even
    Decimal's default 28 digits)."""
    whole, fraction = divmod(int(base_units), 10**decimals)
    digits = str(fraction).rjust(decimals, "0").rstrip("0") if decimals else ""
    return f"{whole}.{digits}" if digits else str(whole)


def render(status: dict[str, Any], stream: TextIO | None = None) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    console = Console(file=stream, highlight=False)
    agent, device, earnings = status["agent"], status["device"], status["earnings"] or {}
    running = bool(agent.get("running"))
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold", no_wrap=True)
    rows.add_column()
    if device is None:
        rows.add_row("Device", "[yellow]not enrolled[/]: run `idlegrid-agent enroll --server URL --token TOKEN`")
    else:
        rows.add_row("Device", f"#{device['device_id']} {device['name']} on {device['server']}")
    rows.add_row("State dir", status["state_dir"])
    rows.add_row("Agent", _agent_line(agent))
    if running and agent.get("paused"):
        rows.add_row("Why", "\n".join(_pause_reasons(agent)))
    unit = agent.get("unit") if running else None
    if unit:
        since = max(0.0, time.time() - float(unit.get("started_at") or time.time()))
        rows.add_row("Unit", f"{unit['label']} (running {_duration(since)})")
        progress = unit.get("progress")
        if isinstance(progress, int | float) and not isinstance(progress, bool):
            bar = Table.grid(padding=(0, 1))
            bar.add_row(ProgressBar(total=1.0, completed=float(progress), width=40), f"{progress:.0%}")
            rows.add_row("Progress", bar)
        else:
            rows.add_row("Progress", "[dim]not reported for this unit[/]")
    elif running:
        rows.add_row("Unit", "[dim]none[/]")
    if running:
        rows.add_row("Done", f"{agent.get('units_done_today', 0)} unit(s) today, {agent.get('units_done_this_run', 0)} this run")
    for label, text in _money_rows(earnings):
        rows.add_row(label, text)
    policy = agent.get("policy") if running else None
    if isinstance(policy, dict) and policy:
        rows.add_row("Policy", "\n".join(policy_lines(policy)))
    elif running:
        rows.add_row("Policy", "[dim]none: computes whenever it has work[/]")
    console.print(Panel(rows, title="idlegrid-agent", expand=False))


def policy_lines(policy: dict[str, Any]) -> list[str]:
    """The policy in force in a few readable lines (the raw keys: `idlegrid-agent config`)."""
    def get(key: str, default: Any = None) -> Any:
        return policy.get(key, default)

    def num(value: Any) -> str:
        return f"{value:g}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)

    idle_now = get("idle_seconds")
    away = ""
    if isinstance(idle_now, int | float) and not isinstance(idle_now, bool):
        away = f"; no input for {_duration(idle_now)}" if idle_now < 7 * 86400 else "; no user session"
    idle_minutes = get("idle_minutes", 0)
    lines = [
        (f"computes after {num(idle_minutes)} min without input" if idle_minutes else "computes even while the machine is in use")
        + f" [dim](idle source {get('idle_source_in_use', get('idle_source'))}{away})[/]",
    ]
    other = get("other_cpu_percent", 100)
    now = get("other_cpu_percent_now")
    lines.append(("not while other programs use over " + f"{num(other)}% CPU" if other < 100 else "whatever other programs use")
                 + (f" [dim](now {num(now)}%)[/]" if isinstance(now, int | float) else ""))
    lines.append(f"{get('cores', 1)} core(s), at most {num(get('cpu_percent', 100))}% CPU time; memory at most "
                 f"{num(get('memory_busy_percent'))}% of RAM while in use, {num(get('memory_idle_percent'))}% while idle")
    battery = ("runs on battery" + (f" down to {num(get('battery_min_percent'))}%" if get("battery_min_percent") else "")
               if get("run_on_battery") else "pauses on battery")
    lines.append(f"{battery}; hours: {get('windows') or 'any'}")
    if get("gpu") == "off":
        lines.append("GPU: off")
    else:
        power = get("gpu_power_max_w") or 0
        lines.append(f"GPU when there is one: {'also' if get('gpu_when_busy') else 'only'} while idle, paused over "
                     f"{num(get('gpu_temp_max_c'))} °C until {num(get('gpu_temp_resume_c'))} °C"
                     + (f", at most {num(power)} W" if power else ""))
    return lines


def _agent_line(agent: dict[str, Any]) -> str:
    if not agent.get("running"):
        return f"[red]not running[/] ({agent.get('why', '')})"
    if agent.get("paused"):
        return f"[yellow]paused[/] (pid {agent.get('pid')})"
    return f"[green]{agent.get('state', 'running')}[/] (pid {agent.get('pid')})"


def _pause_reasons(agent: dict[str, Any]) -> list[str]:
    until = agent.get("paused_until")
    lines = []
    for reason in agent.get("pause_reasons") or ["paused"]:
        if str(reason).startswith("paused by the owner"):
            reason += f" until {time.strftime('%H:%M', time.localtime(until))}" if until else " until `idlegrid-agent resume`"
        lines.append(str(reason))
    return lines


def _money_rows(earnings: dict[str, Any]) -> list[tuple[str, str]]:
    if "error" in earnings:
        return [("Earnings", f"[dim]unavailable: {earnings['error']}[/]")]
    symbol, decimals = earnings.get("token_symbol", ""), int(earnings.get("token_decimals", 18))
    return [
        ("Validated", f"{earnings.get('units_validated_today', 0)} unit(s) of this device today"),
        ("Held", f"{token_amount(earnings.get('held', '0'), decimals)} {symbol} [dim](in the audit window)[/]"),
        ("Settled", f"{token_amount(earnings.get('settled', '0'), decimals)} {symbol}"),
    ]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
