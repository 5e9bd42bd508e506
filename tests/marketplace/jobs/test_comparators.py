"""Comparators: each method agrees and disagrees where it should; the job spec chooses one."""

import math

import numpy as np
import pytest

from marketplace.jobs import comparators
from marketplace.jobs.kinds import inference

LOGITS = np.array([[2.0, -1.0, 0.5], [0.1, 3.0, -2.0], [-0.5, 0.25, 1.5], [4.0, 1.0, 0.0]], dtype=np.float32)


def spec(**compare):
    normal, errors = comparators.validate(compare)
    assert errors == {}
    return normal


def noisy(y, scale=1e-7, seed=0):
    return (y + np.random.default_rng(seed).uniform(-scale, scale, y.shape)).astype(np.float32)


def test_exact_agrees_only_on_bitwise_identical_outputs():
    assert comparators.agree(spec(method="exact"), LOGITS, LOGITS.copy())
    one_ulp = LOGITS.copy()
    one_ulp[0, 0] = np.nextafter(one_ulp[0, 0], np.float32(10))
    assert not comparators.agree(spec(method="exact"), LOGITS, one_ulp)


def test_noise_of_1e_7_agrees_under_allclose_but_not_under_exact():
    other = noisy(LOGITS)
    assert not np.array_equal(other, LOGITS)

    assert comparators.agree(spec(method="allclose"), LOGITS, other)
    assert not comparators.agree(spec(method="exact"), LOGITS, other)


def test_allclose_disagrees_beyond_its_tolerance():
    assert not comparators.agree(spec(method="allclose", rtol=0, atol=1e-6), LOGITS, LOGITS + 2e-6)
    assert comparators.agree(spec(method="allclose", rtol=0, atol=1e-5), LOGITS, LOGITS + 2e-6)
    assert not comparators.agree(spec(method="allclose", rtol=1e-6, atol=0), LOGITS, LOGITS * (1 + 1e-5))


def test_allclose_with_top1_refuses_a_moved_arg_max_that_plain_allclose_accepts():
    tie = np.zeros((4, 3), dtype=np.float32)
    nudged = tie.copy()
    nudged[:, 1] += 1e-7  # within tolerance, but the predicted class moves from 0 to 1

    assert not comparators.agree(spec(method="allclose", top1=True), tie, nudged)
    assert comparators.agree(spec(method="allclose", top1=False), tie, nudged)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("compare", [
    {"method": "allclose", "rtol": 1, "atol": 1},
    {"method": "top1", "min_agreement": 0.01},
    {"method": "metric", "epsilon": 1e12},
    {"rtol": 1, "atol": 1, "top1": False},
])
def test_a_non_finite_value_never_agrees_under_a_tolerance_method(compare, bad):
    broken = LOGITS.copy()
    broken[2, 1] = bad

    assert not comparators.agree(spec(**compare), LOGITS, broken)
    assert not comparators.agree(spec(**compare), broken, broken.copy())  # not even with itself


def test_top1_agrees_when_enough_rows_predict_the_same_class():
    rows = np.tile(np.array([[1.0, 0.0, 0.0]], dtype=np.float32), (100, 1))
    one_flipped = rows.copy()
    one_flipped[7] = [0.0, 1.0, 0.0]

    assert comparators.top1_agreement(rows, one_flipped) == 0.99
    assert comparators.agree(spec(method="top1", min_agreement=0.99), rows, one_flipped)
    assert not comparators.agree(spec(method="top1"), rows, one_flipped)  # default: every row
    assert comparators.agree(spec(method="top1"), rows, rows * 5)  # values may differ wildly


@pytest.mark.parametrize(("metric", "shift", "within"), [
    ("mean", 1e-4, True), ("mean", 1e-2, False),
    ("mean_abs", 1e-4, True), ("mean_abs", 1e-2, False),
    ("rms", 1e-4, True), ("rms", 1e-2, False),
])
def test_metric_agrees_when_the_summaries_are_within_epsilon(metric, shift, within):
    assert comparators.agree(spec(method="metric", metric=metric, epsilon=1e-3), LOGITS, LOGITS + shift) is within


def test_metric_defaults_to_the_mean_of_the_output():
    rolled = np.roll(LOGITS, 1, axis=1)  # every value moved, the mean unchanged
    compare = spec(method="metric", epsilon=1e-6)

    assert compare["metric"] == "mean"
    assert comparators.agree(compare, LOGITS, rolled)


@pytest.mark.parametrize("method", ["exact", "allclose", "top1", "metric"])
def test_outputs_of_different_shapes_never_agree(method):
    compare = spec(method=method, epsilon=1.0) if method == "metric" else spec(method=method)

    assert not comparators.agree(compare, LOGITS, LOGITS[:3])


# --- the spec's compare object -------------------------------------------------------------------

def test_the_historical_form_still_means_allclose_with_top1_and_exact_inside_a_class():
    normal, errors = comparators.validate({"rtol": 1e-4, "atol": 1e-5, "top1": True})

    assert errors == {}
    assert normal == {"method": "allclose", "rtol": 1e-4, "atol": 1e-5, "top1": True, "class_exact": True}


