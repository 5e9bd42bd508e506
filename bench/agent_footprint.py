"""The worker agent's footprint on a contributor's machine, measured on a real agent against a live marketplace.

    .venv/bin/python bench/agent_footprint.py            # ~1.5 min: 10 s idle window, 1-second units
    .venv/bin/python bench/agent_footprint.py --quick    # ~30 s: 3 s idle window, 0.3-second units (for tests)

Starts the marketplace as the demo and the e2e tests do (demo/cluster.py: gunicorn and a Celery worker on
loopback, a SQLite database and the filesystem broker in a temporary folder), enrols one device through
the real `idlegrid-agent enroll`, then runs `idlegrid-agent run` and reads /proc:

- the agent process's resident memory while it waits for work and while a unit runs (goal <= 60 MB), and
  whether torch is mapped into it (goal: torch only in the compute child);
- its CPU while it waits for work, utime+stime of the agent process alone (goal <= 0.2% of a core);
- the overhead per unit: the time between two units' reports (lease, fetch, verify, compute in the child,
  upload, sign, report), read from the agent's control socket, against the same unit computed by hand in a bare
  torch loop (load the weights and rows from safetensors, build the model, the forward pass, save the output) in
  a fresh interpreter with the child's environment and switches (goal <= 5% for a 1-second unit); the forward
  pass alone is printed beside it;
- with the policy's flags, where this agent has them (`run --idle-source file:PATH`, `--cpu-percent`):
  the time from simulated user input (the file says "active") to the child being stopped (state T in
  /proc/CHILD/stat; goal <= 1 s), and the child's CPU share under a 50% cap while it holds a unit (goal
  45-55%). Without those flags the figures are null and the table says "not measured".

Prints a table, then, as the last line, one JSON object of the figures. Exit status 1 when the agent did
not compute the units (a figure that could not be taken is null, not a failure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from demo.cluster import Cluster, Process  # noqa: E402
from worker_agent import control  # noqa: E402

GOALS = {"idle_rss_mb": 60.0, "idle_cpu_percent": 0.2, "pause_latency_s": 1.0, "overhead_percent": 5.0}
CAP_PERCENT = 50
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20
# Compute-heavy per byte, so a 1-second unit is a few hundred KB of input: 2.1 M parameters, ~4 MFLOP a row.
MLP = {"architecture": "mlp", "config": {"in_features": 16, "hidden": [1024, 1024], "out_features": 10}}
BATCH_SIZE = 64
READY = r"compute child \d+ ready"


def log(message: str) -> None:
    print(f"[agent_footprint] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unit-seconds", type=float, default=1.0, help="compute time of one unit in the bare loop (default 1)")
    parser.add_argument("--units", type=int, default=8, help="units computed for the overhead figure (default 8)")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle window for RSS and CPU (default 30: /proc counts CPU in 10 ms ticks)")
    parser.add_argument("--quick", action="store_true", help="a check that it runs: 0.3 s units, 4 of them, a 3 s idle window")
    args = parser.parse_args(argv)
    if args.quick:
        args.unit_seconds, args.units, args.idle_seconds = 0.3, 4, 3.0
    if not 0.05 <= args.unit_seconds <= 60 or not 3 <= args.units <= 100 or not 1 <= args.idle_seconds <= 300:
        parser.error("--unit-seconds in [0.05, 60], --units in [3, 100], --idle-seconds in [1, 300]")
    return args


# --- /proc ------------------------------------------------------------------------------------------

def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (index 0 is the state, 11 utime, 12 stime)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_MB


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(proc_stat(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return found


def agent_pid(process: Process) -> int:
    """`python -m worker_agent run` is the leader of its session: the process Cluster started."""
    return process.popen.pid


def compute_child(pid: int) -> int | None:
    for child in children(pid):
        try:
            if "worker_agent.child" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                return child
        except OSError:
            continue
    return None


# --- the reference computation ---------------------------------------------------------------------

def build_model() -> Any:
    import torch

    from worker_agent.architectures import resolve

    torch.manual_seed(0)
    arch, config = resolve(MLP["architecture"], MLP["config"])
    return arch.build(config).eval()


BARE_SCRIPT = """
import json, sys, tempfile, time
import torch
from safetensors.torch import load_file, save_file
from worker_agent.architectures import resolve
from worker_agent.kinds.inference import forward
torch.set_num_threads(1)
torch._C._set_deterministic_algorithms(True)  # as the compute child computes (worker_agent/child.py)
weights, inputs, batch, repeats, model_spec = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
arch, config = resolve(model_spec["architecture"], model_spec["config"])
out = tempfile.mkdtemp() + "/y.safetensors"

