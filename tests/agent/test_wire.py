"""The wire schema's records on their own (no Django): strict reading, exact writing, and the lease's
deliberate tolerance. That both ends use them is tested in tests/marketplace/test_wire_schema.py."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from worker_agent import kinds, protocol, wire

SHA_W, SHA_X, SHA_Y = "a" * 64, "b" * 64, "c" * 64


def inference() -> dict[str, Any]:
    return {
        "kind": "inference",
        "model": {"architecture": "mlp", "config": {"in_features": 6, "hidden": [4], "out_features": 3}, "weights": SHA_W},
        "inputs": {"x": SHA_X},
        "rows": 16, "batch_size": 8,
        "output": {"name": "y", "dtype": "float32", "shape": [16, 3]},
        "limits": {"seconds": 60, "memory_mb": 2048},
    }


def fedavg() -> dict[str, Any]:
    return {
        "kind": "fedavg",
        "model": {"architecture": "mlp", "config": {"in_features": 6, "hidden": [4], "out_features": 3}, "weights": SHA_W},
        "inputs": {"x": SHA_X, "y": SHA_Y},
        "round": 1, "shard": 2, "samples": 40,
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 0.05, "momentum": 0.9, "seed": 8731},
        "limits": {"seconds": 600.5, "memory_mb": 2048},
    }


def lease(**fields: Any) -> dict[str, Any]:
    return {"result_id": 91, "unit_id": 40, "expires_at": "2026-11-22T10:00:00Z", "payload": inference(),
            "signature": "c2lnbmF0dXJl", "key_id": "mk-1", **fields}


def changed(payload: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of payload with the member at a dotted path set to value."""
    copied = copy.deepcopy(payload)
    *outer, last = path.split(".")
    target = copied
    for key in outer:
        target = target[key]
    target[last] = value
    return copied


@pytest.mark.parametrize("make", [inference, fedavg])
def test_a_payload_reads_and_writes_back_to_the_very_bytes_that_were_signed(make) -> None:
    raw = make()

    unit = wire.unit_payload_from_wire(raw)

    assert protocol.canonical_json(unit.to_wire()) == protocol.canonical_json(raw)
    assert list(unit.to_wire()) == list(raw)  # the key order of the stored JSON too


def test_an_integer_stays_an_integer_and_a_float_a_float() -> None:
    # 60 and 60.0 are equal in Python but not in the signed canonical JSON.
    unit = wire.unit_payload_from_wire(inference())
    again = wire.unit_payload_from_wire(changed(inference(), "limits.seconds", 60.0))

    assert protocol.canonical_json(unit.to_wire()) != protocol.canonical_json(again.to_wire())
    assert b'"seconds":60}' in protocol.canonical_json(unit.to_wire())


@pytest.mark.parametrize(
    ("make", "path", "value", "message"),
    [
        (inference, "rows", True, "payload.rows must be an integer"),  # a bool is not an int
        (inference, "rows", 16.0, "payload.rows must be an integer"),
        (inference, "rows", 0, r"payload.rows must be an integer in \[1, "),
        (inference, "batch_size", 2**40, r"payload.batch_size must be an integer in \[1, 1048576\]"),
        (inference, "output.shape", [17, 3], r"payload.output.shape must have one row per input row \(16\)"),
        (inference, "output.shape", [16, 3, 1], "payload.output.shape must be a list of 2 integers"),
        (inference, "output.dtype", "float16", "payload.output.dtype must be float32"),
        (inference, "output.name", "", "payload.output.name must be a non-empty string"),
        (inference, "output.name", "y" * 257, "payload.output.name must be a non-empty string of at most 256"),
        (inference, "inputs", {"x": SHA_X, "z": SHA_Y}, "payload.inputs must name the input tensor file as `x`"),
        (inference, "model.weights", "A" * 64, "payload.model.weights must be a sha256"),
        (inference, "model.config", [], "payload.model.config must be an object"),
        (inference, "model.config", {f"k{i}": 1 for i in range(65)}, "payload.model.config must be an object of at most 64"),
        (inference, "limits.seconds", float("nan"), "payload.limits.seconds must be a number"),
        (inference, "limits.memory_mb", False, "payload.limits.memory_mb must be an integer"),
        (inference, "limits", None, "payload.limits must be an object, got null"),
        (fedavg, "train.learning_rate", 0, r"payload.train.learning_rate must be a number in \(0, "),
        (fedavg, "train.momentum", 1, r"payload.train.momentum must be a number in \[0, 1\)"),
        (fedavg, "train.seed", 2**63, "payload.train.seed must be an integer in"),
        (fedavg, "round", -1, "payload.round must be an integer"),
        (fedavg, "inputs", {"x": SHA_X}, "payload.inputs must name exactly the shard's `x` and `y`"),
        # read as the kind it claims to be: fedavg's members are strangers to an inference unit
        (fedavg, "kind", "inference", "payload has unknown keys: 'round', 'samples', 'shard', 'train'"),
    ],
)
def test_a_value_out_of_the_schema_is_refused_naming_the_field(make, path, value, message) -> None:
    with pytest.raises(wire.PayloadError, match=message):
        wire.unit_payload_from_wire(changed(make(), path, value))


