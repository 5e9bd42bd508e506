"""One wire schema for both ends (worker_agent/wire.py): what the marketplace builds and sends is what the
agent reads, field for field, and the API's documented serializers name the same fields as the records.

A field renamed on one side fails here: the round trip compares the key set of every JSON object with
the field set of the record that reads it, at every level, not only that parsing raised nothing."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from marketplace.api.v1 import agent as agent_api
from marketplace.core.signing import keyring
from marketplace.jobs.kinds import KINDS
from marketplace.jobs.services import job_split, job_submit
from marketplace.workunits.models import WorkUnit
from tests.marketplace.jobs.fedavg_helpers import spec_for
from worker_agent import kinds, pinning, protocol, wire
from worker_agent.kinds import fedavg as agent_fedavg
from worker_agent.kinds import inference as agent_inference

LEASE = "/api/v1/agent/lease"
AGENT_PARSERS = {"inference": agent_inference.parse, "fedavg": agent_fedavg.parse}


def record_types(record: type) -> dict[str, type[wire.Record]]:
    """The fields of `record` that hold records themselves, by name, with the record type they hold."""
    nested = {}
    for name, hint in typing.get_type_hints(record).items():
        candidates = typing.get_args(hint) or (hint,)
        found = [c for c in candidates if isinstance(c, type) and issubclass(c, wire.Record)]
        if found:
            nested[name] = found[0]
    return nested


def assert_same_fields(raw: dict[str, Any], record: type, where: str = "payload") -> None:
    """Every JSON object in `raw` has exactly the keys of the record that reads it, at every level."""
    keys = {item.name for item in dataclasses.fields(record)}
    assert set(raw) == keys, f"{where}: the JSON has {sorted(set(raw) - keys)} the record lacks, " \
                             f"the record has {sorted(keys - set(raw))} the JSON lacks"
    for name, nested in record_types(record).items():
        assert_same_fields(raw[name], nested, f"{where}.{name}")


def assert_round_trip(unit: WorkUnit, lease: dict[str, Any]) -> None:
    """A unit as the marketplace stored and leased it, read the agent's way, is the same unit."""
    parsed = wire.Lease.from_wire(lease)  # the agent's reading of the envelope
    payload = wire.unit_payload_from_wire(parsed.payload)  # ... and of the payload, once signed
    AGENT_PARSERS[payload.kind](parsed.payload)  # ... and the kind's own checks (architecture, shapes)

    assert_same_fields(unit.payload, wire.PAYLOADS[unit.payload["kind"]])
    assert protocol.canonical_json(payload.to_wire()) == protocol.canonical_json(unit.payload)
    # So the signature made over the stored payload verifies over what the agent rebuilt from it.
    message = protocol.unit_message(unit_id=parsed.unit_id, payload=payload.to_wire())
    assert keyring().active.verifies(bytes(unit.signature), message)


def lease_everything(device, units: int) -> list[dict[str, Any]]:
    """Lease every unit through the real endpoint, as the agent does; returns the answer's leases."""
    response = device.client().post(LEASE, {"max_units": 64}, format="json")
    assert response.status_code == 200
    batch = wire.LeaseBatch.from_wire(response.json())
    assert len(batch.leases) == units
    return list(batch.leases)


@pytest.fixture
def device(make_device, contributor):
    return make_device(contributor)


# --- payloads: built by the split, read by the agent ----------------------------------------------

def test_every_kind_the_marketplace_splits_is_one_the_schema_and_the_agent_know():
    assert set(KINDS) == set(wire.PAYLOADS) == set(kinds.KIND_MODULES) == set(protocol.TASK_KINDS)


@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_inference_units_round_trip_from_the_split_to_the_agent(submit_job, device, architecture):
    job = submit_job(rows=10, rows_per_unit=4, architecture=architecture)

    leases = lease_everything(device, 3)

    units = {unit.pk: unit for unit in WorkUnit.objects.filter(job=job)}
    assert sorted(lease["unit_id"] for lease in leases) == sorted(units)
    for lease in leases:
        assert_round_trip(units[lease["unit_id"]], lease)


def test_inference_units_with_hidden_known_rows_round_trip_too(inference_spec, upload, submitter, device):
    spec = inference_spec(rows=8, rows_per_unit=4, adaptive=False)
    known = {"x": np.ones((3, 4), np.float32), "y": np.zeros((3, 3), np.float32)}
    spec.update(known_answers=upload(save(known), submitter), known_answers_per_unit=2)
    job = job_submit(owner=submitter, kind="inference", spec=spec)
    job_split(job_id=job.pk)

    leases = lease_everything(device, 2)

    units = {unit.pk: unit for unit in WorkUnit.objects.filter(job=job)}
    for lease in leases:
        assert units[lease["unit_id"]].payload["rows"] == 4 + 2  # the known rows travel as rows, unmarked
        assert_round_trip(units[lease["unit_id"]], lease)


def test_fedavg_units_round_trip_from_the_split_to_the_agent(upload, submitter, device):
    job = job_submit(owner=submitter, kind="fedavg", spec=spec_for(upload, submitter, momentum=0.5))
    job_split(job_id=job.pk)

    leases = lease_everything(device, 3)  # round 0's three shards

    units = {unit.pk: unit for unit in WorkUnit.objects.filter(job=job)}
    for lease in leases:
        assert_round_trip(units[lease["unit_id"]], lease)


def test_a_field_renamed_on_the_marketplace_side_fails_the_round_trip(submit_job):
    unit = WorkUnit.objects.filter(job=submit_job(rows=4, rows_per_unit=4)).get()
    renamed = {**unit.payload, "batch": unit.payload["batch_size"]}
    del renamed["batch_size"]

    with pytest.raises(AssertionError, match=r"the JSON has \['batch'\] the record lacks"):
        assert_same_fields(renamed, wire.InferencePayload)
    with pytest.raises(wire.PayloadError, match="payload has unknown keys: 'batch'"):
        wire.unit_payload_from_wire(renamed)  # and the agent would refuse the unit, saying why


