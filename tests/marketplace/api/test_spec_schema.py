"""The job spec in the schema (marketplace/api/specs.py): typed per kind, in agreement with the kinds' own
validation, and with examples a new integrator can send as they stand."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from marketplace.api import specs
from marketplace.jobs import comparators
from marketplace.jobs.kinds import KINDS, fedavg, inference
from marketplace.jobs.models import Job
from marketplace.ledger.escrow import job_price_take
from worker_agent.architectures import REGISTRY

SUBMISSION = "#/components/schemas/JobSubmission"


@pytest.fixture
def schema(client):
    return client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()


def body_examples(schema: dict[str, Any], path: str) -> dict[str, Any]:
    content = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return {name.lower(): example["value"] for name, example in content["examples"].items()}


def as_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable` as JSON Schema (draft 4, whose boolean exclusive bounds 3.0 uses)."""
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: as_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable"):
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


def validator(schema: dict[str, Any], ref: str) -> jsonschema.Draft4Validator:
    document = {"components": as_json_schema(schema["components"]), "$ref": ref}
    return jsonschema.Draft4Validator(document)


def upload_example_artifacts(client) -> dict[str, str]:
    shas = {}
    for name, data in specs.example_artifacts().items():
        response = client.post("/api/v1/artifacts/", data=data, content_type="application/octet-stream")
        assert response.status_code in (200, 201), response.content
        shas[name] = response.json()["sha256"]
    return shas


# --- the schema's shape ----------------------------------------------------------------------------

