"""manage.py tolerance_calibrate: observed differences between valid replicas, and tolerances from them."""

import json
from io import StringIO

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import WorkUnit
from marketplace.workunits.verification import unit_validate

NATIVE = {"os": "linux", "machine": "x86_64", "cpu_capability": "AVX512", "device_type": "cpu", "dtype": "float32"}
SCALAR = {**NATIVE, "cpu_capability": "DEFAULT"}
SMALL = 2.0 ** -10
# Each unit's output: six values of magnitude >= 2 (the predicted class is always column 0) and six of 2^-10.
BASE = np.array([[4.0, 2.0, SMALL], [4.0, 2.0, SMALL], [4.0, SMALL, SMALL], [4.0, SMALL, SMALL]], dtype=np.float32)


def perturbed(exponent):
    """BASE with large values moved by exactly 2^-exponent of themselves and small ones by 2^-(exponent+3)
    (float32-exact): an absolute floor of 2^-(exponent+3), and 2^-exponent - 2^-(exponent+5) relative beyond it."""
    large = BASE >= 1
    step = np.where(large, BASE * 2.0 ** -exponent, 2.0 ** -(exponent + 3))
    return (BASE + step).astype(np.float32)


@pytest.fixture
def replicated(submit_job, make_device, report, contributor, other_contributor):
    """Four decided units, each with one valid result from an AVX512 device and one from a scalar-kernel
    device of another owner: three differ by 2^-21, 2^-22 and 2^-23 relative, one is bitwise identical."""
    job = submit_job(rows=16, rows_per_unit=4)
    native, scalar = make_device(contributor, hardware=NATIVE), make_device(other_contributor, hardware=SCALAR)
    first = workunit_lease(device=native.device, max_units=4)
    second = workunit_lease(device=scalar.device, max_units=4)
    by_unit = {lease.unit_id: lease.result_id for lease in second}
    for lease, exponent in zip(sorted(first, key=lambda lease: lease.unit_id), (21, 22, 23, None), strict=True):
        report(native, lease.result_id, BASE)
        report(scalar, by_unit[lease.unit_id], BASE.copy() if exponent is None else perturbed(exponent))
        assert unit_validate(unit_id=lease.unit_id) == "done"
    return job


def calibrate(*args):
    out = StringIO()
    call_command("tolerance_calibrate", *args, stdout=out)
    lines = out.getvalue().strip().splitlines()
    return lines, json.loads(lines[-1])


def test_it_recommends_the_largest_observed_differences_times_ten(replicated):
    lines, result = calibrate()

    cross = result["groups"]["cross-class"]
    assert (result["units"], cross["pairs"], cross["identical"], cross["differing"]) == (4, 4, 1, 3)
    assert cross["rel_max"] == 2.0 ** -21 - 2.0 ** -26  # beyond the absolute floor of 2^-24, relative to 4
    assert cross["max_abs_max"] == 4 * 2.0 ** -21
    assert result["groups"]["same-class"]["pairs"] == 0
    mean_diff = float(np.mean(perturbed(21), dtype=np.float64) - np.mean(BASE, dtype=np.float64))
    assert result["recommended"] == {
        "rtol": 4.7e-6,  # 10 x (2^-21 - 2^-26) = 4.62e-6, rounded up to two digits
        "atol": 6e-7,  # 10 x 2^-24 = 5.96e-7
        "epsilon": float(f"{np.ceil(mean_diff * 10 / 1e-7 - 1e-9) * 1e-7:.2g}"),
        "min_agreement": 1.0,
    }
    assert result["default"]["rtol"] == 1e-5
    assert any(line.startswith("recommended: allclose rtol 4.7e-06, atol 6e-07") for line in lines)


def test_a_lower_quantile_recommends_from_the_middle_of_the_observations(replicated):
    _, result = calibrate("--quantile", "0.5")

    # 10 x (2^-22 - 2^-27) = 2.31e-6 and 10 x 2^-25 = 2.98e-7: the middle unit's
    assert (result["recommended"]["rtol"], result["recommended"]["atol"]) == (2.4e-6, 3e-7)


def test_a_bigger_safety_factor_scales_the_recommendation(replicated):
    _, result = calibrate("--safety", "100")

    assert (result["recommended"]["rtol"], result["recommended"]["atol"]) == (4.7e-5, 6e-6)


def test_the_sample_is_bounded_by_max_units(replicated):
    _, result = calibrate("--max-units", "2")

    assert result["units"] == 2
    assert result["groups"]["cross-class"]["pairs"] == 2


def test_floors_apply_when_the_observed_differences_are_tiny(submit_job, make_device, report, contributor,
                                                             other_contributor):
    submit_job(rows=4, rows_per_unit=4)
    native, scalar = make_device(contributor, hardware=NATIVE), make_device(other_contributor, hardware=SCALAR)
    (a,), (b,) = workunit_lease(device=native.device, max_units=1), workunit_lease(device=scalar.device, max_units=1)
    report(native, a.result_id, BASE)
    report(scalar, b.result_id, perturbed(30))
    assert unit_validate(unit_id=a.unit_id) == "done"

    _, result = calibrate()

    assert (result["recommended"]["rtol"], result["recommended"]["atol"]) == (1e-6, 1e-7)


def test_without_valid_replicas_there_is_nothing_to_recommend(submit_job):
    submit_job(rows=4, rows_per_unit=4)
    assert WorkUnit.objects.filter(state=WorkUnit.State.DONE).count() == 0

    lines, result = calibrate()

    assert result["recommended"] is None and result["units"] == 0
    assert any("nothing to calibrate on" in line for line in lines)


def test_it_refuses_a_quantile_outside_0_to_1(db):
    with pytest.raises(CommandError, match="quantile"):
        calibrate("--quantile", "1.5")
