"""The client and the CLI against the real API: the marketplace served by pytest-django's live server (a
real HTTP server in a thread, on the test database), no mock between them. Splitting and computing a
job needs Celery and agents: tests/e2e/test_cli.py runs the whole path, download included."""

from __future__ import annotations

import hashlib
import io
import json
import math
import stat
import uuid

import pytest

from idlegrid_client import cli
from idlegrid_client.client import ApiError, Client, RetryPolicy
from marketplace.jobs.models import Job
from marketplace.ledger.grants import balance_grant
from tests.conftest import MLP_CONFIG, dataset_bytes, input_shape, weights_bytes

PASSWORD = "a long and unusual passphrase"


@pytest.fixture
def market(transactional_db, live_server, artifact_dir, enqueued, settings, tmp_path, django_user_model):
    """The live server's URL, with a funded submitter `alice`; tasks are recorded, not sent to a broker."""
    settings.IDLEGRID_SIGNING_KEY_DIR = tmp_path / "keys"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    alice = django_user_model.objects.create_user("alice", password=PASSWORD)
    balance_grant(user=alice, amount=10**24, actor="tests", reason="client tests", idempotency_key=uuid.uuid4().hex)
    return live_server.url


@pytest.fixture
def files(tmp_path):
    """A real MLP's weights and a 10-row dataset, as files a submitter has on disk."""
    (tmp_path / "model.safetensors").write_bytes(weights_bytes("mlp", MLP_CONFIG))
    (tmp_path / "data.safetensors").write_bytes(dataset_bytes(10, input_shape("mlp", MLP_CONFIG)))
    return tmp_path / "model.safetensors", tmp_path / "data.safetensors"


def logged_in(url: str) -> Client:
    client = Client(url)
    client.login("alice", PASSWORD)
    return client


def token_of(url: str) -> str:
    with Client(url) as client:
        return client.login("alice", PASSWORD).token


def test_the_client_logs_in_uploads_quotes_submits_and_reads_the_job_on_the_real_api(market, files):
    weights_file, dataset_file = files
    with logged_in(market) as client:
        weights = client.upload(weights_file)
        assert client.upload(weights_file) == weights  # content-addressed: the same bytes are the same artifact
        dataset = client.upload(dataset_file)
        spec = {"model": {"architecture": "mlp", "config": MLP_CONFIG, "weights": weights}, "dataset": dataset,
                "rows_per_unit": 4, "price_per_result": "1000"}

        quote = client.quote("inference", spec)
        first = client.submit("inference", spec, idempotency_key="retry-me")
        again = client.submit("inference", spec, idempotency_key="retry-me")
        job = client.job(first.id)

    assert (quote.units, quote.quorum, quote.price_per_result) == (math.ceil(10 / 4), 2, 1000)
    assert quote.cost_worst_case == 1000 * quote.units * quote.spec["max_results_per_unit"] and quote.affordable
    assert quote.runnable is False and "owners" in (quote.not_runnable_reason or "")  # no device is active
    assert again.id == first.id and Job.objects.count() == 1  # the retry with the key made no second job
    assert (job.id, job.kind, job.state, job.units_done) == (first.id, "inference", "pending", 0)
    assert job.spec["dataset"] == dataset and job.spec["rows_per_unit"] == 4
    assert not job.finished and job.output_sha256 is None


def test_the_real_apis_refusals_arrive_as_typed_errors(market, files, tmp_path):
    with logged_in(market) as client:
        with pytest.raises(ApiError) as bad_spec:
            client.quote("inference", {"model": {"architecture": "mlp", "config": MLP_CONFIG, "weights": "0" * 64},
                                       "dataset": "0" * 64})
        with pytest.raises(ApiError) as missing:
            client.job(987654)
        with pytest.raises(ApiError) as wrong_hash:
            client.upload(files[0], sha256="0" * 64)
        with pytest.raises(ApiError) as not_done:
            client.download(987654, tmp_path / "out.safetensors")
    with Client(market, "not-a-token", retry=RetryPolicy(attempts=1)) as stranger, pytest.raises(ApiError) as anonymous:
        stranger.job(1)

    assert (bad_spec.value.status, bad_spec.value.code) == (400, "invalid")
    assert {"model.weights", "dataset"} <= set(bad_spec.value.fields)
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert wrong_hash.value.status == 400
    assert not_done.value.status == 404 and not (tmp_path / "out.safetensors").exists()
    assert (anonymous.value.status, anonymous.value.code) == (401, "not_authenticated")


