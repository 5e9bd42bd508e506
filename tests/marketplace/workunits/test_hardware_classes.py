"""Homogeneous classes: results of one hardware class are compared bitwise, of two classes by the job's
comparator; the class is recorded on each result when it is leased."""

import numpy as np
import pytest

from marketplace.workers.services import hardware_class_of
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.verification import unit_validate

NATIVE = {"os": "linux", "machine": "x86_64", "cpu_flags": ["avx2", "avx512f"], "torch_version": "2.13.0+cpu",
          "cpu_capability": "AVX512", "device_type": "cpu", "dtype": "float32", "deterministic": True, "num_threads": 1}
SCALAR = {**NATIVE, "cpu_capability": "DEFAULT", "math_env": {"ATEN_CPU_CAPABILITY": "default"}}


@pytest.fixture
def unit_of(submit_job):
    """unit_of(**spec): the one unit of a 4-row job with that spec."""

    def make(**spec):
        return WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4, **spec))

    return make


@pytest.fixture
def compute(make_device, report):
    """compute(unit, owner, hardware, y): a device of that owner and hardware leases the unit and reports y."""

    def run(unit, owner, hardware, y):
        device = make_device(owner, hardware=hardware)
        (lease,) = workunit_lease(device=device.device, max_units=1)
        assert lease.unit_id == unit.pk
        return report(device, lease.result_id, y)

    return run


def noisy(y, seed=1):
    """What another instruction set does to float32 inference: ~1e-7 here and there, same classes."""
    return (y + np.random.default_rng(seed).uniform(-1e-7, 1e-7, y.shape)).astype(np.float32)


def states(unit):
    return list(unit.results.order_by("pk").values_list("state", flat=True))


def test_the_lease_records_the_devices_hardware_class_on_the_result(unit_of, make_device, contributor):
    unit = unit_of()
    device = make_device(contributor, hardware=SCALAR)

    (lease,) = workunit_lease(device=device.device, max_units=1)

    assert Result.objects.get(pk=lease.result_id).hardware_class == hardware_class_of(SCALAR)
    assert device.device.hardware_class == hardware_class_of(SCALAR) != hardware_class_of(NATIVE)
    assert unit.pk == lease.unit_id


def test_two_results_of_one_class_with_different_bytes_disagree(
    unit_of, compute, honest_output, contributor, other_contributor
):
    unit = unit_of()
    honest = honest_output(unit)
    compute(unit, contributor, NATIVE, honest)
    compute(unit, other_contributor, NATIVE, noisy(honest))  # within any tolerance, but not bitwise

    assert unit_validate(unit_id=unit.pk) == "pending"
    assert states(unit) == [Result.State.REPORTED, Result.State.REPORTED, Result.State.UNSENT]


def test_two_results_of_one_class_with_identical_bytes_agree(
    unit_of, compute, honest_output, contributor, other_contributor
):
    unit = unit_of()
    honest = honest_output(unit)
    compute(unit, contributor, NATIVE, honest)
    compute(unit, other_contributor, NATIVE, honest.copy())

    assert unit_validate(unit_id=unit.pk) == "done"


def test_two_classes_within_the_jobs_tolerance_agree(unit_of, compute, honest_output, contributor, other_contributor):
    unit = unit_of()
    honest = honest_output(unit)
    compute(unit, contributor, NATIVE, honest)
    compute(unit, other_contributor, SCALAR, noisy(honest))

    assert unit_validate(unit_id=unit.pk) == "done"
    assert states(unit) == [Result.State.VALID, Result.State.VALID]


def test_two_classes_beyond_the_jobs_tolerance_disagree(unit_of, compute, honest_output, contributor, other_contributor):
    unit = unit_of(compare={"method": "allclose", "rtol": 0, "atol": 1e-9})
    honest = honest_output(unit)
    compute(unit, contributor, NATIVE, honest)
    compute(unit, other_contributor, SCALAR, noisy(honest))

    assert unit_validate(unit_id=unit.pk) == "pending"


def test_a_job_that_waives_class_exactness_compares_one_class_by_tolerance(
    unit_of, compute, honest_output, contributor, other_contributor
):
    unit = unit_of(compare={"class_exact": False})
    honest = honest_output(unit)
    compute(unit, contributor, NATIVE, honest)
    compute(unit, other_contributor, NATIVE, noisy(honest))

    assert unit_validate(unit_id=unit.pk) == "done"


def test_a_top1_job_accepts_other_values_with_the_same_predicted_classes_across_classes(
    unit_of, compute, honest_output, contributor, other_contributor
):
    unit = unit_of(compare={"method": "top1"})
    honest = honest_output(unit)
    compute(unit, contributor, NATIVE, honest)
    compute(unit, other_contributor, SCALAR, honest * 2)  # far from allclose; every arg-max kept

    assert unit_validate(unit_id=unit.pk) == "done"


def test_a_metric_job_compares_the_means_across_classes(
    unit_of, compute, honest_output, contributor, other_contributor
):
    unit = unit_of(compare={"method": "metric", "epsilon": 1e-3})
    honest = honest_output(unit)
    compute(unit, contributor, NATIVE, honest)
    compute(unit, other_contributor, SCALAR, np.roll(honest, 1, axis=1))  # same mean, other values

    assert unit_validate(unit_id=unit.pk) == "done"


def test_a_result_leased_before_classes_were_recorded_is_compared_by_tolerance(
    unit_of, compute, honest_output, contributor, other_contributor
):
    unit = unit_of()
    honest = honest_output(unit)
    first = compute(unit, contributor, NATIVE, honest)
    compute(unit, other_contributor, NATIVE, noisy(honest))
    Result.objects.filter(pk=first.pk).update(hardware_class="")  # unknown class: never "the same"

    assert unit_validate(unit_id=unit.pk) == "done"
