"""WhiteNoise's middleware, able to run in an async middleware chain (marketplace/asgi.py).

WhiteNoise 6 is sync-only: one sync middleware in Django's async chain makes Django run it in a thread and
the rest of the chain, view included, through async_to_sync beneath it, so every request would hold a
thread for its whole life, and a long-polling lease request (marketplace/api/longpoll.py) a thread for its
whole wait. This subclass passes non-static requests straight on in async mode; a static file is answered
as WhiteNoise answers it, read in an executor thread into a plain response (the portal's assets are small;
a file response's sync iterator would make Django warn and buffer it under ASGI anyway).
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpResponse
from whitenoise.middleware import WhiteNoiseMiddleware


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self._acall(request)
        return super().__call__(request)

    async def _acall(self, request: Any) -> Any:
        static_file = self.find_file(request.path_info) if self.autorefresh else self.files.get(request.path_info)
        if static_file is None:
            return await self.get_response(request)
        return await sync_to_async(_whole, thread_sensitive=False)(self.serve(static_file, request))


def _whole(response: Any) -> HttpResponse:
    try:
        plain = HttpResponse(b"".join(response.streaming_content), status=response.status_code)
        del plain["Content-Type"]
        for name, value in response.items():
            plain[name] = value
        return plain
    finally:
        response.close()
