"""Where the client finds the marketplace and the token: a flag, else the environment, else the config file.

    --url / IDLEGRID_URL / `url` in the file / http://127.0.0.1:8000
    --token / IDLEGRID_TOKEN / `token` in the file (only when the URL is the file's `url`)

The file is TOML, `$IDLEGRID_CONFIG`, else `$XDG_CONFIG_HOME/idlegrid/config.toml`, else
`~/.config/idlegrid/config.toml`; `idlegrid login` writes it, readable by its owner alone (0600, in a
0700 folder), replacing it atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from idlegrid_client.client import ClientError

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, TOKEN_ENV, CONFIG_ENV = "IDLEGRID_URL", "IDLEGRID_TOKEN", "IDLEGRID_CONFIG"


@dataclass(frozen=True)
class Settings:
    url: str
    token: str | None
    config_path: Path


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]).expanduser()
    base = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "idlegrid" / "config.toml"


def read_config(path: Path) -> dict[str, str]:
    """The file's `url` and `token` (either may be absent); nothing when there is no file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ClientError(f"cannot read the config file {path}: {exc}") from None
    return {key: data[key] for key in ("url", "token") if isinstance(data.get(key), str)}


def write_config(path: Path, *, url: str, token: str) -> None:
    """Write url and token, 0600 from the first byte (never world-readable, even for a moment)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # JSON strings of printable ASCII are TOML basic strings; ensure_ascii escapes the rest as \\uXXXX, which
    # TOML reads the same.
    text = f"url = {json.dumps(url)}\ntoken = {json.dumps(token)}\n"
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".toml")
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as sink:
            sink.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def resolve(*, url: str | None = None, token: str | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    path = config_path(environ)
    stored = read_config(path)
    chosen = (url or environ.get(URL_ENV) or stored.get("url") or DEFAULT_URL).rstrip("/")
    # The file's token was made by the file's marketplace: it is never sent to another one.
    saved = stored.get("token") if stored.get("url", "").rstrip("/") == chosen else None
    return Settings(url=chosen, token=token or environ.get(TOKEN_ENV) or saved, config_path=path)
