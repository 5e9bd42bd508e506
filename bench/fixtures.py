"""The Django side of the dispatch bench, run as a subprocess against the bench's own database:

    python -m bench.fixtures setup --devices 8 --out setup.json   # people, devices, artifacts
    python -m bench.fixtures job --setup setup.json --replicas 20000 --out job.json
    python -m bench.fixtures queries --setup setup.json --out queries.json

Units are created in bulk straight through the ORM (no splitting, no dataset bytes): payloads are built
with the same record as `inference.plan_units` builds them (worker_agent/wire.py), their input artifacts exist as rows only (the simulated
agents never fetch them), and every unit's `output.shape` matches the one real output artifact stored
here through `artifact_store`, so every report passes the output check.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROWS_PER_UNIT = 128
BATCH_SIZE = 64
QUORUM = 2
MAX_RESULTS = 6
CONFIG = {"in_channels": 1, "height": 8, "width": 8, "channels": [16, 32], "hidden": 64, "out_features": 10}
SUBMITTER = "bench-submitter"
BULK = 2000


def _django() -> None:
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    import django

    django.setup()


def _store(data: bytes, owner: Any) -> str:
    from marketplace.artifacts.services import artifact_store

    artifact, _ = artifact_store(chunks=[data], uploaded_by=owner)
    return artifact.sha256


def _model(owner: Any) -> dict[str, Any]:
    """A real (random) weights artifact for the small CNN, stored like a submitter's upload."""
    import numpy as np
    from safetensors.numpy import save

    from worker_agent.architectures import resolve

    arch, config = resolve("cnn", CONFIG)
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in arch.param_shapes(config).items()}
    return {"architecture": "cnn", "config": config, "weights": _store(save(tensors), owner)}


def _output_bytes() -> bytes:
    import numpy as np

    from marketplace.core.tensors import array_file_bytes

    y = np.random.default_rng(1).standard_normal((ROWS_PER_UNIT, CONFIG["out_features"])).astype(np.float32)
    return array_file_bytes(y, name="y")


def _device(owner: Any, index: int) -> dict[str, Any]:
    """Enrol one device through the real service, as an agent would, and keep its private key."""
    from cryptography.hazmat.primitives import serialization

    from marketplace.workers.services import device_enroll, enrollment_token_create
    from worker_agent import hardware, signing

    key = signing.generate_key()
    token, _ = enrollment_token_create(owner=owner)
    device, secret = device_enroll(
        token=token, name=f"bench-{index}", public_key_b64=signing.public_key_b64(key),
        hardware=hardware.collect(), proof_b64=signing.enroll_proof(key, token=token),
    )
    # An established fleet: each device trusted on its hardware class (earned in production by valid
    # replicated results), so it holds up to IDLEGRID_MAX_LEASES and the batched scenario leases whole batches
    # (a device on probation holds one lease at a time, whatever it asks).
    from django.utils import timezone

    from marketplace.workers.models import DeviceTrust

    DeviceTrust.objects.create(device=device, kind="inference", hardware_class=device.hardware_class,
                               consecutive_valid=100, trusted_since=timezone.now())
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return {"device_id": device.pk, "secret": secret, "seed": seed.hex()}


def setup(*, devices: int) -> dict[str, Any]:
    """One submitter; one contributor per device (the lease keeps two replicas of a unit off one owner)."""
    from django.contrib.auth import get_user_model

    users = get_user_model().objects
    submitter = users.create_user(SUBMITTER)
    from marketplace.artifacts.models import Artifact

    contributors = [users.create_user(f"bench-contributor-{i}") for i in range(devices)]
    output_bytes = _output_bytes()
    output = _store(output_bytes, submitter)
    enrolled = [_device(owner, i) for i, owner in enumerate(contributors)]
    # A report names an output its own device uploaded (workunits/results.py): record every bench device as
    # having uploaded the one output they all report, as the upload endpoint would.
    Artifact.devices.through.objects.bulk_create(
        [Artifact.devices.through(artifact_id=output, device_id=d["device_id"]) for d in enrolled])
    # The output's bytes too: the batched scenario's agents send variants of it inline (bench/agents.py).
    return {"model": _model(submitter), "output_sha256": output, "output_b64": base64.b64encode(output_bytes).decode(),
            "devices": enrolled}


def _spec(model: dict[str, Any], units: int, dataset: str) -> dict[str, Any]:
    return {
        "rows_per_unit": ROWS_PER_UNIT, "batch_size": BATCH_SIZE,
        "compare": {"rtol": 1e-5, "atol": 1e-6, "top1": True},
        "quorum": QUORUM, "max_results_per_unit": MAX_RESULTS,
        "unit_timeout_seconds": 300, "unit_memory_mb": 2048,
        "rows": units * ROWS_PER_UNIT, "model": model, "dataset": dataset,
    }


