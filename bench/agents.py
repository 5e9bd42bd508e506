"""Simulated agents for the dispatch bench: lease, then report, signed; no compute. `reports="single"`
reports each unit on its own, naming the output every bench device holds already (uploaded once, at setup);
`reports="batched"` reports a lease's units in one POST /agent/reports, each with its own output inline:
a variant of the setup's output (one float changed, so every unit's bytes and hash differ and the server
stores each as a real agent's output would be stored).

Deliberately free of Django: this is the load generator, and it shares the machine with the server.
Runs the agents as threads of this process or as one process each (`load`), with the same loop.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import math
import multiprocessing
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker_agent import signing

LOADS = ("threads", "processes")
REPORTS = ("single", "batched")
CLIENTS = ("httpx", "stdlib")
TIMEOUT = 30.0
TRANSPORT_ERRORS = (httpx.HTTPError, OSError, http.client.HTTPException)
# Failures in a row before an agent gives up: a broken server must not turn the bench into a spin.
MAX_CONSECUTIVE_FAILURES = 20


@dataclass
class AgentRun:
    reported: int = 0
    empty_leases: int = 0
    lease_s: list[float] = field(default_factory=list)
    report_s: list[float] = field(default_factory=list)
    reported_at: list[float] = field(default_factory=list)  # time.monotonic() of each accepted report
    errors: dict[str, int] = field(default_factory=dict)
    ended_at: float = 0.0  # time.monotonic(), comparable across processes on Linux
    cpu_s: float = 0.0  # this process's CPU time; meaningful only for one agent per process


@dataclass(frozen=True)
class Plan:
    base_url: str
    batch: int
    deadline: float  # time.monotonic()
    output_sha256: str
    client: str = "httpx"
    reports: str = "single"  # REPORTS
    output_b64: str = ""  # the output's bytes, base64: what batched reports vary and send inline


class Budget:
    """Units left to lease, shared by all agents (threads or processes), so the total is exact."""

    def __init__(self, ctx: Any, units: int) -> None:
        self._left = ctx.Value("q", units)
        self._stopped = ctx.Value("b", False)

    def take(self, wanted: int) -> int:
        with self._left.get_lock():
            granted = 0 if self._stopped.value else min(wanted, self._left.value)
            self._left.value -= granted
            return granted

    def stop(self) -> None:
        """Every agent stops after its current lease (the bench is ending, perhaps on a signal)."""
        self._stopped.value = True

    def give_back(self, count: int) -> None:
        if count:
            with self._left.get_lock():
                self._left.value += count


class HttpxClient:
    """What the real agent uses. Costly on the client side: ~1.1-1.4 ms of CPU per request here."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self._client = httpx.Client(base_url=base_url, headers=headers, timeout=TIMEOUT)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        response = self._client.post(path, json=body)
        return response.status_code, response.content

    def close(self) -> None:
        self._client.close()