def unit():
    # What the unit asks, done by hand: load the weights, build the model, load the rows, run them, save.
    model = arch.build(config)
    model.load_state_dict(load_file(weights))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = load_file(inputs)["x"]
    started = time.perf_counter()
    y = forward(model, x, batch)
    compute = time.perf_counter() - started
    save_file({"y": y.contiguous()}, out)
    return compute

unit()  # warm, as the agent's child is after its first unit
whole, forward_only, cpu = [], [], []
for _ in range(repeats):
    started, cpu_started = time.perf_counter(), time.process_time()
    forward_only.append(unit())
    whole.append(time.perf_counter() - started)
    cpu.append(time.process_time() - cpu_started)
print(json.dumps({"whole": whole, "forward": forward_only, "cpu": cpu}))
"""


def bare_in_child_env(work: Path, model: Any, x: np.ndarray, repeats: int) -> dict[str, float]:
    """The same unit computed by hand in a fresh interpreter with the compute child's environment and
    switches (one thread, deterministic algorithms, the same allocator settings): load the weights and
    rows from safetensors, build the model, the forward pass (kinds.inference.forward), save the output.
    Medians: {"whole": that, "forward": the forward pass alone}."""
    from safetensors.numpy import save_file

    from worker_agent.runner import child_env

    weights, inputs = work / "bare-weights.safetensors", work / "bare-x.safetensors"
    weights.write_bytes(weights_bytes(model))
    save_file({"x": x}, str(inputs))
    done = subprocess.run([sys.executable, "-c", BARE_SCRIPT, str(weights), str(inputs), str(BATCH_SIZE), str(repeats),
                           json.dumps(MLP)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600, check=True)
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: float(statistics.median(values)) for name, values in times.items()}


def rows_for(work: Path, model: Any, seconds: float) -> int:
    """Rows that take `seconds` in the bare loop, in the child's conditions."""
    probe = dataset(BATCH_SIZE * 16, seed=1)
    per_row = bare_in_child_env(work, model, probe, 3)["forward"] / probe.shape[0]
    return max(BATCH_SIZE, int(seconds / per_row) // BATCH_SIZE * BATCH_SIZE)


# --- the marketplace -------------------------------------------------------------------------------

class Market:
    def __init__(self, work: Path) -> None:
        self.cluster = Cluster(var_dir=work / "c", web_workers=1, env_overrides={
            "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
            "CELERY_BROKER_URL": "filesystem://",
            "IDLEGRID_KNOWN_ANSWER_RATE": "0",
            "IDLEGRID_LEASE_RETRY_AFTER": "1",
            "IDLEGRID_THROTTLE_SCALE": "1000",
            "LOG_LEVEL": "WARNING",
        })
        self.cluster.var_dir.mkdir(parents=True)
        self.http: httpx.Client | None = None

    def start(self) -> Path:
        cluster = self.cluster
        started = time.monotonic()
        cluster.migrate()
        log(f"migrated in {time.monotonic() - started:.1f} s")
        submitter = cluster.account("submitter", funds=10**26)
        owner = cluster.account("contributor")
        log(f"accounts at {time.monotonic() - started:.1f} s")
        cluster.start_services(beat=False)
        log(f"services up at {time.monotonic() - started:.1f} s")
        self.http = httpx.Client(base_url=cluster.url, headers={"Authorization": f"Token {submitter}"}, timeout=60)
        return cluster.enroll_agent(name="fp", owner_token=owner)

    def upload(self, data: bytes) -> str:
        assert self.http is not None
        response = self.http.post("/api/v1/artifacts/", content=data, headers={"Content-Type": "application/octet-stream"})
        response.raise_for_status()
        return str(response.json()["sha256"])

    def submit(self, weights: str, x: np.ndarray, rows_per_unit: int) -> int:
        from marketplace.core.tensors import array_file_bytes

        assert self.http is not None
        spec = {"model": {**MLP, "weights": weights}, "dataset": self.upload(array_file_bytes(x, name="x")),
                "rows_per_unit": rows_per_unit, "batch_size": BATCH_SIZE}
        response = self.http.post("/api/v1/jobs/", json={"kind": "inference", "spec": spec})
        if response.status_code != 201:
            raise RuntimeError(f"the job was refused: {response.text}")
        return int(response.json()["id"])

    def stop(self) -> None:
        if self.http is not None:
            self.http.close()
        self.cluster.stop_all()


def weights_bytes(model: Any) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def dataset(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


# --- the measurements ------------------------------------------------------------------------------

def start_agent(market: Market, state_dir: Path, name: str, *extra: str) -> tuple[Process, int]:
    # The default poll (5 s) when there is no work: the idle CPU figure is the contributor's default.
    process = market.cluster.start_agent(name, state_dir, "--batch", "2", *extra)
    process.wait_for_log(READY, timeout=180)
    return process, agent_pid(process)


def stop_agent(process: Process) -> None:
    process.stop(timeout=30)


def idle_figures(pid: int, seconds: float) -> dict[str, Any]:
    time.sleep(1.0)  # the first lease request and its answer
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    samples = []
    while time.monotonic() - t0 < seconds:
        samples.append(rss_mb(pid))
        time.sleep(0.5)
    cpu = cpu_seconds(pid) - cpu0
    return {"idle_rss_mb": round(max(samples), 1), "idle_cpu_percent": round(100 * cpu / (time.monotonic() - t0), 3),
            "torch_in_agent_idle": maps_torch(pid)}


def done_count(client: control.ControlClient) -> int:
    return int(client.status().get("units_done_this_run", 0))


def busy_figures(pid: int, client: control.ControlClient, units: int, timeout: float) -> dict[str, Any]:
    """While the units run: the agent's largest RSS, torch in its maps, when each unit was reported, and
    the CPU time the agent and its child spent between the first and the last report."""
    deadline = time.monotonic() + timeout
    done_at: list[float] = []
    rss, torch_mapped, child_rss = 0.0, False, 0.0
    last = 0
    child_cpu, last_child = 0.0, (None, 0.0)  # CPU of the children, summed per child (it may be replaced)
    agent_cpu_at: list[float] = []
    child_cpu_at: list[float] = []
    while len(done_at) < units and time.monotonic() < deadline:
        child = compute_child(pid)
        if child is not None:
            try:
                now_cpu = cpu_seconds(child)
                child_cpu += now_cpu - last_child[1] if last_child[0] == child else 0.0
                last_child = (child, now_cpu)
                child_rss = max(child_rss, rss_mb(child))
            except OSError:
                pass
        count = done_count(client)
        now = time.monotonic()
        for _ in range(count - last):
            done_at.append(now)
            agent_cpu_at.append(cpu_seconds(pid))
            child_cpu_at.append(child_cpu)
        last = count
        rss = max(rss, rss_mb(pid))
        torch_mapped = torch_mapped or maps_torch(pid)
        time.sleep(0.02)
    cycles = [b - a for a, b in zip(done_at, done_at[1:])]  # the first unit also fetched the weights
    spans = len(done_at) - 1
    return {"busy_rss_mb": round(rss, 1), "child_rss_mb": round(child_rss, 1), "torch_in_agent_busy": torch_mapped,
            "units_done": len(done_at), "unit_cycle_seconds": round(statistics.median(cycles), 4) if cycles else None,
            "agent_cpu_per_unit": round((agent_cpu_at[-1] - agent_cpu_at[0]) / spans, 4) if spans > 0 else None,
            "child_cpu_per_unit": round((child_cpu_at[-1] - child_cpu_at[0]) / spans, 4) if spans > 0 else None}


def run_help() -> str:
    """`idlegrid-agent run --help`: which of the policy's flags this agent has."""
    import argparse as _argparse

    from worker_agent.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, _argparse._SubParsersAction):
            return str(action.choices["run"].format_help())
    return ""


def wait_running_child(pid: int, timeout: float) -> int | None:
    """The compute child once it is computing (state R) a unit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child = compute_child(pid)
        if child is not None and proc_stat(child)[0] == "R":
            return child
        time.sleep(0.02)
    return None


def pause_latency(market: Market, state_dir: Path, work: Path, weights: str, rows: int) -> float | None:
    idle_file = work / "idle-state"
    idle_file.write_text("idle")
    # The default idle_minutes (3): the file's "idle" is hours away from any input, "active" is input now.
    # (demo/cluster.py starts agents with IDLEGRID_AGENT_IDLE_SOURCE=none and other programs ignored; the
    # flag wins over that environment.)
    process, pid = start_agent(market, state_dir, "latency", f"--idle-source=file:{idle_file}")
    try:
        market.submit(weights, dataset(rows * 4, seed=3), rows * 4)  # one long unit
        child = wait_running_child(pid, timeout=120)
        if child is None:
            return None
        time.sleep(0.3)
        idle_file.write_text("active")
        started = time.monotonic()
        while time.monotonic() - started < 10:
            if proc_stat(child)[0] == "T":
                return round(time.monotonic() - started, 3)
            time.sleep(0.005)
        return None
    finally:
        stop_agent(process)


def capped_share(market: Market, state_dir: Path, weights: str, rows: int, seconds: float) -> float | None:
    """The child's CPU share under the cap, over `seconds` inside one unit (the same unit in the child at
    both ends of the window, as the control socket says): the gaps between units (lease, fetch, report, or
    resuming a unit an earlier phase left) are no part of the cap. Up to four tries."""
    process, pid = start_agent(market, state_dir, "capped", f"--cpu-percent={CAP_PERCENT}")
    client = control.ControlClient(control.socket_path(state_dir))
    try:
        market.submit(weights, dataset(rows * 8, seed=4), rows * 8)
        for _ in range(4):
            child = wait_running_child(pid, timeout=120)
            unit = (client.status().get("unit") or {}).get("result_id")
            if child is None or unit is None:
                return None
            try:
                cpu0, t0 = cpu_seconds(child), time.monotonic()
                time.sleep(seconds)
                cpu1, t1 = cpu_seconds(child), time.monotonic()
            except OSError:
                continue  # the child was replaced meanwhile
            if (client.status().get("unit") or {}).get("result_id") == unit and compute_child(pid) == child:
                return round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
            wait_for_next_unit(client, unit, timeout=120)
        return None
    finally:
        stop_agent(process)


def wait_for_next_unit(client: control.ControlClient, unit: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (client.status().get("unit") or {}).get("result_id") in (unit, None):
        time.sleep(0.05)


_HELP = ""


def bench(args: argparse.Namespace) -> dict[str, Any]:
    global _HELP
    _HELP = run_help()
    model = build_model()
    with tempfile.TemporaryDirectory(prefix="igfp-", dir="/tmp") as name:  # short: the control socket's path
        work = Path(name)
        rows = rows_for(work, model, args.unit_seconds)
        figures: dict[str, Any] = {"quick": args.quick, "rows_per_unit": rows}
        market = Market(work)
        try:
            state_dir = market.start()
            weights = market.upload(weights_bytes(model))
            process, pid = start_agent(market, state_dir, "plain")
            try:
                figures.update(idle_figures(pid, args.idle_seconds))
                log(f"idle: {figures['idle_rss_mb']} MB, {figures['idle_cpu_percent']}% of a core")
                market.submit(weights, dataset(rows * args.units, seed=5), rows)
                client = control.ControlClient(control.socket_path(state_dir))
                figures.update(busy_figures(pid, client, args.units, timeout=120 + 20 * args.units * args.unit_seconds))
            finally:
                stop_agent(process)
            assert process.log_path is not None
            in_child = [float(m) for m in re.findall(r"done in ([0-9.]+)s, reported", process.log_path.read_text())]
            figures["child_unit_seconds"] = round(statistics.median(in_child), 4) if in_child else None
            # Right after the agent's units, on the machine as loaded as it was for them; the median, as the cycle.
            bare_times = bare_in_child_env(work, model, dataset(rows, seed=5), 5)
            bare, forward_only = bare_times["whole"], bare_times["forward"]
            figures["bare_unit_seconds"] = round(bare, 4)
            figures["bare_forward_seconds"] = round(forward_only, 4)
            log(f"{rows} rows a unit: {bare:.3f} s in the bare loop ({forward_only:.3f} s of it the forward pass), "
                f"{figures['unit_cycle_seconds']} s a unit in the agent")
            cycle = figures["unit_cycle_seconds"]
            figures["overhead_percent"] = round(100 * (cycle / bare - 1), 1) if cycle else None
            figures["overhead_vs_forward_percent"] = round(100 * (cycle / forward_only - 1), 1) if cycle else None
            # In CPU time: what the agent and its child spend per unit against the bare unit's CPU. The wall
            # clock above also counts the marketplace (gunicorn, Celery) computing beside them on these cores.
            figures["bare_unit_cpu_seconds"] = round(bare_times["cpu"], 4)
            spent = (figures["agent_cpu_per_unit"] or 0) + (figures["child_cpu_per_unit"] or 0)
            figures["overhead_cpu_percent"] = (round(100 * (spent / bare_times["cpu"] - 1), 1)
                                               if figures["child_cpu_per_unit"] else None)
            policy = "--idle-source" in _HELP and "--cpu-percent" in _HELP
            figures["policy_flags"] = policy
            figures["pause_latency_s"] = pause_latency(market, state_dir, work, weights, rows) if policy else None
            figures["cap_percent"] = CAP_PERCENT
            figures["capped_cpu_percent"] = capped_share(market, state_dir, weights, rows, 2.0 if args.quick else 6.0) if policy else None
        finally:
            market.stop()
    return figures


def verdict(value: float | None, goal: float, *, lower: float | None = None) -> str:
    if value is None:
        return "not measured"
    if lower is not None:
        return "ok" if lower <= value <= goal else "MISSED"
    return "ok" if value <= goal else "MISSED"


def render(f: dict[str, Any]) -> str:
    no_policy = "" if f["policy_flags"] else " (this agent has no --idle-source/--cpu-percent)"
    rows = [
        ["figure", "value", "goal", ""],
        ["agent RSS, idle", f"{f['idle_rss_mb']} MB", "<= 60 MB", verdict(f["idle_rss_mb"], GOALS["idle_rss_mb"])],
        ["agent RSS, unit running", f"{f['busy_rss_mb']} MB", "", f"child {f['child_rss_mb']} MB"],
        ["torch in the agent process", f"idle {f['torch_in_agent_idle']}, busy {f['torch_in_agent_busy']}", "no",
         "ok" if not (f["torch_in_agent_idle"] or f["torch_in_agent_busy"]) else "MISSED"],
        ["agent CPU, idle", f"{f['idle_cpu_percent']}% of a core", "<= 0.2%", verdict(f["idle_cpu_percent"], GOALS["idle_cpu_percent"])],
        ["unit: bare torch loop / agent cycle", f"{f['bare_unit_seconds']} s / {f['unit_cycle_seconds']} s", "",
         f"{f['rows_per_unit']} rows; load, build, forward, save"],
        ["  of which the forward pass (bare)", f"{f['bare_forward_seconds']} s", "",
         f"agent cycle against it: +{f['overhead_vs_forward_percent']}%"],
        ["  of which in the child (load, compute, save)", f"{f['child_unit_seconds']} s", "", "median, from the agent's log"],
        ["overhead per unit (wall clock)", f"{f['overhead_percent']}%", "<= 5%", verdict(f["overhead_percent"], GOALS["overhead_percent"])],
        ["overhead per unit (CPU time)", f"{f['overhead_cpu_percent']}%", "<= 5%",
         verdict(f["overhead_cpu_percent"], GOALS["overhead_percent"])
         + f"; agent {f['agent_cpu_per_unit']} s + child {f['child_cpu_per_unit']} s vs bare {f['bare_unit_cpu_seconds']} s"],
        ["input -> child stopped", f"{f['pause_latency_s']} s", "<= 1 s", verdict(f["pause_latency_s"], GOALS["pause_latency_s"]) + no_policy],
        [f"CPU share under a {f['cap_percent']}% cap", f"{f['capped_cpu_percent']}%", "45-55%",
         verdict(f["capped_cpu_percent"], 55.0, lower=45.0) + no_policy],
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks: every process is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    figures = bench(args)
    print(render(figures))
    print(json.dumps(figures, sort_keys=True))
    return 0 if figures["units_done"] >= args.units else 1


if __name__ == "__main__":
    sys.exit(main())
