"""Idlegrid's submitter client: a typed Python client of the REST API (`idlegrid_client.client`) and the
`idlegrid` command built on it (`idlegrid_client.cli`). Needs httpx and rich, never Django or torch."""

from idlegrid_client._version import __version__
from idlegrid_client.client import (
    ApiError,
    BadAnswer,
    ChecksumMismatch,
    Client,
    ClientError,
    Job,
    Page,
    Quote,
    RetryPolicy,
    Round,
    Rounds,
    ServerUnreachable,
    TokenInfo,
    Training,
    WaitTimeout,
)

__all__ = [
    "ApiError", "BadAnswer", "ChecksumMismatch", "Client", "ClientError", "Job", "Page", "Quote", "RetryPolicy",
    "Round", "Rounds", "ServerUnreachable", "TokenInfo", "Training", "WaitTimeout", "__version__",
]
