"""Run the marketplace as production does, one process per part, on loopback: gunicorn (uvicorn workers), a Celery
worker, Celery beat, and any number of agents. Used by the demo, the end-to-end tests and the benches
(bench/dispatch.py, bench/sabotage.py): the one process harness of the project.
Every process starts in its own session and is stopped by its process group, always."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


class ClusterError(RuntimeError):
    """A process did not start, answer or say what it was waited for."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path | None  # None: the child writes to this process's own stdout and stderr

    @classmethod
    def spawn(cls, name: str, args: list[str], *, env: dict[str, str], log_dir: Path | None,
              cwd: Path = ROOT) -> Process:
        """Start `args` in a session of its own, so that stop() reaches whatever it forks (gunicorn's
        workers, an agent's compute child). Its stdout and stderr go to `log_dir`/`name`.log, appended;
        with no log_dir, to this process's own (a bench child's progress lines and traceback)."""
        log_path = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            log_path = log_dir / f"{name}.log"
        # The child keeps its own copy of the descriptor: this process's copy is closed at once.
        with (log_path.open("ab") if log_path else contextlib.nullcontext()) as log:
            popen = subprocess.Popen(
                args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT if log else None, start_new_session=True,
            )
        return cls(name, popen, log_path)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signum)

    def stop(self, *, timeout: float = 15.0) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        try:  # children that outlived their leader
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.popen.returncode

    def wait_for_log(self, pattern: str | re.Pattern[str], *, timeout: float) -> re.Match[str]:
        """Wait until the process's log matches `pattern` (a regular expression) and return the match;
        raise on timeout or exit."""
        if self.log_path is None:
            raise ClusterError(f"{self.name} writes to the caller's output, not to a log of its own")
        compiled, deadline = re.compile(pattern), time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if match := compiled.search(self.log_path.read_text(errors="replace")):
                    return match
            except OSError:
                pass
            if not self.alive():
                raise ClusterError(f"{self.name} exited before its log said {compiled.pattern!r}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise ClusterError(f"{self.name}'s log did not say {compiled.pattern!r} within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) if self.log_path else ""
        except OSError:
            return ""


def wait_for_health(url: str, processes: Sequence[Process], *, timeout: float = 60.0) -> None:
    """Wait until `url`/healthz answers 200; raise as soon as one of `processes` exits, or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if not process.alive():
                raise ClusterError(f"{process.name} exited early ({process.popen.returncode}):\n{process.log_tail()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    logs = "".join(f"\n--- {process.name}\n{process.log_tail()}" for process in processes)
    raise ClusterError(f"{url} did not answer /healthz within {timeout:.0f}s{logs}")


@dataclass
class Cluster:
    var_dir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    web_workers: int = 2
    port: int = field(default_factory=free_port)
    # Throttle counters of this cluster alone: on a shared Redis (CI), counts left by another cluster (a
    # test that bombed the login) would otherwise throttle this one for the rest of their minute.
    cache_prefix: str = field(default_factory=lambda: f"cluster-{secrets.token_hex(6)}")
    processes: list[Process] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)  # of the accounts made by account(), by username

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        # Not the test process's own switches: pytest's, and the async-safety override its browser tests set.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST") and k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "marketplace.settings",
                "IDLEGRID_VAR_DIR": str(self.var_dir),
                "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
                "IDLEGRID_CACHE_KEY_PREFIX": self.cache_prefix,
                # Webhook receivers of the demo and the e2e tests listen on loopback, which production refuses.
                "IDLEGRID_WEBHOOKS_ALLOW_PRIVATE": "true",
            }
        )
        env.update(self.env_overrides)
        return env

    def start(self, name: str, args: list[str], *, env: dict[str, str] | None = None) -> Process:
        process = Process.spawn(name, args, env=env or self.env, log_dir=self.var_dir / "logs")
        self.processes.append(process)
        return process

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise ClusterError(f"manage.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def migrate(self) -> None:
        self.manage("migrate", "--no-input", "-v", "0")

    def account(self, username: str, *, funds: int = 0) -> str:
        """Create an account and return a new API token of it; `funds` (base units) are granted once through
        the ledger (`manage.py ledger_grant`, audited), for a submitter whose jobs must be escrowed. The
        account gets a random password (linking a payout address needs it), kept in `passwords`."""
        password = self.passwords.setdefault(username, secrets.token_urlsafe(18))
        # "--password=...": a generated password may start with "-", which argparse would take for an option
        token = json.loads(self.manage("account_create", username, "--exists-ok", f"--password={password}"))["token"]
        if funds:
            self.manage("ledger_grant", username, "--amount", str(funds), "--reason", "cluster submitter funds",
                        "--key", f"cluster-funds:{username}")
        return token

    def start_services(self, *, beat: bool = True) -> None:
        py = sys.executable
        self.start(
            "web",
            # As production serves it: the ASGI app under uvicorn workers, so idle agents long-poll.
            [py, "-m", "gunicorn", "marketplace.asgi:application", "--worker-class", "marketplace.core.asgi_worker.AsgiWorker",
             "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.web_workers), "--timeout", "120",
             "--graceful-timeout", "5"],
        )
        self.start(
            "celery-worker",
            # One worker for both queues here (the receivers are local); compose runs a worker per queue.
            [py, "-m", "celery", "-A", "marketplace", "worker", "-Q", "celery,webhooks", "--pool=prefork", "--concurrency=2",
             "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        )
        if beat:
            self.start(
                "celery-beat",
                [py, "-m", "celery", "-A", "marketplace", "beat", "--loglevel=INFO",
                 "--schedule", str(self.var_dir / "celerybeat-schedule")],
            )
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 60.0) -> None:
        wait_for_health(self.url, self.processes, timeout=timeout)

    def agent_env(self, state_dir: Path) -> dict[str, str]:
        env = dict(self.env)
        env["IDLEGRID_AGENT_HOME"] = str(state_dir)
        # A demo computes unconditionally: nobody's keyboard or the other agents' load is a reason to pause
        # here (a `run` flag of start_agent's `extra` still overrides these).
        env.update({"IDLEGRID_AGENT_IDLE_SOURCE": "none", "IDLEGRID_AGENT_OTHER_CPU_PERCENT": "100",
                    "IDLEGRID_AGENT_RUN_ON_BATTERY": "true"})
        for key in ("DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"):
            env.pop(key, None)  # the agent knows only the REST API
        for key in [k for k in env if k.startswith("IDLEGRID_CHAIN_")]:
            del env[key]  # nor the marketplace's chain settings: the operator key above all
        return env

    def enroll_agent(self, *, name: str, owner_token: str) -> Path:
        """Enrol a device for the owner (an enrolment token from the API, then `idlegrid-agent enroll`)."""
        state_dir = self.var_dir / "agents" / name
        enrollment = httpx.post(
            f"{self.url}/api/v1/enrollment-tokens/", headers={"Authorization": f"Token {owner_token}"}, timeout=30
        )
        enrollment.raise_for_status()
        done = subprocess.run(
            [sys.executable, "-m", "worker_agent", "--state-dir", str(state_dir), "enroll", "--server", self.url,
             "--token", enrollment.json()["token"], "--name", name],
            cwd=ROOT, env=self.agent_env(state_dir), capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            raise ClusterError(f"enrolling {name} failed:\n{done.stdout}\n{done.stderr}")
        return state_dir

    def start_agent(self, name: str, state_dir: Path, *extra: str, python_flags: tuple[str, ...] = ()) -> Process:
        return self.start(
            f"agent-{name}",
            [sys.executable, *python_flags, "-m", "worker_agent", "--state-dir", str(state_dir), "run", *extra],
            env=self.agent_env(state_dir),
        )

    def stop_all(self) -> None:
        """Stop everything, newest first. The Celery worker is killed (its process group, pool included): its
        shutdown, warm or cold, took 4-5 s per cluster here, most of every e2e test's teardown, and nothing
        is lost by it (tasks are safe to run twice; the database says what is left, the sweep does it)."""
        for process in reversed(self.processes):
            if process.name == "celery-worker":
                process.signal(signal.SIGKILL)
            process.stop()
