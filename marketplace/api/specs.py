"""The job spec in the OpenAPI schema: one typed request per task kind, a union discriminated on `kind`.

These serializers document; they validate nothing. A submission is still parsed by JobCreateIn (kind +
free-form spec) and checked by the kind itself (marketplace/jobs/kinds/*.validate_spec, the price by
ledger/escrow.job_price_take), which stays the one source of truth: a second validator could disagree
with it. What keeps the two from drifting is tests/marketplace/api/test_spec_schema.py: the fields,
defaults, enums and bounds here are compared with the kinds' own tables, and specs the kinds accept and
refuse are validated against the generated JSON schema.

The examples (SUBMISSION_EXAMPLES) name real artifacts: `example_artifacts()` makes the files, byte for
byte, whose sha256 the examples cite, so a test can upload them and post the example as it stands.
"""

from __future__ import annotations

import json
import struct
from functools import cache
from typing import Any

from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.utils import OpenApiExample, PolymorphicProxySerializer
from rest_framework import serializers

from marketplace.jobs import comparators
from marketplace.jobs.fedavg_math import AGGREGATIONS
from marketplace.jobs.kinds import fedavg, inference
from worker_agent.protocol import sha256_hex

SHA256 = r"^[0-9a-f]{64}$"


def sha256_field(what: str, **kwargs: Any) -> serializers.RegexField:
    return serializers.RegexField(
        SHA256, help_text=f"{what}: the sha256 (64 lowercase hex digits) POST /api/v1/artifacts/ answered for "
                          "a safetensors file you uploaded", **kwargs)


class Number(serializers.FloatField):
    """A float whose bounds may be open: the schema says exclusiveMinimum/exclusiveMaximum (NumberExtension)."""

    def __init__(self, *, low: float, high: float, low_open: bool = False, high_open: bool = False,
                 **kwargs: Any) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        super().__init__(**kwargs)


class NumberExtension(OpenApiSerializerFieldExtension):
    target_class = Number

    def map_serializer_field(self, auto_schema, direction):
        field = self.target
        schema: dict[str, Any] = {"type": "number", "format": "double", "minimum": field.low, "maximum": field.high}
        # OpenAPI 3.0's form (drf-spectacular writes 3.0.3): a boolean beside the bound.
        if field.low_open:
            schema["exclusiveMinimum"] = True
        if field.high_open:
            schema["exclusiveMaximum"] = True
        return schema


class Price(serializers.Field):
    """`price_per_result`: an integer or a string of ASCII digits (amounts exceed 2**53)."""


class PriceExtension(OpenApiSerializerFieldExtension):
    target_class = Price

    def map_serializer_field(self, auto_schema, direction):
        return {"oneOf": [{"type": "string", "pattern": r"^[0-9]{1,37}$"},
                          {"type": "integer", "minimum": 0, "maximum": 10**36}]}


DEVICE_HELP = ("cpu: units run on any device (on its CPU); cuda: only on devices that report a CUDA GPU "
               "with min_gpu_memory_mb")


def integer(low: int, high: int, help_text: str, **kwargs: Any) -> serializers.IntegerField:
    return serializers.IntegerField(min_value=low, max_value=high, help_text=help_text, **kwargs)


def _kind_choice(name: str) -> serializers.ChoiceField:
    return serializers.ChoiceField(choices=[name], help_text=f"always {name!r}: selects this variant")


# --- models: an architecture from the agent's registry (worker_agent/architectures.py) ----------------

class MlpConfig(serializers.Serializer):
    in_features = integer(1, 65_536, "inputs per row: the dataset's `x` is float32 [rows, in_features]")
    hidden = serializers.ListField(child=serializers.IntegerField(min_value=1, max_value=65_536), min_length=0,
                                   max_length=16, default=list,
                                   help_text="widths of the hidden Linear+ReLU layers, in order (0 to 16 of them)")
    out_features = integer(1, 65_536, "outputs per row (logits): the output is float32 [rows, out_features]")


class CnnConfig(serializers.Serializer):
    in_channels = integer(1, 64, "input channels", default=1)
    height = integer(1, 1024, "input height in pixels")
    width = integer(1, 1024, "input width in pixels; the dataset's `x` is float32 [rows, in_channels, height, width]")
    channels = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=65_536), min_length=1, max_length=16,
        help_text="output channels of each Conv2d+ReLU+MaxPool2d(2) block (1 to 16 blocks); every block halves "
                  "height and width, which must stay at least 1")
    kernel_size = integer(1, 15, "an odd convolution kernel size (same padding)", default=3)
    hidden = integer(1, 65_536, "width of the hidden Linear layer of the classifier", default=64)
    out_features = integer(1, 65_536, "outputs per row (logits)")


