"""Capability matching: each unit carries what it needs (memory, device type, GPU memory, kind), the device
says what it can run with each lease request, and the one lease statement leases only units that fit."""

from __future__ import annotations

import pytest
from django.utils import timezone

from marketplace.workers.models import Device
from marketplace.workunits import requirements
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.results import result_release
from marketplace.workunits.verification import unit_validate
from worker_agent import wire

LEASE = "/api/v1/agent/lease"
QUOTE = "/api/v1/jobs/quote/"


def caps(memory_mb: int = 4096, *, gpu_mb: int = 0, kinds: tuple[str, ...] = ("fedavg", "inference")) -> wire.Capabilities:
    return wire.Capabilities(memory_mb=memory_mb, cores=2, device_type="cuda" if gpu_mb else "cpu",
                             gpu_memory_mb=gpu_mb, kinds=kinds)


def test_every_replica_carries_its_units_requirements(submit_job, make_device, contributor):
    job = submit_job(rows=10, rows_per_unit=4)
    unit = WorkUnit.objects.filter(job=job).first()
    (lease,) = workunit_lease(device=make_device(contributor).device, max_units=1, capabilities=caps())
    result_release(device=Result.objects.get(pk=lease.result_id).device, result_id=lease.result_id)  # a replacement

    expected = requirements.unit_requirements(payload=unit.payload, spec=job.spec)
    assert expected.memory_mb > requirements.SLACK_MB and (expected.device, expected.kind) == ("cpu", "inference")
    rows = Result.objects.filter(job=job).values_list("unit_id", *requirements.NEEDS)
    assert rows.count() == 3 * 2 + 1  # 3 units x quorum 2, and the replacement of the released one
    for unit_id, *needs in rows:
        unit = WorkUnit.objects.get(pk=unit_id)
        assert needs == [unit.need_memory_mb, unit.need_device, unit.need_gpu_mb, unit.kind]
        assert unit.need_memory_mb == requirements.unit_requirements(payload=unit.payload, spec=job.spec).memory_mb


def test_a_unit_needing_more_memory_than_the_device_reports_is_never_leased_to_it(submit_job, make_device,
                                                                                 contributor, other_contributor):
    job = submit_job(rows=4, rows_per_unit=4)
    need = WorkUnit.objects.get(job=job).need_memory_mb

    assert workunit_lease(device=make_device(contributor).device, max_units=4, capabilities=caps(need - 1)) == []
    (lease,) = workunit_lease(device=make_device(other_contributor).device, max_units=4, capabilities=caps(need))
    assert lease.unit_id == WorkUnit.objects.get(job=job).pk


def test_a_smaller_device_gets_the_units_it_can_run_past_the_ones_it_cannot(submit_job, make_device, contributor):
    big, small = submit_job(rows=4, rows_per_unit=4), submit_job(rows=4, rows_per_unit=4)
    Result.objects.filter(job=big).update(need_memory_mb=30_000)  # the older job's unit needs 30 GB

    leases = workunit_lease(device=make_device(contributor).device, max_units=4, capabilities=caps(8192))

    assert [lease.job_id for lease in leases] == [small.pk]


def test_a_cuda_unit_never_goes_to_a_cpu_device_nor_to_a_gpu_too_small(submit_job, make_device, contributor,
                                                                       other_contributor, cheater):
    job = submit_job(rows=4, rows_per_unit=4, device="cuda", min_gpu_memory_mb=10_000)
    assert (WorkUnit.objects.get(job=job).need_device, WorkUnit.objects.get(job=job).need_gpu_mb) == ("cuda", 10_000)

    assert workunit_lease(device=make_device(contributor).device, max_units=4, capabilities=caps(64_000)) == []
    assert workunit_lease(device=make_device(contributor, name="old").device, max_units=4) == []  # reports nothing
    assert workunit_lease(device=make_device(other_contributor).device, max_units=4,
                          capabilities=caps(gpu_mb=8192)) == []
    (lease,) = workunit_lease(device=make_device(cheater).device, max_units=4, capabilities=caps(gpu_mb=12_288))
    assert lease.job_id == job.pk


def test_a_cpu_unit_runs_on_a_gpu_device_too(submit_job, make_device, contributor):
    submit_job(rows=4, rows_per_unit=4)

    assert len(workunit_lease(device=make_device(contributor).device, max_units=4, capabilities=caps(gpu_mb=8192))) == 1