def test_the_create_and_quote_bodies_are_a_union_discriminated_on_kind(schema):
    for path in ("/api/v1/jobs/", "/api/v1/jobs/quote/"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": SUBMISSION}
    union = schema["components"]["schemas"]["JobSubmission"]
    assert union["discriminator"]["propertyName"] == "kind"
    assert set(union["discriminator"]["mapping"]) == set(KINDS)


def test_the_model_is_a_union_on_architecture_with_each_config_typed(schema):
    components = schema["components"]["schemas"]
    model = components["Model"]

    assert model["discriminator"]["propertyName"] == "architecture"
    assert set(model["discriminator"]["mapping"]) == set(REGISTRY)
    assert components["MlpConfig"]["required"] == ["in_features", "out_features"]
    assert components["CnnConfig"]["properties"]["kernel_size"]["default"] == 3
    assert components["InferenceSpec"]["additionalProperties"] is False


def test_the_spec_serializers_name_exactly_the_keys_and_defaults_the_kinds_take():
    for serializer, kind in ((specs.InferenceSpec(), inference), (specs.FedavgSpec(), fedavg)):
        fields = serializer.fields
        assert set(fields) == kind.ALLOWED_KEYS | {"price_per_result"}
        for key, default in kind.DEFAULTS.items():
            if key in ("compare", "trim_fraction"):  # a union, and an option of one aggregation: in help_text
                continue
            assert fields[key].default == default, key
    assert set(specs.MODELS) == set(REGISTRY)
    assert set(specs.COMPARES) == set(comparators.PARAMETERS)
    for method, serializer in specs.COMPARES.items():
        assert set(serializer().fields) == {*comparators.COMMON, *comparators.PARAMETERS[method]}, method
    assert set(specs.SUBMISSIONS) == set(KINDS)


# --- the examples, as a new integrator uses them -----------------------------------------------------

def test_the_example_bodies_match_the_schema(schema):
    check = validator(schema, SUBMISSION)
    examples = body_examples(schema, "/api/v1/jobs/")

    assert set(examples) == {"inference", "fedavg"}
    for body in examples.values():
        check.validate(body)


@pytest.mark.parametrize("name", ["inference", "fedavg"])
def test_a_first_submission_written_from_the_schema_alone_is_created(schema, api, submitter, enqueued, name):
    client = api(submitter)
    shas = upload_example_artifacts(client)
    body = body_examples(schema, "/api/v1/jobs/")[name]
    assert {body["spec"]["model"]["weights"]} <= set(shas.values())

    quote = client.post("/api/v1/jobs/quote/", body, format="json")
    created = client.post("/api/v1/jobs/", body, format="json")

    assert quote.status_code == 200, quote.json()
    assert created.status_code == 201, created.json()
    assert Job.objects.get(pk=created.json()["id"]).kind == name


# --- the schema and the kinds agree --------------------------------------------------------------------

def _changed(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """The example body with spec.<path> set to value (a `...` value deletes the key)."""
    changed = copy.deepcopy(body)
    *parents, last = path.split(".")
    node = changed["spec"]
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return changed


ACCEPTED = [
    ("inference", "rows_per_unit", 1), ("inference", "rows_per_unit", 1_000_000), ("inference", "batch_size", 65_536),
    ("inference", "compare", {"method": "exact"}), ("inference", "compare", {"method": "top1", "min_agreement": 0.9}),
    ("inference", "compare", {"method": "metric", "metric": "rms", "epsilon": 0.01}),
    ("inference", "compare", ...), ("inference", "price_per_result", 7), ("inference", "price_per_result", "0"),
    ("inference", "quorum", 3), ("inference", "allow_nonfinite", True), ("inference", "unit_memory_mb", 256),
    ("inference", "max_results_per_unit", 20), ("inference", "unit_timeout_seconds", 86_400),
    ("fedavg", "momentum", 0.99), ("fedavg", "aggregation", "median"), ("fedavg", "target", None),
    ("fedavg", "dp", {"clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}), ("fedavg", "seed", 2**31 - 1),
    ("fedavg", "learning_rate", 100), ("fedavg", "target", {"metric": "loss", "value": 0.5}),
]
REFUSED = [
    ("inference", "rows_per_unit", 0, "rows_per_unit"), ("inference", "rows_per_unit", 1_000_001, "rows_per_unit"),
    ("inference", "batch_size", "4", "batch_size"), ("inference", "quorum", 1, "quorum"),
    ("inference", "quorum", 11, "quorum"), ("inference", "extra", 1, "spec"),
    ("inference", "compare", {"method": "fuzzy"}, "compare.method"),
    ("inference", "compare", {"method": "metric"}, "compare.epsilon"),
    ("inference", "compare", {"method": "allclose", "rtol": 2}, "compare.rtol"),
    ("inference", "compare", {"method": "exact", "rtol": 0.1}, "compare"),
    ("inference", "model.config.depth", 3, "model.config"), ("inference", "model.architecture", "resnet", "model.architecture"),
    ("inference", "model.config.in_features", 0, "model.config"), ("inference", "dataset", "ABC", "dataset"),
    ("inference", "price_per_result", -1, "price_per_result"), ("inference", "price_per_result", "1e3", "price_per_result"),
    ("inference", "adaptive", "yes", "adaptive"), ("inference", "unit_memory_mb", 100, "unit_memory_mb"),
    ("inference", "dataset", ..., "dataset"),
    ("fedavg", "momentum", 1.0, "momentum"), ("fedavg", "learning_rate", 0, "learning_rate"),
    ("fedavg", "aggregation", "max", "aggregation"), ("fedavg", "dp", {"clip_norm": 0}, "dp.clip_norm"),
    ("fedavg", "dp", {"clip_norm": 1, "delta": 1}, "dp.delta"), ("fedavg", "target", {"metric": "f1", "value": 1}, "target"),
    ("fedavg", "rounds", 1001, "rounds"), ("fedavg", "eval_dataset", ..., "eval_dataset"),
]


def _kind_verdict(body: dict[str, Any], owner) -> dict[str, str]:
    """The kind's own field errors for a body ({} when it accepts it)."""
    from marketplace.core.exceptions import ValidationFailed

    try:
        spec, _ = job_price_take(body["spec"])
        KINDS[body["kind"]].validate_spec(spec, owner=owner)
    except ValidationFailed as exc:
        return exc.fields
    return {}


def test_the_schema_accepts_what_the_kinds_accept_and_refuses_what_they_refuse(schema, api, submitter):
    upload_example_artifacts(api(submitter))
    check = validator(schema, SUBMISSION)
    examples = body_examples(schema, "/api/v1/jobs/")

    assert len(ACCEPTED) == 21 and len(REFUSED) == 27
    for kind, path, value in ACCEPTED:
        body = _changed(examples[kind], path, value)
        assert _kind_verdict(body, submitter) == {}, (kind, path, value)
        assert check.is_valid(body), (kind, path, value, [e.message for e in check.iter_errors(body)])
    for kind, path, value, field in REFUSED:
        body = _changed(examples[kind], path, value)
        assert field in _kind_verdict(body, submitter), (kind, path, value)
        assert not check.is_valid(body), (kind, path, value)


def test_what_only_the_kinds_can_check_is_said_in_the_schema_descriptions(schema):
    """Rules across fields or inside artifacts have no JSON Schema form: the descriptions carry them."""
    spec = schema["components"]["schemas"]["InferenceSpec"]["properties"]

    assert "at least quorum" in spec["max_results_per_unit"]["description"]
    assert "`x`" in spec["dataset"]["description"]
    assert "trimmed_mean only" in schema["components"]["schemas"]["FedavgSpec"]["properties"]["trim_fraction"]["description"]


def test_the_weights_description_names_the_tensors_the_registry_expects(schema):
    from worker_agent.architectures import resolve

    described = schema["components"]["schemas"]["MlpModel"]["properties"]["weights"]["description"]
    arch, config = resolve("mlp", specs.EXAMPLE_MLP)

    for name, shape in arch.param_shapes(config).items():
        assert f"{name} {list(shape)}" in described, name
