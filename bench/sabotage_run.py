"""One scenario of the sabotage bench, run by bench/sabotage.py in a child process against its own fresh
database (the parent sets DATABASE_URL, IDLEGRID_VAR_DIR, IDLEGRID_ARTIFACT_DIR and the trust settings
in the environment before this module sets Django up):

    python -m bench.sabotage_run --scenario colluding_10 --units 200000 --out figures.json

Everything goes through the real services, in process: jobs through `job_submit` and the split task,
devices through `device_enroll` with real Ed25519 keys, leases through `workunit_lease`, reports through
`artifact_store` and `result_report` signed over `protocol.result_message`. Celery is stubbed: enqueued
tasks go to an in-process FIFO that is drained after every device's turn by running the tasks' own
functions, as a worker would; the beat tasks (`sweep`, `leases_expire_task`) run every few rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.sabotage_devices import Behaviour, Device, mlp_forward  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    """Who computes and what the submitter sends.

    `share`: saboteurs as a share of --devices (the six steady-state scenarios). `pair`: a cold network,
    --devices honest devices plus two saboteurs of two owners sharing one schedule and one set of wrong
    bytes, everyone enrolled at the start and on probation (nobody trusted). `known_per_unit`: the
    submitter's own known rows hidden in each unit (0: no `known_answers` in the spec)."""

    saboteur: Behaviour | None = None
    share: float = 0.0
    pair: bool = False
    rows_per_unit: int = 1
    known_per_unit: int = 0

    def saboteurs(self, devices: int) -> int:
        if self.saboteur is None:
            return 0
        return 2 if self.pair else round(devices * self.share)


# At a cold network nothing can ban (every ban needs the word of a device already trusted), so a pair loses
# nothing but the pay for the units it loses by cheating: it cheats on every unit, the most wrong rows it
# can deliver. Four rows per unit, so that one corrupted row of a unit means something.
PAIR_CHEAT_RATE = 1.0
COLD_ROWS_PER_UNIT = 4
SCENARIOS: dict[str, Scenario] = {
    "honest": Scenario(),
    "always_wrong": Scenario(Behaviour("always_wrong"), share=0.2),
    "intermittent_10": Scenario(Behaviour("intermittent", 0.10), share=0.2),
    "intermittent_1": Scenario(Behaviour("intermittent", 0.01), share=0.2),
    "colluding_10": Scenario(Behaviour("colluding", 0.10), share=0.2),
    "lazy": Scenario(Behaviour("lazy"), share=0.2),
    "cold_colluding_pair": Scenario(Behaviour("colluding", PAIR_CHEAT_RATE), pair=True, rows_per_unit=COLD_ROWS_PER_UNIT),
    "cold_colluding_pair_known": Scenario(
        Behaviour("colluding", PAIR_CHEAT_RATE), pair=True, rows_per_unit=COLD_ROWS_PER_UNIT, known_per_unit=1),
    "cold_subtle_pair": Scenario(Behaviour("colluding_row", PAIR_CHEAT_RATE), pair=True, rows_per_unit=COLD_ROWS_PER_UNIT),
    "cold_subtle_pair_known": Scenario(
        Behaviour("colluding_row", PAIR_CHEAT_RATE), pair=True, rows_per_unit=COLD_ROWS_PER_UNIT, known_per_unit=1),
}
HEADLINE = "colluding_10"
MLP = {"in_features": 4, "hidden": [8], "out_features": 4}
HARDWARE_CLASSES = 4
# The submitter's known answers: this many rows of x it computed y for itself, drawn like its dataset.
KNOWN_ROWS = 64
# Far beyond anything a run spends (a known-answer copy costs IDLEGRID_VERIFICATION_PRICE, 10**15 by default).
VERIFICATION_BUDGET = 10**30
TRUST_SETTINGS = (
    "IDLEGRID_TRUST_THRESHOLD", "IDLEGRID_AUDIT_RATE", "IDLEGRID_KNOWN_ANSWER_RATE", "IDLEGRID_AUDIT_WINDOW_SECONDS",
)