def test_the_cli_logs_in_saves_the_token_0600_and_submits_from_friendly_flags(market, files, tmp_path, monkeypatch,
                                                                             capsys):
    config_file = tmp_path / "home" / "config.toml"
    monkeypatch.setenv("IDLEGRID_CONFIG", str(config_file))
    monkeypatch.delenv("IDLEGRID_TOKEN", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))

    assert cli.main(["--url", market, "login", "--username", "alice", "--password-stdin"]) == cli.EXIT_OK
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    capsys.readouterr()
    weights_file, dataset_file = files
    code = cli.main(["--url", market, "submit", "--architecture", "mlp", "--config", json.dumps(MLP_CONFIG),
                     "--weights", str(weights_file), "--dataset", str(dataset_file), "--rows-per-unit", "4",
                     "--quorum", "2", "--price", "1000", "--set", "adaptive=false", "--yes", "--json"])
    printed = capsys.readouterr()

    assert code == cli.EXIT_OK, printed.err
    job = Job.objects.get(pk=json.loads(printed.out)["id"])
    assert job.owner.username == "alice" and job.kind == "inference"
    assert (job.spec["rows_per_unit"], job.spec["quorum"], job.spec["price_per_result"], job.spec["adaptive"]) == (
        4, 2, "1000", False)
    assert job.spec["dataset"] == json.loads(printed.out)["spec"]["dataset"]
    assert "uploaded data.safetensors" in printed.err  # the upload's progress bar, on stderr

    assert cli.main(["--url", market, "job", str(job.pk)]) == cli.EXIT_OK
    assert f"job {job.pk}" in capsys.readouterr().out


def test_the_cli_asks_before_submitting_and_without_a_terminal_submits_nothing(market, files, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    token_args = ["--url", market, "--token", token_of(market)]
    weights_file, dataset_file = files

    code = cli.main([*token_args, "submit", "--architecture", "mlp", "--config", json.dumps(MLP_CONFIG),
                     "--weights", str(weights_file), "--dataset", str(dataset_file)])

    printed = capsys.readouterr()
    assert code == cli.EXIT_ERROR and "pass --yes" in printed.err
    assert "escrow (worst case)" in printed.out  # the quote was shown
    assert Job.objects.count() == 0


def test_the_cli_says_plainly_when_the_server_refuses_or_cannot_be_reached(market, monkeypatch, capsys):
    monkeypatch.setattr(cli, "CLI_RETRY", RetryPolicy(attempts=2, base_seconds=0.01))

    refused = cli.main(["--url", market, "--token", "not-a-token", "job", "1"])
    said = capsys.readouterr().err
    unreachable = cli.main(["--url", "http://127.0.0.1:9", "--token", "t", "job", "1"])
    unreachable_said = capsys.readouterr().err

    assert refused == cli.EXIT_ERROR and "HTTP 401 not_authenticated" in said and "Traceback" not in said
    assert unreachable == cli.EXIT_UNREACHABLE and "cannot reach http://127.0.0.1:9" in unreachable_said
    assert "Traceback" not in unreachable_said


def test_the_cli_quotes_a_spec_file_whose_artifact_fields_name_local_files(market, files, monkeypatch, capsys):
    weights_file, dataset_file = files
    spec_file = weights_file.parent / "job.json"
    spec_file.write_text(json.dumps({"kind": "inference", "spec": {
        "model": {"architecture": "mlp", "config": MLP_CONFIG, "weights": weights_file.name},
        "dataset": dataset_file.name, "rows_per_unit": 5}}))
    monkeypatch.chdir("/")  # the files are found beside the spec file, not in the working directory
    token = token_of(market)

    code = cli.main(["--url", market, "--token", token, "quote", "--spec", str(spec_file), "--quorum", "3", "--json"])

    printed = capsys.readouterr()
    assert code == cli.EXIT_OK, printed.err
    quote = json.loads(printed.out)
    assert (quote["units"], quote["quorum"], quote["spec"]["rows_per_unit"]) == (2, 3, 5)  # a flag beats the file
    assert quote["spec"]["dataset"] == hashlib.sha256(dataset_file.read_bytes()).hexdigest()
    assert Job.objects.count() == 0


def test_the_client_pages_through_the_real_job_list_and_cancels_on_the_real_api(market, files):
    weights_file, dataset_file = files
    with logged_in(market) as client:
        spec = {"model": {"architecture": "mlp", "config": MLP_CONFIG, "weights": client.upload(weights_file)},
                "dataset": client.upload(dataset_file), "rows_per_unit": 4, "price_per_result": "1000"}
        submitted = [client.submit("inference", spec).id for _ in range(5)]
        listed = [job.id for job in client.jobs(page_size=2)]  # three pages of the real cursor pagination
        cancelled = client.cancel(submitted[0])
        again = client.cancel(submitted[0])  # idempotent: the job as it is
        pending_only = [job.id for job in client.jobs(state="pending")]
        Job.objects.filter(pk=submitted[1]).update(state=Job.State.COMPLETED)
        with pytest.raises(ApiError) as finished:
            client.cancel(submitted[1])

    assert listed == sorted(submitted, reverse=True)  # every job once, newest first
    assert cancelled.state in ("cancelling", "cancelled") and again.id == cancelled.id
    assert Job.objects.get(pk=submitted[0]).state in (Job.State.CANCELLING, Job.State.CANCELLED)
    assert pending_only == sorted(submitted[1:], reverse=True)
    assert (finished.value.status, finished.value.code) == (409, "conflict")
