"""Shared fixtures: personas, API clients, enrolled devices with real Ed25519 keys, real safetensors
weights and datasets for a registry architecture, and submitted jobs.

Everything goes through the services (enrolment, artifact storage, job submission), so a fixture
builds exactly what a real request would. Tests that store artifacts should depend on `artifact_dir`
(the storing fixtures already do) so nothing is written under var/.

IDLEGRID_VAR_DIR is deliberately not set here: pytest-django loads the settings before any conftest
is imported, so setting it now would only make this process's environment (inherited by the servers
and agents the e2e tests start) disagree with the settings already loaded, test database included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from rest_framework.test import APIClient

from marketplace.accounts.services import api_token_create
from marketplace.artifacts.services import artifact_store
from marketplace.artifacts.storage import get_storage
from marketplace.core.tensors import array_file_bytes
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_split, job_submit
from marketplace.workers.models import Device
from marketplace.workers.services import device_enroll, enrollment_token_create
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.results import result_report
from worker_agent.architectures import resolve
from worker_agent.protocol import b64encode, enroll_message, result_message

MLP_CONFIG: dict[str, Any] = {"in_features": 4, "hidden": [8], "out_features": 3}
CNN_CONFIG: dict[str, Any] = {"in_channels": 1, "height": 8, "width": 8, "channels": [4], "hidden": 8, "out_features": 5}
DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {"mlp": MLP_CONFIG, "cnn": CNN_CONFIG}
HARDWARE: dict[str, Any] = {
    "os": "linux", "machine": "x86_64", "cpu_flags": ["avx2"], "torch_version": "2.13.0",
    "device_type": "cpu", "dtype": "float32", "cpus": 4, "memory_mb": 8192,
}


# --- tensors and files ----------------------------------------------------------------------------

def weights_bytes(architecture: str = "mlp", config: dict[str, Any] | None = None, *, dtype: Any = None,
                  seed: int = 0) -> bytes:
    """A real safetensors weights file for a registry architecture, made by torch and safetensors."""
    import torch
    from safetensors.torch import save

    arch, normal = resolve(architecture, DEFAULT_CONFIGS[architecture] if config is None else config)
    torch.manual_seed(seed)
    state = arch.build(normal).state_dict()
    return save({name: tensor.detach().to(dtype or torch.float32).contiguous() for name, tensor in state.items()})


def input_shape(architecture: str = "mlp", config: dict[str, Any] | None = None) -> tuple[int, ...]:
    arch, normal = resolve(architecture, DEFAULT_CONFIGS[architecture] if config is None else config)
    return arch.input_shape(normal)


def dataset_array(rows: int, shape: tuple[int, ...] = (4,), *, dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, *shape)).astype(dtype)


def dataset_bytes(rows: int, shape: tuple[int, ...] = (4,), *, dtype: Any = np.float32, seed: int = 0) -> bytes:
    """A dataset file as a submitter sends it: one tensor `x` of shape [rows, *shape]."""
    return array_file_bytes(dataset_array(rows, shape, dtype=dtype, seed=seed), name="x")


def output_bytes(y: np.ndarray, *, name: str = "y") -> bytes:
    """A unit output file as an agent writes it."""
    return array_file_bytes(y, name=name)


def stored_bytes(sha256: str) -> bytes:
    """An artifact's bytes as stored, from whichever backend the settings name."""
    with get_storage().open(sha256) as stream:
        return stream.read()


def read_tensor(path: Path, name: str) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(path))[name]


def infer(unit: WorkUnit) -> np.ndarray:
    """What an honest agent computes for an inference unit: the real model, batched as the payload says."""
    import torch
    from safetensors.torch import load_file

    payload, storage = unit.payload, get_storage()
    arch, config = resolve(payload["model"]["architecture"], payload["model"]["config"])
    model = arch.build(config)
    with storage.local_path(payload["model"]["weights"]) as path:
        model.load_state_dict(load_file(str(path)))
    model.eval()
    with storage.local_path(payload["inputs"]["x"]) as path:
        x = torch.from_numpy(read_tensor(path, "x").copy())
    batch = payload["batch_size"]
    with torch.no_grad():
        return torch.cat([model(x[start:start + batch]) for start in range(0, len(x), batch)]).numpy()