def test_a_field_renamed_on_the_agent_side_fails_the_round_trip(upload, submitter):
    job = job_submit(owner=submitter, kind="fedavg", spec=spec_for(upload, submitter))
    job_split(job_id=job.pk)
    unit = WorkUnit.objects.filter(job=job).first()
    # The agent's record of the training part, with one field renamed (a dataclass built like wire's).
    renamed = dataclasses.make_dataclass(
        "FedAvgTrain", [("epochs", int), ("batch", int), ("learning_rate", float), ("momentum", float), ("seed", int)],
        bases=(wire.Record,), frozen=True, kw_only=True,
    )
    payload_record = dataclasses.make_dataclass(
        "FedAvgPayload", [(item.name, renamed if item.name == "train" else item.type)
                          for item in dataclasses.fields(wire.FedAvgPayload)],
        bases=(wire.Record,), frozen=True, kw_only=True, namespace={"__module__": wire.__name__},
    )

    with pytest.raises(AssertionError, match=r"payload.train: the JSON has \['batch_size'\] the record lacks"):
        assert_same_fields(unit.payload, payload_record)


# --- the API's serializers document the records' fields -------------------------------------------

def serializer_fields(serializer: Any) -> dict[str, Any]:
    return dict(serializer().fields if isinstance(serializer, type) else serializer.fields)


def is_nullable(record: type, name: str) -> bool:
    hint = typing.get_type_hints(record)[name]
    return isinstance(hint, types.UnionType | typing._UnionGenericAlias) and type(None) in typing.get_args(hint)


SENT_BY_THE_SERVER = [  # (serializer the schema shows, record that builds the answer)
    (agent_api.LeaseOut, wire.Lease),
    (agent_api.LEASES_OUT, wire.LeaseBatch),
    (agent_api.RENEWED_OUT, wire.HeartbeatAnswer),
    (agent_api.ENROLLED_OUT, wire.Enrolled),
    (agent_api.MarketplaceKeyOut, pinning.MarketplaceKey),
]
SENT_BY_THE_AGENT = [  # (serializer that validates the request, record the agent builds it with)
    (agent_api.LeaseApi.LeaseIn, wire.LeaseRequest),
    (agent_api.CapabilitiesIn, wire.Capabilities),
    (agent_api.HeartbeatApi.HeartbeatIn, wire.HeartbeatRequest),
    (agent_api.ReportApi.ReportIn, wire.Report),
    (agent_api.FailApi.FailIn, wire.Failure),
    (agent_api.EnrollApi.EnrollIn, wire.EnrollRequest),
]


@pytest.mark.parametrize(("serializer", "record"), SENT_BY_THE_SERVER + SENT_BY_THE_AGENT,
                         ids=lambda value: getattr(value, "__name__", None) or type(value).__name__)
def test_the_serializer_names_the_records_fields_and_their_nullability(serializer, record):
    fields = serializer_fields(serializer)

    assert set(fields) == {item.name for item in dataclasses.fields(record)}
    for item in dataclasses.fields(record):
        # A field the record leaves out when None is absent on the wire, never null.
        nullable = is_nullable(record, item.name) and not item.metadata.get("omit_if_none")
        assert fields[item.name].allow_null == nullable, item.name


@pytest.mark.parametrize(("serializer", "record"), SENT_BY_THE_AGENT, ids=lambda value: getattr(value, "__name__", ""))
def test_a_request_member_is_required_by_the_server_exactly_when_the_record_has_no_default(serializer, record):
    fields = serializer_fields(serializer)

    assert len(fields) == len(dataclasses.fields(record))
    for item in dataclasses.fields(record):
        has_default = item.default is not dataclasses.MISSING or item.default_factory is not dataclasses.MISSING
        assert fields[item.name].required == (not has_default), item.name


def test_the_keys_the_marketplace_publishes_are_the_ones_the_agent_pins(db):
    (published,) = [key.wire() for key in keyring().published()]

    assert set(published) == {item.name for item in dataclasses.fields(pinning.MarketplaceKey)}
    assert pinning.MarketplaceKey.from_wire(published).key_id == published["key_id"]


# --- the other answers, read by the agent's own records -------------------------------------------

def test_a_heartbeat_answer_reads_as_the_agent_reads_it(submit_job, device):
    submit_job(rows=4, rows_per_unit=4)
    (lease,) = lease_everything(device, 1)

    response = device.client().post("/api/v1/agent/heartbeat", {"result_ids": [lease["result_id"], 999]}, format="json")

    answer = wire.HeartbeatAnswer.from_wire(response.json())
    assert (answer.renewed, answer.lost) == ((lease["result_id"],), (999,))


def test_an_enrolment_answer_reads_as_the_agent_reads_it(api, contributor):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    token = api(contributor).post("/api/v1/enrollment-tokens/", {}, format="json").json()["token"]
    key = Ed25519PrivateKey.generate()
    public_key = protocol.b64encode(key.public_key().public_bytes_raw())
    request = wire.EnrollRequest(
        token=token, name="garage pc", public_key=public_key, hardware={"os": "linux", "machine": "x86_64"},
        proof=protocol.b64encode(key.sign(protocol.enroll_message(token=token, public_key_b64=public_key))),
    )

    response = api().post("/api/v1/agent/enroll", request.to_wire(), format="json")

    assert response.status_code == 201
    answer = wire.Enrolled.from_wire(response.json())
    assert [key["key_id"] for key in answer.marketplace_keys] == [keyring().active.key_id]