def test_an_unknown_or_missing_key_is_refused_at_every_level() -> None:
    with pytest.raises(wire.PayloadError, match="payload has unknown keys: 'job_id'"):
        wire.unit_payload_from_wire({**inference(), "job_id": 3})
    with pytest.raises(wire.PayloadError, match="payload.train has unknown keys: 'lr'"):
        wire.unit_payload_from_wire(changed(fedavg(), "train.lr", 0.1))
    raw = fedavg()
    del raw["train"]["epochs"]
    with pytest.raises(wire.PayloadError, match="payload.train lacks epochs"):
        wire.unit_payload_from_wire(raw)


def test_an_unknown_kind_is_refused_saying_what_this_agent_runs() -> None:
    with pytest.raises(wire.PayloadError) as caught:
        wire.unit_payload_from_wire({"kind": "sweep"})

    assert str(caught.value) == "unsupported task kind 'sweep'; this agent runs: fedavg, inference"
    with pytest.raises(wire.PayloadError, match="payload must be an object, got list"):
        wire.unit_payload_from_wire([])


def test_the_schema_knows_exactly_the_kinds_the_agent_runs() -> None:
    assert set(wire.PAYLOADS) == set(kinds.KIND_MODULES) == set(protocol.TASK_KINDS)


def test_optional_members_read_as_an_agent_always_read_them() -> None:
    raw = fedavg()
    del raw["limits"], raw["train"]["momentum"]

    unit = wire.unit_payload_from_wire(raw)

    assert isinstance(unit, wire.FedAvgPayload)
    assert unit.limits == wire.Limits(seconds=300, memory_mb=2048) and unit.train.momentum == 0.0


def test_a_payload_names_each_artifact_it_needs_once() -> None:
    shared = wire.unit_payload_from_wire(changed(fedavg(), "inputs.y", SHA_X))

    assert wire.unit_payload_from_wire(fedavg()).artifacts() == [SHA_W, SHA_X, SHA_Y]
    assert shared.artifacts() == [SHA_W, SHA_X]


def test_a_record_cannot_be_built_invalid_on_either_side() -> None:
    with pytest.raises(wire.WireError, match="samples must be an integer"):
        wire.FedAvgPayload.from_wire(changed(fedavg(), "samples", 0))
    with pytest.raises(wire.WireError, match="model must be a ModelRef, got dict"):
        wire.InferencePayload(model=inference()["model"], inputs=wire.InferenceInputs(x=SHA_X), rows=1,  # type: ignore[arg-type]
                              batch_size=1, output=wire.InferenceOutput(name="y", dtype="float32", shape=(1, 3)))


def test_a_record_is_frozen_and_what_it_writes_is_a_copy() -> None:
    unit = wire.unit_payload_from_wire(inference())
    written = unit.to_wire()
    written["model"]["config"]["in_features"] = 99

    with pytest.raises(dataclasses.FrozenInstanceError):
        unit.rows = 3  # type: ignore[misc]
    assert unit.model.config["in_features"] == 6


# --- the lease ------------------------------------------------------------------------------------

def test_a_lease_keeps_its_payload_exactly_as_signed() -> None:
    raw = lease(payload={**inference(), "rows": 17})  # not a valid unit: that is for after the signature check

    parsed = wire.Lease.from_wire(raw)

    assert parsed.payload == raw["payload"] and parsed.label == "unit 40 (result 91)"
    assert parsed.to_wire() == raw