# --- the cache ------------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Throttle counters of this test run in a folder of its own, in the embedded default's backend. The
    settings' cache is shared by design: var/cache with every other run on this checkout (test databases
    all start at device 1 and user 1, so their counters would add up), or the broker's Redis, which
    cache.clear() (tests/marketplace/conftest.py) would FLUSHDB."""
    from django.test import override_settings

    location = tmp_path_factory.mktemp("cache")
    with override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                                               "LOCATION": str(location)}}):
        yield location


# --- people ---------------------------------------------------------------------------------------

def _person(django_user_model, username: str):
    return django_user_model.objects.create_user(username=username, password=f"{username}-password")


SUBMITTER_FUNDS = 10**24  # base units: a million tokens of 18 decimals, plenty for any test's jobs


def _funded(user):
    """Submitters start with a balance granted through the ledger (audited), as an admin would grant it."""
    from marketplace.ledger.grants import balance_grant

    balance_grant(user=user, amount=SUBMITTER_FUNDS, actor="tests", reason="test persona funds",
                  idempotency_key=f"test-persona:{user.pk}")
    return user


@pytest.fixture
def submitter(django_user_model):
    return _funded(_person(django_user_model, "submitter"))


@pytest.fixture
def other_submitter(django_user_model):
    return _funded(_person(django_user_model, "other_submitter"))


@pytest.fixture
def contributor(django_user_model):
    return _person(django_user_model, "contributor")


@pytest.fixture
def other_contributor(django_user_model):
    return _person(django_user_model, "other_contributor")


@pytest.fixture
def cheater(django_user_model):
    return _person(django_user_model, "cheater")


@pytest.fixture
def api(db) -> Callable[..., APIClient]:
    """api(user) is a client authenticated by an API token (knox) of the user, one per user and test;
    api() is anonymous."""
    tokens: dict[int, str] = {}

    def make(user=None) -> APIClient:
        client = APIClient()
        if user is not None:
            if user.pk not in tokens:
                tokens[user.pk] = api_token_create(user=user)[1]
            client.credentials(HTTP_AUTHORIZATION=f"Token {tokens[user.pk]}")
        return client

    return make


# --- devices --------------------------------------------------------------------------------------

@dataclass
class EnrolledDevice:
    """A device enrolled through the service, with the private key and secret its agent would keep."""

    device: Device
    secret: str
    key: Ed25519PrivateKey

    @property
    def pk(self) -> int:
        return self.device.pk

    @property
    def owner(self):
        return self.device.owner

    @property
    def authorization(self) -> str:
        return f"Device {self.device.pk}:{self.secret}"

    def client(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=self.authorization)
        return client

    def sign(self, result: Result, output_sha256: str) -> str:
        message = result_message(
            result_id=result.pk, unit_id=result.unit_id, device_id=self.device.pk, output_sha256=output_sha256
        )
        return b64encode(self.key.sign(message))

    def refresh(self) -> Device:
        self.device.refresh_from_db()
        return self.device


def public_key_b64(key: Ed25519PrivateKey) -> str:
    return b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


@pytest.fixture
def make_device(db) -> Callable[..., EnrolledDevice]:
    """make_device(owner) enrols a device with a fresh Ed25519 key through a one-time token."""

    def make(owner, *, name: str = "laptop", hardware: dict[str, Any] | None = None) -> EnrolledDevice:
        token, _ = enrollment_token_create(owner=owner)
        key = Ed25519PrivateKey.generate()
        public = public_key_b64(key)
        device, secret = device_enroll(
            token=token, name=name, public_key_b64=public, hardware=dict(hardware or HARDWARE),
            proof_b64=b64encode(key.sign(enroll_message(token=token, public_key_b64=public))),
        )
        return EnrolledDevice(device=device, secret=secret, key=key)

    return make


# --- artifacts and jobs ---------------------------------------------------------------------------

@pytest.fixture
def artifact_dir(settings, tmp_path) -> Path:
    """Artifacts of this test live under its tmp_path, never under var/."""
    settings.IDLEGRID_ARTIFACT_DIR = tmp_path / "artifacts"
    return settings.IDLEGRID_ARTIFACT_DIR


@pytest.fixture
def upload(db, artifact_dir) -> Callable[..., str]:
    """upload(data, owner) stores bytes as that person's artifact (or a device's, device=...); returns the sha256."""

    def store(data: bytes, owner=None, *, device: Device | None = None) -> str:
        artifact, _ = artifact_store(chunks=[data], uploaded_by=owner, device=device)
        return artifact.sha256

    return store


@pytest.fixture
def inference_spec(upload, submitter) -> Callable[..., dict[str, Any]]:
    """inference_spec(...) uploads real weights and a dataset and returns a job spec naming them."""

    def make(*, owner=None, rows: int = 10, architecture: str = "mlp", config: dict[str, Any] | None = None,
             **spec: Any) -> dict[str, Any]:
        owner = owner or submitter
        config = dict(DEFAULT_CONFIGS[architecture] if config is None else config)
        weights = upload(weights_bytes(architecture, config), owner)
        dataset = upload(dataset_bytes(rows, input_shape(architecture, config)), owner)
        return {"model": {"architecture": architecture, "config": config, "weights": weights},
                "dataset": dataset, **spec}

    return make


@pytest.fixture
def submit_job(inference_spec, submitter) -> Callable[..., Job]:
    """submit_job(rows=10, rows_per_unit=4, ...) submits an inference job and, unless split=False, splits it.
    Jobs replicate every unit to the quorum (adaptive=False) unless a test asks for adaptive replication."""

    def submit(*, owner=None, split: bool = True, rows: int = 10, rows_per_unit: int = 4, **spec: Any) -> Job:
        owner = owner or submitter
        spec.setdefault("adaptive", False)
        job = job_submit(
            owner=owner, kind="inference",
            spec=inference_spec(owner=owner, rows=rows, rows_per_unit=rows_per_unit, **spec),
        )
        if split:
            job_split(job_id=job.pk)
            job.refresh_from_db()
        return job

    return submit


@pytest.fixture
def report(upload) -> Callable[..., Result]:
    """report(enrolled, result, y=None) does what an agent does after computing: upload the output as the
    device, sign it and report it. Without y, the output is the honest one (the real model's)."""

    def do(enrolled: EnrolledDevice, result: Result | int, y: np.ndarray | None = None) -> Result:
        result = Result.objects.select_related("unit").get(pk=result if isinstance(result, int) else result.pk)
        output = output_bytes(infer(result.unit) if y is None else y)
        sha = upload(output, device=enrolled.device)
        return result_report(
            device=enrolled.device, result_id=result.pk, output_sha256=sha, signature_b64=enrolled.sign(result, sha)
        )

    return do


@pytest.fixture
def make_weights() -> Callable[..., bytes]:
    """make_weights(architecture="mlp", config=None, dtype=None, seed=0): real safetensors weights."""
    return weights_bytes


@pytest.fixture
def make_dataset() -> Callable[..., bytes]:
    """make_dataset(rows, shape=(4,), dtype=np.float32, seed=0): a dataset file with one tensor `x`."""
    return dataset_bytes


@pytest.fixture
def make_output() -> Callable[..., bytes]:
    """make_output(y, name="y"): a unit output file."""
    return output_bytes


@pytest.fixture
def honest_output() -> Callable[[WorkUnit], np.ndarray]:
    """honest_output(unit): the real model's output for an inference unit, batched as its payload says."""
    return infer


@pytest.fixture
def enqueued(monkeypatch) -> list[tuple[str, tuple]]:
    """Celery tasks sent, recorded as (task name, args) instead of reaching a broker."""
    from celery.app.task import Task

    sent: list[tuple[str, tuple]] = []

    def apply_async(task, args=None, kwargs=None, **options):
        sent.append((task.name, tuple(args or ())))

    monkeypatch.setattr(Task, "apply_async", apply_async)
    return sent
