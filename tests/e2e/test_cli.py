"""The `idlegrid` CLI end to end, as a submitter runs it: its own process (`python -m idlegrid_client`),
nothing but the REST API of a real cluster (gunicorn, Celery worker and beat, two agents), the files on
disk. It quotes, submits, watches and downloads; the output is checked against the same model run
locally, batched as the agents batch it, as the demo checks its job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from demo.cluster import ROOT
from marketplace.core.tensors import array_file_bytes
from tests.e2e.conftest import MLP, Client, _fund, enrolled
from worker_agent.architectures import resolve

ROWS, ROWS_PER_UNIT, BATCH = 40, 10, 5


def idlegrid(*args: str, env: dict[str, str], flags: tuple[str, ...] = (), timeout: float = 300):
    return subprocess.run([sys.executable, *flags, "-m", "idlegrid_client", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_cli_submits_watches_and_downloads_a_job_whose_output_matches_the_local_model(cluster, tmp_path):
    submitter = Client(cluster, "submitter")
    _fund(submitter)
    for owner in ("alice", "bob"):
        cluster.start_agent(f"{owner}-1", enrolled(cluster, Client(cluster, owner), f"{owner}-1"),
                            "--batch", "1", "--poll", "0.5")
    torch.manual_seed(0)
    arch, config = resolve(MLP["architecture"], MLP["config"])
    model = arch.build(config).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    x = np.random.default_rng(0).standard_normal((ROWS, 16)).astype(np.float32)
    (tmp_path / "data.safetensors").write_bytes(array_file_bytes(x, name="x"))
    # The submitter's environment: the marketplace's URL and a token, nothing of the cluster's settings.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
           "IDLEGRID_URL": cluster.url, "IDLEGRID_TOKEN": submitter.token,
           "IDLEGRID_CONFIG": str(tmp_path / "config.toml")}

    submitted = idlegrid("submit", "--kind", "inference", "--architecture", "mlp", "--config", json.dumps(MLP["config"]),
                         "--weights", str(tmp_path / "model.safetensors"), "--dataset", str(tmp_path / "data.safetensors"),
                         "--rows-per-unit", str(ROWS_PER_UNIT), "--batch-size", str(BATCH), "--quorum", "2",
                         "--price", "1000", "--set", "adaptive=false", "--yes", "--json", env=env,
                         flags=("-X", "importtime"))
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = json.loads(submitted.stdout)["id"]
    watched = idlegrid("watch", str(job_id), "--interval", "0.5", "--timeout", "240", "--json", env=env)
    assert watched.returncode == 0, (watched.stderr[-3000:], [p.log_tail(15) for p in cluster.processes])
    downloaded = idlegrid("download", str(job_id), "-o", str(tmp_path / "out" / "output.safetensors"), "--json", env=env)
    assert downloaded.returncode == 0, downloaded.stderr[-3000:]
    shown = idlegrid("job", str(job_id), env=env)

    job = json.loads(watched.stdout)
    assert job["state"] == "completed" and job["units_done"] == job["units_total"] == ROWS // ROWS_PER_UNIT
    assert job["results_valid"] >= 2 * job["units_total"] and job["results_invalid"] == 0
    assert job["spec"]["price_per_result"] == "1000" and job["spec"]["batch_size"] == BATCH
    with torch.inference_mode():
        expected = torch.cat([model(torch.from_numpy(x[i : i + BATCH])) for i in range(0, ROWS, BATCH)]).numpy()
    download = json.loads(downloaded.stdout)
    merged = load_file(download["path"])["y"]
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
    assert (merged.argmax(1) == expected.argmax(1)).all()
    assert download["sha256"] == job["output_sha256"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["output.safetensors"]  # no partial file left
    assert shown.returncode == 0 and f"job {job_id}" in shown.stdout and "completed" in shown.stdout
    # the CLI's process imported the client and httpx, and never Django, torch or the marketplace
    imported = {line.split("|")[-1].strip().split(".")[0] for line in submitted.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"idlegrid_client", "httpx", "rich"} <= imported
    assert "uploaded model.safetensors" in submitted.stderr and "uploaded data.safetensors" in submitted.stderr
    assert not imported & {"django", "celery", "torch", "numpy", "marketplace"}
