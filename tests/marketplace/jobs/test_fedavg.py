"""The fedavg kind's server half: the spec, round 0's units, what an output must be, when two updates agree,
and the numbers (aggregation, central DP, numpy evaluation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from marketplace.core.exceptions import ValidationFailed
from marketplace.core.tensors import TensorFileError
from marketplace.jobs import fedavg_math
from marketplace.jobs.kinds import fedavg, kind_module
from marketplace.jobs.services import job_split, job_submit
from marketplace.workunits.models import Result, WorkUnit
from tests.conftest import stored_bytes
from tests.marketplace.jobs.fedavg_helpers import labelled_bytes, spec_for, x_only_bytes
from worker_agent.kinds.fedavg import LOSS_NAME, SAMPLES_NAME, unit_seed


def refused(submitter, spec) -> dict:
    with pytest.raises(ValidationFailed) as caught:
        fedavg.validate_spec(spec, owner=submitter)
    return caught.value.fields


# --- the spec -------------------------------------------------------------------------------------

def test_a_valid_spec_is_normalised_with_defaults(upload, submitter):
    normal = kind_module("fedavg").validate_spec(spec_for(upload, submitter), owner=submitter)

    assert normal["train_rows"] == 60 and normal["eval_rows"] == 30
    assert normal["aggregation"] == "mean" and normal["adaptive"] is False
    assert normal["compare"]["class_exact"] is True and normal["dp"] is None and normal["target"] is None
    assert fedavg.units_expected(normal) == 2 * 3


def test_compare_parameters_left_out_take_the_training_defaults(upload, submitter):
    normal = fedavg.validate_spec(spec_for(upload, submitter, compare={"rtol": 1e-2}), owner=submitter)

    assert normal["compare"] == {"method": "allclose", "rtol": 1e-2, "atol": 1e-5, "top1": False, "class_exact": True}


def test_central_dp_shows_its_privacy_parameters_on_the_spec(upload, submitter):
    normal = fedavg.validate_spec(spec_for(upload, submitter, dp={"clip_norm": 1.0, "noise_multiplier": 1.1}),
                                  owner=submitter)

    privacy = normal["dp"]
    assert (privacy["clip_norm"], privacy["noise_multiplier"], privacy["delta"]) == (1.0, 1.1, 1e-5)
    assert privacy["noise_std"] == pytest.approx(1.1 / 3)
    assert privacy["sampling_rate"] == 1.0
    assert privacy["epsilon"] == fedavg_math.dp_epsilon(noise_multiplier=1.1, rounds=2, delta=1e-5)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"aggregation": "mode"}, "aggregation"),
        ({"rounds": 0}, "rounds"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"trim_fraction": 0.1}, "trim_fraction"),
        ({"aggregation": "trimmed_mean", "trim_fraction": 0.5}, "trim_fraction"),
        ({"dp": {"clip_norm": 0}}, "dp.clip_norm"),
        ({"dp": {"clip_norm": 1.0}, "aggregation": "median"}, "dp"),
        # Out of range: refused on its field, not a ZeroDivisionError in the privacy accountant (a 500).
        ({"dp": {"clip_norm": -1, "delta": 2}}, "dp.delta"),
        ({"dp": {"clip_norm": 1.0, "delta": 0}}, "dp.delta"),
        ({"target": {"metric": "f1", "value": 1}}, "target"),
        ({"shards": 61}, "shards"),
        ({"rounds": 1000, "shards": 101}, "rounds"),
        ({"surprise": 1}, "spec"),
    ],
)
def test_a_bad_spec_is_refused_on_its_field(upload, submitter, change, field):
    assert field in refused(submitter, spec_for(upload, submitter, **change))


def test_a_dataset_without_labels_is_refused(upload, submitter):
    spec = spec_for(upload, submitter, train_dataset=upload(x_only_bytes(10), submitter))

    assert "exactly two tensors" in refused(submitter, spec)["train_dataset"]


def test_labels_outside_the_models_classes_are_refused(upload, submitter):
    x = np.zeros((5, 4), dtype=np.float32)
    bad = upload(save_tensors({"x": x, "y": np.array([0, 1, 2, 3, 0], dtype=np.int64)}), submitter)

    assert "[0, 3)" in refused(submitter, spec_for(upload, submitter, eval_dataset=bad))["eval_dataset"]


def test_a_pickle_given_as_a_dataset_is_refused_without_being_read(upload, submitter):
    import pickle

    spec = spec_for(upload, submitter, train_dataset=upload(pickle.dumps({"x": [1, 2]}), submitter))

    assert "not a safetensors file" in refused(submitter, spec)["train_dataset"]


def test_someone_elses_dataset_is_refused(upload, submitter, other_submitter):
    spec = spec_for(upload, submitter, eval_dataset=upload(labelled_bytes(9, seed=9), other_submitter))

    assert "no artifact" in refused(submitter, spec)["eval_dataset"]


# --- round 0's units ------------------------------------------------------------------------------

@pytest.fixture
def split_job(upload, submitter):
    job = job_submit(owner=submitter, kind="fedavg", spec=spec_for(upload, submitter, rows=61))
    job_split(job_id=job.pk)
    job.refresh_from_db()
    return job


def test_splitting_makes_one_replicated_unit_per_shard_of_round_zero(split_job):
    units = list(WorkUnit.objects.filter(job=split_job).order_by("index"))

    assert split_job.units_total == 3 and [u.index for u in units] == [0, 1, 2]
    assert [(u.payload["round"], u.payload["shard"], u.payload["samples"]) for u in units] == [(0, 0, 21), (0, 1, 20), (0, 2, 20)]
    assert all(u.payload["model"]["weights"] == split_job.spec["model"]["weights"] for u in units)
    assert [u.payload["train"]["seed"] for u in units] == [unit_seed(0, 0, shard) for shard in range(3)]
    assert Result.objects.filter(job=split_job).count() == 3 * 2  # quorum 2, not adaptive


def test_the_shards_are_the_training_rows_in_order(split_job):
    data = load_tensors(stored_bytes(split_job.spec["train_dataset"]))
    units = WorkUnit.objects.filter(job=split_job).order_by("index")

    xs = [load_tensors(stored_bytes(u.payload["inputs"]["x"]))["x"] for u in units]
    ys = [load_tensors(stored_bytes(u.payload["inputs"]["y"]))["y"] for u in units]

    np.testing.assert_array_equal(np.concatenate(xs), data["x"])
    np.testing.assert_array_equal(np.concatenate(ys), data["y"])
    assert all(set(u.inputs.values_list("sha256", flat=True)) == {u.payload["model"]["weights"], *u.payload["inputs"].values()}
               for u in units)


# --- outputs and agreement ------------------------------------------------------------------------

def _update_file(tmp_path, name, weights, *, loss=0.5, samples=21):
    path = tmp_path / name
    tensors = {k: v.astype(np.float32) for k, v in weights.items()}
    tensors[LOSS_NAME] = np.array([loss], dtype=np.float32)
    tensors[SAMPLES_NAME] = np.array([samples], dtype=np.int64)
    path.write_bytes(save_tensors(tensors))
    return path


@pytest.fixture
def unit_and_weights(split_job):
    unit = WorkUnit.objects.filter(job=split_job).order_by("index").first()
    weights = load_tensors(stored_bytes(unit.payload["model"]["weights"]))
    return unit, weights


def test_an_output_with_the_weights_and_metrics_is_accepted(unit_and_weights, tmp_path):
    unit, weights = unit_and_weights

    fedavg.check_output(unit.payload, _update_file(tmp_path, "ok", weights))


def test_an_output_claiming_other_samples_than_the_shard_is_refused(unit_and_weights, tmp_path):
    unit, weights = unit_and_weights

    with pytest.raises(TensorFileError, match="says 99 samples"):
        fedavg.check_output(unit.payload, _update_file(tmp_path, "lie", weights, samples=99))


def test_an_output_without_its_training_loss_is_refused(unit_and_weights, tmp_path):
    unit, weights = unit_and_weights
    path = tmp_path / "no-loss"
    path.write_bytes(save_tensors({**weights, SAMPLES_NAME: np.array([21], dtype=np.int64)}))

    with pytest.raises(TensorFileError, match=LOSS_NAME):
        fedavg.check_output(unit.payload, path)


def test_inside_one_hardware_class_only_identical_updates_agree(split_job, unit_and_weights, tmp_path):
    _, weights = unit_and_weights
    nudged = {k: v + np.float32(1e-7) for k, v in weights.items()}
    a, b = _update_file(tmp_path, "a", weights), _update_file(tmp_path, "b", nudged)

    assert not fedavg.outputs_agree(split_job.spec, a, b, same_class=True)
    assert fedavg.outputs_agree(split_job.spec, a, b, same_class=False)


def test_a_sign_flipped_update_disagrees_with_the_honest_one_across_classes(split_job, unit_and_weights, tmp_path):
    _, start = unit_and_weights
    honest = {k: v + np.float32(0.01) for k, v in start.items()}
    poisoned = {k: start[k] - 10 * (honest[k] - start[k]) for k in start}

    assert not fedavg.outputs_agree(split_job.spec, _update_file(tmp_path, "h", honest),
                                    _update_file(tmp_path, "p", poisoned), same_class=False)


def test_updates_whose_training_losses_differ_beyond_epsilon_disagree(split_job, unit_and_weights, tmp_path):
    _, weights = unit_and_weights

    assert not fedavg.outputs_agree(split_job.spec, _update_file(tmp_path, "a", weights, loss=0.5),
                                    _update_file(tmp_path, "b", weights, loss=0.6))


def test_a_non_finite_update_agrees_with_nothing_not_even_itself(split_job, unit_and_weights, tmp_path):
    _, weights = unit_and_weights
    broken = dict(weights)
    name = sorted(broken)[0]
    broken[name] = broken[name].copy()
    broken[name].flat[0] = np.nan
    path = _update_file(tmp_path, "nan", broken)

    assert not fedavg.outputs_agree(split_job.spec, path, path, same_class=True)


# --- the numbers ----------------------------------------------------------------------------------

def _weights(value):
    return {"w": np.full((2, 2), value, dtype=np.float32), "b": np.full((2,), value, dtype=np.float32)}


def test_the_mean_weights_each_update_by_its_shards_samples():
    new = fedavg_math.aggregate(_weights(0), [_weights(1), _weights(4)], [3, 1], method="mean")

    np.testing.assert_allclose(new["w"], 1.75)


def test_trimmed_mean_and_median_ignore_an_outlier():
    updates = [_weights(1), _weights(1.2), _weights(0.8), _weights(-100)]

    trimmed = fedavg_math.aggregate(_weights(0), updates, [1] * 4, method="trimmed_mean", trim_fraction=0.25)
    median = fedavg_math.aggregate(_weights(0), updates, [1] * 4, method="median")

    np.testing.assert_allclose(trimmed["b"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(median["b"], 0.9, rtol=1e-6)


def test_central_dp_clips_each_update_and_adds_noise_of_the_stated_scale():
    big = {"w": np.full((100, 100), 10.0, dtype=np.float32)}
    start = {"w": np.zeros((100, 100), dtype=np.float32)}

    clipped = fedavg_math.aggregate(start, [big, big], [1, 1], method="mean",
                                    dp={"clip_norm": 1.0, "noise_multiplier": 0.0})
    noisy = fedavg_math.aggregate(start, [start, start], [1, 1], method="mean",
                                  dp={"clip_norm": 1.0, "noise_multiplier": 2.0}, rng=np.random.default_rng(0))

    assert math.sqrt(float(np.sum(np.square(clipped["w"].astype(np.float64))))) == pytest.approx(1.0, rel=1e-5)
    assert float(np.std(noisy["w"])) == pytest.approx(2.0 * 1.0 / 2, rel=0.05)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    base = fedavg_math.dp_epsilon(noise_multiplier=1.0, rounds=10, delta=1e-5)

    assert fedavg_math.dp_epsilon(noise_multiplier=1.0, rounds=20, delta=1e-5) > base
    assert fedavg_math.dp_epsilon(noise_multiplier=2.0, rounds=10, delta=1e-5) < base
    assert fedavg_math.dp_epsilon(noise_multiplier=0.0, rounds=10, delta=1e-5) is None


@pytest.mark.parametrize(
    ("architecture", "config"),
    [("mlp", {"in_features": 4, "hidden": [8, 5], "out_features": 3}),
     ("cnn", {"in_channels": 2, "height": 9, "width": 7, "channels": [4, 3], "kernel_size": 3, "hidden": 6,
              "out_features": 5})],
)
def test_the_numpy_forward_pass_matches_the_registry_model_in_torch(architecture, config):
    import torch

    from worker_agent.architectures import resolve

    arch, normal = resolve(architecture, config)
    torch.manual_seed(0)
    model = arch.build(normal).eval()
    x = torch.randn(11, *arch.input_shape(normal))
    with torch.no_grad():
        expected = model(x).numpy()
    params = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}

    got = fedavg_math.forward(architecture, normal, params, x.numpy().astype(np.float64))

    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_shards_differ_in_size_by_at_most_one_and_cover_every_row():
    assert fedavg_math.shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
