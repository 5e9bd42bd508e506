"""Validation, split and merge at speed: the server's work between the reports and the submitter's output.

    .venv/bin/python bench/pipeline.py --database-url postgres://postgres@127.0.0.1:5432/postgres \\
        --broker-url redis://127.0.0.1:6379/8          # 100,000-unit split, 4,000 units validated
    .venv/bin/python bench/pipeline.py --quick          # SQLite and the filesystem broker, tiny (the test runs it)

Three stages, on a fresh database (a new PostgreSQL database on --database-url's server, dropped at the
end; without it a SQLite file in a temporary folder) and a fresh artifact folder:

- **split**: a real inference job of --split-units one-row units submitted through `job_submit`, split by
  the `jobs.split` task's body in process. Figures: seconds, units/s, and the longest transaction the split
  held open (each outermost transaction timed from the moment it turned autocommit off to its commit: the
  longest time its row locks, the job's among them, were held).
- **validate**: --validate-units units of a second job leased and reported through the real services
  (`workunit_lease`, `artifact_store`, `result_report`) by honest devices of four hardware classes (class
  0 exact, the others ~1e-7 off, so replicas of different classes are compared by tolerance and tensors
  are read), a third of them trusted (their units accepted alone or audited) and one always-wrong device;
  Celery is held back meanwhile, so every unit waits with need_validate as reports leave it. Then half
  the waiting units are validated in process by the body of the `workunits.validate_waiting` message
  (limited to that half; seconds, SQL statements per unit), and the other half by **one real Celery
  worker process** (`celery worker --pool solo`, the broker --broker-url), sent for as each unit's report
  asks (one coalesced message while none is queued, `core.tasks.enqueue_coalesced_on_commit`): units/s
  from the first message sent to the queue drained and no unit waiting, and the messages it took.
- **merge**: the split job's units all decided (their replicas made valid in two UPDATEs, one shared
  output file), then merged by the `jobs.merge` task's body: seconds and the peak of Python memory
  (tracemalloc) while it ran.

A table, then, as the last line, one JSON object of all figures. Exit status 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.sabotage_devices import Behaviour, mlp_forward  # noqa: E402
from bench.sabotage_devices import Device as Compute  # noqa: E402
from demo.cluster import Process  # noqa: E402

MLP = {"in_features": 4, "hidden": [8], "out_features": 4}
HARDWARE_CLASSES = 4
QUICK = {"split_units": 2000, "validate_units": 200, "devices": 9}
DEFAULTS = {"split_units": 100_000, "validate_units": 4000, "devices": 12}
WORKER_TIMEOUT = 600.0


def log(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="a PostgreSQL server to create the bench database on (default: SQLite)")
    parser.add_argument("--broker-url", help="the Celery broker of the worker stage (default: filesystem:// in the temporary folder)")
    parser.add_argument("--split-units", type=int, help=f"units of the split stage (default {DEFAULTS['split_units']:,})")
    parser.add_argument("--validate-units", type=int, help=f"units of the validation stage (default {DEFAULTS['validate_units']:,})")
    parser.add_argument("--devices", type=int, help=f"devices reporting in the validation stage (default {DEFAULTS['devices']})")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", type=Path, help="write a cProfile of each timed stage into this folder")
    parser.add_argument("--no-worker", action="store_true", help="validate everything in process (no Celery worker)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny: a {QUICK['split_units']:,}-unit split, {QUICK['validate_units']} units validated")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULTS
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 1 <= args.split_units <= 100_000 or not 2 <= args.validate_units <= 100_000 or not 4 <= args.devices <= 1000:
        parser.error("--split-units 1..100,000, --validate-units 2..100,000, --devices 4..1,000")
    return args


# --- the environment ------------------------------------------------------------------------------

@contextmanager
def database(args: argparse.Namespace, work: Path) -> Iterator[str]:
    """A fresh database's URL; a PostgreSQL one is dropped at the end."""
    if not args.database_url:
        yield f"sqlite:///{work / 'bench.sqlite3'}"
        return
    import psycopg

    parts = urlsplit(args.database_url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise SystemExit(f"--database-url must be postgres://...; got {parts.scheme!r}")
    maintenance = urlunsplit(parts if parts.path.strip("/") else parts._replace(path="/postgres"))
    name = f"idlegrid_pipeline_{os.getpid()}"
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def environment(database_url: str, broker_url: str, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDLEGRID_", "CELERY_", "DATABASE_URL", "DJANGO_"))}
    env.update({
        "DJANGO_SETTINGS_MODULE": "marketplace.settings", "DATABASE_URL": database_url, "CELERY_BROKER_URL": broker_url,
        "IDLEGRID_VAR_DIR": str(work / "var"), "IDLEGRID_ARTIFACT_DIR": str(work / "var" / "artifacts"),
        "IDLEGRID_SIGNING_KEY_DIR": str(work / "var" / "keys"), "IDLEGRID_ENROLLMENTS_PER_HOUR": "1000000",
        "IDLEGRID_THROTTLE_SCALE": "1000", "DEBUG": "false", "LOG_LEVEL": "ERROR",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })
    return env


@contextmanager
def profiled(args: argparse.Namespace, stage: str) -> Iterator[None]:
    """cProfile the block into --profile/<stage>.prof when asked (the figures are then slower)."""
    if args.profile is None:
        yield
        return
    import cProfile

    args.profile.mkdir(parents=True, exist_ok=True)
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(str(args.profile / f"{stage}.prof"))


class Meter:
    """SQL statements, and the longest outermost transaction, while it is on."""

    def __init__(self) -> None:
        from django.db import connection

        self.queries = 0
        self.longest = 0.0
        self.transactions = 0
        self._opened: float | None = None
        self._set_autocommit = connection.set_autocommit
        self._wrapper = connection.execute_wrapper(self._count)  # kept: a collected generator would unwrap
        self._wrapper.__enter__()

        def set_autocommit(autocommit: bool, *a: Any, **k: Any) -> None:
            if not autocommit:
                self._opened = time.perf_counter()
            elif self._opened is not None:
                self.longest = max(self.longest, time.perf_counter() - self._opened)
                self.transactions += 1
                self._opened = None
            self._set_autocommit(autocommit, *a, **k)

        connection.set_autocommit = set_autocommit

    def _count(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        self.queries += 1
        return execute(sql, params, many, context)

    def reset(self) -> None:
        self.queries, self.longest, self.transactions = 0, 0.0, 0


class HeldTasks:
    """Celery held back while the bench sets up: what would be sent is counted, nothing is sent."""

    def __init__(self) -> None:
        from celery.app.task import Task

        self.original = Task.apply_async
        self.held = 0

    def __enter__(self) -> HeldTasks:
        from celery.app.task import Task

        def hold(task: Any, *args: Any, **kwargs: Any) -> None:
            self.held += 1

        Task.apply_async = hold  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        from celery.app.task import Task

        Task.apply_async = self.original  # type: ignore[method-assign]


# --- the stages ------------------------------------------------------------------------------------

class Submitter:
    def __init__(self, seed: int) -> None:
        from django.contrib.auth import get_user_model
        from safetensors.numpy import save

        from marketplace.ledger.grants import balance_grant
        from worker_agent.architectures import resolve

        self.rng = np.random.default_rng(seed)
        self.owner = get_user_model().objects.create_user("submitter")
        balance_grant(user=self.owner, amount=10**30, actor="bench", reason="pipeline bench funds",
                      idempotency_key="bench-pipeline-submitter")
        arch, self.config = resolve("mlp", MLP)
        self.weights = {name: (self.rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
                        for name, shape in arch.param_shapes(self.config).items()}
        self.weights_sha = self.store(save(self.weights))

    def store(self, data: bytes) -> str:
        from marketplace.artifacts.services import artifact_store

        return artifact_store(chunks=[data], uploaded_by=self.owner)[0].sha256

    def submit(self, units: int) -> Any:
        from marketplace.core.tensors import array_file_bytes
        from marketplace.jobs.services import job_submit

        x = self.rng.standard_normal((units, MLP["in_features"])).astype(np.float32)
        spec = {"model": {"architecture": "mlp", "config": self.config, "weights": self.weights_sha},
                "dataset": self.store(array_file_bytes(x, name="x")), "rows_per_unit": 1, "batch_size": 1}
        return job_submit(owner=self.owner, kind="inference", spec=spec)


def stage_split(args: argparse.Namespace, submitter: Submitter, meter: Meter) -> tuple[dict[str, Any], int]:
    from marketplace.jobs.models import Job
    from marketplace.jobs.tasks import job_split_task

    with HeldTasks():
        job = submitter.submit(args.split_units)
    log(f"split: {args.split_units:,} units")
    meter.reset()
    started = time.perf_counter()
    with profiled(args, "split"):
        job_split_task(job.pk)
    seconds = time.perf_counter() - started
    job.refresh_from_db()
    if job.state != Job.State.RUNNING or job.units_total != args.split_units:
        raise RuntimeError(f"the split left job {job.pk} {job.state} with {job.units_total} units")
    return {"units": job.units_total, "seconds": round(seconds, 2), "units_per_second": round(job.units_total / seconds),
            "longest_transaction_seconds": round(meter.longest, 3), "transactions": meter.transactions,
            "queries_per_unit": round(meter.queries / job.units_total, 2)}, job.pk


class Population:
    """Honest devices of four hardware classes, a third of them trusted for inference, and one device
    that is always wrong; each its own owner."""

    def __init__(self, devices: int, seed: int) -> None:
        from django.utils import timezone

        from marketplace.workers.models import DeviceTrust

        rng = np.random.default_rng(seed)
        self.devices: list[tuple[Any, Any, Compute]] = []
        for index in range(devices):
            behaviour = Behaviour("always_wrong" if index == devices - 1 else "honest")
            hardware_class = index % HARDWARE_CLASSES
            device, key = enrol(f"{behaviour.kind}-{index}", hardware_class)
            if index % 3 == 0 and behaviour.honest:
                DeviceTrust.objects.create(device=device, kind="inference", hardware_class=device.hardware_class,
                                           consecutive_valid=1000, trusted_since=timezone.now())
            self.devices.append((device, key, Compute(behaviour, hardware_class=hardware_class,
                                                      seed=int(rng.integers(2**63)))))
        self.rng = rng


def enrol(name: str, hardware_class: int) -> tuple[Any, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from django.contrib.auth import get_user_model

    from bench.sabotage_run import hardware_facts
    from marketplace.workers.services import device_enroll, enrollment_token_create
    from worker_agent.protocol import b64encode, enroll_message

    owner = get_user_model().objects.create_user(f"contributor-{name}")
    token, _ = enrollment_token_create(owner=owner)
    key = Ed25519PrivateKey.generate()
    public = b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    device, _secret = device_enroll(token=token, name=name, public_key_b64=public, hardware=hardware_facts(hardware_class),
                                    proof_b64=b64encode(key.sign(enroll_message(token=token, public_key_b64=public))))
    return device, key


def report_everything(population: Population, submitter: Submitter, job_id: int) -> int:
    """Devices lease and report in turns until no replica is left unsent. Returns the reports made."""
    from marketplace.artifacts.services import artifact_store
    from marketplace.artifacts.storage import get_storage
    from marketplace.core.tensors import array_file_bytes, read_array, read_header
    from marketplace.workers.models import Device as DeviceRow
    from marketplace.workunits.leasing import workunit_lease
    from marketplace.workunits.models import Result
    from marketplace.workunits.results import result_report
    from worker_agent.protocol import b64encode, result_message

    truth: dict[str, np.ndarray] = {}
    reports, idle = 0, 0
    while Result.objects.filter(job_id=job_id, state=Result.State.UNSENT).exists() and idle < 3:
        leased = 0
        for index in population.rng.permutation(len(population.devices)):
            device, key, compute = population.devices[index]
            device = DeviceRow.objects.get(pk=device.pk)
            if device.state == DeviceRow.State.BANNED:
                continue
            for lease in workunit_lease(device=device, max_units=4):
                sha = lease.payload["inputs"]["x"]
                if sha not in truth:
                    with get_storage().local_path(sha) as path:
                        truth[sha] = mlp_forward(submitter.weights, read_array(path, read_header(path)["x"]))
                y, _ = compute.compute(truth[sha], sha)
                output = artifact_store(chunks=[array_file_bytes(y, name="y")], device=device)[0].sha256
                message = result_message(result_id=lease.result_id, unit_id=lease.unit_id, device_id=device.pk,
                                         output_sha256=output)
                result_report(device=device, result_id=lease.result_id, output_sha256=output,
                              signature_b64=b64encode(key.sign(message)))
                reports += 1
                leased += 1
        idle = idle + 1 if leased == 0 else 0
    return reports


def stage_validate(args: argparse.Namespace, submitter: Submitter, meter: Meter, env: dict[str, str],
                   work: Path) -> dict[str, Any]:
    from marketplace.jobs.tasks import job_split_task
    from marketplace.workunits.models import Result, WorkUnit
    from marketplace.workunits.tasks import units_validate_waiting_task

    with HeldTasks() as held:
        job = submitter.submit(args.validate_units)
        job_split_task(job.pk)
        population = Population(args.devices, args.seed)
        started = time.perf_counter()
        reports = report_everything(population, submitter, job.pk)
    log(f"validate: {reports} reports in {time.perf_counter() - started:.0f} s, {held.held} messages held back")
    waiting = list(WorkUnit.objects.filter(need_validate=True).order_by("pk").values_list("pk", flat=True))
    figures: dict[str, Any] = {"units": args.validate_units, "reports": reports, "units_waiting": len(waiting)}
    half = waiting if args.no_worker else waiting[: len(waiting) // 2]
    meter.reset()
    started = time.perf_counter()
    with profiled(args, "validate"), HeldTasks():  # its message for what it leaves waiting is not sent
        units_validate_waiting_task(limit=len(half))  # the message's body, as a worker runs it
    seconds = time.perf_counter() - started
    figures["in_process"] = {"units": len(half), "seconds": round(seconds, 3),
                             "units_per_second": round(len(half) / seconds) if seconds else None,
                             "queries_per_unit": round(meter.queries / max(1, len(half)), 2)}
    if not args.no_worker:
        figures["worker"] = worker_rate(waiting[len(half):], env, work)
    states = dict(Result.objects.filter(job_id=job.pk).values_list("state").annotate(n=_count()).values_list("state", "n"))
    units = dict(WorkUnit.objects.filter(job_id=job.pk, known_answer_of__isnull=True).values_list("state")
                 .annotate(n=_count()).values_list("state", "n"))
    figures.update(result_states=states, unit_states=units,
                   still_waiting=WorkUnit.objects.filter(need_validate=True).count())
    return figures


def _count() -> Any:
    from django.db.models import Count

    return Count("pk")


def worker_rate(unit_ids: list[int], env: dict[str, str], work: Path) -> dict[str, Any]:
    """One real Celery worker process validates `unit_ids`, sent for as each unit's report asks: one
    coalesced message while none is queued (results.units_mark_due)."""
    from marketplace.core.tasks import coalesced_started, enqueue_coalesced_on_commit
    from marketplace.workunits.models import WorkUnit
    from marketplace.workunits.tasks import VALIDATE_WAITING

    worker = Process.spawn("worker", [sys.executable, "-m", "celery", "-A", "marketplace", "worker", "--pool", "solo",
                                      "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
                                      "-n", f"pipeline-{os.getpid()}@%h"], env=env, log_dir=work / "logs")
    try:
        worker.wait_for_log(r"ready\.", timeout=120)
        coalesced_started(VALIDATE_WAITING)  # the messages held back during the reports left the gate shut
        started = time.perf_counter()
        for _ in unit_ids:
            enqueue_coalesced_on_commit(VALIDATE_WAITING)  # autocommit: sent now, or held back by the gate
        sent = time.perf_counter() - started
        deadline = time.monotonic() + WORKER_TIMEOUT
        while not finished(worker, 1) or WorkUnit.objects.filter(pk__in=unit_ids, need_validate=True).exists():
            if time.monotonic() > deadline or not worker.alive():
                raise RuntimeError(f"the worker did not validate {len(unit_ids)} units:\n{worker.log_tail()}")
            time.sleep(0.05)
        seconds = time.perf_counter() - started
    finally:
        worker.stop()
    return {"units": len(unit_ids), "seconds": round(seconds, 3), "send_seconds": round(sent, 3),
            "messages": ended(worker), "units_per_second": round(len(unit_ids) / seconds) if seconds else None,
            "pool": "solo (one process)"}


def ended(worker: Process) -> int:
    """Messages the worker has finished: at INFO it logs one line per task that ends."""
    assert worker.log_path is not None
    text = worker.log_path.read_text(errors="replace")
    return text.count("] succeeded in") + text.count("] raised")


def finished(worker: Process, sent: int) -> bool:
    return ended(worker) >= sent


def stage_merge(job_id: int, submitter: Submitter) -> dict[str, Any]:
    from django.db.models import Min, OuterRef, Subquery

    from marketplace.artifacts.services import artifact_store
    from marketplace.core.tensors import array_file_bytes
    from marketplace.jobs.models import Job
    from marketplace.jobs.tasks import job_merge_task
    from marketplace.workunits.models import Result, WorkUnit

    y = np.arange(MLP["out_features"], dtype=np.float32).reshape(1, -1)
    output = artifact_store(chunks=[array_file_bytes(y, name="y")])[0].sha256
    Result.objects.filter(job_id=job_id).update(state=Result.State.VALID, output_id=output)
    first = Result.objects.filter(unit_id=OuterRef("pk")).values("unit_id").annotate(first=Min("pk")).values("first")
    WorkUnit.objects.filter(job_id=job_id).update(state=WorkUnit.State.DONE, canonical_result_id=Subquery(first))
    Job.objects.filter(pk=job_id).update(state=Job.State.MERGING)
    tracemalloc.start()
    started = time.perf_counter()
    job_merge_task(job_id)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    job = Job.objects.get(pk=job_id)
    if job.state != Job.State.COMPLETED:
        raise RuntimeError(f"the merge left job {job_id} {job.state}")
    return {"units": job.units_total, "seconds": round(seconds, 2), "peak_python_mb": round(peak / 2**20, 2),
            "output_bytes": job.output.size}


# --- the run ---------------------------------------------------------------------------------------

def table(figures: dict[str, Any]) -> str:
    split, validate, merge = figures["split"], figures["validate"], figures["merge"]
    rows = [
        ("split", f"{split['units']:,} units", f"{split['seconds']} s", f"{split['units_per_second']:,} units/s",
         f"longest transaction {split['longest_transaction_seconds']} s"),
        ("validate, in process", f"{validate['in_process']['units']:,} units", f"{validate['in_process']['seconds']} s",
         f"{validate['in_process']['units_per_second']} units/s",
         f"{validate['in_process']['queries_per_unit']} queries/unit"),
    ]
    if "worker" in validate:
        worker = validate["worker"]
        rows.append(("validate, Celery worker", f"{worker['units']:,} units", f"{worker['seconds']} s",
                     f"{worker['units_per_second']} units/s", f"{worker['pool']}, {worker['messages']} messages"))
    rows.append(("merge", f"{merge['units']:,} units", f"{merge['seconds']} s", f"peak {merge['peak_python_mb']} MB",
                 f"{merge['output_bytes']:,} bytes"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="idlegrid-pipeline-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    figures: dict[str, Any] = {"quick": args.quick}
    try:
        broker = args.broker_url or "filesystem://"  # its folders under the bench's IDLEGRID_VAR_DIR
        with database(args, work) as url:
            env = environment(url, broker, work)
            os.environ.update(env)
            import django
            from django.core.management import call_command

            django.setup()
            call_command("migrate", verbosity=0)
            from django.db import connection

            figures["database"] = connection.vendor
            figures["broker"] = "redis" if broker.startswith("redis") else "filesystem"
            if broker.startswith("redis"):  # a bench's own Redis database: nothing of anyone else's is in it
                from celery import current_app

                with current_app.connection_for_write() as conn:
                    conn.default_channel.queue_purge("celery")
            meter = Meter()
            submitter = Submitter(args.seed)
            # Validation first: its devices lease every unsent replica there is, and the split's are not theirs.
            figures["validate"] = stage_validate(args, submitter, meter, env, work)
            figures["split"], split_job = stage_split(args, submitter, meter)
            figures["merge"] = stage_merge(split_job, submitter)
    except Exception as exc:
        log(f"failed: {exc!r}")
        figures["error"] = repr(exc)
        print(json.dumps(figures))
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