@pytest.mark.parametrize(
    ("fields", "signature", "key_id"),
    [({"signature": None, "key_id": None}, None, ""), ({"signature": 5, "key_id": ["k"]}, None, ""),
     ({"signature": "s" * 5000}, None, "mk-1"), ({}, "c2lnbmF0dXJl", "mk-1")],
)
def test_a_lease_with_a_missing_or_odd_signature_is_still_a_lease(fields, signature, key_id) -> None:
    raw = lease(**fields)
    for name in ("signature", "key_id"):
        if fields.get(name, "") is None:
            del raw[name]  # missing altogether

    parsed = wire.Lease.from_wire(raw)

    assert (parsed.signature, parsed.key_id) == (signature, key_id)


def test_a_lease_ignores_envelope_keys_it_does_not_know() -> None:
    assert wire.Lease.from_wire(lease(job_id=3)).unit_id == 40


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"result_id": True}, "result_id must be an integer"), ({"unit_id": 0}, "unit_id must be an integer"),
     ({"payload": []}, "payload must be an object"), ({"expires_at": "soon"}, "expires_at must be an ISO 8601"),
     ({"expires_at": None}, "expires_at must be a non-empty string")],
)
def test_a_lease_whose_ids_payload_or_expiry_cannot_be_read_is_refused(fields, message) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.Lease.from_wire(lease(**fields))


def test_a_lease_batch_holds_at_most_a_batch() -> None:
    with pytest.raises(wire.WireError, match="leases must be a list of at most 64"):
        wire.LeaseBatch.from_wire({"leases": [lease()] * 65, "retry_after": 0})
    with pytest.raises(wire.WireError, match="retry_after must be a number"):
        wire.LeaseBatch.from_wire({"leases": [], "retry_after": "2"})
    assert wire.LeaseBatch.from_wire({"leases": [lease()], "retry_after": 0.5}).leases == (lease(),)


# --- the other messages ---------------------------------------------------------------------------

def test_a_lease_request_leaves_out_hardware_it_does_not_send() -> None:
    assert wire.LeaseRequest(max_units=4).to_wire() == {"max_units": 4}
    assert wire.LeaseRequest(max_units=4, hardware={"os": "linux"}).to_wire() == {"max_units": 4, "hardware": {"os": "linux"}}


def test_a_heartbeat_carries_progress_only_when_given_and_only_for_its_own_result_ids() -> None:
    assert wire.HeartbeatRequest(result_ids=(5,)).to_wire() == {"result_ids": [5]}
    request = wire.HeartbeatRequest.from_wire({"result_ids": [5, 6], "progress": {"5": 0.5, "6": 1}})
    assert request.fractions() == {5: 0.5, 6: 1.0}
    for progress, problem in [({"7": 0.5}, "keys must be result ids"), ({"05": 0.5}, "keys must be result ids"),
                              ({"5": 1.01}, r"progress.5 must be a number in \[0, 1\]"),
                              ({"5": True}, "must be a number"), ({"5": float("nan")}, "must be a number"),
                              ([0.5], "must be an object")]:
        with pytest.raises(wire.WireError, match=problem):
            wire.HeartbeatRequest.from_wire({"result_ids": [5], "progress": progress})


def test_a_heartbeat_answer_is_read_strictly() -> None:
    answer = {"renewed": [1, 2], "lost": [3], "expires_at": "2026-11-22T10:00:00.123456Z"}

    assert wire.HeartbeatAnswer.from_wire(answer).lost == (3,)
    with pytest.raises(wire.WireError, match=r"lost\[0\] must be an integer"):
        wire.HeartbeatAnswer.from_wire({**answer, "lost": ["3"]})
    with pytest.raises(wire.WireError, match="lacks expires_at"):
        wire.HeartbeatAnswer.from_wire({"renewed": [], "lost": []})


def test_a_report_writes_every_member_the_server_reads() -> None:
    report = wire.Report(output_sha256=SHA_X, signature="AA==", elapsed_seconds=1.5, metrics={"rows": 16})

    assert report.to_wire() == {"output_sha256": SHA_X, "signature": "AA==", "elapsed_seconds": 1.5, "metrics": {"rows": 16}}
    with pytest.raises(wire.WireError, match="elapsed_seconds must be a number"):
        wire.Report(output_sha256=SHA_X, signature="AA==", elapsed_seconds=-1.0)


