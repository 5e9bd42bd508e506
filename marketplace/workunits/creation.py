"""Making work units: stored inputs, the unit rows, their first replicas and the marketplace's signature.

One public service, `units_create`, for every caller that makes units of a job: a job's split
(jobs/services.py) and each new round of a federated job (jobs/rounds.py). The signature covers the
unit id, which exists only after the insert, so units are signed right after they are inserted and
before their transaction commits: no agent ever sees an unsigned unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.db import connection

from marketplace.artifacts.services import artifacts_store_many
from marketplace.core.bulk import rows_insert
from marketplace.core.signing import keyring
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.notify import work_available
from marketplace.workunits.requirements import NEEDS, unit_requirements
from worker_agent.protocol import unit_message

if TYPE_CHECKING:
    from marketplace.jobs.kinds.inference import UnitPlan
    from marketplace.jobs.models import Job

SIGN_BATCH = 1000  # units per UPDATE of their signatures (3 parameters each: far below SQLite's limit)


def units_create(*, job: Job, plans: Sequence[UnitPlan]) -> list[int]:
    """Store each plan's inputs, create its unit and first replicas, and sign the units. Runs inside the
    caller's transaction; returns the new units' ids in the plans' order. An adaptive job's unit starts
    with one replica: the first lease decides how many more (marketplace/workunits/replicas.py,
    replication_decide). The rows go in multi-row INSERTs (core/bulk.py): a split makes 100,000 units."""
    quorum, cap = job.spec["quorum"], job.spec["max_results_per_unit"]
    adaptive = job.spec.get("adaptive", False)
    first = 1 if adaptive else quorum
    rows, inputs = [], []
    # The marketplace's own files, held by no person: the units' rows keep them (WorkUnit.inputs), and a
    # split must not fill its submitter's storage quota (marketplace/jobs/artifacts.py).
    stored = iter(artifacts_store_many(blobs=[data for plan in plans for data in plan.inputs]))
    for plan in plans:
        weights = plan.payload["model"]["weights"]  # a fedavg round trains its own global weights
        shas = [next(stored) for _ in plan.inputs]
        if shas != list(plan.payload["inputs"].values()):
            # The payload names its inputs by content and is signed as it is: stored bytes that are not
            # those very files would make a unit no agent can run (a bug in the kind's plan, never data).
            raise RuntimeError(f"unit {plan.index} of job {job.pk}: its input files are not the ones its payload names")
        needs = unit_requirements(payload=plan.payload, spec=job.spec).columns()
        rows.append({"job_id": job.pk, "index": plan.index, "payload": plan.payload, "quorum": quorum,
                     "max_results": cap, "results_created": first, "replication_decided": not adaptive,
                     "hidden_rows": plan.hidden_rows, **needs})
        inputs.append([weights, *shas])
    ids = rows_insert(WorkUnit, rows, returning=True)
    ring = keyring()
    _signatures_store([(pk, *ring.sign(unit_message(unit_id=pk, payload=row["payload"]))) for pk, row in zip(ids, rows)])
    rows_insert(WorkUnit.inputs.through, [{"workunit_id": pk, "artifact_id": sha}
                                          for pk, shas in zip(ids, inputs) for sha in shas])
    rows_insert(Result, [{"unit_id": pk, "job_id": job.pk, **{name: row[name] for name in NEEDS}}
                         for pk, row in zip(ids, rows) for _ in range(first)])
    work_available()  # long-polling agents hear of it at commit (workunits/notify.py)
    return ids


def unit_signature(*, unit_id: int, payload: dict[str, Any]) -> tuple[str, bytes]:
    """(key id, signature) of a unit by the active key, over `protocol.unit_message`."""
    return keyring().sign(unit_message(unit_id=unit_id, payload=payload))


def units_sign(units: Sequence[WorkUnit]) -> None:
    """Sign saved units in place with the active key and store the signatures."""
    ring = keyring()
    for unit in units:
        unit.signing_key_id, unit.signature = ring.sign(unit_message(unit_id=unit.pk, payload=unit.payload))
    _signatures_store([(unit.pk, unit.signing_key_id, bytes(unit.signature or b"")) for unit in units])


def _signatures_store(signed: Sequence[tuple[int, str, bytes]]) -> None:
    """(unit id, key id, signature) stored, SIGN_BATCH units per UPDATE ... FROM (VALUES ...) (PostgreSQL,
    and SQLite since 3.33): Django's bulk_update writes a CASE of one branch per unit, which costs each row
    a scan of the branches (a 2,000-unit chunk of a split spent most of its time there)."""
    table = connection.ops.quote_name(WorkUnit._meta.db_table)
    with connection.cursor() as cursor:
        for start in range(0, len(signed), SIGN_BATCH):
            batch = signed[start:start + SIGN_BATCH]
            rows = ", ".join(["(%s, %s, %s)"] * len(batch))
            cursor.execute(
                f"UPDATE {table} SET signing_key_id = v.column2, signature = v.column3 "
                f"FROM (VALUES {rows}) AS v WHERE {table}.id = v.column1",
                [value for row in batch for value in row],
            )


def units_resign(*, key_id: str, batch: int = 500) -> int:
    """Sign again, with the active key, the pending units that `key_id` signed. Safe to run twice."""
    done, after = 0, 0
    while units := list(
        WorkUnit.objects.filter(signing_key_id=key_id, state=WorkUnit.State.PENDING, pk__gt=after)
        .order_by("pk")
        .only("pk", "payload")[:batch]
    ):
        units_sign(units)
        done, after = done + len(units), units[-1].pk
    return done
