"""`idlegrid-agent service install`: start the agent at login, as the platform's own service manager does.

Linux: a systemd user unit (~/.config/systemd/user/idlegrid-agent.service), logs in the journal.
macOS: a launchd agent (~/Library/LaunchAgents/org.idlegrid.agent.plist), logs in ~/Library/Logs.
Windows: a Task Scheduler command is printed, never run (schtasks needs the user's own shell).

Either way the service runs `<this python> -m worker_agent --state-dir <dir> run`: the same interpreter
(and so the same installed agent) as the command that installed it. A stop is SIGTERM, the agent's warm
shutdown (the current unit finishes, up to its time limit), with STOP_TIMEOUT_SECONDS before the kill.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

SYSTEMD_UNIT = "idlegrid-agent.service"
LAUNCHD_LABEL = "org.idlegrid.agent"
WINDOWS_TASK = "IdlegridAgent"
# A warm stop lets the unit in hand finish; units are sized to minutes, so give it a quarter hour
# before the service manager kills the agent (whose cold shutdown hands every lease back).
STOP_TIMEOUT_SECONDS = 900


class ServiceError(Exception):
    """The service file could not be written or removed; the message says why."""


@dataclass(frozen=True)
class ServiceFile:
    platform: str  # "systemd", "launchd" or "windows"
    path: Path | None  # None on Windows: nothing is written
    content: str
    next_commands: list[str]
    uninstall_commands: list[str]


def agent_command(state_dir: Path, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "worker_agent", "--state-dir", str(state_dir), "run"]


def service_file(*, state_dir: Path, home: Path, platform: str | None = None, python: str | None = None) -> ServiceFile:
    platform = platform or sys.platform
    command = agent_command(state_dir.expanduser().resolve(), python)
    if platform.startswith("linux"):
        return _systemd(command, home)
    if platform == "darwin":
        return _launchd(command, home)
    if platform in ("win32", "cygwin"):
        return _windows(command)
    raise ServiceError(f"no service manager is known for {platform}; start `{shlex.join(command)}` at login yourself")


def install(service: ServiceFile) -> None:
    if service.path is None:
        return
    try:
        service.path.parent.mkdir(parents=True, exist_ok=True)
        temp = service.path.with_name(f".{service.path.name}.tmp")
        temp.write_text(service.content)
        temp.chmod(0o644)
        temp.replace(service.path)
    except OSError as exc:
        raise ServiceError(f"cannot write {service.path}: {exc.strerror}") from None


def uninstall(service: ServiceFile) -> bool:
    """Remove the service file; False when there was none."""
    if service.path is None or not service.path.exists():
        return False
    try:
        service.path.unlink()
    except OSError as exc:
        raise ServiceError(f"cannot remove {service.path}: {exc.strerror}") from None
    return True


def _systemd(command: list[str], home: Path) -> ServiceFile:
    content = f"""\
# Written by `idlegrid-agent service install`; `idlegrid-agent service install --uninstall` removes it.
[Unit]
Description=Idlegrid worker agent (lends this machine's idle compute)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={" ".join(_systemd_quote(part) for part in command)}
Restart=on-failure
RestartSec=30
# SIGTERM is the agent's warm stop: the unit in hand finishes first.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={STOP_TIMEOUT_SECONDS}
StandardOutput=journal
StandardError=journal
SyslogIdentifier=idlegrid-agent
Nice=19
IOSchedulingClass=idle

[Install]
WantedBy=default.target
"""
    return ServiceFile(
        platform="systemd",
        path=home / ".config" / "systemd" / "user" / SYSTEMD_UNIT,
        content=content,
        next_commands=["systemctl --user daemon-reload", f"systemctl --user enable --now {SYSTEMD_UNIT}",
                       f"journalctl --user -u {SYSTEMD_UNIT} -f   # its log",
                       "loginctl enable-linger $USER   # optional: keep it running while you are logged out"],
        uninstall_commands=[f"systemctl --user disable --now {SYSTEMD_UNIT}", "systemctl --user daemon-reload"],
    )


def _systemd_quote(part: str) -> str:
    # systemd splits ExecStart like a shell, with C-style escapes in double quotes; % starts a specifier.
    part = part.replace("%", "%%")
    if part and all(c.isalnum() or c in "/._-=:+," for c in part):
        return part
    return '"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _launchd(command: list[str], home: Path) -> ServiceFile:
    log_file = home / "Library" / "Logs" / "idlegrid-agent.log"
    arguments = "\n".join(f"        <string>{escape(part)}</string>" for part in command)
    content = f"""\
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
    <key>Label</key>
    <string>{LAUNCHD_LABEL}</string>
    <key>ProgramArguments</key>
    <array>
{arguments}
    </array>
    <key>RunAtLoad</key>
    <true/>
    <key>KeepAlive</key>
    <dict>
        <key>SuccessfulExit</key>
        <false/>
    </dict>
    <key>ExitTimeOut</key>
    <integer>{STOP_TIMEOUT_SECONDS}</integer>
    <key>ProcessType</key>
    <string>Background</string>
    <key>LowPriorityIO</key>
    <true/>
    <key>Nice</key>
    <integer>19</integer>
    <key>StandardOutPath</key>
    <string>{escape(str(log_file))}</string>
    <key>StandardErrorPath</key>
    <string>{escape(str(log_file))}</string>
</dict>
</plist>
"""
    plist = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    return ServiceFile(
        platform="launchd",
        path=plist,
        content=content,
        next_commands=[f"launchctl bootstrap gui/$(id -u) {shlex.quote(str(plist))}",
                       f"launchctl kickstart gui/$(id -u)/{LAUNCHD_LABEL}",
                       f"tail -f {shlex.quote(str(log_file))}   # its log"],
        uninstall_commands=[f"launchctl bootout gui/$(id -u)/{LAUNCHD_LABEL}"],
    )


def _windows(command: list[str]) -> ServiceFile:
    task = subprocess.list2cmdline(command)
    create = f'schtasks /Create /TN {WINDOWS_TASK} /SC ONLOGON /RL LIMITED /F /TR "{task.replace(chr(34), chr(92) + chr(34))}"'
    return ServiceFile(
        platform="windows",
        path=None,
        content=create + "\n",
        next_commands=[f"schtasks /Run /TN {WINDOWS_TASK}"],
        uninstall_commands=[f"schtasks /End /TN {WINDOWS_TASK}", f"schtasks /Delete /TN {WINDOWS_TASK} /F"],
    )