def _model(name: str, config: type[serializers.Serializer], doc: str, weights: str) -> type[serializers.Serializer]:
    fields = {
        "architecture": serializers.ChoiceField(choices=[name], help_text=f"{name!r}: {doc}"),
        "config": config(help_text="the architecture's configuration; the weights' tensor names and shapes follow "
                                   "from it (worker_agent/architectures.py)"),
        "weights": sha256_field(f"the model's weights: a safetensors file of exactly these float32 (F32) tensors, "
                                f"torch's state_dict names: {weights}"),
        "Meta": type("Meta", (), {"ref_name": f"{name.capitalize()}Model"}),
        "__doc__": f"A `{name}` model: {doc}.",
    }
    return type(f"{name.capitalize()}Model", (serializers.Serializer,), fields)


MlpModel = _model(
    "mlp", MlpConfig, "a multilayer perceptron, Linear layers with ReLU between them",
    "with widths w = [in_features, *hidden, out_features], for each layer i: net.{2i}.weight [w[i+1], w[i]] and "
    "net.{2i}.bias [w[i+1]] (4 -> [8] -> 3: net.0.weight [8, 4], net.0.bias [8], net.2.weight [3, 8], "
    "net.2.bias [3])")
CnnModel = _model(
    "cnn", CnnConfig, "a small convolutional network: conv blocks, then Linear, ReLU, Linear",
    "for each block i with c = channels[i] and p the channels before it (in_channels first): features.{3i}.weight "
    "[c, p, kernel_size, kernel_size] and features.{3i}.bias [c]; then classifier.1.weight [hidden, "
    "channels[-1] x h x w] (h, w: height and width halved, floored, once per block), classifier.1.bias [hidden], "
    "classifier.3.weight [out_features, hidden], classifier.3.bias [out_features]")
MODELS = {"mlp": MlpModel, "cnn": CnnModel}


def model_field() -> PolymorphicProxySerializer:
    return PolymorphicProxySerializer(
        component_name="Model", serializers=MODELS, resource_type_field_name="architecture",
        help_text="the model: an architecture of the agent's registry, its config and the sha256 of its weights "
                  "(no code crosses the network)")


# --- comparators (marketplace/jobs/comparators.py) ---------------------------------------------------

CLASS_EXACT_HELP = ("true: two results from devices of one hardware class must be bitwise identical, whatever "
                    "the method (the method applies across classes)")


class ExactCompare(serializers.Serializer):
    """Results agree when the output tensors are bitwise identical."""

    method = serializers.ChoiceField(choices=["exact"], help_text="bitwise identical outputs")
    class_exact = serializers.BooleanField(default=True, help_text=CLASS_EXACT_HELP)


class AllcloseCompare(serializers.Serializer):
    """Every element within atol + rtol * |b| (numpy allclose), and with top1 the same arg-max in every row."""

    method = serializers.ChoiceField(choices=["allclose"], help_text="elementwise tolerance (the default method)")
    class_exact = serializers.BooleanField(default=True, help_text=CLASS_EXACT_HELP)
    rtol = Number(low=0, high=1, required=False,
                  help_text="relative tolerance; default 1e-5 for inference, 1e-3 for fedavg")
    atol = Number(low=0, high=1, required=False,
                  help_text="absolute tolerance; default 1e-6 for inference, 1e-5 for fedavg")
    top1 = serializers.BooleanField(required=False,
                                    help_text="also require the same arg-max per row; default true for inference, "
                                              "false for fedavg")


class Top1Compare(serializers.Serializer):
    """Results agree when enough rows have the same arg-max (predicted class)."""

    method = serializers.ChoiceField(choices=["top1"], help_text="agreement on predicted classes")
    class_exact = serializers.BooleanField(default=True, help_text=CLASS_EXACT_HELP)
    min_agreement = Number(low=0, high=1, low_open=True, default=1.0,
                           help_text="the fraction of rows whose arg-max must be the same")


