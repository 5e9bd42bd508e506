"""The portal in a real browser: Playwright driving Debian's chromium against the e2e cluster (gunicorn,
Celery, beat, real agents) with a real chain (anvil, TestToken + PayoutLedger).

Every page a test opens fails it on a console error, an uncaught exception, or a request to any host but
the cluster's own (assets come from static, never a CDN). `shoot(page, name)` saves a full-page screenshot
under var/screenshots/ and runs axe-core on the page: a serious or critical violation fails the test."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from demo.cluster import ROOT, Cluster
from demo.payouts import LocalChain, chain_start

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SCREENSHOTS = ROOT / "var" / "screenshots"
AXE = ROOT / "frontend" / "node_modules" / "axe-core" / "axe.min.js"
BLOCKING = ("serious", "critical")
ASYNC_UNSAFE = "DJANGO_ALLOW_ASYNC_UNSAFE"


@pytest.fixture
def chain() -> Iterator[LocalChain]:
    running = chain_start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def cluster_extra_env(chain: LocalChain) -> dict[str, str]:
    """The servers get the chain (deposits followed, epochs published) and a short audit window, so that
    earnings settle within a test."""
    return {**chain.server_env(), "IDLEGRID_AUDIT_WINDOW_SECONDS": "3"}


@pytest.fixture(scope="module")
def browser():
    """Chromium for one test module. Playwright's sync API runs an event loop in this thread, and the tests'
    own ORM reads are synchronous: Django's async-safety check is off while it runs, and only then (a later
    `manage.py check --deploy` of the suite must not inherit it; Cluster.env never passes it to a server)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: bin/bootstrap --browser installs Debian's chromium (bin/test does)")
    before = os.environ.get(ASYNC_UNSAFE)
    os.environ[ASYNC_UNSAFE] = "true"
    try:
        with sync_playwright() as playwright:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield launched
            finally:
                launched.close()
    finally:
        if before is None:
            os.environ.pop(ASYNC_UNSAFE, None)
        else:
            os.environ[ASYNC_UNSAFE] = before


@dataclass
class Watch:
    """What went wrong in one browser context: console errors, page errors, foreign requests."""

    host: str
    problems: list[str] = field(default_factory=list)

    def console(self, message) -> None:
        if message.type == "error":
            self.problems.append(f"console error: {message.text} at {message.location}")

    def page_error(self, error) -> None:
        self.problems.append(f"uncaught exception: {error}")

    def route(self, route) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about") or parts.netloc == self.host:
            route.continue_()
        else:
            self.problems.append(f"request to another host: {url}")
            route.abort()


@pytest.fixture
def browse(browser, cluster: Cluster):
    """`browse()` opens a new browser context (a person: own cookies) on the cluster and returns its first
    page. At the end of the test, any problem seen in any of them fails it."""
    watches: list[Watch] = []
    contexts = []

    def open_context(*, viewport: dict | None = None):
        watch = Watch(host=urlsplit(cluster.url).netloc)
        context = browser.new_context(base_url=cluster.url, viewport=viewport or {"width": 1280, "height": 900},
                                      timezone_id="Europe/Paris", locale="en-GB", accept_downloads=True)
        context.route("**/*", watch.route)
        context.set_default_timeout(20_000)
        page = context.new_page()
        page.on("console", watch.console)
        page.on("pageerror", watch.page_error)
        context.on("page", lambda extra: (extra.on("console", watch.console), extra.on("pageerror", watch.page_error)))
        watches.append(watch)
        contexts.append(context)
        return page

    yield open_context
    for context in contexts:
        context.close()
    problems = [problem for watch in watches for problem in watch.problems]
    assert not problems, "the browser saw:\n" + "\n".join(problems)


def shoot(page, name: str) -> Path:
    """Save a full-page screenshot as var/screenshots/<name>.png and check the page with axe-core."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ValueError(f"screenshot names are lowercase words with dashes, got {name!r}")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.wait_for_load_state("load")
    page.screenshot(path=str(path), full_page=True)
    axe_check(page, name)
    return path


def axe_check(page, name: str) -> None:
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(content=AXE.read_text())
    report = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    blocking = [v for v in report["violations"] if v.get("impact") in BLOCKING]
    details = "\n".join(f"{v['impact']} {v['id']}: {v['help']} ({len(v['nodes'])}x, e.g. {v['nodes'][0]['target']})"
                        for v in blocking)
    assert not blocking, f"axe-core on {name} ({page.url}):\n{details}"
