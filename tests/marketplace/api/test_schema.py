"""The OpenAPI schema and its offline Swagger UI."""

import re

from django.core.management import call_command

AGENT_OPERATIONS = {"agent_enroll", "agent_keys", "agent_lease", "agent_heartbeat", "agent_report", "agent_fail"}
JOB_OPERATIONS = {"job_create", "job_retrieve", "job_output", "job_cancel"}
OTHER_OPERATIONS = {"artifact_upload", "artifact_download", "enrollment_token_create", "device_list"}
AUTH_OPERATIONS = {"auth_token_create", "auth_token_list", "auth_token_revoke", "auth_logout", "auth_logout_all"}
WALLET_OPERATIONS = {"wallet_challenge", "wallet_retrieve", "wallet_link", "wallet_change_cancel"}


def operation_ids(schema):
    return {op["operationId"] for path in schema["paths"].values() for op in path.values() if "operationId" in op}


def test_the_schema_describes_the_agent_and_job_operations(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["title"] == "Idlegrid API"
    assert AGENT_OPERATIONS | JOB_OPERATIONS | OTHER_OPERATIONS <= operation_ids(schema)
    assert "/api/v1/agent/results/{result_id}/report" in schema["paths"]
    assert schema["components"]["securitySchemes"]["deviceAuth"]["in"] == "header"


def test_the_schema_describes_the_token_and_wallet_operations_and_the_token_scheme(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()

    assert AUTH_OPERATIONS | WALLET_OPERATIONS <= operation_ids(schema)
    token_scheme = schema["components"]["securitySchemes"]["knoxApiToken"]
    assert (token_scheme["in"], token_scheme["name"]) == ("header", "Authorization")
    assert "Token" in token_scheme["description"]
    assert set(schema["paths"]["/api/v1/wallet/"]["post"]["responses"]) >= {"201", "202", "400", "429"}


def test_the_schema_validates_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yml"))

    assert "agent_report" in (tmp_path / "schema.yml").read_text()


def test_the_docs_page_loads_swagger_ui_from_local_static_files(client):
    response = client.get("/api/docs/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger-ui" in html
    assert re.findall(r"https?://", html) == []
    scripts = re.findall(r'<script src="([^"]+)"', html)
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in scripts


def test_the_swagger_ui_files_are_served(client):
    html = client.get("/api/docs/").content.decode()
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)

    assert len(assets) >= 3
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert b"".join(response.streaming_content), asset


def test_the_health_check_answers(client):
    assert client.get("/healthz").json() == {"status": "ok"}
