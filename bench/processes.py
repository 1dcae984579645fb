"""Long-running processes of a run: started in their own session, stopped by their id.

Each process gets its own session (so a Ctrl-C in the terminal reaches only the bench, which
then stops everything in order) and writes its output to a log file in the run's temporary
directory, which is where readiness is read from.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.system import BenchError

START_TIMEOUT = 60.0
STOP_TIMEOUT = 25.0  # patgate drains for up to 20 s


def free_port() -> int:
    """A port nothing listens on now (patgate's --workers need one fixed port, not 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Service:
    """One started process (and its children, which share its session)."""

    def __init__(self, name: str, command: Sequence[str], log: Path, *, cwd: Path | None = None):
        self.name = name
        self.log = log
        self.stopped = False
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, pattern: str, *, count: int = 1, timeout: float = START_TIMEOUT) -> str:
        """Wait until ``pattern`` appears ``count`` times in the output; the output then.

        Not ready in time, or interrupted meanwhile: the process is stopped (the caller has
        not registered it for cleanup yet).
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.stopped_on_failure():
            while time.monotonic() < deadline:
                text = self.output()
                if len(regex.findall(text)) >= count:
                    return text
                if self.process.poll() is not None:
                    raise BenchError(
                        f"{self.name} exited ({self.process.returncode}): {tail(text)}"
                    )
                time.sleep(0.05)
            raise BenchError(
                f"{self.name} did not get ready in {timeout:.0f} s: {tail(self.output())}"
            )

    @contextlib.contextmanager
    def stopped_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its process group if it does not exit in time."""
        if self.stopped:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT)
        # Its session is its own process group: children a killed parent left behind go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self.stopped = True  # only now: an interrupted stop() is done again by the next caller


def wait_for_port(port: int, service: Service, *, timeout: float = START_TIMEOUT) -> None:
    """For servers that print nothing when ready (nginx): connect until one succeeds."""
    deadline = time.monotonic() + timeout
    with service.stopped_on_failure():
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise BenchError(f"{service.name} exited: {tail(service.output())}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
            time.sleep(0.05)
        raise BenchError(f"{service.name} is not listening on {port} after {timeout:.0f} s")


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"