def test_an_enrolment_answer_is_read_strictly() -> None:
    answer = {"device_id": 42, "device_secret": "s", "lease_seconds": 90, "marketplace_keys": [{"key_id": "mk-1"}]}

    assert wire.Enrolled.from_wire(answer).marketplace_keys == ({"key_id": "mk-1"},)
    with pytest.raises(wire.WireError, match="device_id must be an integer"):
        wire.Enrolled.from_wire({**answer, "device_id": "42"})
    with pytest.raises(wire.WireError, match="lacks lease_seconds"):
        wire.Enrolled.from_wire({key: value for key, value in answer.items() if key != "lease_seconds"})


# --- capabilities, sent with every lease request ----------------------------------------------------

CAPABILITIES = {"memory_mb": 8000, "cores": 4, "device_type": "cuda", "gpu_name": "RTX 3060",
                "gpu_memory_mb": 12288, "torch_version": "2.13.0", "kinds": ["fedavg", "inference"]}


def test_capabilities_round_trip_inside_a_lease_request() -> None:
    request = wire.LeaseRequest.from_wire({"max_units": 2, "capabilities": CAPABILITIES})

    assert request.capabilities is not None and request.capabilities.kinds == ("fedavg", "inference")
    assert request.to_wire() == {"max_units": 2, "capabilities": CAPABILITIES}
    assert "capabilities" not in wire.LeaseRequest(max_units=1).to_wire()  # an old agent's request, as it was


def test_a_cpu_devices_capabilities_need_only_memory_and_cores() -> None:
    read = wire.Capabilities.from_wire({"memory_mb": 0, "cores": 1})

    assert (read.device_type, read.gpu_memory_mb, read.gpu_name, read.kinds) == ("cpu", 0, None, ())
    assert read.to_wire() == {"memory_mb": 0, "cores": 1, "device_type": "cpu", "gpu_memory_mb": 0, "kinds": []}


@pytest.mark.parametrize(("changes", "message"), [
    ({"memory_mb": -1}, r"capabilities.memory_mb must be an integer in \[0, 16777216\]"),
    ({"memory_mb": 1.5}, "capabilities.memory_mb must be an integer"),
    ({"cores": 0}, r"capabilities.cores must be an integer in \[1, 4096\]"),
    ({"cores": True}, "capabilities.cores must be an integer"),
    ({"device_type": "tpu"}, "capabilities.device_type must be one of cpu, cuda"),
    ({"gpu_memory_mb": 0}, "capabilities.gpu_memory_mb must be more than 0 exactly when device_type is cuda"),
    ({"device_type": "cpu"}, "capabilities.gpu_memory_mb must be more than 0 exactly when device_type is cuda"),
    ({"gpu_name": ""}, "capabilities.gpu_name must be a non-empty string"),
    ({"torch_version": "x" * 65}, "capabilities.torch_version must be a non-empty string of at most 64"),
    ({"kinds": "inference"}, "capabilities.kinds must be a list of at most 16"),
    ({"kinds": ["k"] * 17}, "capabilities.kinds must be a list of at most 16"),
    ({"kinds": ["inference", "inference"]}, "capabilities.kinds must not repeat a kind"),
    ({"kinds": [7]}, r"capabilities.kinds\[0\] must be a non-empty string of at most 32"),
    ({"swap_mb": 1}, "capabilities has unknown keys: 'swap_mb'"),
])
def test_capabilities_out_of_the_schema_are_refused_naming_the_field(changes, message) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.LeaseRequest.from_wire({"max_units": 1, "capabilities": {**CAPABILITIES, **changes}})


def test_null_or_non_object_capabilities_are_refused() -> None:
    for value in (None, [], "cpu"):
        with pytest.raises(wire.WireError, match="capabilities must be an object"):
            wire.LeaseRequest.from_wire({"capabilities": value})
    with pytest.raises(wire.WireError, match="capabilities lacks cores"):
        wire.LeaseRequest.from_wire({"capabilities": {"memory_mb": 1}})