def test_a_device_gets_only_the_kinds_it_ships(submit_job, make_device, contributor):
    submit_job(rows=4, rows_per_unit=4)

    assert workunit_lease(device=make_device(contributor).device, max_units=4, capabilities=caps(kinds=("fedavg",))) == []
    assert workunit_lease(device=make_device(contributor, name="b").device, max_units=4, capabilities=caps(kinds=())) == []
    assert len(workunit_lease(device=make_device(contributor, name="c").device, max_units=4,
                              capabilities=caps(kinds=("inference",)))) == 1


def test_an_old_agent_is_matched_as_a_cpu_device_with_the_default_memory(submit_job, make_device, contributor,
                                                                         other_contributor, settings):
    ordinary, large = submit_job(rows=4, rows_per_unit=4), submit_job(rows=4, rows_per_unit=4)
    Result.objects.filter(job=large).update(need_memory_mb=settings.IDLEGRID_UNREPORTED_MEMORY_MB + 1)

    (lease,) = workunit_lease(device=make_device(contributor).device, max_units=4)  # no capabilities

    assert lease.job_id == ordinary.pk
    assert Device.objects.get(pk=lease_device(lease)).cap_memory_mb is None  # nothing recorded of it


def lease_device(lease) -> int:
    return Result.objects.values_list("device_id", flat=True).get(pk=lease.result_id)


def test_known_answer_copies_respect_the_devices_capabilities(submit_job, make_device, contributor,
                                                              other_contributor, cheater, report, settings,
                                                              verification_budget):
    verification_budget()
    job = submit_job(rows=4, rows_per_unit=4)
    for owner in (contributor, other_contributor):  # a replicated quorum decides the unit: a known answer
        device = make_device(owner)
        report(device, workunit_lease(device=device.device, max_units=1, capabilities=caps())[0].result_id)
    assert unit_validate(unit_id=WorkUnit.objects.get(job=job).pk) == "done"
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 1.0
    need = WorkUnit.objects.get(job=job).need_memory_mb

    newcomer = make_device(cheater)
    assert workunit_lease(device=newcomer.device, max_units=1, capabilities=caps(need - 1)) == []
    (copy,) = workunit_lease(device=newcomer.device, max_units=1, capabilities=caps(need))
    unit = WorkUnit.objects.get(pk=copy.unit_id)
    assert unit.known_answer_of_id is not None
    assert Result.objects.get(pk=copy.result_id).need_memory_mb == unit.need_memory_mb == need


# --- the API ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"memory_mb": -1, "cores": 1},
    {"memory_mb": 1024},  # no cores
    {"memory_mb": 1024, "cores": 1, "swap_mb": 5},  # unknown member
    {"memory_mb": "1024", "cores": 1},
    {"memory_mb": True, "cores": 1},
    {"memory_mb": 1024, "cores": 1, "device_type": "cuda"},  # cuda without GPU memory
    {"memory_mb": 1024, "cores": 1, "gpu_memory_mb": 512},  # GPU memory on a cpu device
    {"memory_mb": 1024, "cores": 1, "kinds": ["inference"] * 2},
    {"memory_mb": 1024, "cores": 1, "kinds": [f"k{n}" for n in range(wire.MAX_KINDS + 1)]},
    {"memory_mb": 1024, "cores": 1, "kinds": ["x" * 33]},
    None,
    [1024, 1],
])
def test_the_lease_endpoint_refuses_bad_capabilities_and_changes_nothing(submit_job, make_device, contributor, bad):
    submit_job(rows=4, rows_per_unit=4)
    enrolled = make_device(contributor)

    response = enrolled.client().post(LEASE, {"max_units": 1, "capabilities": bad}, format="json")

    assert response.status_code == 400, response.json()
    assert "capabilities" in response.json()["error"]["fields"]
    assert not Result.objects.exclude(state=Result.State.UNSENT).exists()
    assert Device.objects.get(pk=enrolled.pk).cap_memory_mb is None  # nothing of it recorded


