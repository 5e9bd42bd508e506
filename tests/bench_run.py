"""Running a bench's --quick form from a test: on the PostgreSQL server DATABASE_URL names (the machine's own
otherwise; the bench makes and drops a database of its own there), its last line of output read as JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
SERVER = os.environ.get("DATABASE_URL", "")
if not SERVER.startswith(("postgres://", "postgresql://")):
    SERVER = "postgres://postgres@127.0.0.1:5432/postgres"


def run_quick_on_postgres(bench: str, *args: str, timeout: float = 900) -> dict:
    """Not a skip when the server is missing: the suite must run every bench (CI has the server)."""
    try:
        psycopg.connect(SERVER, connect_timeout=3).close()
    except psycopg.Error as exc:
        raise AssertionError(f"bench/{bench} needs a PostgreSQL server at {SERVER}: {exc}") from exc
    done = subprocess.run([sys.executable, f"bench/{bench}", "--quick", "--database-url", SERVER, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
