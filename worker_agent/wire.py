"""The wire schema: every message between the marketplace and the agent, as frozen records (docs/protocol.md).

One definition for both ends. The marketplace builds with these records (`XPayload(...).to_wire()`) and
the agent parses with them (`X.from_wire(raw)`); a field renamed on one side then fails here, in unit
tests, instead of in an end-to-end run. Pure standard library: the marketplace imports this module,
and it imports nothing of the marketplace, of Django or of torch.

A record's dataclass fields are its JSON keys, in the order the JSON has them. `to_wire()` writes every
field; `from_wire(raw)` refuses anything else: a value of the wrong type (a bool is not a number), out
of bounds, an unknown key, a missing one. Values are kept exactly as they travelled (an integer stays
an integer, never becomes 300.0): a unit payload's canonical JSON is what the marketplace signed
(`protocol.unit_message`), and payloads already stored and signed must read back the same.

Two deliberate tolerances, both of the agent's reading of old or odd servers: a lease envelope may carry
keys this agent does not know (a server adding a field must not make old agents drop its units), and its
`signature`/`key_id` may be missing or odd, which still makes a lease: one the agent refuses and hands
back. A unit payload is signed and says what to compute, so it has no such slack.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from datetime import datetime
from typing import Any, ClassVar, Literal, Self, TypeVar

from worker_agent import protocol

# --- bounds ---------------------------------------------------------------------------------------
# Each is well above what the marketplace's spec validation allows (jobs/kinds/*.py), so a valid job
# always fits, and well below what would let one message exhaust an agent.
MAX_ID = 2**63 - 1  # the database's bigint keys
MAX_UNIT_ROWS = 10_000_000  # inference: 1,000,000 rows per unit + 16 known rows; fedavg: a 5,000,000-row shard
MAX_BATCH_SIZE = 1 << 20  # the spec allows 65,536
MAX_EPOCHS = 100_000  # the spec allows 1,000
MAX_ROUND_OR_SHARD = 1_000_000  # the spec allows 1,000 rounds of 1,000 shards
MAX_LEARNING_RATE = 1e6  # the spec allows 100
MAX_SEED = 2**63 - 1  # torch.Generator takes a non-negative int64
MAX_UNIT_SECONDS = 7 * 86_400  # the spec allows a day
MAX_UNIT_MEMORY_MB = 1 << 20  # 1 TiB; the spec allows 64 GiB
MAX_CONFIG_KEYS = 64  # an architecture's config; resolve() then checks every value
MAX_NAME = 256  # architecture, output tensor and device names, key ids, timestamps
MAX_TOKEN = 4000  # secrets, signatures, public keys, error texts: the longest is fail's 4,000 characters
MAX_RESULT_IDS = 1000  # a heartbeat's list (the API's limit); an agent holds at most 64 leases
MAX_KEYS = 1000  # marketplace keys in an enrolment answer, retired ones included

DEFAULT_SECONDS = 300  # a payload without `limits` (none is made so; an old agent read it this way)
DEFAULT_MEMORY_MB = 2048

T = TypeVar("T")


class WireError(ValueError):
    """A message that does not match the schema. `path` names the field at fault ("train.seed")."""

    def __init__(self, problem: str, path: str = "") -> None:
        super().__init__(f"{path} {problem}" if path else problem)
        self.problem = problem
        self.path = path

    def within(self, outer: str) -> WireError:
        """The same problem, seen from the object that holds this one under the key `outer`."""
        return type(self)(self.problem, f"{outer}.{self.path}" if self.path else outer)


class PayloadError(WireError):
    """A unit payload the agent cannot run as given (its message starts with `payload`)."""


# --- checks on single values ----------------------------------------------------------------------

def _show(value: Any) -> str:
    """A value for an error message: short, whatever a server sent."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int(value: Any, name: str, low: int, high: int) -> None:
    # bool is an int subclass in Python: `true` must not pass for 1.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WireError(f"must be an integer in [{low}, {high}], got {_show(value)}", name)


