"""The machine: the tools the run needs, what it is made of, and where CPU time goes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# command → Debian package, as dev.sh's debian_packages installs them
TOOLS = {"wrk": "wrk", "nginx": "nginx-light"}
SBIN = Path("/usr/sbin")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PYTHON_PACKAGES = ("aiohttp", "uvloop", "asyncpg", "httptools", "pgserver", "matplotlib")


class BenchError(Exception):
    """A reason the run cannot go on: printed as one line, exit 1."""


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = SBIN / name
    return str(candidate) if candidate.exists() else None


def ensure_tools() -> dict[str, str]:
    """Path of each tool, installing the missing ones from Debian's packages when root."""
    missing = [name for name in TOOLS if find_tool(name) is None]
    if missing:
        packages = [TOOLS[name] for name in missing]
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BenchError(
                f"{', '.join(missing)} not found; install the Debian packages "
                f"{' '.join(packages)} (the bench installs them itself when run as root)"
            )
        print(f"bench: installing {' '.join(packages)}", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", *packages]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
            subprocess.run(install, env=env, capture_output=True, check=True)
    paths = {name: find_tool(name) for name in TOOLS}
    lost = [name for name, path in paths.items() if path is None]
    if lost:
        raise BenchError(f"{', '.join(lost)} still missing after installing")
    return {name: path for name, path in paths.items() if path is not None}


def core_count() -> int:
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------------------------
# What the machine is


def cpu_info() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def memory_total_mb() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def tool_version(command: list[str]) -> str:
    """First version-looking word a tool prints (nginx -v writes to stderr, wrk -v exits 1)."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    match = re.search(r"\d+\.\d+(?:\.\d+)?\S*", result.stdout + result.stderr)
    return match.group(0) if match else "unknown"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(repo: Path) -> dict[str, object]:
    """The commit measured, and which gateway files differ from it (a run of a work tree)."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
        return result.stdout

    status = git("status", "--porcelain", "--untracked-files=all", "gateway")
    changed = [line[3:] for line in status.splitlines() if line.strip()]  # "XY path"
    return {"commit": git("rev-parse", "HEAD").strip() or None, "gateway_changes": changed}


def describe(tools: dict[str, str], repo: Path) -> dict[str, object]:
    cpu = cpu_info()
    return {
        "cpu_model": cpu.get("model name") or platform.processor() or "unknown",
        "cpu_mhz": cpu.get("cpu MHz"),
        "virtual_machine": "hypervisor" in cpu.get("flags", "").split(),
        "cores": os.cpu_count(),
        "memory_mb": memory_total_mb(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: package_version(name) for name in PYTHON_PACKAGES},
        "nginx": tool_version([tools["nginx"], "-v"]),
        "wrk": tool_version([tools["wrk"], "-v"]),
        "load_average_at_start": list(os.getloadavg()),
        "git": git_state(repo),
    }


# ---------------------------------------------------------------------------------------------
# CPU accounting: to show which process was the bottleneck


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text().rpartition(")")[2].split()
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and its children (the process trees here are one level deep)."""
    return [pid, *children(pid)]


@dataclass
class CpuMeter:
    """CPU seconds used by a group of process trees between ``start`` and ``stop``."""

    roots: tuple[int, ...]
    _before: dict[int, float] | None = None

    def _sample(self) -> dict[int, float]:
        return {pid: cpu_seconds(pid) for root in self.roots for pid in tree(root)}

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> float:
        assert self._before is not None
        after = self._sample()
        # A process that started meanwhile counts from zero; one that ended is lost (rare).
        return sum(after[pid] - self._before.get(pid, 0.0) for pid in after)


def pin(pid: int, cores: set[int]) -> None:
    for member in tree(pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(member, cores)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values