def _payload(model: dict[str, Any], x_sha256: str) -> dict[str, Any]:
    from worker_agent import wire

    return wire.InferencePayload(
        model=wire.ModelRef(**model), inputs=wire.InferenceInputs(x=x_sha256),
        rows=ROWS_PER_UNIT, batch_size=BATCH_SIZE,
        output=wire.InferenceOutput(name="y", dtype="float32", shape=(ROWS_PER_UNIT, CONFIG["out_features"])),
        limits=wire.Limits(seconds=300, memory_mb=2048),
    ).to_wire()


# What the split would compute for the bench's small model (workunits/requirements.py), on the unit and on
# every replica: the lease matches a device's capabilities against these columns.
NEEDS: dict[str, Any] = {"need_memory_mb": 128, "need_device": "cpu", "need_gpu_mb": 0, "kind": "inference"}


def _unit_fields() -> dict[str, Any]:
    """What the split gives a unit of a non-adaptive job: its whole quorum of replicas up front."""
    from marketplace.workunits.models import WorkUnit

    fields: dict[str, Any] = {"quorum": QUORUM, "max_results": MAX_RESULTS, "results_created": QUORUM, **NEEDS}
    # Adaptive replication (in progress) decides the replica count at the first lease unless told it is
    # decided; the bench measures plain replication, so say so when the model has the flag.
    if any(field.name == "replication_decided" for field in WorkUnit._meta.get_fields()):
        fields["replication_decided"] = True
    return fields


def _retire_bench_replicas() -> int:
    """Leftovers of an earlier scenario (unsent, or leased when its clock ran out) must not serve this one."""
    from marketplace.workunits.models import Result

    live = (Result.State.UNSENT, Result.State.IN_PROGRESS)
    return Result.objects.filter(job__owner__username=SUBMITTER, state__in=live).update(state=Result.State.CANCELLED)