class MetricCompare(serializers.Serializer):
    """Results agree when one scalar summary of each output differs by at most epsilon."""

    method = serializers.ChoiceField(choices=["metric"], help_text="agreement on a scalar summary")
    class_exact = serializers.BooleanField(default=True, help_text=CLASS_EXACT_HELP)
    metric = serializers.ChoiceField(choices=list(comparators.METRICS), default="mean",
                                     help_text="the summary, computed by the marketplace from the signed output")
    epsilon = Number(low=0, high=comparators.MAX_EPSILON, help_text="the largest difference of the summaries")


COMPARES = {"exact": ExactCompare, "allclose": AllcloseCompare, "top1": Top1Compare, "metric": MetricCompare}


def compare_field() -> PolymorphicProxySerializer:
    return PolymorphicProxySerializer(
        component_name="Compare", serializers=COMPARES, resource_type_field_name="method", required=False,
        help_text="when two results of a unit agree (docs/protocol.md, 'compare'); the kind's own allclose "
                  "when left out. The kind also takes an object without `method` (allclose); the schema asks for it.")


# --- the specs -------------------------------------------------------------------------------------

PRICE_HELP = ("base units of the payout token paid per validated result, an integer 0..10**36 (send a decimal "
              "string: amounts exceed 2**53); default IDLEGRID_PRICE_PER_RESULT. The escrow taken at submission is "
              "price x units x max_results_per_unit (402 insufficient_balance if your balance cannot cover it)")
INF, FED = inference.DEFAULTS, fedavg.DEFAULTS


class InferenceSpec(serializers.Serializer):
    """Batch inference: a registry model over a float32 dataset, split by rows, merged into one output `y`."""

    model = model_field()
    dataset = sha256_field("the inputs: a safetensors file with exactly one float32 tensor named `x`, shaped "
                           "[rows > 0, *the model's input shape]")
    rows_per_unit = integer(1, 1_000_000, "dataset rows per work unit (at most 100,000 units per job)",
                            default=INF["rows_per_unit"])
    batch_size = integer(1, 65_536, "rows per forward pass inside a unit (outputs depend on batch layout by ~1e-7)",
                         default=INF["batch_size"])
    compare = compare_field()
    quorum = integer(2, 10, "agreeing results, from devices of different owners, that decide a unit",
                     default=INF["quorum"])
    max_results_per_unit = integer(2, 20, "results a unit may take before it errors; at least quorum; bounds the "
                                          "escrow", default=INF["max_results_per_unit"])
    unit_timeout_seconds = integer(1, 86_400, "a unit's compute time limit on the device",
                                   default=INF["unit_timeout_seconds"])
    unit_memory_mb = integer(256, 65_536, "a unit's memory limit on the device", default=INF["unit_memory_mb"])
    device = serializers.ChoiceField(choices=["cpu", "cuda"], default=INF["device"], help_text=DEVICE_HELP)
    min_gpu_memory_mb = integer(0, 1 << 20, "with device cuda: the GPU memory a unit needs (0: any GPU); "
                                "0 with cpu", default=INF["min_gpu_memory_mb"])
    adaptive = serializers.BooleanField(default=INF["adaptive"], help_text="true: a trusted device's results are "
                                        "accepted on its word and audited at random; false: every unit is "
                                        "replicated to the quorum")
    allow_nonfinite = serializers.BooleanField(default=INF["allow_nonfinite"],
                                               help_text="accept NaN or infinity in outputs")
    known_answers = sha256_field("optional known answers: a safetensors file with float32 `x` [k, *input shape] "
                                 "and `y` [k, out_features], 1 <= k <= 10,000, hidden among the units' rows",
                                 required=False)
    known_answers_per_unit = integer(1, inference.MAX_KNOWN_PER_UNIT, "known rows hidden in each unit (only with "
                                     "known_answers; at most k)", required=False)
    price_per_result = Price(required=False, help_text=PRICE_HELP)


class DifferentialPrivacy(serializers.Serializer):
    """Central differential privacy of the aggregate (aggregation `mean` only)."""

    clip_norm = Number(low=0, high=1e6, low_open=True, help_text="every update is clipped to this L2 norm")
    noise_multiplier = Number(low=0, high=1e3, default=1.0,
                              help_text="Gaussian noise std = noise_multiplier x clip_norm / shards")
    delta = Number(low=0, high=1, low_open=True, high_open=True, default=fedavg.DEFAULT_DELTA,
                   help_text="the delta epsilon is computed at")