def log(message: str) -> None:
    print(f"[sabotage] {message}", file=sys.stderr, flush=True)


def django_setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    import django

    django.setup()


# --- where the time goes ----------------------------------------------------------------------------

class Meter:
    """Wall time and SQL statements per phase (lease, report, each task), for the profile in the figures."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.queries: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.phase = "bench"

    def install(self) -> None:
        from django.db import connection

        def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            self.queries[self.phase] += 1
            return execute(sql, params, many, context)

        self._wrapper = connection.execute_wrapper(count)  # kept: a collected generator would unwrap
        self._wrapper.__enter__()

    def __call__(self, phase: str) -> _Phase:
        return _Phase(self, phase)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            phase: {"calls": self.calls[phase], "seconds": round(self.seconds[phase], 1),
                    "ms_per_call": round(1000 * self.seconds[phase] / max(1, self.calls[phase]), 2),
                    "queries_per_call": round(self.queries[phase] / max(1, self.calls[phase]), 1)}
            for phase in sorted(self.calls, key=lambda p: -self.seconds[p])
        }


class _Phase:
    def __init__(self, meter: Meter, phase: str) -> None:
        self.meter, self.phase = meter, phase

    def __enter__(self) -> None:
        self.outer, self.meter.phase = self.meter.phase, self.phase
        self.started = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        elapsed = time.perf_counter() - self.started
        self.meter.seconds[self.phase] += elapsed
        self.meter.calls[self.phase] += 1
        self.meter.phase = self.outer
        if self.outer != "bench":  # nested: the outer phase's time excludes this one
            self.meter.seconds[self.outer] -= elapsed


METER = Meter()


# --- Celery, stubbed ---------------------------------------------------------------------------------

class TaskQueue:
    """What the broker would hold: tasks enqueued (after commit) by the services, run FIFO by `drain`.
    A task already waiting is not queued twice (the tasks are idempotent, so this changes no outcome)."""

    def __init__(self) -> None:
        self.waiting: deque[tuple[str, tuple]] = deque()
        self.keys: set[tuple[str, tuple]] = set()
        self.ran: Counter[str] = Counter()
        self.merges: list[tuple[int, str | None]] = []  # (job id, output sha) of every merge that completed

    def install(self) -> None:
        from celery.app.task import Task

        queue = self

        def apply_async(task: Any, args: Any = None, kwargs: Any = None, **options: Any) -> None:
            key = (task.name, tuple(args or ()))
            if key not in queue.keys:
                queue.keys.add(key)
                queue.waiting.append(key)

        Task.apply_async = apply_async  # type: ignore[method-assign]

    def drain(self) -> int:
        from marketplace.jobs.models import Job
        from marketplace.jobs.tasks import job_merge_task, job_split_task
        from marketplace.workunits.tasks import unit_validate_task, units_validate_waiting_task

        tasks = {"workunits.validate": unit_validate_task, "workunits.validate_waiting": units_validate_waiting_task,
                 "jobs.merge": job_merge_task, "jobs.split": job_split_task}
        ran = 0
        while self.waiting:
            key = self.waiting.popleft()
            self.keys.discard(key)
            name, args = key
            with METER(name):
                tasks[name](*args)  # calling a Celery task runs its body in process
            self.ran[name] += 1
            ran += 1
            if name == "jobs.merge":
                job = Job.objects.only("state", "output_id").get(pk=args[0])
                if job.state == Job.State.COMPLETED:
                    self.merges.append((args[0], job.output_id))
        return ran


# --- the population ------------------------------------------------------------------------------

def hardware_facts(hardware_class: int) -> dict[str, Any]:
    """Facts an agent would send; only cpu_model differs between the bench's classes."""
    return {
        "os": "linux", "machine": "x86_64", "cpu_vendor": "GenuineIntel", "cpu_model": f"bench-cpu-{hardware_class}",
        "cpu_flags": ["avx2", "fma"], "libc": "glibc 2.36", "torch_version": "2.13.0", "cpu_capability": "AVX2",
        "device_type": "cpu", "dtype": "float32", "deterministic": True, "num_threads": 1,
        "cpus": 4, "memory_mb": 8192,
    }


