"""The embedded PostgreSQL used when no database URL is configured. Development only.

The server comes from the ``pgserver`` package (PostgreSQL binaries in a wheel). It listens
on a Unix socket inside its data directory, never on TCP, and is shared by every patgate
process pointed at the same ``database.data_dir`` (pgserver counts its users and stops the
server when the last one exits).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

NOTICE = (
    "patgate: no database.url configured - using an embedded PostgreSQL in {path} "
    "(development only; set PATGATE_DATABASE_URL for production)"
)


class EmbeddedPostgres:
    def __init__(self, server: Any, data_dir: Path) -> None:
        self._server = server
        self.data_dir = data_dir

    @property
    def url(self) -> str:
        return str(self._server.get_uri())

    def stop(self) -> None:
        self._server.cleanup()


def start(data_dir: str | Path, *, delete_on_stop: bool = False) -> EmbeddedPostgres:
    """Start (or join) the embedded server whose files live under ``data_dir``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
            import pgserver  # optional dependency, imported only when used
    except ImportError as exc:
        raise ConfigError(
            [
                "database.url: empty, and the embedded PostgreSQL is not installed "
                "(pip install 'patgate[embedded]', or set PATGATE_DATABASE_URL)"
            ]
        ) from exc
    root = Path(data_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
        server = pgserver.get_server(  # type: ignore[attr-defined]
            root / "pgdata", cleanup_mode="delete" if delete_on_stop else "stop"
        )
    return EmbeddedPostgres(server, root)


def database_url(data_dir: str, *, quiet: bool = False) -> str:
    """The embedded server's URL, started on demand, with its development-only notice."""
    if not quiet:
        print(NOTICE.format(path=data_dir), file=sys.stderr)
    return start(data_dir).url