class TrainingTarget(serializers.Serializer):
    """Complete the job early once a round reaches the target on the held-out eval dataset."""

    metric = serializers.ChoiceField(choices=["accuracy", "loss"],
                                     help_text="accuracy: reach at least value; loss: fall to at most value")
    value = Number(low=0, high=1e6, help_text="the target")


class FedavgSpec(serializers.Serializer):
    """Federated training in rounds: each round trains the global weights on `shards` shards, the validated
    updates are aggregated into the next round's weights; the output is the final weights."""

    model = model_field()
    train_dataset = sha256_field("training data: a safetensors file with exactly float32 `x` [rows, *input shape] "
                                 "and int64 `y` [rows], class indices in [0, out_features), at most 5,000,000 rows")
    eval_dataset = sha256_field("held-out data the marketplace evaluates each round on, shaped as train_dataset")
    rounds = integer(1, 1000, "training rounds (rounds x shards <= 100,000)", default=FED["rounds"])
    shards = integer(1, 1000, "units per round; the training rows are split into this many shards (at most the "
                              "rows)", default=FED["shards"])
    local_epochs = integer(1, 1000, "epochs each unit trains its shard", default=FED["local_epochs"])
    batch_size = integer(1, 65_536, "minibatch size of the local SGD", default=FED["batch_size"])
    learning_rate = Number(low=0, high=100, low_open=True, default=FED["learning_rate"], help_text="SGD learning rate")
    momentum = Number(low=0, high=1, high_open=True, default=FED["momentum"], help_text="SGD momentum")
    seed = integer(0, 2**31 - 1, "seeds every unit's data order (with the round and shard)", default=FED["seed"])
    aggregation = serializers.ChoiceField(choices=list(AGGREGATIONS), default=FED["aggregation"],
                                          help_text="mean (weighted by shard rows), trimmed_mean or median "
                                                    "(coordinate-wise; robust to a poisoned update)")
    trim_fraction = Number(low=0, high=0.5, high_open=True, required=False,
                           help_text=f"trimmed_mean only: the fraction dropped at each end (default {FED['trim_fraction']})")
    dp = DifferentialPrivacy(required=False, allow_null=True, help_text="central DP (optional)")
    target = TrainingTarget(required=False, allow_null=True, help_text="early stop (optional)")
    compare = compare_field()
    loss_epsilon = Number(low=0, high=1e6, default=FED["loss_epsilon"],
                          help_text="the largest training-loss difference of two agreeing updates")
    quorum = integer(2, 10, "agreeing results, from devices of different owners, that decide a unit",
                     default=FED["quorum"])
    max_results_per_unit = integer(2, 20, "results a unit may take before it errors; at least quorum; bounds the "
                                          "escrow", default=FED["max_results_per_unit"])
    unit_timeout_seconds = integer(1, 86_400, "a unit's compute time limit on the device",
                                   default=FED["unit_timeout_seconds"])
    unit_memory_mb = integer(256, 65_536, "a unit's memory limit on the device", default=FED["unit_memory_mb"])
    device = serializers.ChoiceField(choices=["cpu", "cuda"], default=FED["device"], help_text=DEVICE_HELP)
    min_gpu_memory_mb = integer(0, 1 << 20, "with device cuda: the GPU memory a unit needs (0: any GPU); "
                                "0 with cpu", default=FED["min_gpu_memory_mb"])
    adaptive = serializers.BooleanField(default=FED["adaptive"], help_text="accept a trusted device's update on its "
                                        "word (off by default: an update is aggregated before an audit could "
                                        "catch it)")
    price_per_result = Price(required=False, help_text=PRICE_HELP)


DRY_RUN_HELP = ("true: validate and quote (200, the body of POST /jobs/quote/); nothing is created or escrowed. "
                "Ignored by POST /jobs/quote/")


class InferenceSubmission(serializers.Serializer):
    """An `inference` job."""

    kind = _kind_choice("inference")
    spec = InferenceSpec(help_text="the inference spec")
    dry_run = serializers.BooleanField(default=False, help_text=DRY_RUN_HELP)


class FedavgSubmission(serializers.Serializer):
    """A federated training (`fedavg`) job."""

    kind = _kind_choice("fedavg")
    spec = FedavgSpec(help_text="the federated training spec")
    dry_run = serializers.BooleanField(default=False, help_text=DRY_RUN_HELP)


SUBMISSIONS = {"inference": InferenceSubmission, "fedavg": FedavgSubmission}
JobSubmission = PolymorphicProxySerializer(
    component_name="JobSubmission", serializers=SUBMISSIONS, resource_type_field_name="kind")

