"""Hardware facts: the class is a digest of exactly the class facts, and a lease request may carry new
facts, which move the device to another class before anything is leased."""

import hashlib
import json

import pytest

from marketplace.workers.models import Device
from marketplace.workers.services import HARDWARE_CLASS_FACTS, MAX_HARDWARE_JSON, hardware_class_of
from marketplace.workunits.models import Result
from worker_agent import hardware

LEASE = "/api/v1/agent/lease"
FACTS = {"os": "linux", "machine": "x86_64", "cpu_vendor": "GenuineIntel", "cpu_model": "Intel(R) Xeon(R) Processor",
         "cpu_flags": ["avx", "avx2", "fma", "avx512f"], "libc": "glibc 2.39", "torch_version": "2.13.0+cpu",
         "cpu_capability": "AVX512", "device_type": "cpu", "dtype": "float32", "deterministic": True,
         "num_threads": 1, "matmul_precision": "highest", "math_env": {}, "numerics_revision": 1,
         "cpu_count": 2, "memory_bytes": 8 << 30, "os_release": "6.8.0", "python": "3.12.3", "agent_version": "0.1.0"}


@pytest.fixture
def device(make_device, contributor):
    return make_device(contributor, hardware=FACTS)


def test_the_class_depends_on_the_class_facts_only():
    same = {**FACTS, "cpu_count": 64, "memory_bytes": 1 << 40, "os_release": "6.9.1", "cpu_flags": ["avx512f", "fma", "avx2", "avx"]}

    assert hardware_class_of(same) == hardware_class_of(FACTS)
    for fact in HARDWARE_CLASS_FACTS:
        assert hardware_class_of({**FACTS, fact: "something else"}) != hardware_class_of(FACTS), fact


CUDA_FACTS = {**FACTS, "device_type": "cuda", "torch_version": "2.13.0+cu124",
              "gpu": {"name": "NVIDIA GeForce RTX 3090", "memory_mb": 24259, "capability": "8.6", "cuda": "12.4"},
              "cuda_numerics": {"cudnn_version": 90100, "cudnn_deterministic": True, "cudnn_benchmark": False,
                                "cudnn_allow_tf32": False, "matmul_allow_tf32": False,
                                "cublas_workspace_config": ":4096:8"},
              "gpu_uuid": "5a3c1a2e-0000-4000-8000-000000000001"}


def test_a_cpu_devices_class_is_the_digest_of_the_cpu_class_facts_alone_as_before_gpus():
    facts = {key: FACTS.get(key) for key in HARDWARE_CLASS_FACTS}
    canonical = json.dumps({**facts, "cpu_flags": sorted(FACTS["cpu_flags"])}, sort_keys=True, separators=(",", ":"))

    assert hardware_class_of(FACTS) == hashlib.sha256(canonical.encode()).hexdigest()


def test_a_cuda_device_is_in_a_class_of_its_card_and_its_switches_but_not_of_its_cards_serial():
    assert hardware_class_of(CUDA_FACTS) != hardware_class_of({**CUDA_FACTS, "gpu": None, "cuda_numerics": None})
    for fact, value in [("name", "NVIDIA GeForce RTX 3080"), ("capability", "8.9"), ("cuda", "12.8"), ("memory_mb", 12288)]:
        assert hardware_class_of({**CUDA_FACTS, "gpu": {**CUDA_FACTS["gpu"], fact: value}}) != hardware_class_of(CUDA_FACTS), fact
    for switch in ("cudnn_deterministic", "cudnn_benchmark", "cudnn_allow_tf32", "matmul_allow_tf32"):
        numerics = {**CUDA_FACTS["cuda_numerics"], switch: not CUDA_FACTS["cuda_numerics"][switch]}
        assert hardware_class_of({**CUDA_FACTS, "cuda_numerics": numerics}) != hardware_class_of(CUDA_FACTS), switch
    assert hardware_class_of({**CUDA_FACTS, "gpu_uuid": "another card"}) == hardware_class_of(CUDA_FACTS)


def test_every_class_fact_is_one_the_agent_sends():
    sent = hardware.collect(hardware.numerics_facts())  # runs `python -m worker_agent.child facts`

    assert set(HARDWARE_CLASS_FACTS) <= set(sent)
    assert None not in (sent["torch_version"], sent["cpu_capability"], sent["deterministic"])