def _number(value: Any, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise WireError(f"must be a number in {interval}, got {_show(value)}", name)


def _text(value: Any, name: str, *, max_length: int = MAX_NAME, empty: bool = False) -> None:
    if not isinstance(value, str) or len(value) > max_length or (not value and not empty):
        what = "a string" if empty else "a non-empty string"
        raise WireError(f"must be {what} of at most {max_length} characters, got {_show(value)}", name)


def _sha256(value: Any, name: str) -> None:
    if not protocol.is_sha256_hex(value):
        raise WireError(f"must be a sha256 (64 lowercase hex digits), got {_show(value)}", name)


def _timestamp(value: Any, name: str) -> None:
    _text(value, name)
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise WireError(f"must be an ISO 8601 date and time, got {_show(value)}", name) from None


def _json_object(value: Any, name: str, *, max_keys: int) -> None:
    """A JSON object with string keys; its values are the business of whoever reads them."""
    if not isinstance(value, dict) or len(value) > max_keys or not all(isinstance(key, str) for key in value):
        raise WireError(f"must be an object of at most {max_keys} members, got {_type_name(value)}", name)


def _ids(value: Any, name: str, *, max_count: int) -> None:
    if not isinstance(value, tuple) or len(value) > max_count:
        raise WireError(f"must be a list of at most {max_count} ids, got {_type_name(value)}", name)
    for index, item in enumerate(value):
        _int(item, f"{name}[{index}]", 1, MAX_ID)


def _is(value: Any, record: type[Record], name: str) -> None:
    """A nested record given to a constructor (from_wire parses dicts into records before)."""
    if not isinstance(value, record):
        raise WireError(f"must be a {record.__name__}, got {_type_name(value)}", name)


# --- records --------------------------------------------------------------------------------------

OMIT_IF_NONE = {"omit_if_none": True}  # field metadata: None leaves the key out (the server tells absent from null)


@dataclass(frozen=True, kw_only=True)
class Record:
    """A wire record: its fields are its JSON keys. Subclasses validate in __post_init__, so a record that
    exists is valid, whichever side made it."""

    EXTRA_KEYS_IGNORED: ClassVar[bool] = False  # only an envelope may meet keys it does not know

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None and item.metadata.get("omit_if_none"):
                continue
            wire[item.name] = _to_json(value)
        return wire

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        """A record of flat values; records holding records or lists override this."""
        return cls(**cls.members(raw))

    @classmethod
    def members(cls, raw: Any) -> dict[str, Any]:
        """raw's members that are fields of this record, once raw is an object with every required field
        and (unless the record ignores extra keys) nothing else."""
        if not isinstance(raw, dict):
            raise WireError(f"must be an object, got {_type_name(raw)}")
        names = {item.name for item in fields(cls)}
        if not cls.EXTRA_KEYS_IGNORED:
            unknown = sorted(_show(key) for key in raw if key not in names)
            if unknown:
                raise WireError(f"has unknown keys: {', '.join(unknown[:8])}")
        missing = [item.name for item in fields(cls) if item.name not in raw and _required(item)]
        if missing:
            raise WireError(f"lacks {', '.join(missing)}")
        return {key: value for key, value in raw.items() if key in names}


def _required(item: Field[Any]) -> bool:
    return item.default is MISSING and item.default_factory is MISSING


def _to_json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_wire()
    if isinstance(value, tuple | list):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return copy.deepcopy(value)  # a caller changing the dict it got must not change the record
    return value


def _nested(members: dict[str, Any], key: str, parse: Callable[[Any], T]) -> T:
    """members[key] parsed by `parse`, an error in it named from here (`model.weights`)."""
    try:
        return parse(members[key])
    except WireError as exc:
        raise exc.within(key) from None


def _listed(value: Any) -> Any:
    """A JSON list as the tuple a record holds (anything else is left for the record to refuse)."""
    return tuple(value) if isinstance(value, list) else value


# --- unit payloads --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ModelRef(Record):
    """An architecture from the agent's registry (worker_agent/architectures.py), its config, and the
    sha256 of its weights (safetensors). The config is checked by `architectures.resolve`, by the kind."""

    architecture: str
    config: dict[str, Any]
    weights: str

    def __post_init__(self) -> None:
        _text(self.architecture, "architecture")
        _json_object(self.config, "config", max_keys=MAX_CONFIG_KEYS)
        _sha256(self.weights, "weights")


@dataclass(frozen=True, kw_only=True)
class Limits(Record):
    """What one unit may take: wall-clock seconds and memory (the agent's child enforces both)."""

    seconds: float = DEFAULT_SECONDS
    memory_mb: int = DEFAULT_MEMORY_MB

    def __post_init__(self) -> None:
        _number(self.seconds, "seconds", 0, MAX_UNIT_SECONDS, low_open=True)
        _int(self.memory_mb, "memory_mb", 1, MAX_UNIT_MEMORY_MB)


@dataclass(frozen=True, kw_only=True)
class InferenceInputs(Record):
    x: str  # sha256 of a safetensors file with one float32 tensor `x` [rows, *input_shape]

    def __post_init__(self) -> None:
        _sha256(self.x, "x")

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        if not isinstance(raw, dict) or set(raw) != {"x"}:
            raise WireError("must name the input tensor file as `x`, and nothing else")
        return cls(**raw)


@dataclass(frozen=True, kw_only=True)
class InferenceOutput(Record):
    name: str  # the one tensor of the output file
    dtype: Literal["float32"]
    shape: tuple[int, int]  # [rows, out_features]

    def __post_init__(self) -> None:
        _text(self.name, "name")
        if self.dtype != "float32":
            raise WireError(f"must be float32, got {_show(self.dtype)}", "dtype")
        if not isinstance(self.shape, tuple) or len(self.shape) != 2:
            raise WireError(f"must be a list of 2 integers, got {_show(self.shape)}", "shape")
        for index, size in enumerate(self.shape):
            _int(size, f"shape[{index}]", 1, MAX_UNIT_ROWS)

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        members = cls.members(raw)
        return cls(**{**members, "shape": _listed(members["shape"])})


@dataclass(frozen=True, kw_only=True)
class InferencePayload(Record):
    """Run `model` over the rows of `inputs.x`, `batch_size` rows at a time (outputs depend on the batch
    layout), writing one float32 tensor as `output` says."""

    KIND: ClassVar[str] = "inference"
    kind: Literal["inference"] = "inference"
    model: ModelRef
    inputs: InferenceInputs
    rows: int
    batch_size: int
    output: InferenceOutput
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        _kind(self.kind, self.KIND)
        _is(self.model, ModelRef, "model")
        _is(self.inputs, InferenceInputs, "inputs")
        _int(self.rows, "rows", 1, MAX_UNIT_ROWS)
        _int(self.batch_size, "batch_size", 1, MAX_BATCH_SIZE)
        _is(self.output, InferenceOutput, "output")
        if self.output.shape[0] != self.rows:
            raise WireError(f"must have one row per input row ({self.rows}), got {list(self.output.shape)}", "output.shape")
        _is(self.limits, Limits, "limits")

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        members = cls.members(raw)
        return cls(**{
            **members,
            "model": _nested(members, "model", ModelRef.from_wire),
            "inputs": _nested(members, "inputs", InferenceInputs.from_wire),
            "output": _nested(members, "output", InferenceOutput.from_wire),
            **({"limits": _nested(members, "limits", Limits.from_wire)} if "limits" in members else {}),
        })

    def artifacts(self) -> list[str]:
        """The sha256 of every artifact the unit needs, each once, in fetch order."""
        return list(dict.fromkeys([self.model.weights, self.inputs.x]))


@dataclass(frozen=True, kw_only=True)
class FedAvgInputs(Record):
    x: str  # sha256 of the shard's features: one float32 tensor `x` [samples, *input_shape]
    y: str  # sha256 of the shard's labels: one int64 tensor `y` [samples]

    def __post_init__(self) -> None:
        _sha256(self.x, "x")
        _sha256(self.y, "y")

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        if not isinstance(raw, dict) or set(raw) != {"x", "y"}:
            raise WireError("must name exactly the shard's `x` and `y` tensor files")
        return cls(**raw)


@dataclass(frozen=True, kw_only=True)
class FedAvgTrain(Record):
    """Local minibatch SGD; `seed` fixes the data order (worker_agent/kinds/fedavg.py unit_seed)."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0  # optional: an agent has always read a missing one as plain SGD
    seed: int

    def __post_init__(self) -> None:
        _int(self.epochs, "epochs", 1, MAX_EPOCHS)
        _int(self.batch_size, "batch_size", 1, MAX_BATCH_SIZE)
        _number(self.learning_rate, "learning_rate", 0, MAX_LEARNING_RATE, low_open=True)
        _number(self.momentum, "momentum", 0, 1, high_open=True)
        _int(self.seed, "seed", 0, MAX_SEED)


@dataclass(frozen=True, kw_only=True)
class FedAvgPayload(Record):
    """Train `model` (round `round`'s global weights) on shard `shard` of `samples` rows."""

    KIND: ClassVar[str] = "fedavg"
    kind: Literal["fedavg"] = "fedavg"
    model: ModelRef
    inputs: FedAvgInputs
    round: int
    shard: int
    samples: int
    train: FedAvgTrain
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        _kind(self.kind, self.KIND)
        _is(self.model, ModelRef, "model")
        _is(self.inputs, FedAvgInputs, "inputs")
        _int(self.round, "round", 0, MAX_ROUND_OR_SHARD)
        _int(self.shard, "shard", 0, MAX_ROUND_OR_SHARD)
        _int(self.samples, "samples", 1, MAX_UNIT_ROWS)
        _is(self.train, FedAvgTrain, "train")
        _is(self.limits, Limits, "limits")

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        members = cls.members(raw)
        return cls(**{
            **members,
            "model": _nested(members, "model", ModelRef.from_wire),
            "inputs": _nested(members, "inputs", FedAvgInputs.from_wire),
            "train": _nested(members, "train", FedAvgTrain.from_wire),
            **({"limits": _nested(members, "limits", Limits.from_wire)} if "limits" in members else {}),
        })

    def artifacts(self) -> list[str]:
        """The sha256 of every artifact the unit needs, each once, in fetch order."""
        return list(dict.fromkeys([self.model.weights, self.inputs.x, self.inputs.y]))


def _kind(value: Any, expected: str) -> None:
    if value != expected:
        raise WireError(f"must be {expected!r}, got {_show(value)}", "kind")


UnitPayload = InferencePayload | FedAvgPayload
PAYLOADS: dict[str, type[InferencePayload] | type[FedAvgPayload]] = {
    InferencePayload.KIND: InferencePayload,
    FedAvgPayload.KIND: FedAvgPayload,
}


def unit_payload_from_wire(raw: Any) -> UnitPayload:
    """A unit's payload, parsed by its kind. Every problem is a PayloadError naming the field
    (`payload.train.seed must be ...`); an unknown kind is refused, saying which kinds this agent runs."""
    if not isinstance(raw, dict):
        raise PayloadError(f"must be an object, got {_type_name(raw)}", "payload")
    kind = raw.get("kind")
    record = PAYLOADS.get(kind) if isinstance(kind, str) else None
    if record is None:
        raise PayloadError(f"unsupported task kind {_show(kind)}; this agent runs: {', '.join(sorted(PAYLOADS))}")
    try:
        return record.from_wire(raw)
    except WireError as exc:
        raise PayloadError(exc.problem, f"payload.{exc.path}" if exc.path else "payload") from None


# --- the lease ------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Lease(Record):
    """One unit leased to one device. No job id: a known-answer or audit unit looks like any other.

    `payload` is the unit exactly as the marketplace signed it (protocol.unit_message): the agent checks
    the signature over these very members, then parses them with unit_payload_from_wire."""

    EXTRA_KEYS_IGNORED: ClassVar[bool] = True
    result_id: int
    unit_id: int
    expires_at: str  # ISO 8601
    payload: dict[str, Any]
    signature: str | None  # base64 Ed25519 over unit_message(unit_id, payload) by key_id; None: unsigned
    key_id: str  # "" when unsigned

    def __post_init__(self) -> None:
        _int(self.result_id, "result_id", 1, MAX_ID)
        _int(self.unit_id, "unit_id", 1, MAX_ID)
        _timestamp(self.expires_at, "expires_at")
        if not isinstance(self.payload, dict):
            raise WireError(f"must be an object, got {_type_name(self.payload)}", "payload")
        if self.signature is not None:
            _text(self.signature, "signature", max_length=MAX_TOKEN)
        _text(self.key_id, "key_id", empty=True)

    @property
    def label(self) -> str:
        return f"unit {self.unit_id} (result {self.result_id})"

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        # A missing or odd signature still makes a lease: one the agent refuses and hands back (a lease it
        # could not read at all would sit on the server until it expired).
        members = cls.members({"signature": None, "key_id": "", **raw} if isinstance(raw, dict) else raw)
        signature, key_id = members["signature"], members["key_id"]
        return cls(**{
            **members,
            "signature": signature if isinstance(signature, str) and len(signature) <= MAX_TOKEN else None,
            "key_id": key_id if isinstance(key_id, str) and len(key_id) <= MAX_NAME else "",
        })


DEVICE_TYPES = ("cpu", "cuda")
MAX_MEMORY_MB = 1 << 24  # 16 TiB: more than any machine reports
MAX_CORES = 4096
MAX_KINDS = 16  # the marketplace stores them in one column (workers.Device.cap_kinds)
MAX_KIND_NAME = 32  # the marketplace's kind column


@dataclass(frozen=True, kw_only=True)
class Capabilities(Record):
    """What this device can run now, sent with every lease request (small: a few hundred bytes). The
    lease leases only units whose requirements fit (docs/protocol.md, "Capabilities"). `memory_mb` is
    the memory free now for a unit, already bounded by the contributor's memory cap; `gpu_memory_mb` is
    0 without a CUDA device, and `gpu_name` then None."""

    memory_mb: int
    cores: int
    device_type: Literal["cpu", "cuda"] = "cpu"
    gpu_name: str | None = field(default=None, metadata=OMIT_IF_NONE)
    gpu_memory_mb: int = 0
    torch_version: str | None = field(default=None, metadata=OMIT_IF_NONE)
    kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _int(self.memory_mb, "memory_mb", 0, MAX_MEMORY_MB)
        _int(self.cores, "cores", 1, MAX_CORES)
        if self.device_type not in DEVICE_TYPES:
            raise WireError(f"must be one of {', '.join(DEVICE_TYPES)}, got {_show(self.device_type)}", "device_type")
        if self.gpu_name is not None:
            _text(self.gpu_name, "gpu_name")
        _int(self.gpu_memory_mb, "gpu_memory_mb", 0, MAX_MEMORY_MB)
        if (self.device_type == "cuda") != (self.gpu_memory_mb > 0):
            raise WireError("must be more than 0 exactly when device_type is cuda", "gpu_memory_mb")
        if self.torch_version is not None:
            _text(self.torch_version, "torch_version", max_length=64)
        if not isinstance(self.kinds, tuple) or len(self.kinds) > MAX_KINDS:
            raise WireError(f"must be a list of at most {MAX_KINDS} task kinds, got {_show(self.kinds)}", "kinds")
        for index, kind in enumerate(self.kinds):
            _text(kind, f"kinds[{index}]", max_length=MAX_KIND_NAME)
        if len(set(self.kinds)) != len(self.kinds):
            raise WireError("must not repeat a kind", "kinds")

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        members = cls.members(raw)
        return cls(**{**members, **({"kinds": _listed(members["kinds"])} if "kinds" in members else {})})


@dataclass(frozen=True, kw_only=True)
class LeaseRequest(Record):
    max_units: int = 1
    hardware: dict[str, Any] | None = field(default=None, metadata=OMIT_IF_NONE)  # sent when the facts changed
    # Sent with every request (free memory changes); absent from old agents, matched conservatively.
    capabilities: Capabilities | None = field(default=None, metadata=OMIT_IF_NONE)
    # Seconds the server may hold the request while nothing can be leased, answering as soon as work comes
    # (docs/protocol.md, "Long poll"); absent (None): answer at once, as before, and as old servers always do.
    wait_seconds: int | None = field(default=None, metadata=OMIT_IF_NONE)

    def __post_init__(self) -> None:
        # The cap (protocol.MAX_LEASE_BATCH) is the server's to enforce, with its 400; the agent asks
        # within it (Agent._wanted). The record refuses only what no server could read as a count.
        _int(self.max_units, "max_units", 1, MAX_ID)
        if self.wait_seconds is not None:
            _int(self.wait_seconds, "wait_seconds", 0, protocol.MAX_LEASE_WAIT_SECONDS)
        if self.hardware is not None:
            _json_object(self.hardware, "hardware", max_keys=MAX_CONFIG_KEYS)
        if self.capabilities is not None:
            _is(self.capabilities, Capabilities, "capabilities")

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        members = cls.members(raw)
        if "capabilities" in members:  # null too is refused: an absent member is how an agent says nothing
            members["capabilities"] = _nested(members, "capabilities", Capabilities.from_wire)
        return cls(**members)


@dataclass(frozen=True, kw_only=True)
class LeaseBatch(Record):
    """The answer to a lease request. Its leases stay raw here: each is read on its own (Lease.from_wire),
    so one the agent cannot read costs only itself."""

    leases: tuple[dict[str, Any], ...]
    retry_after: float  # seconds to wait before asking again when nothing was leased

    def __post_init__(self) -> None:
        if not isinstance(self.leases, tuple) or len(self.leases) > protocol.MAX_LEASE_BATCH:
            raise WireError(f"must be a list of at most {protocol.MAX_LEASE_BATCH} leases", "leases")
        _number(self.retry_after, "retry_after", 0, 86_400)

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        members = cls.members(raw)
        return cls(**{**members, "leases": _listed(members["leases"])})


# --- the other agent messages ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class HeartbeatRequest(Record):
    result_ids: tuple[int, ...]
    # How far the device is with the units it computes: result id (a JSON key, so a string of digits) ->
    # fraction done in [0, 1]; only ids in result_ids. Information for job progress and ETA, never trusted
    # for money or verification.
    progress: dict[str, float] | None = field(default=None, metadata=OMIT_IF_NONE)

    def __post_init__(self) -> None:
        _ids(self.result_ids, "result_ids", max_count=MAX_RESULT_IDS)
        if self.progress is not None:
            _progress(self.progress, set(self.result_ids))

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        return cls(**{**(members := cls.members(raw)), "result_ids": _listed(members["result_ids"])})

    def fractions(self) -> dict[int, float]:
        """progress by result id, as numbers."""
        return {int(key): float(value) for key, value in (self.progress or {}).items()}


def _progress(value: Any, allowed: set[int]) -> None:
    _json_object(value, "progress", max_keys=MAX_RESULT_IDS)
    for key, fraction in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 19 and str(int(key)) == key and int(key) in allowed):
            raise WireError(f"keys must be result ids listed in result_ids, got {_show(key)}", "progress")
        _number(fraction, f"progress.{key}", 0, 1)


@dataclass(frozen=True, kw_only=True)
class HeartbeatAnswer(Record):
    renewed: tuple[int, ...]
    lost: tuple[int, ...]  # asked for, and no longer this device's: the agent drops them
    expires_at: str  # ISO 8601: when the renewed leases run out unless renewed again

    def __post_init__(self) -> None:
        _ids(self.renewed, "renewed", max_count=MAX_RESULT_IDS)
        _ids(self.lost, "lost", max_count=MAX_RESULT_IDS)
        _timestamp(self.expires_at, "expires_at")

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        members = cls.members(raw)
        return cls(**{**members, "renewed": _listed(members["renewed"]), "lost": _listed(members["lost"])})


@dataclass(frozen=True, kw_only=True)
class Report(Record):
    """What a device says of a computed unit; `signature` is over protocol.result_message. `metrics` are
    information for people, never read by verification."""

    output_sha256: str
    signature: str
    elapsed_seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _report_fields(self.output_sha256, self.signature, self.elapsed_seconds, self.metrics)


def _report_fields(output_sha256: Any, signature: Any, elapsed_seconds: Any, metrics: Any) -> None:
    _sha256(output_sha256, "output_sha256")
    _text(signature, "signature", max_length=MAX_TOKEN)
    if elapsed_seconds is not None:
        _number(elapsed_seconds, "elapsed_seconds", 0, math.inf)
    _json_object(metrics, "metrics", max_keys=MAX_CONFIG_KEYS)


MAX_INLINE_OUTPUT_BASE64 = 4 * -(-protocol.MAX_INLINE_OUTPUT_BYTES // 3)  # base64 of the largest inline output
ERROR_KEYS = ("code", "message", "fields")


@dataclass(frozen=True, kw_only=True)
class BatchedReport(Record):
    """One report of a batch: a Report naming its lease, its output inline (`output`, base64 of the file's
    bytes, at most protocol.MAX_INLINE_OUTPUT_BYTES decoded) or uploaded before (`output` absent)."""

    result_id: int
    output_sha256: str
    signature: str
    elapsed_seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    output: str | None = field(default=None, metadata=OMIT_IF_NONE)

    def __post_init__(self) -> None:
        _int(self.result_id, "result_id", 1, MAX_ID)
        _report_fields(self.output_sha256, self.signature, self.elapsed_seconds, self.metrics)
        if self.output is not None:
            _text(self.output, "output", max_length=MAX_INLINE_OUTPUT_BASE64)


@dataclass(frozen=True, kw_only=True)
class ReportBatch(Record):
    """The body of a batched report: 1 to protocol.MAX_REPORT_BATCH reports of distinct leases, each signed
    on its own, each answered on its own (ReportBatchAnswer)."""

    reports: tuple[BatchedReport, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.reports, tuple):
            raise WireError(f"must be a list of 1 to {protocol.MAX_REPORT_BATCH} reports", "reports")
        for index, report in enumerate(self.reports):
            _is(report, BatchedReport, f"reports[{index}]")
        _report_ids(tuple(report.result_id for report in self.reports))

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        members = cls.members(raw)
        reports = _listed(members["reports"])
        if not isinstance(reports, tuple):
            raise WireError(f"must be a list of 1 to {protocol.MAX_REPORT_BATCH} reports", "reports")
        return cls(reports=tuple(_each(reports, "reports", BatchedReport.from_wire)))

    @classmethod
    def items_from_wire(cls, raw: Any) -> tuple[tuple[int, BatchedReport | WireError], ...]:
        """The server's reading: the envelope strictly (an object of `reports` only: a list of 1 to
        MAX_REPORT_BATCH objects, each naming a distinct result_id), raising WireError; each report then on
        its own, so one the server cannot read is answered by its result id and fails nothing else."""
        reports = _listed(cls.members(raw)["reports"])
        if not isinstance(reports, tuple):
            raise WireError(f"must be a list of 1 to {protocol.MAX_REPORT_BATCH} reports", "reports")
        for index, report in enumerate(reports):
            if not isinstance(report, dict):
                raise WireError(f"must be an object, got {_type_name(report)}", f"reports[{index}]")
            _int(report.get("result_id"), f"reports[{index}].result_id", 1, MAX_ID)
        _report_ids(tuple(report["result_id"] for report in reports))
        items: list[tuple[int, BatchedReport | WireError]] = []
        for report in reports:
            try:
                items.append((report["result_id"], BatchedReport.from_wire(report)))
            except WireError as exc:
                items.append((report["result_id"], exc))
        return tuple(items)


def _each(values: tuple[Any, ...], name: str, parse: Callable[[Any], T]) -> list[T]:
    """Each value parsed by `parse`, an error named by its place (`reports[3].signature`)."""
    parsed = []
    for index, value in enumerate(values):
        try:
            parsed.append(parse(value))
        except WireError as exc:
            raise exc.within(f"{name}[{index}]") from None
    return parsed


def _report_ids(ids: tuple[int, ...]) -> None:
    if not 1 <= len(ids) <= protocol.MAX_REPORT_BATCH:
        raise WireError(f"must be a list of 1 to {protocol.MAX_REPORT_BATCH} reports, got {len(ids)}", "reports")
    if len(set(ids)) != len(ids):
        raise WireError("must name each result_id once", "reports")


@dataclass(frozen=True, kw_only=True)
class ReportOutcome(Record):
    """What became of one report of a batch: its result's `state`, or the `error` that refused it (the API's
    one error shape: code, message, fields), exactly as a single report would have answered it."""

    result_id: int
    state: str | None = field(default=None, metadata=OMIT_IF_NONE)
    error: dict[str, Any] | None = field(default=None, metadata=OMIT_IF_NONE)

    def __post_init__(self) -> None:
        _int(self.result_id, "result_id", 1, MAX_ID)
        if (self.state is None) == (self.error is None):
            raise WireError("must carry either state or error", "state")
        if self.state is not None:
            _text(self.state, "state", max_length=32)
        if self.error is not None:
            _json_object(self.error, "error", max_keys=len(ERROR_KEYS))
            if not set(self.error) <= set(ERROR_KEYS):
                raise WireError(f"may hold only {', '.join(ERROR_KEYS)}", "error")
            _text(self.error.get("code"), "error.code", max_length=64)
            _text(self.error.get("message"), "error.message", max_length=MAX_TOKEN * 4)
            if "fields" in self.error:
                _json_object(self.error["fields"], "error.fields", max_keys=MAX_CONFIG_KEYS * 4)

    @property
    def code(self) -> str:
        return str((self.error or {}).get("code", ""))


@dataclass(frozen=True, kw_only=True)
class ReportBatchAnswer(Record):
    """The answer to a batched report: one outcome per report, in the request's order."""

    results: tuple[ReportOutcome, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.results, tuple) or len(self.results) > protocol.MAX_REPORT_BATCH:
            raise WireError(f"must be a list of at most {protocol.MAX_REPORT_BATCH} outcomes", "results")
        for index, outcome in enumerate(self.results):
            _is(outcome, ReportOutcome, f"results[{index}]")

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        members = cls.members(raw)
        outcomes = _listed(members["results"])
        if not isinstance(outcomes, tuple):
            raise WireError(f"must be a list of at most {protocol.MAX_REPORT_BATCH} outcomes", "results")
        return cls(results=tuple(_each(outcomes, "results", ReportOutcome.from_wire)))


@dataclass(frozen=True, kw_only=True)
class Failure(Record):
    """A device gives a unit up, saying why (the body of `fail`)."""

    error: str

    def __post_init__(self) -> None:
        _text(self.error, "error", max_length=MAX_TOKEN)


@dataclass(frozen=True, kw_only=True)
class EnrollRequest(Record):
    token: str
    name: str
    public_key: str  # the raw 32-byte Ed25519 public key, base64
    hardware: dict[str, Any]
    proof: str  # base64 signature by that key of protocol.enroll_message(token, public_key)

    def __post_init__(self) -> None:
        for name in ("token", "public_key", "proof"):
            _text(getattr(self, name), name, max_length=MAX_TOKEN)
        _text(self.name, "name")
        _json_object(self.hardware, "hardware", max_keys=MAX_CONFIG_KEYS)


@dataclass(frozen=True, kw_only=True)
class Enrolled(Record):
    """The answer to an enrolment. The keys stay raw: worker_agent/pinning.py reads and checks them."""

    device_id: int
    device_secret: str
    lease_seconds: float
    marketplace_keys: tuple[dict[str, Any], ...]

    def __post_init__(self) -> None:
        _int(self.device_id, "device_id", 1, MAX_ID)
        _text(self.device_secret, "device_secret", max_length=MAX_TOKEN)
        _number(self.lease_seconds, "lease_seconds", 0, 86_400, low_open=True)
        if not isinstance(self.marketplace_keys, tuple) or len(self.marketplace_keys) > MAX_KEYS:
            raise WireError(f"must be a list of at most {MAX_KEYS} keys", "marketplace_keys")

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        members = cls.members(raw)
        return cls(**{**members, "marketplace_keys": _listed(members["marketplace_keys"])})