class StdlibClient:
    """http.client, a connection per request (gunicorn's sync workers close each one anyway): about a
    quarter of httpx's CPU per request, so the load generator takes less of the server's cores."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._headers = {**headers, "Content-Type": "application/json"}

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=TIMEOUT)
        try:
            conn.request("POST", path, json.dumps(body), self._headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def close(self) -> None:
        pass


def _error(run: AgentRun, what: str, status: int, content: bytes) -> None:
    try:
        code = json.loads(content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "?"
    key = f"{what}:{status}:{code}"
    run.errors[key] = run.errors.get(key, 0) + 1


def _report(client: Any, key: Ed25519PrivateKey, device_id: int, lease: dict, plan: Plan, run: AgentRun) -> bool:
    signature = signing.sign_result(
        key, result_id=lease["result_id"], unit_id=lease["unit_id"], device_id=device_id,
        output_sha256=plan.output_sha256,
    )
    body = {"output_sha256": plan.output_sha256, "signature": signature, "elapsed_seconds": 0.01, "metrics": {}}
    started = time.perf_counter()
    status, content = client.post(f"/api/v1/agent/results/{lease['result_id']}/report", body)
    run.report_s.append(time.perf_counter() - started)
    if status != 200:
        _error(run, "report", status, content)
        return False
    run.reported += 1
    run.reported_at.append(time.monotonic())
    return True


def _variant(output: bytes, seed: int) -> bytes:
    """The output with its first float32 set from `seed`: same shape and header, other bytes and hash."""
    header_length = struct.unpack_from("<Q", output)[0]
    start = 8 + header_length
    return output[:start] + struct.pack("<f", float(seed % 1_000_003) / 7.0) + output[start + 4:]


def _report_batch(client: Any, key: Ed25519PrivateKey, device_id: int, leases: list[dict], plan: Plan,
                  run: AgentRun) -> None:
    output = base64.b64decode(plan.output_b64)
    items = []
    for lease in leases:
        data = _variant(output, lease["result_id"])
        sha = hashlib.sha256(data).hexdigest()
        signature = signing.sign_result(key, result_id=lease["result_id"], unit_id=lease["unit_id"],
                                        device_id=device_id, output_sha256=sha)
        items.append({"result_id": lease["result_id"], "output_sha256": sha, "signature": signature,
                      "elapsed_seconds": 0.01, "metrics": {}, "output": base64.b64encode(data).decode()})
    started = time.perf_counter()
    status, content = client.post("/api/v1/agent/reports", {"reports": items})
    run.report_s.append(time.perf_counter() - started)
    if status != 200:
        _error(run, "reports", status, content)
        return
    now = time.monotonic()
    for outcome in json.loads(content)["results"]:
        if "error" in outcome:
            key_name = f"report:200:{outcome['error'].get('code', '?')}"
            run.errors[key_name] = run.errors.get(key_name, 0) + 1
        else:
            run.reported += 1
            run.reported_at.append(now)


def _cycle(client: Any, key: Ed25519PrivateKey, device_id: int, plan: Plan, budget: Budget, run: AgentRun) -> bool:
    """One lease and its reports. False when this agent should stop."""
    wanted = budget.take(plan.batch)
    if not wanted:
        return False
    started = time.perf_counter()
    status, content = client.post("/api/v1/agent/lease", {"max_units": wanted})
    run.lease_s.append(time.perf_counter() - started)
    if status != 200:
        budget.give_back(wanted)
        _error(run, "lease", status, content)
        return True
    leases = json.loads(content)["leases"]
    budget.give_back(wanted - len(leases))
    if not leases:
        # Nothing this owner may take (the other replicas of what is left are another owner's): done.
        run.empty_leases += 1
        return False
    if plan.reports == "batched":
        _report_batch(client, key, device_id, leases, plan, run)
        return True
    for lease in leases:
        _report(client, key, device_id, lease, plan, run)
    return True


def agent_loop(device: dict[str, Any], plan: Plan, budget: Budget, start: Any) -> AgentRun:
    run = AgentRun()
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(device["seed"]))
    headers = {"Authorization": f"Device {device['device_id']}:{device['secret']}"}
    # A device may name its own node (dispatch --nodes): else the plan's server.
    client = (HttpxClient if plan.client == "httpx" else StdlibClient)(device.get("base_url", plan.base_url), headers)
    try:
        start.wait()
        cpu = time.process_time()
        failures = 0
        while time.monotonic() < plan.deadline and failures < MAX_CONSECUTIVE_FAILURES:
            errors_before = sum(run.errors.values())
            try:
                if not _cycle(client, key, device["device_id"], plan, budget, run):
                    break
            except TRANSPORT_ERRORS as exc:
                name = f"transport:{type(exc).__name__}"
                run.errors[name] = run.errors.get(name, 0) + 1
            failures = failures + 1 if sum(run.errors.values()) > errors_before else 0
        run.ended_at = time.monotonic()
        run.cpu_s = time.process_time() - cpu
    finally:
        client.close()
    return run


def _process_main(device: dict[str, Any], plan: Plan, budget: Budget, start: Any, results: Any) -> None:
    results.put(agent_loop(device, plan, budget, start))


@dataclass
class LoadResult:
    runs: list[AgentRun]
    began: float  # time.monotonic() when the agents were released
    wall_s: float
    load_cpu_s: float

    def rate_by_window(self, seconds: float) -> list[float]:
        """Reports accepted per second in consecutive windows: a falling series means the server slows
        down as rows pile up (dead tuples, bloated indexes), which a single average hides."""
        windows = max(1, math.ceil(self.wall_s / seconds))
        counts = [0] * windows
        for run in self.runs:
            for at in run.reported_at:
                counts[min(windows - 1, int((at - self.began) / seconds))] += 1
        # The last window is usually short: divide by its own length.
        lengths = [min(seconds, self.wall_s - i * seconds) for i in range(windows)]
        return [round(count / length, 1) if length > 0 else 0.0 for count, length in zip(counts, lengths)]


def run_agents(*, load: str, devices: list[dict[str, Any]], plan_args: dict[str, Any], units: int, seconds: float) -> LoadResult:
    """Start one simulated agent per device, release them together, wait for all; bounded by units and time."""
    if load not in LOADS:
        raise ValueError(f"load must be one of {LOADS}")
    # fork: the parent imports no Django and holds no open connection at this point.
    ctx = multiprocessing.get_context("fork")
    budget = Budget(ctx, units)
    start = ctx.Event()
    ready_margin = 2.0 if load == "processes" else 0.2  # the deadline is fixed now; agents start at `start`
    plan = Plan(deadline=time.monotonic() + ready_margin + seconds, **plan_args)
    if load == "threads":
        return _run_threads(devices, plan, budget, start, ready_margin)
    return _run_processes(ctx, devices, plan, budget, start, ready_margin)


def _release(start: Any, ready_margin: float) -> float:
    time.sleep(ready_margin)
    began = time.monotonic()
    start.set()
    return began


def _run_threads(devices: list[dict[str, Any]], plan: Plan, budget: Budget, start: Any, ready_margin: float) -> LoadResult:
    runs: list[AgentRun] = []
    lock = threading.Lock()

    def target(device: dict[str, Any]) -> None:
        run = agent_loop(device, plan, budget, start)
        with lock:
            runs.append(run)

    threads = [threading.Thread(target=target, args=(d,), daemon=True) for d in devices]
    for thread in threads:
        thread.start()
    began = _release(start, ready_margin)
    cpu = time.process_time()
    try:
        for thread in threads:
            thread.join(timeout=max(1.0, plan.deadline - time.monotonic() + 60))
    finally:
        budget.stop()
    load_cpu = time.process_time() - cpu
    return LoadResult(runs, began, max((r.ended_at for r in runs), default=began) - began, load_cpu)


def _run_processes(ctx: Any, devices: list[dict[str, Any]], plan: Plan, budget: Budget, start: Any,
                   ready_margin: float) -> LoadResult:
    results = ctx.Queue()
    procs = [ctx.Process(target=_process_main, args=(d, plan, budget, start, results), daemon=True) for d in devices]
    for proc in procs:
        proc.start()
    began = _release(start, ready_margin)
    runs: list[AgentRun] = []
    try:
        for _ in procs:
            runs.append(results.get(timeout=max(1.0, plan.deadline - time.monotonic() + 60)))
    except queue.Empty:
        pass
    finally:
        budget.stop()
        grace = time.monotonic() + 10
        for proc in procs:
            proc.join(timeout=max(0.1, grace - time.monotonic()))
            if proc.is_alive():
                proc.kill()
    return LoadResult(runs, began, max((r.ended_at for r in runs), default=began) - began, sum(r.cpu_s for r in runs))


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_ms(samples: list[float]) -> dict[str, Any]:
    values = sorted(samples)
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {
        "n": len(values),
        "p50_ms": round(1000 * percentile(values, 50), 2),
        "p99_ms": round(1000 * percentile(values, 99), 2),
        "mean_ms": round(1000 * sum(values) / len(values), 2),
    }