def test_an_empty_compare_is_the_documented_default():
    normal, errors = comparators.validate({})

    assert errors == {}
    assert normal == inference.DEFAULTS["compare"]


@pytest.mark.parametrize(("compare", "field", "words"), [
    ({"method": "fuzzy"}, "compare.method", "exact, allclose, top1, metric"),
    ({"method": "exact", "rtol": 1e-5}, "compare", "unknown keys for method exact: rtol"),
    ({"method": "top1", "atol": 1e-5}, "compare", "unknown keys for method top1: atol"),
    ({"method": "metric"}, "compare.epsilon", "required for method metric"),
    ({"method": "metric", "epsilon": -1}, "compare.epsilon", "between 0 and"),
    ({"method": "metric", "epsilon": 1, "metric": "accuracy"}, "compare.metric", "mean, mean_abs, rms"),
    ({"method": "top1", "min_agreement": 0}, "compare.min_agreement", "above 0 and at most 1"),
    ({"method": "top1", "min_agreement": 1.5}, "compare.min_agreement", "above 0 and at most 1"),
    ({"method": "allclose", "rtol": 2}, "compare.rtol", "between 0 and 1"),
    ({"atol": "1e-6"}, "compare.atol", "between 0 and 1"),
    ({"atol": math.nan}, "compare.atol", "between 0 and 1"),
    ({"top1": 1}, "compare.top1", "true or false"),
    ({"class_exact": "yes"}, "compare.class_exact", "true or false"),
    ([1e-5, 1e-6], "compare", "must be an object"),
])
def test_a_bad_compare_object_is_refused_with_a_field_error(compare, field, words):
    _, errors = comparators.validate(compare)

    assert field in errors, errors
    assert words in errors[field]


def test_a_stored_compare_object_is_read_with_todays_defaults():
    assert comparators.effective({"rtol": 1e-5, "atol": 1e-6, "top1": False})["class_exact"] is True
    with pytest.raises(ValueError):
        comparators.effective({"method": "metric"})


# --- outputs_agree: exact inside a hardware class, the job's method across classes ---------------

@pytest.fixture
def files(tmp_path, make_output):
    def write(*arrays):
        paths = []
        for index, y in enumerate(arrays):
            path = tmp_path / f"out{index}.safetensors"
            path.write_bytes(make_output(y))
            paths.append(path)
        return paths

    return write


def test_inside_one_class_different_bytes_disagree_however_close(files):
    a, b = files(LOGITS, noisy(LOGITS))
    job = {"compare": inference.DEFAULTS["compare"]}

    assert not inference.outputs_agree(job, a, b, same_class=True)
    assert inference.outputs_agree(job, a, b, same_class=False)


def test_inside_one_class_identical_tensors_agree(files):
    a, b = files(LOGITS, LOGITS.copy())

    assert inference.outputs_agree({"compare": inference.DEFAULTS["compare"]}, a, b, same_class=True)


def test_a_job_may_waive_exactness_inside_a_class(files):
    a, b = files(LOGITS, noisy(LOGITS))
    job = {"compare": {**inference.DEFAULTS["compare"], "class_exact": False}}

    assert inference.outputs_agree(job, a, b, same_class=True)


def test_an_exact_job_wants_identical_bytes_across_classes_too(files):
    a, b = files(LOGITS, noisy(LOGITS))

    assert not inference.outputs_agree({"compare": {"method": "exact"}}, a, b, same_class=False)


def test_a_job_stored_before_methods_existed_is_still_compared_by_allclose(files):
    a, b = files(LOGITS, noisy(LOGITS))
    legacy = {"compare": {"rtol": 1e-5, "atol": 1e-6, "top1": True}}

    assert inference.outputs_agree(legacy, a, b, same_class=False)
    assert not inference.outputs_agree(legacy, a, b, same_class=True)


# --- measuring differences for calibration -------------------------------------------------------

def test_pair_diff_splits_relative_and_absolute_differences_at_the_median_magnitude():
    a = np.array([[2.0, 4.0, 2.0 ** -10, 2.0 ** -11]], dtype=np.float32)
    b = a + np.array([[2.0 ** -20, 2.0 ** -19, 2.0 ** -24, 0.0]], dtype=np.float32)

    diff = comparators.pair_diff(a, b)

    assert diff.max_abs == 2.0 ** -19
    assert diff.small_abs == 2.0 ** -24  # the small half's largest difference: the absolute floor
    assert diff.rel == 2.0 ** -21 - 2.0 ** -26  # (2^-19 - 2^-24) / 4 beats (2^-20 - 2^-24) / 2
    assert diff.top1_agreement == 1.0
    assert not diff.identical
    assert comparators.agree(spec(method="allclose", rtol=diff.rel, atol=diff.small_abs, top1=False), a, b)


def test_pair_diff_of_identical_outputs_is_zero():
    diff = comparators.pair_diff(LOGITS, LOGITS.copy())

    assert diff.identical and diff.max_abs == 0.0 and diff.top1_agreement == 1.0
