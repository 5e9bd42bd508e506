"""A new submitter in the browser, against the live cluster, real agents of two other owners and a real
chain: sign up, fund the account with a real deposit (the address linked through the REST API: the
payout page is built elsewhere), upload a model and a dataset through the new-job form, read the quote,
confirm, watch the job page update live until it completes, download the output and compare it with the
logits computed here; then submit a second job and cancel it from its page."""

from __future__ import annotations

import time

import httpx
import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save as save_safetensors

from demo.payouts import Wallet, deposit_make, gas_money_give, step, wallet_link
from marketplace.core.tensors import array_file_bytes
from tests.e2e.browser.conftest import shoot
from worker_agent.architectures import resolve

CONFIG = {"in_features": 16, "hidden": [32], "out_features": 4}
ROWS, ROWS_PER_UNIT, BATCH = 40, 10, 5
DEPOSIT = 50 * 10**18  # 50 tokens; a job of 4 units at the default price escrows 0.024
PASSWORD = "a long enough passphrase 41"
RTOL, ATOL = 1e-5, 1e-6  # the inference kind's default comparator: the job's tolerance


def _model_files(folder):
    """Weights and a dataset as files a person would pick, and the logits they should come back as."""
    torch.manual_seed(3)
    arch, config = resolve("mlp", CONFIG)
    model = arch.build(config).eval()
    x = np.random.default_rng(3).standard_normal((ROWS, 16)).astype(np.float32)
    weights, dataset = folder / "model.safetensors", folder / "rows.safetensors"
    weights.write_bytes(save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}))
    dataset.write_bytes(array_file_bytes(x, name="x"))
    with torch.inference_mode():
        expected = torch.cat([model(torch.from_numpy(x[i:i + BATCH])) for i in range(0, ROWS, BATCH)]).numpy()
    return weights, dataset, expected


def _agents(cluster):
    """Two devices of two other owners, so every unit is verified by a quorum of different owners."""
    running = []
    for owner in ("alice", "bob"):
        state_dir = cluster.enroll_agent(name=f"{owner}-pc", owner_token=cluster.account(owner))
        running.append(cluster.start_agent(f"{owner}-pc", state_dir))
    return running


def _sign_up(page, username):
    page.goto("/accounts/signup/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Email").fill(f"{username}@example.org")
    page.get_by_label("Password:", exact=True).fill(PASSWORD)
    page.get_by_label("Password (again)").fill(PASSWORD)
    page.get_by_role("button", name="Sign Up").click()
    page.wait_for_url("**/jobs/")


def _fund(cluster, chain, tmp_path, username, page):
    """Link a fresh key as the payout address (REST API, with the password), deposit from it on chain."""
    token = httpx.post(f"{cluster.url}/api/v1/auth/token/", json={"username": username, "password": PASSWORD},
                       timeout=30).json()["token"]
    wallet = Wallet.create(username, tmp_path / "keys")
    gas_money_give(chain, [wallet])
    wallet_link(server=cluster.url, token=token, password=PASSWORD, wallet=wallet)
    tx = deposit_make(chain, wallet, DEPOSIT)
    page.goto("/funds/")
    shoot(page, "submitter-funds-deposited")  # pending confirmation, or credited by the follower already
    credited = step(cluster, "follow-deposit", "--tx", tx)
    assert credited["amount"] == str(DEPOSIT)
    return wallet, tx


def _new_job(page, weights, dataset, *, shot=None):
    page.goto("/jobs/new/")
    page.get_by_label("Weights (safetensors)", exact=True).set_input_files(str(weights))
    page.get_by_label("Dataset (safetensors)", exact=True).set_input_files(str(dataset))
    page.locator("#field-weights_file .upload-done").wait_for(state="visible")
    page.locator("#field-dataset_file .upload-done").wait_for(state="visible")
    page.get_by_label("Rows per unit").fill(str(ROWS_PER_UNIT))
    page.get_by_label("Batch size").fill(str(BATCH))
    page.locator("#id_batch_size_status .field-ok").wait_for()  # checked on the server as it was typed
    page.locator("#id_weights_file_status .field-ok").wait_for()  # checked once uploaded
    if shot:
        shoot(page, shot)
    page.get_by_role("button", name="Get a quote").click()
    page.get_by_role("heading", level=1, name="Quote: inference job").wait_for()