def test_a_lease_request_with_new_facts_moves_the_device_to_their_class_before_leasing(submit_job, device):
    submit_job(rows=4, rows_per_unit=4)
    scalar = {**FACTS, "cpu_capability": "DEFAULT", "math_env": {"ATEN_CPU_CAPABILITY": "default"}}

    response = device.client().post(LEASE, {"max_units": 1, "hardware": scalar}, format="json")

    assert response.status_code == 200, response.json()
    (lease,) = response.json()["leases"]
    stored = device.refresh()
    assert stored.hardware == scalar
    assert stored.hardware_class == hardware_class_of(scalar) != hardware_class_of(FACTS)
    assert Result.objects.get(pk=lease["result_id"]).hardware_class == hardware_class_of(scalar)


def test_a_lease_request_without_facts_keeps_the_devices_class(submit_job, device):
    submit_job(rows=4, rows_per_unit=4)
    before = device.refresh().hardware_class

    response = device.client().post(LEASE, {"max_units": 1}, format="json")

    assert response.status_code == 200
    assert device.refresh().hardware_class == before == hardware_class_of(FACTS)
    assert Result.objects.get(pk=response.json()["leases"][0]["result_id"]).hardware_class == before


def test_facts_that_change_only_memory_update_the_facts_but_not_the_class(device):
    bigger = {**FACTS, "memory_bytes": 64 << 30}

    response = device.client().post(LEASE, {"max_units": 1, "hardware": bigger}, format="json")

    assert response.status_code == 200
    stored = device.refresh()
    assert stored.hardware["memory_bytes"] == 64 << 30
    assert stored.hardware_class == hardware_class_of(FACTS)


@pytest.mark.parametrize("bad", [["linux"], "linux", {"padding": "x" * MAX_HARDWARE_JSON}])
def test_facts_that_are_not_a_small_object_are_refused_and_nothing_is_leased(submit_job, device, bad):
    submit_job(rows=4, rows_per_unit=4)

    response = device.client().post(LEASE, {"max_units": 1, "hardware": bad}, format="json")

    assert response.status_code == 400
    assert "hardware" in response.json()["error"]["fields"]
    assert Device.objects.get(pk=device.pk).hardware == FACTS
    assert not Result.objects.filter(device=device.device).exists()


# --- a device cannot choose how it is compared ------------------------------------------------------

@pytest.mark.parametrize("fact, value", [("cpu_model", "AMD EPYC 9654"), ("cpu_flags", ["avx", "avx2"]),
                                         ("machine", "aarch64"), ("cpu_vendor", "AuthenticAMD")])
def test_attack_a_device_cannot_claim_other_cpu_facts_than_it_enrolled_with(submit_job, device, fact, value):
    # Before: each lease could claim a new hardware class, and nothing checked it, so a device picked
    # lease by lease whether its results were compared bitwise (one class) or within the tolerance.
    submit_job(rows=4, rows_per_unit=4)

    response = device.client().post(LEASE, {"max_units": 1, "hardware": {**FACTS, fact: value}}, format="json")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "hardware_changed"
    assert fact in response.json()["error"]["message"]
    stored = device.refresh()
    assert (stored.hardware, stored.hardware_class) == (FACTS, hardware_class_of(FACTS))
    assert not Result.objects.filter(device=device.device).exists()


def test_software_changes_of_class_are_limited_per_day_and_each_starts_on_probation(
    submit_job, device, settings
):
    from django.utils import timezone

    from marketplace.workers.models import DeviceTrust, HardwareChange

    settings.IDLEGRID_HARDWARE_CHANGES_PER_DAY = 2
    DeviceTrust.objects.create(device=device.device, kind="inference", hardware_class=hardware_class_of(FACTS),
                               consecutive_valid=100, trusted_since=timezone.now())
    submit_job(rows=40, rows_per_unit=4)
    answers = []
    for revision in (2, 3, 4):
        facts = {**FACTS, "numerics_revision": revision}
        answers.append(device.client().post(LEASE, {"max_units": 1, "hardware": facts}, format="json").status_code)

    assert answers == [200, 200, 429]
    assert HardwareChange.objects.filter(device=device.device).count() == 2
    stored = device.refresh()
    assert stored.hardware["numerics_revision"] == 3
    assert not DeviceTrust.objects.filter(device=device.device, hardware_class=stored.hardware_class,
                                          trusted_since__isnull=False).exists()  # the new class: probation
