"""The demo's REST client: one account's token against the marketplace the demo cluster runs."""

from __future__ import annotations

import httpx


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=60)

    def upload(self, data: bytes) -> str:
        response = self.http.post("/api/v1/artifacts/", content=data, headers={"Content-Type": "application/octet-stream"})
        response.raise_for_status()
        return response.json()["sha256"]

    def get(self, path: str) -> httpx.Response:
        response = self.http.get(path)
        response.raise_for_status()
        return response
