"""The recursion limit of marketplace processes (web, Celery, manage.py), restored once at start.

py_ecc, imported through eth_account (marketplace/ledger/wallets.py, marketplace/chain/client.py,
web3), calls `sys.setrecursionlimit(max(100000, current))` at import (py_ecc/__init__.py). CPython
3.11 bounds C recursion, the json decoder's included, by that same limit, so with it a 200 KB request
body nested 100,000 deep overflowed the C stack of a gunicorn worker (SIGSEGV) instead of raising
RecursionError. Bodies and headers are depth-checked before parsing anyway (worker_agent/safejson.py);
this keeps every other C recursion of these processes (repr, pickle, deepcopy...) bounded too.

py-evm (`eth`, the in-process chain of the tests) raises the limit to 12288 when imported, for the
EVM's 1024 call frames; that import is lazy and the need is real, so it is left alone.
"""

from __future__ import annotations

import sys

# CPython's default. py_ecc's own recursion (scalar multiplication halves the scalar: ~256 levels for a
# 256-bit one) fits under it.
RECURSION_LIMIT = 1000


def recursion_limit_restore() -> None:
    # Imported here, once: every later import of py_ecc is a cache hit that runs no setrecursionlimit.
    import py_ecc  # noqa: F401

    sys.setrecursionlimit(min(sys.getrecursionlimit(), RECURSION_LIMIT))