def _wait_for_state(page, states, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = page.locator("#job-state").inner_text()
        if state in states:
            return state
        time.sleep(0.2)
    raise AssertionError(f"the job page still says {page.locator('#job-state').inner_text()} after {timeout}s")


def test_a_new_submitter_funds_the_account_submits_watches_downloads_and_cancels(cluster, chain, browse, tmp_path):
    agents = _agents(cluster)
    weights, dataset, expected = _model_files(tmp_path)
    page = browse()
    _sign_up(page, "carol")
    assert "No jobs yet" in page.locator("main").inner_text()
    shoot(page, "submitter-dashboard-empty")

    _fund(cluster, chain, tmp_path, "carol", page)
    page.goto("/funds/")
    credited = page.get_by_role("region", name="Deposits credited")
    assert "50 IGT" in credited.inner_text()
    assert "50 IGT" in page.locator(".stats").inner_text()  # available
    shoot(page, "submitter-funds")

    page.goto("/jobs/new/")
    page.get_by_label("Architecture config (JSON)").fill('{"in_features": 16, "hidden": [32]')
    page.locator("#id_config_status .field-error").wait_for()  # validated as it was typed
    assert "not JSON" in page.locator("#id_config_status").inner_text()
    shoot(page, "submitter-new-job-error")
    page.get_by_label("Architecture config (JSON)").fill('{"in_features": 16, "hidden": [32], "out_features": 4}')
    page.locator("#id_config_status .field-ok").wait_for()

    _new_job(page, weights, dataset, shot="submitter-new-job")
    assert page.locator(".stat", has_text="Units").locator("dd").first.inner_text() == "4"
    assert "covers the escrow" in page.locator("main").inner_text()
    shoot(page, "submitter-quote")
    page.get_by_role("button", name="Confirm and reserve").click()
    page.wait_for_url("**/jobs/*/")
    job_url = page.url
    assert page.locator("#job-live[hx-trigger]").count() == 1  # polling while it runs
    shoot(page, "submitter-job-live")

    assert _wait_for_state(page, ("completed", "failed")) == "completed"  # no reload: the fragment updated
    assert page.locator("#job-live[hx-trigger]").count() == 0  # and stopped polling
    assert page.locator("#units-done").inner_text() == "4 / 4"
    page.locator(".chart .u-over").first.wait_for()  # the progress chart drew, from the swapped-in data
    shoot(page, "submitter-job-done")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download output").click()
    output = load_file(download.value.path())["y"]
    assert output.shape == expected.shape
    assert np.allclose(output, expected, rtol=RTOL, atol=ATOL)

    for agent in agents:  # no device: the second job waits, to be cancelled
        agent.stop()
    _new_job(page, weights, dataset)
    page.get_by_role("button", name="Confirm and reserve").click()
    page.wait_for_url("**/jobs/*/")
    assert page.url != job_url
    _wait_for_state(page, ("running",))
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel job").click()
    page.wait_for_load_state("load")
    assert _wait_for_state(page, ("cancelled",)) == "cancelled"
    assert page.get_by_role("button", name="Cancel job").count() == 0
    shoot(page, "submitter-job-cancelled")
    page.goto(job_url)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing may overflow sideways
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shoot(page, "submitter-job-done-narrow")
    page.set_viewport_size({"width": 1280, "height": 900})

    page.goto("/jobs/")
    assert page.locator("tbody tr").count() == 2
    shoot(page, "submitter-dashboard")
    page.goto("/funds/statement/")
    assert page.locator("tbody tr").count() >= 4  # deposit, two escrows, credits, a return
    shoot(page, "submitter-statement")
