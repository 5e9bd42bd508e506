"""Making work units: stored inputs, the unit rows, their first replicas and the marketplace's signature.

One public service, `units_create`, for every caller that makes units of a job: a job's split
(jobs/services.py) and each new round of a federated job (jobs/rounds.py). The signature covers the
unit id, which exists only after the insert, so units are signed right after they are inserted and
before their transaction commits: no agent ever sees an unsigned unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from marketplace.artifacts.services import artifact_store
from marketplace.core.signing import keyring
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.notify import work_available
from marketplace.workunits.requirements import replica_needs, unit_requirements
from worker_agent.protocol import unit_message

if TYPE_CHECKING:
    from marketplace.jobs.kinds.inference import UnitPlan
    from marketplace.jobs.models import Job


def units_create(*, job: Job, plans: Sequence[UnitPlan]) -> list[WorkUnit]:
    """Store each plan's inputs, create its unit and first replicas, and sign the units. Runs inside the
    caller's transaction. An adaptive job's unit starts with one replica: the first lease decides how
    many more (marketplace/workunits/replicas.py, replication_decide)."""
    quorum, cap = job.spec["quorum"], job.spec["max_results_per_unit"]
    adaptive = job.spec.get("adaptive", False)
    first = 1 if adaptive else quorum
    units, inputs = [], []
    for plan in plans:
        weights = plan.payload["model"]["weights"]  # a fedavg round trains its own global weights
        # The marketplace's own files, held by no person: the units' rows keep them (WorkUnit.inputs), and a
        # split must not fill its submitter's storage quota (marketplace/jobs/artifacts.py).
        shas = [artifact_store(chunks=[data])[0].sha256 for data in plan.inputs]
        if shas != list(plan.payload["inputs"].values()):
            # The payload names its inputs by content and is signed as it is: stored bytes that are not
            # those very files would make a unit no agent can run (a bug in the kind's plan, never data).
            raise RuntimeError(f"unit {plan.index} of job {job.pk}: its input files are not the ones its payload names")
        needs = unit_requirements(payload=plan.payload, spec=job.spec).columns()
        units.append(
            WorkUnit(job=job, index=plan.index, payload=plan.payload, quorum=quorum, max_results=cap,
                     results_created=first, replication_decided=not adaptive, hidden_rows=plan.hidden_rows, **needs)
        )
        inputs.append([weights, *shas])
    WorkUnit.objects.bulk_create(units)
    units_sign(units)
    through = WorkUnit.inputs.through
    through.objects.bulk_create(
        [through(workunit_id=unit.pk, artifact_id=sha) for unit, shas in zip(units, inputs) for sha in shas]
    )
    Result.objects.bulk_create(
        [Result(unit_id=unit.pk, job_id=job.pk, **replica_needs(unit)) for unit in units for _ in range(first)]
    )
    work_available()  # long-polling agents hear of it at commit (workunits/notify.py)
    return units


def unit_signature(*, unit_id: int, payload: dict[str, Any]) -> tuple[str, bytes]:
    """(key id, signature) of a unit by the active key, over `protocol.unit_message`."""
    return keyring().sign(unit_message(unit_id=unit_id, payload=payload))


def units_sign(units: Sequence[WorkUnit]) -> None:
    """Sign saved units in place with the active key and store the signatures in one bulk UPDATE."""
    for unit in units:
        unit.signing_key_id, unit.signature = unit_signature(unit_id=unit.pk, payload=unit.payload)
    WorkUnit.objects.bulk_update(units, ["signature", "signing_key_id"])


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