def job(*, setup_data: dict[str, Any], replicas: int) -> dict[str, Any]:
    """A running inference job of ceil(replicas / quorum) units, each with its quorum of unsent replicas."""
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from marketplace.artifacts.models import Artifact
    from marketplace.jobs.models import Job
    from marketplace.workunits.models import Result, WorkUnit

    started = time.perf_counter()
    retired = _retire_bench_replicas()
    submitter = get_user_model().objects.get(username=SUBMITTER)
    model, units = setup_data["model"], -(-replicas // QUORUM)
    label = f"{time.time_ns()}"
    x_shas = [hashlib.sha256(f"bench-x-{label}-{i}".encode()).hexdigest() for i in range(units)]
    x_size = 8 + 80 + ROWS_PER_UNIT * 64 * 4  # what a real 128-row slice of 1x8x8 float32 weighs
    with transaction.atomic():
        Artifact.objects.bulk_create(
            [Artifact(sha256=sha, size=x_size, uploaded_by=submitter) for sha in x_shas], batch_size=BULK
        )
        job_row = Job.objects.create(
            owner=submitter, kind="inference", state=Job.State.RUNNING, units_total=units,
            spec=_spec(model, units, hashlib.sha256(f"bench-dataset-{label}".encode()).hexdigest()),
            started_at=timezone.now(),
        )
        unit_rows = WorkUnit.objects.bulk_create(
            [WorkUnit(job=job_row, index=i, payload=_payload(model, sha), **_unit_fields()) for i, sha in enumerate(x_shas)],
            batch_size=BULK,
        )
        through = WorkUnit.inputs.through
        through.objects.bulk_create(
            [through(workunit_id=u.pk, artifact_id=a) for u, sha in zip(unit_rows, x_shas) for a in (model["weights"], sha)],
            batch_size=BULK,
        )
        Result.objects.bulk_create(
            [Result(unit_id=u.pk, job_id=job_row.pk, **NEEDS) for u in unit_rows for _ in range(QUORUM)], batch_size=BULK
        )
    _analyze()
    return {"job_id": job_row.pk, "units": units, "replicas": units * QUORUM, "retired": retired,
            "seconds": round(time.perf_counter() - started, 2)}


def _analyze() -> None:
    """Bulk loads leave the planner's statistics stale; production tables grow slowly under autovacuum."""
    from django.db import connection

    with connection.cursor() as cursor:
        for table in ("workunits_result", "workunits_workunit", "artifacts_artifact"):
            cursor.execute(f"ANALYZE {table}")


def _summarise(queries: list[dict[str, str]]) -> list[str]:
    return [" ".join(q["sql"].split())[:160] for q in queries]


def queries(*, setup_data: dict[str, Any], batch: int, timed: int) -> dict[str, Any]:
    """SQL statements per lease and per report, through the real URLconf and middleware, in process.

    Not counted by Django (so added by hand in the report): with CONN_MAX_AGE and CONN_HEALTH_CHECKS
    every request's first query is preceded by a `SELECT 1` health check on a raw cursor.
    """
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from worker_agent import signing

    job(setup_data=setup_data, replicas=2 * (timed + batch + 4) * QUORUM)
    device = setup_data["devices"][0]
    key = _key(device["seed"])
    client = Client(HTTP_AUTHORIZATION=f"Device {device['device_id']}:{device['secret']}")
    output = setup_data["output_sha256"]

    def lease(units: int) -> list[dict[str, Any]]:
        response = client.post("/api/v1/agent/lease", {"max_units": units}, content_type="application/json")
        assert response.status_code == 200, response.content
        return response.json()["leases"]

    def report(lease_: dict[str, Any]) -> None:
        signature = signing.sign_result(key, result_id=lease_["result_id"], unit_id=lease_["unit_id"],
                                        device_id=device["device_id"], output_sha256=output)
        response = client.post(f"/api/v1/agent/results/{lease_['result_id']}/report",
                               {"output_sha256": output, "signature": signature, "elapsed_seconds": 0.1},
                               content_type="application/json")
        assert response.status_code == 200, response.content

    report(lease(1)[0])  # warm: imports, URL resolver, the broker connection
    counted: dict[str, Any] = {}
    for name, units in (("lease_1", 1), (f"lease_{batch}", batch)):
        with CaptureQueriesContext(connection) as captured:
            leased = lease(units)
        counted[name] = {"leased": len(leased), "queries": len(captured), "sql": _summarise(captured.captured_queries)}
    with CaptureQueriesContext(connection) as captured:
        report(leased[0])
    counted["report"] = {"queries": len(captured), "sql": _summarise(captured.captured_queries)}
    counted["in_process_ms"] = _time_in_process(lease, report, timed)
    return counted


def _time_in_process(lease: Any, report: Any, cycles: int) -> dict[str, float]:
    """Mean server-side cost without HTTP, gunicorn or a load generator (one thread, test client): wall
    time, and this process's CPU time (Django's share; PostgreSQL's is in its own processes)."""
    spent = {"lease": [0.0, 0.0], "report": [0.0, 0.0]}

    def timed(name: str, call: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        answer = call()
        spent[name][0] += time.perf_counter() - wall
        spent[name][1] += time.process_time() - cpu
        return answer

    for _ in range(cycles):
        leased = timed("lease", lambda: lease(1))
        timed("report", lambda lease_=leased[0]: report(lease_))
    figures: dict[str, float] = {"cycles": cycles}
    for name, (wall, cpu) in spent.items():
        figures[f"{name}_ms"] = round(1000 * wall / cycles, 2)
        figures[f"{name}_cpu_ms"] = round(1000 * cpu / cycles, 2)
    return figures


def _key(seed_hex: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))


def statements() -> dict[str, str]:
    """The lease statement's text exactly as the server builds it for the bench's agents (no capabilities
    reported: the kinds fedavg and inference; the configured draw window), for bench/sql_limit.py."""
    from django.conf import settings

    from marketplace.workunits import leasing

    draw = settings.IDLEGRID_LEASE_DRAW_WINDOW > 1
    sql = leasing._lease_sql(draw=draw, kinds=2, joined=True)
    return {"lease_single": sql, "lease_batch": sql}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fixtures")
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup")
    p_setup.add_argument("--devices", type=int, required=True)
    p_job = sub.add_parser("job")
    p_job.add_argument("--replicas", type=int, required=True)
    p_queries = sub.add_parser("queries")
    p_queries.add_argument("--batch", type=int, default=10)
    p_queries.add_argument("--timed", type=int, default=200)
    for p in (p_job, p_queries):
        p.add_argument("--setup", type=Path, required=True)
    p_sql = sub.add_parser("sql")
    for p in (p_setup, p_job, p_queries, p_sql):
        p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    _django()
    if args.command == "setup":
        result = setup(devices=args.devices)
    elif args.command == "sql":
        result = statements()
    else:
        setup_data = json.loads(args.setup.read_text())
        if args.command == "job":
            result = job(setup_data=setup_data, replicas=args.replicas)
        else:
            result = queries(setup_data=setup_data, batch=args.batch, timed=args.timed)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
