"""``python -m bench``: every scenario of issue 7, in one run, on this machine.

Placement (two cores): the server under test - nginx, or patgate with one worker - runs
alone on core 0; wrk, the upstream and PostgreSQL share core 1. The server gets a whole
core and is the only thing measured; the upstream and PostgreSQL cost the same for every
server. Two exceptions: "upstream direct" moves the upstream to core 0 for its own row, and
``--workers 2`` leaves patgate unpinned (its two processes compete with core 1's tenants).

Order: upstream direct; nginx; one patgate process for public, hot (one head, then a new
path each request), cold, bad-checksum and unknown tokens; patgate ``--workers 2`` (hot); a
fresh patgate for memory with 100,000 cached identities. Everything started is stopped, and
the temporary directory removed, on success, error, SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import nginx, report, wrk
from bench.database import Database, Seeded, bad_checksum, write_list
from bench.patgate import API_PATH, PUBLIC_PATH, Patgate, config_data, write_config
from bench.processes import Service, free_port
from bench.report import Memory, Report, Row
from bench.system import BenchError, CpuMeter, core_count, describe, ensure_tools, pin

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SERVER_CORE = 0
LOAD_CORE = 1
STOP_AFTER_LIMIT = 300  # seconds a stop-after run may take at most
PATH = "/bench"  # upstream and nginx are asked for this path
BUSY_LOAD = 0.5  # a load average above this at the start is worth a warning


@dataclass
class Scenario:
    """One row of the table: what wrk sends, what must come back, what PostgreSQL must see."""

    key: str
    label: str
    load: wrk.Load
    expected_status: int = 200
    warmup: bool = True  # token-list runs skip it: it would use up their tokens
    queries: Callable[[wrk.Result], int] | None = None  # expected token lookups (patgate)
    note: str = ""


def no_queries(result: wrk.Result) -> int:
    return 0


@dataclass
class Pins:
    server: list[str]  # command prefixes: taskset -c N (empty on a one-core machine)
    load: list[str]
    server_cores: set[int]
    load_cores: set[int]


def pins() -> Pins:
    taskset = shutil.which("taskset")
    if core_count() < 2 or taskset is None:
        print(
            "bench: warning: fewer than 2 cores or no taskset - nothing is pinned", file=sys.stderr
        )
        every = set(os.sched_getaffinity(0))
        return Pins([], [], every, every)
    return Pins(
        [taskset, "-c", str(SERVER_CORE)],
        [taskset, "-c", str(LOAD_CORE)],
        {SERVER_CORE},
        {LOAD_CORE},
    )


class Bench:
    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.stack = stack
        self.tools = ensure_tools()
        self.pins = pins()
        self.tmp = Path(tempfile.mkdtemp(prefix="patgate-bench-"))
        stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        self.rows: list[Row] = []
        self.db: Database
        self.upstream: Service

    def say(self, text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def started(self, service: Service) -> Service:
        self.stack.callback(service.stop)
        return service

    # -- measuring

    def measure(self, scenario: Scenario, url: str, *, server: int) -> Row:
        a, load = self.args, scenario.load
        script = self.tmp / f"{scenario.key}.lua"
        if scenario.warmup and a.warmup > 0:
            wrk.run(
                self.tools["wrk"],
                url,
                load,
                script,
                duration=a.warmup,
                connections=a.connections,
                pin=self.pins.load,
            )
        before = self.db.lookups()
        meters = {
            "server": CpuMeter((server,)),
            "upstream": CpuMeter((self.upstream.pid,)),
            "postgres": CpuMeter((self.db.postmaster_pid(),)),
        }
        for meter in meters.values():
            meter.start()
        started = time.monotonic()
        duration = STOP_AFTER_LIMIT if load.stop_after else a.duration
        self.say(f"{scenario.label} ...")
        result = wrk.run(
            self.tools["wrk"],
            url,
            load,
            script,
            duration=duration,
            connections=a.connections,
            pin=self.pins.load,
        )
        wall = time.monotonic() - started
        cpu = {who: meter.stop() for who, meter in meters.items()}
        cpu["wrk"] = result.wrk_cpu_s
        row = Row(
            scenario.key,
            scenario.label,
            result,
            scenario.expected_status,
            cpu,
            wall,
            note=scenario.note,
        )
        if scenario.queries is not None:
            row.queries = self.db.lookups() - before
            row.expected_queries = scenario.queries(result)
        if load.stop_after and not result.stopped:
            row.note += f" (ended by the time limit after {result.requests:,} responses)"
        self.rows.append(row)
        queries = "" if row.queries is None else f", token queries {row.queries:,}"
        self.say(
            f"{scenario.label}: {result.requests_per_s:,.0f} requests/s, "
            f"p99 {result.p99_ms:.2f} ms, errors {row.errors}{queries}"
        )
        return row

    # -- the run

    def run(self) -> Report:
        a, started = self.args, time.monotonic()
        timestamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        machine = describe(self.tools, REPO)
        self.say(f"temporary files in {self.tmp}")
        load = os.getloadavg()[0]
        if load > BUSY_LOAD:
            self.say(
                f"warning: load average {load:.2f} - other processes compete for the cores, "
                "so the figures will be noisy"
            )

        self.say("starting PostgreSQL (embedded)")
        self.db = Database(self.tmp / "postgres")
        self.stack.callback(self.db.stop)
        pin(self.db.postmaster_pid(), self.pins.load_cores)  # backends inherit it

        upstream_port = free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        self.upstream = self.started(
            Service(
                "upstream",
                [*self.pins.load, sys.executable, "-m", "bench.upstream", str(upstream_port)],
                self.tmp / "upstream.log",
                cwd=REPO,
            )
        )
        self.upstream.wait_for("ready")

        port, admin_port = free_port(), free_port()
        cfg = write_config(
            self.tmp / "gateway.yaml",
            config_data(
                port=port,
                admin_port=admin_port,
                upstream=upstream_url,
                database_url=self.db.url,
                cache_entries=max(a.identities, 100_000),
            ),
        )
        self.say(f"seeding {a.identities:,} tokens for {a.users:,} users")
        seeded = self.db.seed(cfg, count=a.identities, users=a.users, invalid=a.invalid_tokens)
        scans_start, logged_start = self.db.index_scans(), self.db.lookups()
        lists = {
            "cold": write_list(self.tmp / "cold.txt", seeded.tokens[: a.cold_tokens]),
            "all": write_list(self.tmp / "all.txt", seeded.tokens),
            "unknown": write_list(self.tmp / "unknown.txt", seeded.unknown),
            "bad": write_list(self.tmp / "bad.txt", seeded.bad_checksum),
        }

        # upstream direct: the upstream alone on the server core for this one row
        pin(self.upstream.pid, self.pins.server_cores)
        direct = Scenario(report.UPSTREAM, "upstream direct", wrk.Load(PATH), note="on core 0")
        self.measure(direct, upstream_url, server=self.upstream.pid)
        pin(self.upstream.pid, self.pins.load_cores)

        nginx_port = free_port()
        proxy = self.started(
            nginx.start(
                self.tools["nginx"],
                self.tmp / "nginx",
                port=nginx_port,
                upstream_port=upstream_port,
                pin=self.pins.server,
            )
        )
        reference = Scenario(report.NGINX, "nginx proxy_pass", wrk.Load(PATH))
        self.measure(reference, f"http://127.0.0.1:{nginx_port}", server=proxy.pid)
        proxy.stop()

        self.patgate_one_worker(port, admin_port, seeded, lists)
        self.patgate_two_workers(port, admin_port, seeded)
        memory = None if a.no_memory else self.memory(port, admin_port, lists["all"], a.identities)
        logged = self.db.lookups() - logged_start
        totals = {
            "statement_log": logged,
            "idx_scan": self.index_scans_reaching(logged, scans_start),
        }

        placement = {
            "server_under_test": f"core {SERVER_CORE} (taskset), alone",
            "wrk": f"core {LOAD_CORE} (taskset), 1 thread",
            "upstream": f"core {LOAD_CORE}, except its own 'upstream direct' row (core 0)",
            "postgres": f"core {LOAD_CORE} (postmaster affinity, inherited by backends)",
            "patgate --workers 2": "not pinned: both cores, shared with wrk/upstream/postgres",
        }
        result = Report(
            rows=self.rows,
            memory=memory,
            machine=machine,
            settings={
                "duration_s": a.duration,
                "warmup_s": a.warmup,
                "connections": a.connections,
                "wrk_threads": 1,
                "cold_tokens": a.cold_tokens,
                "invalid_tokens": a.invalid_tokens,
                "identities": a.identities,
                "users": a.users,
                "upstream": "bench/upstream.py: raw uvloop protocol, fixed 64-byte 200 body",
            },
            placement=placement,
            query_totals=totals,
            command=shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
            timestamp=timestamp,
        )
        result.elapsed_s = time.monotonic() - started
        machine["load_average_at_end"] = list(os.getloadavg())
        return result

    def index_scans_reaching(self, expected: int, start: int) -> int:
        """``idx_scan`` since ``start`` once it reaches ``expected`` (every gateway backend has
        exited and published by now), or whatever it shows after a bounded wait."""
        deadline = time.monotonic() + 15.0
        scans = self.db.index_scans() - start
        while scans < expected and time.monotonic() < deadline:
            time.sleep(0.25)
            scans = self.db.index_scans() - start
        return scans

    def start_patgate(self, port: int, admin_port: int, *, workers: int, pinned: bool) -> Patgate:
        gateway = Patgate(
            self.tmp / "gateway.yaml",
            self.tmp,
            port=port,
            admin_port=admin_port,
            workers=workers,
            pin=self.pins.server if pinned else [],
        )
        self.stack.callback(gateway.stop)
        return gateway

    def smoke(self, gateway: Patgate, seeded: Seeded) -> None:
        """One request of each kind, so a broken setup fails here and not as a table of errors."""
        expected = [
            (PUBLIC_PATH, None, 200),
            (API_PATH, seeded.hot, 200),
            (API_PATH, None, 401),
            (API_PATH, bad_checksum(seeded.hot), 401),
        ]
        for path, token, status in expected:
            got = gateway.status(path, token)
            if got != status:
                what = "no token" if token is None else "a token"
                raise BenchError(f"patgate answered {got}, not {status}, to {path} with {what}")

    def patgate_one_worker(
        self, port: int, admin_port: int, seeded: Seeded, lists: dict[str, Path]
    ) -> None:
        a = self.args
        self.say("starting patgate (1 worker)")
        gateway = self.start_patgate(port, admin_port, workers=1, pinned=True)
        self.smoke(gateway, seeded)
        bearer = {"Authorization": f"Bearer {seeded.hot}"}
        cold, invalid = a.cold_tokens, a.invalid_tokens
        scenarios = [
            Scenario(
                report.PUBLIC, "patgate public route", wrk.Load(PUBLIC_PATH), queries=no_queries
            ),
            Scenario(report.HOT, "patgate hot PAT", wrk.Load(API_PATH, bearer), queries=no_queries),
            Scenario(
                report.HOT_PATHS,
                "patgate hot PAT, a new path each request",
                wrk.Load(API_PATH, bearer, vary_path=True),
                queries=no_queries,
                note="the same headers, the path /api/bench/1, /2, ...: an API client",
            ),
            Scenario(
                report.COLD,
                f"patgate cold PATs ({cold:,} distinct)",
                wrk.Load(API_PATH, token_file=lists["cold"], stop_after=cold),
                warmup=False,
                queries=lambda result: min(result.sent, cold),
                note="each request a token never used before",
            ),
            Scenario(
                report.BAD_CHECKSUM,
                "patgate invalid: bad checksum",
                wrk.Load(API_PATH, token_file=lists["bad"]),
                expected_status=401,
                warmup=False,
                queries=no_queries,
            ),
            Scenario(
                report.UNKNOWN,
                f"patgate invalid: unknown ({invalid:,} distinct)",
                wrk.Load(API_PATH, token_file=lists["unknown"]),
                expected_status=401,
                warmup=False,
                queries=lambda result: min(result.sent, invalid),
                note="well-formed, not stored: one query each, then the negative cache",
            ),
        ]
        for scenario in scenarios:
            self.measure(scenario, gateway.url, server=gateway.pid)
        gateway.stop()

    def patgate_two_workers(self, port: int, admin_port: int, seeded: Seeded) -> None:
        self.say("starting patgate (--workers 2, not pinned)")
        gateway = self.start_patgate(port, admin_port, workers=2, pinned=False)
        bearer = {"Authorization": f"Bearer {seeded.hot}"}
        scenario = Scenario(
            report.HOT_2W,
            "patgate hot PAT, --workers 2",
            wrk.Load(API_PATH, bearer),
            queries=no_queries,
            note="two processes, not pinned: they share core 1 with wrk, upstream, postgres",
        )
        self.measure(scenario, gateway.url, server=gateway.pid)
        gateway.stop()

    def memory(self, port: int, admin_port: int, tokens: Path, identities: int) -> Memory:
        self.say(f"memory: a fresh patgate, warming {identities:,} identities")
        gateway = self.start_patgate(port, admin_port, workers=1, pinned=True)
        time.sleep(1.0)  # let start-up allocations settle
        idle = gateway.memory()["VmRSS"]
        before = self.db.lookups()
        warm = wrk.run(
            self.tools["wrk"],
            gateway.url,
            wrk.Load(API_PATH, token_file=tokens, stop_after=identities),
            self.tmp / "memory.lua",
            duration=STOP_AFTER_LIMIT,
            connections=self.args.connections,
            pin=self.pins.load,
        )
        queries = self.db.lookups() - before
        metrics = gateway.cache_metrics()
        usage = gateway.memory()
        gateway.stop()
        memory = Memory(
            identities=identities,
            rss_idle_kib=idle,
            rss_kib=usage["VmRSS"],
            peak_kib=usage["VmHWM"],
            cache_entries=int(metrics.get("patgate_cache_entries", 0)),
            queries=queries,
            warm=warm,
        )
        self.say(
            f"memory: {memory.rss_mb:.1f} MB RSS with {memory.cache_entries:,} cached identities "
            f"(idle {idle / 1024:.1f} MB); warmed at {warm.requests_per_s:,.0f} requests/s"
        )
        return memory