# Components whose objects the kinds refuse unknown keys of: the schema says additionalProperties false.
CLOSED_COMPONENTS = {"InferenceSpec", "FedavgSpec", "MlpConfig", "CnnConfig", "MlpModel", "CnnModel",
                     "ExactCompare", "AllcloseCompare", "Top1Compare", "MetricCompare", "DifferentialPrivacy",
                     "TrainingTarget"}


# --- examples --------------------------------------------------------------------------------------

EXAMPLE_MLP = {"in_features": 4, "hidden": [8], "out_features": 3}


def safetensors_bytes(tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> bytes:
    """A safetensors file from (dtype, shape, raw little-endian bytes) per name, names in sorted order."""
    header, offset, data = {}, 0, b""
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset, data = offset + len(raw), data + raw
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def _floats(count: int, start: int) -> bytes:
    # Small, fixed, finite values: the same bytes on every machine (no RNG).
    return struct.pack(f"<{count}f", *(((start + i) % 17 - 8) / 40 for i in range(count)))


def _labels(count: int, classes: int) -> bytes:
    return struct.pack(f"<{count}q", *(i % classes for i in range(count)))


@cache
def example_artifacts() -> dict[str, bytes]:
    """The files the examples name, by name: MLP 4-8-3 weights, an inference dataset, train and eval data."""
    weights = safetensors_bytes({
        "net.0.weight": ("F32", (8, 4), _floats(32, 0)), "net.0.bias": ("F32", (8,), _floats(8, 1)),
        "net.2.weight": ("F32", (3, 8), _floats(24, 2)), "net.2.bias": ("F32", (3,), _floats(3, 3)),
    })
    return {
        "weights": weights,
        "dataset": safetensors_bytes({"x": ("F32", (10, 4), _floats(40, 5))}),
        "train_dataset": safetensors_bytes({"x": ("F32", (16, 4), _floats(64, 6)), "y": ("I64", (16,), _labels(16, 3))}),
        "eval_dataset": safetensors_bytes({"x": ("F32", (8, 4), _floats(32, 7)), "y": ("I64", (8,), _labels(8, 3))}),
    }


def _sha(name: str) -> str:
    return sha256_hex(example_artifacts()[name])


def _model_example() -> dict[str, Any]:
    return {"architecture": "mlp", "config": EXAMPLE_MLP, "weights": _sha("weights")}


def example_inference() -> dict[str, Any]:
    return {"kind": "inference", "spec": {
        "model": _model_example(), "dataset": _sha("dataset"), "rows_per_unit": 4, "batch_size": 4,
        "compare": {"method": "allclose", "rtol": 1e-5, "atol": 1e-6, "top1": True, "class_exact": True},
        "quorum": 2, "max_results_per_unit": 6, "unit_timeout_seconds": 300, "unit_memory_mb": 2048,
        "adaptive": True, "price_per_result": "1000"}}


def example_fedavg() -> dict[str, Any]:
    return {"kind": "fedavg", "spec": {
        "model": _model_example(), "train_dataset": _sha("train_dataset"), "eval_dataset": _sha("eval_dataset"),
        "rounds": 3, "shards": 2, "local_epochs": 1, "batch_size": 4, "learning_rate": 0.05, "momentum": 0.0,
        "seed": 7, "aggregation": "mean", "target": {"metric": "accuracy", "value": 0.9},
        "compare": {"method": "allclose", "rtol": 1e-3, "atol": 1e-5, "top1": False, "class_exact": True},
        "loss_epsilon": 1e-3, "quorum": 2, "max_results_per_unit": 4, "price_per_result": "1000"}}


ARTIFACTS_NOTE = ("The sha256 values are those of the artifacts you uploaded (POST /api/v1/artifacts/ answers "
                  "them); these name the example files of marketplace/api/specs.py `example_artifacts()`.")


def submission_examples() -> list[OpenApiExample]:
    return [
        OpenApiExample("inference", value=example_inference(), request_only=True,
                       summary="An MLP (4 -> 8 -> 3) over a 10-row dataset, 4 rows per unit",
                       description=ARTIFACTS_NOTE),
        OpenApiExample("fedavg", value=example_fedavg(), request_only=True,
                       summary="3 rounds of federated training on 2 shards, stopping early at 90% accuracy",
                       description=ARTIFACTS_NOTE),
    ]
