"""``python -m bench``: options, the run, and what it prints."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path
from types import FrameType

from bench.run import REPO, RESULTS, Bench
from bench.system import BenchError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="patgate against nginx proxy_pass, with wrk"
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per scenario")
    parser.add_argument("--warmup", type=int, default=2, help="seconds before each run (0: none)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument(
        "--cold-tokens", type=int, default=10_000, help="distinct tokens of the cold run"
    )
    parser.add_argument(
        "--invalid-tokens", type=int, default=2_000, help="distinct tokens of each invalid run"
    )
    parser.add_argument(
        "--identities", type=int, default=100_000, help="tokens cached for the memory figure"
    )
    parser.add_argument("--users", type=int, default=1_000, help="users owning those tokens")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory figure")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where JSON and PNG go")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 0:
        parser.error("--duration must be 1 or more, --warmup 0 or more (whole seconds, as wrk)")
    if args.cold_tokens > args.identities:
        parser.error("--cold-tokens cannot exceed --identities (the cold run uses those tokens)")
    return args


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        with contextlib.ExitStack() as stack:
            result = Bench(args, stack).run()
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted - everything it started is stopped", file=sys.stderr)
        return 130
    result.evaluate()
    data_path, chart_path = result.write(args.results)
    print()
    print(result.table())
    if result.memory is not None:
        print()
        print(result.memory_line())
    print()
    print(result.checks_table())
    print()
    for path in (data_path, chart_path):
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    print(f"took {result.elapsed_s:.0f} s")
    return 0
