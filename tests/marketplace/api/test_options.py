"""OPTIONS on every API path answers the view's description, never a server error."""

import re

import pytest
from django.urls import URLPattern, URLResolver

from marketplace.api import urls as api_urls

pytestmark = pytest.mark.django_db


def api_paths():
    for pattern in api_urls.urlpatterns:
        assert isinstance(pattern, URLPattern) and not isinstance(pattern, URLResolver)
        yield "/api/v1/" + re.sub(r"<(?:int|str):[a-z_0-9]+>", "1", str(pattern.pattern))


def test_options_on_every_path_describes_the_view_and_never_fails(api, submitter):
    paths = list(api_paths())
    assert len(paths) >= 35

    described = 0
    for path in paths:
        response = api(submitter).options(path)

        # 401: the agent's paths take a device's credentials only
        assert response.status_code in (200, 401), (path, response.status_code, response.content[:200])
        device_only = path.startswith("/api/v1/agent/") and path != "/api/v1/agent/enroll"
        assert (response.status_code == 401) == device_only, path
        if response.status_code == 200:
            assert response.json()["schema"] == "/api/schema/", path
            assert "actions" not in response.json(), path
            described += 1
    assert described >= 25