def test_the_lease_endpoint_matches_the_capabilities_sent_and_records_them(submit_job, make_device, contributor):
    submit_job(rows=4, rows_per_unit=4)
    enrolled = make_device(contributor)
    client = enrolled.client()

    small = client.post(LEASE, {"max_units": 1, "capabilities": caps(8).to_wire()}, format="json")
    enough = client.post(LEASE, {"max_units": 1, "capabilities": caps(4096).to_wire()}, format="json")

    assert (small.status_code, small.json()["leases"]) == (200, [])
    assert enough.status_code == 200 and len(enough.json()["leases"]) == 1
    device = Device.objects.get(pk=enrolled.pk)
    assert (device.cap_memory_mb, device.cap_gpu_mb, device.cap_kinds) == (8, 0, ",fedavg,inference,")


# --- "no device can run this job" -----------------------------------------------------------------------

def seen_with(enrolled, capabilities: wire.Capabilities | None) -> None:
    workunit_lease(device=enrolled.device, max_units=1, capabilities=capabilities)  # records them, leases nothing
    Device.objects.filter(pk=enrolled.pk).update(last_seen_at=timezone.now())


def test_the_quote_says_when_no_active_device_can_run_the_jobs_units(api, submitter, inference_spec, make_device,
                                                                     contributor, other_contributor):
    seen_with(make_device(contributor), caps(32))  # below any unit's slack
    seen_with(make_device(other_contributor), caps(64_000))
    body = {"kind": "inference", "spec": inference_spec(rows=10, rows_per_unit=4, device="cuda")}

    quote = api(submitter).post(QUOTE, body, format="json").json()

    assert (quote["devices_active"], quote["runnable_devices"], quote["runnable"]) == (2, 0, False)
    assert "CUDA GPU" in quote["not_runnable_reason"] and "no active device can run" in quote["not_runnable_reason"]

    cpu = api(submitter).post(QUOTE, {"kind": "inference", "spec": inference_spec(rows=10, rows_per_unit=4)},
                              format="json").json()
    assert cpu["runnable_devices"] == 1  # the 64 GB device; the 32 MB one fits nothing
    assert cpu["runnable"] is False and "2 different owners" in cpu["not_runnable_reason"]


def test_a_running_job_whose_units_no_online_device_can_run_says_so(api, submitter, submit_job, make_device,
                                                                     contributor):
    job = submit_job(rows=4, rows_per_unit=4, device="cuda", min_gpu_memory_mb=20_000)
    seen_with(make_device(contributor), caps(64_000, gpu_mb=8192))

    shown = api(submitter).get(f"/api/v1/jobs/{job.pk}/").json()

    assert shown["runnable_devices"] == 0
    assert "CUDA GPU with 20000 MB" in shown["not_runnable_reason"]
    seen_with(make_device(contributor, name="big"), caps(64_000, gpu_mb=24_576))
    assert api(submitter).get(f"/api/v1/jobs/{job.pk}/").json()["runnable_devices"] == 1


@pytest.mark.parametrize(("changes", "field"), [
    ({"device": "tpu"}, "device"),
    ({"min_gpu_memory_mb": 100}, "min_gpu_memory_mb"),  # without cuda
    ({"device": "cuda", "min_gpu_memory_mb": -1}, "min_gpu_memory_mb"),
    ({"device": "cuda", "min_gpu_memory_mb": True}, "min_gpu_memory_mb"),
])
def test_the_device_options_of_a_spec_are_validated(api, submitter, inference_spec, changes, field):
    body = {"kind": "inference", "spec": inference_spec(rows=10, rows_per_unit=4, **changes)}

    response = api(submitter).post(QUOTE, body, format="json")

    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]


def test_the_job_page_says_when_no_online_device_can_run_what_waits(submitter, submit_job, make_device, contributor):
    from django.test import Client

    cuda_job, cpu_job = submit_job(rows=4, rows_per_unit=4, device="cuda"), submit_job(rows=4, rows_per_unit=4)
    seen_with(make_device(contributor), caps(64_000))  # a CPU device, online
    browser = Client()
    browser.force_login(submitter)

    waiting = browser.get(f"/jobs/{cuda_job.pk}/live/").content.decode()
    running = browser.get(f"/jobs/{cpu_job.pk}/live/").content.decode()

    assert 'id="not-runnable"' in waiting and "a CUDA GPU with 1 MB" in waiting
    assert 'id="not-runnable"' not in running
