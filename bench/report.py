"""The run's results: one Markdown table on stdout, the SPEC §12 checks, JSON and a chart."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.wrk import Result

NGINX = "nginx"
UPSTREAM = "upstream"
PUBLIC = "public"
HOT = "hot"
HOT_PATHS = "hot_paths"
COLD = "cold"
BAD_CHECKSUM = "bad_checksum"
UNKNOWN = "unknown"
HOT_2W = "hot_2w"

RSS_TARGET_MB = 150.0
HOT_RATIO_TARGET = 0.40
P99_FACTOR_TARGET = 3.0
AUTH_OVERHEAD_TARGET = 0.10


@dataclass
class Row:
    key: str
    label: str
    result: Result
    expected_status: int
    cpu_s: dict[str, float]  # server / upstream / wrk / postgres, over the wrk run
    wall_s: float  # the wrk process's lifetime, for CPU percentages
    queries: int | None = None  # token lookups in PostgreSQL (patgate rows)
    expected_queries: int | None = None
    note: str = ""

    @property
    def errors(self) -> int:
        """Socket errors plus responses other than the expected status.

        Token-list runs count every status (wrk's response() sees them); static runs only
        know wrk's own count of statuses >= 400."""
        result = self.result
        if result.statuses:
            unexpected = sum(
                n for status, n in result.statuses.items() if int(status) != self.expected_status
            )
        else:
            unexpected = result.status_errors
        return result.socket_errors + unexpected

    def cpu_percent(self, who: str) -> float:
        return 100.0 * self.cpu_s.get(who, 0.0) / self.wall_s if self.wall_s else 0.0

    def cpu_us_per_request(self, who: str) -> float:
        requests = max(self.result.requests, 1)
        return 1e6 * self.cpu_s.get(who, 0.0) / requests


@dataclass
class Memory:
    identities: int
    rss_idle_kib: int
    rss_kib: int
    peak_kib: int
    cache_entries: int
    queries: int
    warm: Result

    @property
    def rss_mb(self) -> float:
        return self.rss_kib / 1024


@dataclass
class Check:
    name: str
    target: str
    measured: str
    ok: bool


@dataclass
class Report:
    rows: list[Row]
    memory: Memory | None
    machine: dict[str, Any]
    settings: dict[str, Any]
    placement: dict[str, str]
    query_totals: dict[str, int]  # lookups over the whole run: statement log vs idx_scan
    command: str
    timestamp: str
    elapsed_s: float = 0.0
    checks: list[Check] = field(default_factory=list)

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)

    @property
    def nginx_rps(self) -> float | None:
        nginx = self.row(NGINX)
        return nginx.result.requests_per_s if nginx else None

    def ratio(self, row: Row) -> str:
        return f"{row.result.requests_per_s / self.nginx_rps:.0%}" if self.nginx_rps else "-"

    # -- checks

    def evaluate(self) -> list[Check]:
        checks: list[Check] = []
        nginx, hot, public = self.row(NGINX), self.row(HOT), self.row(PUBLIC)
        if nginx and hot:
            ratio = hot.result.requests_per_s / nginx.result.requests_per_s
            checks.append(
                Check(
                    "hot PAT throughput vs nginx",
                    f">= {HOT_RATIO_TARGET:.0%}",
                    f"{ratio:.1%}",
                    ratio >= HOT_RATIO_TARGET,
                )
            )
            factor = hot.result.p99_ms / nginx.result.p99_ms if nginx.result.p99_ms else 0.0
            checks.append(
                Check(
                    "hot PAT p99 vs nginx p99",
                    f"<= {P99_FACTOR_TARGET:g}x",
                    f"{factor:.2f}x ({hot.result.p99_ms:.2f} / {nginx.result.p99_ms:.2f} ms)",
                    factor <= P99_FACTOR_TARGET,
                )
            )
        if hot and public:
            overhead = 1 - hot.result.requests_per_s / public.result.requests_per_s
            checks.append(
                Check(
                    "auth overhead (hot PAT vs public route)",
                    f"<= {AUTH_OVERHEAD_TARGET:.0%}",
                    f"{overhead:.1%} fewer requests/s",
                    overhead <= AUTH_OVERHEAD_TARGET,
                )
            )
        for row in self.rows:
            if row.expected_queries is not None and row.queries is not None:
                checks.append(
                    Check(
                        f"{row.label}: token queries",
                        f"= {row.expected_queries:,}",
                        f"{row.queries:,}",
                        row.queries == row.expected_queries,
                    )
                )
        if self.memory is not None:
            m = self.memory
            checks.append(
                Check(
                    f"RSS with {m.identities:,} cached identities",
                    f"<= {RSS_TARGET_MB:g} MB",
                    f"{m.rss_mb:.1f} MB ({m.cache_entries:,} cached)",
                    m.rss_mb <= RSS_TARGET_MB and m.cache_entries >= m.identities,
                )
            )
            checks.append(
                Check(
                    "memory warm-up: token queries",
                    f"= {m.identities:,}",
                    f"{m.queries:,}",
                    m.queries == m.identities,
                )
            )
        logged, scans = self.query_totals["statement_log"], self.query_totals["idx_scan"]
        checks.append(
            Check(
                "token lookups, whole run: statement log vs tokens_hash_idx idx_scan",
                "equal",
                f"{logged:,} vs {scans:,}",
                logged == scans,
            )
        )
        for row in self.rows:
            if row.errors:
                checks.append(Check(f"{row.label}: errors", "0", f"{row.errors:,}", False))
        self.checks = checks
        return checks

    # -- output

    def table(self) -> str:
        header = (
            "| Scenario | Requests/s | vs nginx | p50 ms | p99 ms | Errors | Token queries "
            "| CPU % server / upstream / wrk / pg |"
        )
        lines = [header, "|---|--:|--:|--:|--:|--:|--:|--:|"]
        for row in self.rows:
            r = row.result
            queries = "-" if row.queries is None else f"{row.queries:,}"
            cpu = " / ".join(
                f"{row.cpu_percent(w):.0f}" for w in ("server", "upstream", "wrk", "postgres")
            )
            lines.append(
                f"| {row.label} | {r.requests_per_s:,.0f} | {self.ratio(row)} | {r.p50_ms:.2f} "
                f"| {r.p99_ms:.2f} | {row.errors:,} | {queries} | {cpu} |"
            )
        return "\n".join(lines)

    def memory_line(self) -> str:
        m = self.memory
        if m is None:
            return ""
        return (
            f"Memory: one patgate process holding {m.cache_entries:,} cached identities: "
            f"VmRSS {m.rss_mb:.1f} MB (target <= {RSS_TARGET_MB:g} MB; idle after start "
            f"{m.rss_idle_kib / 1024:.1f} MB, peak {m.peak_kib / 1024:.1f} MB). Warmed with "
            f"{m.identities:,} distinct tokens at {m.warm.requests_per_s:,.0f} requests/s, "
            f"{m.queries:,} token queries."
        )

    def checks_table(self) -> str:
        lines = ["| SPEC §12 check | Target | Measured | |", "|---|---|---|---|"]
        for c in self.checks:
            lines.append(f"| {c.name} | {c.target} | {c.measured} | {'ok' if c.ok else 'MISSED'} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def row_json(row: Row) -> dict[str, Any]:
            result = row.result
            return {
                "key": row.key,
                "label": row.label,
                "requests_per_s": round(result.requests_per_s, 1),
                "ratio_vs_nginx": (
                    round(result.requests_per_s / self.nginx_rps, 4) if self.nginx_rps else None
                ),
                "requests": result.requests,
                "duration_s": round(result.duration_s, 3),
                "ended_by_stop_after": result.stopped,
                "p50_ms": result.p50_ms,
                "p90_ms": result.p90_ms,
                "p99_ms": result.p99_ms,
                "max_ms": result.max_ms,
                "errors": row.errors,
                "socket_errors": result.socket_errors,
                "statuses": result.statuses,
                "expected_status": row.expected_status,
                "token_queries": row.queries,
                "expected_token_queries": row.expected_queries,
                "cpu_percent": {w: round(row.cpu_percent(w), 1) for w in row.cpu_s},
                "cpu_us_per_request": {w: round(row.cpu_us_per_request(w), 1) for w in row.cpu_s},
                "note": row.note.strip(),
                "wrk_cpu_s": round(result.wrk_cpu_s, 3),
                "wrk": result.raw,  # as wrk's done() reported it
            }

        memory = None
        if self.memory is not None:
            m = self.memory
            memory = {
                "identities": m.identities,
                "cache_entries": m.cache_entries,
                "rss_idle_kib": m.rss_idle_kib,
                "rss_kib": m.rss_kib,
                "rss_mb": round(m.rss_mb, 1),
                "peak_kib": m.peak_kib,
                "target_mb": RSS_TARGET_MB,
                "token_queries": m.queries,
                "warm_requests_per_s": round(m.warm.requests_per_s, 1),
                "warm_duration_s": round(m.warm.duration_s, 2),
            }
        return {
            "timestamp": self.timestamp,
            "command": self.command,
            "elapsed_s": round(self.elapsed_s, 1),
            "machine": self.machine,
            "settings": self.settings,
            "placement": self.placement,
            "token_lookups_whole_run": self.query_totals,
            "scenarios": [row_json(r) for r in self.rows],
            "memory": memory,
            "checks": [asdict(c) for c in self.checks],
        }

    def write(self, folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        data_path = folder / f"{self.timestamp}.json"
        data_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        chart_path = folder / f"{self.timestamp}.png"
        self.chart(chart_path)
        return data_path, chart_path

    def chart(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter

        labels = [r.label for r in self.rows]
        values = [r.result.requests_per_s for r in self.rows]
        colours = [
            "#9e9e9e" if r.key in (UPSTREAM, NGINX) else "#d62728" if r.errors else "#1f77b4"
            for r in self.rows
        ]
        figure, axes = plt.subplots(figsize=(11, 5.5), dpi=100)
        positions = list(range(len(labels)))
        bars = axes.barh(positions, values, color=colours)
        axes.set_yticks(positions, labels)
        axes.invert_yaxis()
        connections = self.settings.get("connections", "?")
        axes.set_xlabel(f"requests/s (wrk, 1 thread, {connections} connections)")
        nginx = self.nginx_rps
        if nginx:
            axes.axvline(nginx, color="#333333", linestyle="--", linewidth=1, label="nginx")
            axes.axvline(
                nginx * HOT_RATIO_TARGET,
                color="#2ca02c",
                linestyle=":",
                linewidth=1.5,
                label=f"{HOT_RATIO_TARGET:.0%} of nginx (SPEC target for hot PAT)",
            )
            axes.legend(loc="lower right", fontsize=9)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        for bar, row in zip(bars, self.rows, strict=True):
            axes.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {row.result.requests_per_s:,.0f} ({self.ratio(row)})",
                va="center",
                fontsize=9,
            )
        axes.set_xlim(0, max(values) * 1.25)
        cpu = self.machine.get("cpu_model", "")
        axes.set_title(f"patgate vs nginx proxy_pass - {self.timestamp} - {cpu}", fontsize=10)
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
