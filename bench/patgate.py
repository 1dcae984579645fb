"""patgate under test: its generated config, its ``serve`` process, its metrics and memory.

The config is the product's defaults plus what a benchmark needs: a fixed port (``--workers``
processes share it through SO_REUSEPORT, so it cannot be 0), no access log, warnings only, a
cache that keeps everything for the whole run, and two routes to the upstream - ``/public``
(no token) and ``/api`` (requires ``jobs:read``).
"""

from __future__ import annotations

import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench.processes import Service
from bench.system import rss_kib
from gateway.config import Config, parse_config

LISTENING = r"patgate: listening on http://\S+ \(admin http://\S+\)"
PUBLIC_PATH = "/public/bench"
API_PATH = "/api/bench"
ROLES = {
    "owner": ["*"],
    "admin": ["jobs:*", "invoices:*", "tokens:admin", "tokens:create", "users:admin"],
    "full_user": ["jobs:*", "invoices:read", "tokens:create"],
    "field_user": ["jobs:read"],
}
_METRIC = re.compile(r'^(patgate_cache_\w+?)(?:\{kind="(\w+)"\})? ([0-9.e+]+)$', re.MULTILINE)


def config_data(
    *, port: int, admin_port: int, upstream: str, database_url: str, cache_entries: int
) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin_listen": {"host": "127.0.0.1", "port": admin_port},
        "database": {"url": database_url},
        "cache": {
            "ttl": "1h",
            "negative_ttl": "1h",
            "max_entries": cache_entries,
            "negative_max_entries": 10_000,
        },
        "logging": {"level": "warning", "access_log": False},
        "roles": ROLES,
        "routes": [
            {
                "name": "public",
                "match": {"prefix": "/public"},
                "upstream": upstream,
                "public": True,
            },
            {
                "name": "api",
                "match": {"prefix": "/api"},
                "upstream": upstream,
                "require": ["jobs:read"],
            },
        ],
    }


def write_config(path: Path, data: dict[str, Any]) -> Config:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return parse_config(data)


class Patgate:
    """``patgate serve`` with ``workers`` processes, optionally pinned (``taskset`` prefix)."""

    def __init__(
        self, config: Path, root: Path, *, port: int, admin_port: int, workers: int, pin: list[str]
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.workers = workers
        command = [
            *pin,
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config),
            "--workers",
            str(workers),
            "--migrate",
            "--pid-file",
            str(root / f"patgate-{workers}.pid"),
        ]
        log = root / f"patgate-{workers}w-{port}.log"
        self.service = Service(f"patgate --workers {workers}", command, log)
        self.service.wait_for(LISTENING, count=workers)

    @property
    def pid(self) -> int:
        return self.service.pid

    def stop(self) -> None:
        self.service.stop()

    def status(self, path: str, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.url + path, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def cache_metrics(self) -> dict[str, float]:
        """``patgate_cache_entries`` and the cache event counters (one worker's)."""
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=10) as response:  # noqa: S310
            text = response.read().decode()
        return {
            f"{name}{'_' + kind if kind else ''}": float(value)
            for name, kind, value in _METRIC.findall(text)
        }

    def memory(self) -> dict[str, int]:
        return rss_kib(self.pid)
