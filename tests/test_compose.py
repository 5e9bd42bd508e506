"""docker/compose.yaml, checked on paper (no Docker engine here): no secret has a default, so compose refuses
to start without them, and the marketplace runs with its production settings."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "docker" / "compose.yaml"
MARKETPLACE = ("web", "worker", "webhooks", "beat")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|(^|_)KEY$|DATABASE_URL")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]  # the x-marketplace anchor is merged (<<)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def test_every_secret_is_required_and_has_no_default():
    checked = []
    for service_name, service in services().items():
        for name, value in environment(service).items():
            if not SECRET_NAME.search(name) or name == "IDLEGRID_ENROLLMENT_TOKEN":
                continue
            checked.append((service_name, name))
            references = list(REFERENCE.finditer(value))
            assert references, f"{service_name}: {name} is written into the file"
            for reference in references:
                assert reference["op"] == ":?", f"{service_name}: {name} must be ${{{reference['name']}:?...}}"
            literal = REFERENCE.sub("", value)
            assert not re.search(r"://[^/@]*:[^/@$]+@", literal), f"{service_name}: {name} holds a password"
    assert {("web", "SECRET_KEY"), ("worker", "SECRET_KEY"), ("beat", "SECRET_KEY"), ("web", "DATABASE_URL"),
            ("postgres", "POSTGRES_PASSWORD")} <= set(checked)


def test_the_agents_enrolment_token_defaults_to_nothing():
    # Single use and only for enrolling: empty means "not enrolling", never a usable token.
    value = environment(services()["agent"])["IDLEGRID_ENROLLMENT_TOKEN"]
    assert REFERENCE.fullmatch(value)["arg"] == ""


def test_every_reference_in_the_file_is_well_formed():
    text = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    opened = [m.start() for m in re.finditer(r"(?<!\$)\$\{", text)]
    assert len(opened) == len(REFERENCE.findall(text)) > 0


def test_the_marketplace_runs_with_its_production_settings():
    for name in MARKETPLACE:
        env = environment(services()[name])
        assert env["IDLEGRID_PRODUCTION"] == "true", name
        assert env["IDLEGRID_PROXY_SSL_HEADER"] == "X-Forwarded-Proto", name
        assert (env["SECURE_SSL_REDIRECT"], env["SESSION_COOKIE_SECURE"], env["CSRF_COOKIE_SECURE"]) == ("true",) * 3
        assert int(env["SECURE_HSTS_SECONDS"]) >= 31_536_000, name


def test_the_health_check_probes_the_path_exempt_from_the_https_redirect():
    from django.conf import settings

    probe = " ".join(services()["web"]["healthcheck"]["test"])
    path = re.search(r"http://127\.0\.0\.1:8000/(\S+?)'", probe)[1]
    assert any(re.fullmatch(pattern, path) for pattern in settings.SECURE_REDIRECT_EXEMPT)


def test_a_worker_consumes_the_webhooks_queue_and_the_default_worker_does_not():
    from django.conf import settings

    command = services()["webhooks"]["command"]
    assert command[command.index("-Q") + 1] == settings.IDLEGRID_WEBHOOKS_QUEUE
    assert settings.CELERY_TASK_ROUTES["webhooks.deliver"]["queue"] == settings.IDLEGRID_WEBHOOKS_QUEUE
    assert "-Q" not in services()["worker"]["command"]  # the default queue: splits, merges, validations


def test_the_image_serves_the_same_front_end_files_as_a_bootstrapped_checkout():
    """bin/bootstrap copies the portal's vendored files out of frontend/node_modules; the image's frontend stage
    must copy the same ones (the portal's pages load them from static/portal/vendor/)."""
    root = COMPOSE.parent.parent
    bootstrap = (root / "bin" / "bootstrap").read_text()
    copied = set(re.findall(r"frontend/node_modules/(\S+?\.(?:js|css))", bootstrap))
    dockerfile = (root / "docker" / "Dockerfile").read_text()
    in_image = set(re.findall(r"/frontend/node_modules/(\S+?\.(?:js|css))", dockerfile))
    assert copied and copied == in_image
    ignore = (root / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!frontend/package-lock.json" in ignore and "!frontend/package.json" in ignore
    templates = root / "marketplace" / "portal" / "templates" / "portal" / "base.html"
    for name in {path.rsplit("/", 1)[1] for path in copied}:
        assert f"portal/vendor/{name}" in templates.read_text(), name
