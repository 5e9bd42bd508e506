"""The embedded broker (Celery's `filesystem://`), with messages published atomically.

kombu's filesystem transport creates a message file, then locks and writes it; a consumer moves and reads
any file with the queue's suffix without looking at the lock, so it can take a file still empty. The
worker then dies on the JSON error ("Unrecoverable error: JSONDecodeError", seen here with a 0.1 s poll:
the job waited forever). Here a message is written under a name the consumer ignores and renamed into
place once complete, which a rename does atomically on one file system.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")  # no ".msg" suffix: not read yet
        try:
            with open(partial, "wb", buffering=0) as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel


def register() -> None:
    """Make `filesystem://` mean this transport in this process (producers and consumers alike)."""
    TRANSPORT_ALIASES["filesystem"] = "marketplace.core.broker:Transport"