@dataclass
class Slot:
    """A place in the population. A banned saboteur's slot is refilled by a new identity (a new account
    and device, Sybil); the population's make-up stays constant."""

    behaviour: Behaviour
    hardware_class: int
    device_id: int = 0
    key: Any = None
    compute: Device | None = None
    identities: int = 0


class Population:
    """`honest` honest devices and `saboteurs` saboteurs, each device its own owner, all enrolled at the
    start (on probation: trust is earned in the run)."""

    def __init__(self, *, honest: int, saboteurs: int, saboteur: Behaviour | None, groups: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.enrolled = 0
        self.slots: list[Slot] = []
        for index in range(saboteurs + honest):
            behaviour = Behaviour("honest")
            if index < saboteurs:
                assert saboteur is not None
                behaviour = Behaviour(saboteur.kind, saboteur.cheat_rate, group=index % max(1, groups))
            self.slots.append(Slot(behaviour, hardware_class=int(rng.integers(HARDWARE_CLASSES))))
        for slot in self.slots:
            self.enrol(slot)

    def enrol(self, slot: Slot) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
        from django.contrib.auth import get_user_model

        from marketplace.workers.services import device_enroll, enrollment_token_create
        from worker_agent.protocol import b64encode, enroll_message

        self.enrolled += 1
        owner = get_user_model().objects.create_user(f"contributor-{self.enrolled}")
        token, _ = enrollment_token_create(owner=owner)
        key = Ed25519PrivateKey.generate()
        public = b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
        device, _secret = device_enroll(
            token=token, name=f"{slot.behaviour.kind}-{self.enrolled}", public_key_b64=public,
            hardware=hardware_facts(slot.hardware_class),
            proof_b64=b64encode(key.sign(enroll_message(token=token, public_key_b64=public))),
        )
        slot.device_id, slot.key, slot.identities = device.pk, key, slot.identities + 1
        slot.compute = Device(slot.behaviour, hardware_class=slot.hardware_class, seed=int(self.rng.integers(2**63)))


# --- jobs ----------------------------------------------------------------------------------------

class Submitter:
    """Submits inference jobs of a tiny MLP through `job_submit` and keeps each unit's true output. With
    `known_per_unit`, it also sends its own known answers: KNOWN_ROWS inputs whose outputs it computed with
    the true model, that many hidden among every unit's rows."""

    def __init__(self, *, seed: int, rows_per_unit: int, known_per_unit: int) -> None:
        from django.contrib.auth import get_user_model
        from safetensors.numpy import save

        from marketplace.ledger.grants import balance_grant
        from worker_agent.architectures import resolve

        self.rng = np.random.default_rng(seed)
        self.rows_per_unit, self.known_per_unit = rows_per_unit, known_per_unit
        self.owner = get_user_model().objects.create_user("submitter")
        balance_grant(user=self.owner, amount=10**30, actor="bench", reason="sabotage bench funds",  # jobs are escrowed
                      idempotency_key="bench-sabotage-submitter")
        arch, self.config = resolve("mlp", MLP)
        self.weights = {
            name: (self.rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
            for name, shape in arch.param_shapes(self.config).items()
        }
        self.weights_sha = self._store(save(self.weights))
        self.known_sha = None
        if known_per_unit:
            known_x = self.rng.standard_normal((KNOWN_ROWS, MLP["in_features"])).astype(np.float32)
            self.known_sha = self._store(save({"x": known_x, "y": mlp_forward(self.weights, known_x)}))
        self.truth: dict[str, np.ndarray] = {}  # unit input sha -> true output of the unit's rows
        self.job_truth: dict[int, np.ndarray] = {}  # job id -> true outputs of the job's own rows [rows, out]
        self.units = 0

    def _store(self, data: bytes) -> str:
        from marketplace.artifacts.services import artifact_store

        artifact, _ = artifact_store(chunks=[data], uploaded_by=self.owner)
        return artifact.sha256

    def submit(self, units: int, queue: TaskQueue) -> int:
        from marketplace.artifacts.storage import get_storage
        from marketplace.core.tensors import array_file_bytes, read_array, read_header
        from marketplace.jobs.services import job_submit
        from marketplace.workunits.models import WorkUnit

        x = self.rng.standard_normal((units * self.rows_per_unit, MLP["in_features"])).astype(np.float32)
        spec = {
            "model": {"architecture": "mlp", "config": self.config, "weights": self.weights_sha},
            "dataset": self._store(array_file_bytes(x, name="x")),
            "rows_per_unit": self.rows_per_unit, "batch_size": self.rows_per_unit, "adaptive": True,
        }
        if self.known_sha is not None:
            spec |= {"known_answers": self.known_sha, "known_answers_per_unit": self.known_per_unit}
        job = job_submit(owner=self.owner, kind="inference", spec=spec)
        queue.drain()  # the split task
        self.job_truth[job.pk] = mlp_forward(self.weights, x)
        # A unit's truth is computed from the unit's own input, as a device sees it: the submitter's known
        # rows, where there are any, sit among the unit's rows at places only the marketplace knows.
        storage = get_storage()
        for sha in WorkUnit.objects.filter(job=job, known_answer_of__isnull=True).values_list(
            "payload__inputs__x", flat=True
        ):
            with storage.local_path(sha) as path:
                self.truth[sha] = mlp_forward(self.weights, read_array(path, read_header(path)["x"]))
        self.units += units
        return job.pk


def verification_budget_open() -> None:
    """Fund the platform's verification budget once, far beyond anything a run can spend. Known-answer
    copies (and re-verification past a job's escrow) are paid from it and never made without it; the bench
    measures verification, not what a marketplace does when that budget runs out."""
    from marketplace.ledger.grants import verification_budget_fund

    verification_budget_fund(amount=VERIFICATION_BUDGET, actor="bench", reason="sabotage bench: verification budget",
                             idempotency_key="bench-sabotage-verification")


# --- one device's turn ---------------------------------------------------------------------------

@dataclass
class Tally:
    leases: int = 0
    reports: int = 0
    cheats: int = 0
    cheated_results: set[int] = field(default_factory=set)
    bans: Counter[str] = field(default_factory=Counter)  # by behaviour kind


def take_turn(slot: Slot, population: Population, submitter: Submitter, batch: int, tally: Tally) -> int:
    """What an agent does between two lease requests: lease, compute, upload, sign, report. The device
    row is read fresh, as the API's authentication does, so a ban takes effect at the next turn."""
    from marketplace.artifacts.services import artifact_store
    from marketplace.core.tensors import array_file_bytes
    from marketplace.workers.models import Device as DeviceRow
    from marketplace.workunits.leasing import workunit_lease
    from marketplace.workunits.results import result_report
    from worker_agent.protocol import b64encode, result_message

    with METER("authenticate"):
        device = DeviceRow.objects.get(pk=slot.device_id)
    if device.state == DeviceRow.State.BANNED:
        tally.bans[slot.behaviour.kind] += 1
        population.enrol(slot)  # Sybil: a new account, a new key, the same behaviour
        device = DeviceRow.objects.get(pk=slot.device_id)
    with METER("lease"):
        leases = workunit_lease(device=device, max_units=batch)
    assert slot.compute is not None
    for lease in leases:
        input_sha = lease.payload["inputs"]["x"]
        y, cheated = slot.compute.compute(submitter.truth[input_sha], input_sha)
        with METER("upload"):
            artifact, _ = artifact_store(chunks=[array_file_bytes(y, name="y")], device=device)
        message = result_message(
            result_id=lease.result_id, unit_id=lease.unit_id, device_id=device.pk, output_sha256=artifact.sha256
        )
        with METER("report"):
            result_report(
                device=device, result_id=lease.result_id, output_sha256=artifact.sha256,
                signature_b64=b64encode(slot.key.sign(message)),
            )
        if cheated:
            tally.cheats += 1
            tally.cheated_results.add(lease.result_id)
    tally.leases += 1
    tally.reports += len(leases)
    return len(leases)


# --- the run -------------------------------------------------------------------------------------

def unsent() -> int:
    from marketplace.workunits.models import Result

    return Result.objects.filter(state=Result.State.UNSENT).count()


def jobs_open() -> int:
    from marketplace.jobs.models import Job

    return Job.objects.exclude(state__in=(Job.State.COMPLETED, Job.State.FAILED)).count()


def beat() -> None:
    """The periodic tasks Celery beat sends every IDLEGRID_SWEEP_SECONDS."""
    from marketplace.workunits.tasks import leases_expire_task, sweep_run_task

    leases_expire_task()
    sweep_run_task()


def held_leases() -> int:
    from marketplace.workunits.models import Result

    return Result.objects.filter(state=Result.State.IN_PROGRESS).count()


def trusted_now() -> int:
    from marketplace.workers.models import Device as DeviceRow
    from marketplace.workers.models import DeviceTrust

    return DeviceTrust.objects.filter(trusted_since__isnull=False, device__state=DeviceRow.State.ACTIVE).count()


@dataclass
class Warmth:
    """When the network stopped being cold, in reports made so far: the first trusted device, and the
    trusted pool (IDLEGRID_TRUSTED_POOL_MIN) from which a quorum on probation no longer decides alone."""

    first_trusted: int | None = None
    trusted_pool: int | None = None

    def look(self, reports: int, pool: int) -> None:
        if self.trusted_pool is not None:
            return
        trusted = trusted_now()
        if trusted and self.first_trusted is None:
            self.first_trusted = reports
        if trusted >= pool:
            self.trusted_pool = reports


def simulate(args: argparse.Namespace, queue: TaskQueue) -> dict[str, Any]:
    from django.conf import settings

    scenario = SCENARIOS[args.scenario]
    started = time.perf_counter()
    verification_budget_open()
    saboteurs = scenario.saboteurs(args.devices)
    population = Population(
        honest=args.devices if scenario.pair else args.devices - saboteurs, saboteurs=saboteurs,
        saboteur=scenario.saboteur, groups=1 if scenario.pair else args.collusion_groups, seed=args.seed,
    )
    submitter = Submitter(seed=args.seed + 1, rows_per_unit=args.rows_per_unit, known_per_unit=args.known_per_unit)
    tally, warmth = Tally(), Warmth()
    setup_seconds = time.perf_counter() - started
    backlog = len(population.slots) * args.batch * 2  # two rounds of work queued: jobs arrive as a stream
    rounds = idle = held_max = 0
    loop_started = time.perf_counter()
    while True:
        while submitter.units < args.units and unsent() < backlog:
            submitter.submit(min(args.units_per_job, args.units - submitter.units), queue)
        leased = 0
        for index in population.rng.permutation(len(population.slots)):
            leased += take_turn(population.slots[index], population, submitter, args.batch, tally)
            queue.drain()
        rounds += 1
        # Every device reports what it leased within its turn, so none holds a lease between turns and
        # the per-device lease quota (IDLEGRID_PROBATION_LEASES, IDLEGRID_MAX_LEASES) never starves one.
        held_max = max(held_max, held_leases())
        warmth.look(tally.reports, settings.IDLEGRID_TRUSTED_POOL_MIN)
        if rounds % args.beat_rounds == 0 or leased == 0:
            with METER("beat"):
                beat()
            queue.drain()
        if rounds % 20 == 0:
            log(f"{args.scenario}: round {rounds}, {submitter.units} units submitted, {tally.reports} reports, "
                f"{sum(tally.bans.values())} bans, {jobs_open()} jobs open, {time.perf_counter() - loop_started:.0f} s")
        if submitter.units >= args.units and jobs_open() == 0 and not queue.waiting:
            break
        idle = idle + 1 if leased == 0 else 0
        if idle >= 5:
            log(f"{args.scenario}: stalled: {jobs_open()} jobs open and nothing to lease for {idle} rounds")
            break
    loop_seconds = time.perf_counter() - loop_started
    figures = measure(submitter, queue, tally, population)
    figures.update(
        scenario=args.scenario, devices=len(population.slots), honest_devices=len(population.slots) - saboteurs,
        saboteur={"kind": scenario.saboteur.kind, "cheat_rate": scenario.saboteur.cheat_rate, "devices": saboteurs,
                  "pair": scenario.pair} if scenario.saboteur else None,
        batch=args.batch, units_per_job=args.units_per_job, rounds=rounds, stalled=idle >= 5,
        leases_held_after_a_round_max=held_max,
        first_trusted_at_report=warmth.first_trusted, trusted_pool_at_report=warmth.trusted_pool,
        setup_seconds=round(setup_seconds, 1), wall_seconds=round(loop_seconds, 1),
        units_per_second=round(figures["units"] / loop_seconds, 1), tasks_run=dict(queue.ran), profile=METER.summary(),
    )
    return figures


# --- figures -------------------------------------------------------------------------------------

def wrong_rows(output_sha: str, truth: np.ndarray, compare: dict[str, Any]) -> np.ndarray:
    """Rows of a delivered job output that do not agree with the truth under the job's comparator."""
    from marketplace.artifacts.storage import get_storage
    from marketplace.jobs import comparators
    from marketplace.jobs.kinds.inference import read_output

    with get_storage().local_path(output_sha) as path:
        got = read_output(path)
    compare = comparators.effective(compare)
    if compare["method"] != "allclose":
        return np.array([not comparators.agree(compare, got[i:i + 1], truth[i:i + 1]) for i in range(len(truth))])
    close = np.abs(got - truth) <= compare["atol"] + compare["rtol"] * np.abs(truth)  # numpy allclose, per row
    ok = np.isfinite(got).all(axis=1) & close.all(axis=1)
    if compare["top1"]:
        ok &= got.argmax(axis=1) == truth.argmax(axis=1)
    return ~ok


@dataclass
class Wrong:
    """Wrong rows of delivered job outputs, and the units they belong to."""

    rows: int = 0
    units: int = 0

    def add(self, job: Any, output_sha: str, truth: np.ndarray) -> None:
        wrong = np.flatnonzero(wrong_rows(output_sha, truth, job.spec["compare"]))
        self.rows += len(wrong)
        self.units += len(np.unique(wrong // job.spec["rows_per_unit"]))  # the merge leaves hidden rows out


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def measure(submitter: Submitter, queue: TaskQueue, tally: Tally, population: Population) -> dict[str, Any]:
    from django.conf import settings
    from django.db.models import Count, Q, Sum

    from marketplace.jobs.models import Job
    from marketplace.workers.models import Device as DeviceRow
    from marketplace.workers.models import DeviceTrust
    from marketplace.workunits.models import Result, WorkUnit

    computed_states = (Result.State.REPORTED, Result.State.VALID, Result.State.INVALID)
    jobs = {job.pk: job for job in Job.objects.all()}
    delivered = [job for job in jobs.values() if job.state == Job.State.COMPLETED]
    units_delivered = sum(job.units_total for job in delivered)
    rows_delivered = sum(job.spec["rows"] for job in delivered)
    wrong_by_job = {}
    for job in delivered:
        wrong_by_job[job.pk] = Wrong()
        wrong_by_job[job.pk].add(job, job.output_id, submitter.job_truth[job.pk])
    wrong_final = Wrong(sum(w.rows for w in wrong_by_job.values()), sum(w.units for w in wrong_by_job.values()))
    first: dict[int, str] = {}
    for job_id, sha in queue.merges:
        first.setdefault(job_id, sha)
    wrong_first = Wrong()
    for job_id, sha in first.items():
        wrong_first.add(jobs[job_id], sha, submitter.job_truth[job_id])
    real_units = sum(job.units_total for job in jobs.values())
    # A disputed known answer is copied onto the original unit to be counted there (verification._dispute):
    # one computation, two rows; the copy on the original is not counted again.
    computations = Result.objects.filter(disputes_known_answer__isnull=True)
    results = computations.filter(state__in=computed_states)
    results_computed = results.count()
    # The second half of the jobs, by submission: the population has left its cold start (every device on
    # probation) behind, as a long-running marketplace has.
    later = sorted(jobs)[len(jobs) // 2:]
    later_units = sum(jobs[pk].units_total for pk in later)
    later_results = results.filter(job_id__in=later).count()
    later_delivered = sum(jobs[pk].units_total for pk in later if pk in wrong_by_job)
    later_wrong = sum(wrong_by_job[pk].units for pk in later if pk in wrong_by_job)
    honest = computations.filter(device__name__startswith="honest-")
    saboteur = computations.exclude(device__name__startswith="honest-")
    judged = honest.aggregate(
        valid=Count("pk", filter=Q(state=Result.State.VALID)), invalid=Count("pk", filter=Q(state=Result.State.INVALID))
    )
    bans = DeviceRow.objects.filter(state=DeviceRow.State.BANNED).values_list("name", "ban_reason")
    banned = Counter(name.split("-")[0] for name, _ in bans)
    why = Counter((name.split("-")[0] == "honest", " ".join(w for w in reason.split() if not w.isdigit())) for name, reason in bans)
    trusted = Counter(
        name.split("-")[0]
        for name in DeviceTrust.objects.filter(trusted_since__isnull=False, device__state=DeviceRow.State.ACTIVE)
        .values_list("device__name", flat=True)
    )
    cheated = sorted(tally.cheated_results)
    cheated_states: Counter[str] = Counter()
    for start in range(0, len(cheated), 5000):  # in chunks: SQLite bounds the parameters of one statement
        cheated_states.update(Result.objects.filter(pk__in=cheated[start:start + 5000]).values_list("state", flat=True))
    # Units two saboteur owners both answered (a pair "shares" them): the only ones it can decide on its own.
    shared = (saboteur.filter(unit__known_answer_of__isnull=True, state__in=computed_states).values("unit_id")
              .annotate(owners=Count("owner_id", distinct=True)).filter(owners__gte=2).count())
    honest_judged = judged["valid"] + judged["invalid"]
    rows_per_unit = submitter.rows_per_unit
    return {
        "units": real_units,
        "units_delivered": units_delivered,
        "rows_per_unit": rows_per_unit,
        "known_rows_per_unit": submitter.known_per_unit,
        "rows_delivered": rows_delivered,
        "jobs": len(jobs),
        "jobs_completed": len(delivered),
        "jobs_failed": sum(job.state == Job.State.FAILED for job in jobs.values()),
        "units_error": WorkUnit.objects.filter(known_answer_of__isnull=True, state=WorkUnit.State.ERROR).count(),
        "accepted_wrong_units": wrong_final.units,
        "accepted_wrong_rate": _rate(wrong_final.units, units_delivered),
        "accepted_wrong_rows": wrong_final.rows,
        "accepted_wrong_row_rate": _rate(wrong_final.rows, rows_delivered),
        "wrong_at_first_delivery_units": wrong_first.units,
        "wrong_at_first_delivery_rows": wrong_first.rows,
        "results_computed": results_computed,
        "results_per_unit": round(results_computed / real_units, 4) if real_units else None,
        # What a unit's rows cost: every result computes the unit's own rows and its hidden known rows.
        "rows_computed_per_row_delivered": (
            round(results_computed * (rows_per_unit + submitter.known_per_unit) / (real_units * rows_per_unit), 4)
            if real_units else None),
        "later_half": {
            "units": later_units, "accepted_wrong_units": later_wrong,
            "accepted_wrong_rate": _rate(later_wrong, later_delivered),
            "results_per_unit": round(later_results / later_units, 4) if later_units else None,
        },
        "known_answer_results": results.filter(unit__known_answer_of__isnull=False).count(),
        "audited_units": WorkUnit.objects.filter(audit=True).count(),
        # re-decided after a ban, a known-answer dispute or an owner's re-check (all raise the unit's cap)
        "units_redecided": sum(WorkUnit.objects.filter(
            job=job, known_answer_of__isnull=True, max_results__gt=job.spec["max_results_per_unit"]).count()
            for job in jobs.values()),
        # answers that failed the submitter's hidden rows once another answer passing them decided the unit:
        # each sends its owner's recent answers to be checked again (reverify.owner_answers_recheck)
        "known_rows_failed": {
            "honest": honest.filter(failed_known_rows=True).count(),
            "saboteur": saboteur.filter(failed_known_rows=True).count(),
        },
        "units_accepted_alone": WorkUnit.objects.filter(
            known_answer_of__isnull=True, state=WorkUnit.State.DONE, canonical_result__accepted_alone=True
        ).count(),
        "honest_results_judged": honest_judged,
        "honest_results_invalid": judged["invalid"],
        "honest_false_mismatch_rate": _rate(judged["invalid"], honest_judged),
        "cheated_results": tally.cheats,
        "cheated_results_valid": cheated_states[Result.State.VALID],
        "cheated_results_invalid": cheated_states[Result.State.INVALID],
        "saboteur_results": saboteur.filter(state__in=computed_states).count(),
        "saboteur_results_valid": saboteur.filter(state=Result.State.VALID).count(),
        "saboteur_units_shared": shared,
        "bans_honest": banned.get("honest", 0),
        "bans_saboteur": sum(count for kind, count in banned.items() if kind != "honest"),
        "ban_reasons": {"honest": {r: n for (h, r), n in why.items() if h}, "saboteur": {r: n for (h, r), n in why.items() if not h}},
        "identities_enrolled": population.enrolled,
        "trusted_at_end": {"honest": trusted.get("honest", 0), "saboteur": sum(
            count for kind, count in trusted.items() if kind != "honest")},
        "jobs_reopened": sum(job.corrections > 0 for job in jobs.values()),
        "corrections": Job.objects.aggregate(total=Sum("corrections"))["total"] or 0,
        "reports": tally.reports,
        "settings": {name: getattr(settings, name) for name in TRUST_SETTINGS},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="one scenario of bench/sabotage.py (run by it)")
    parser.add_argument("--migrate-only", action="store_true", help="migrate the fresh database (a template) and stop")
    parser.add_argument("--migrate", action="store_true", help="migrate the fresh database, then run the scenario")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--units", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=50,
                        help="the population; for a pair scenario, the honest devices beside the pair")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--units-per-job", type=int, default=1000)
    parser.add_argument("--rows-per-unit", type=int, help="rows of the submitter's dataset per unit (default: the scenario's)")
    parser.add_argument("--known-per-unit", type=int,
                        help="the submitter's known rows hidden per unit, for a scenario that sends them (default 1)")
    parser.add_argument("--collusion-groups", type=int, default=1)
    parser.add_argument("--beat-rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True, help="where to write the figures (JSON)")
    args = parser.parse_args(argv)
    if args.migrate_only:
        return args
    if args.scenario is None:
        parser.error("--scenario is required")
    scenario = SCENARIOS[args.scenario]
    args.rows_per_unit = args.rows_per_unit or scenario.rows_per_unit
    args.known_per_unit = (args.known_per_unit or scenario.known_per_unit) if scenario.known_per_unit else 0
    return args


def migrate() -> None:
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:  # fold the WAL into the file, which is then copied per scenario
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    django_setup()
    if args.migrate_only or args.migrate:
        migrate()
    if args.migrate_only:
        return 0
    METER.install()
    queue = TaskQueue()
    queue.install()
    figures = simulate(args, queue)
    Path(args.out).write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
