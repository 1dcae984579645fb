"""Load: wrk with a generated Lua script that reports in JSON.

Every run gets a script with ``setup`` and ``done`` (no per-request cost) that prints one
``BENCH_RESULT {json}`` line. A run over a token list adds ``request`` (each request carries
the next token of the list, pre-formatted in ``init``, cycling) and ``response`` (counts
statuses). With ``stop_after``, the thread stops once that many responses arrived, timed
with a monotonic clock through LuaJIT's FFI, and says so on stderr; the bench then sends
wrk SIGINT, which makes it report at once instead of sitting out the rest of ``-d``.
Static runs (``headers`` only) leave ``request`` undefined, so wrk sends one pre-built
request, its fastest mode. A run with ``vary_path`` sends the same headers with a new path
each time (``path/1``, ``path/2``, ...), as an API client does, and counts statuses too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.system import BenchError

RESULT_MARK = "BENCH_RESULT "
STOPPED_MARK = "BENCH_STOPPED"

_DONE = """
threads = {}
function setup(thread) threads[#threads + 1] = thread end
function done(summary, latency, requests)
  local counts, sent, received, elapsed = {}, 0, 0, 0
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("counts") or {}) do
      counts[tostring(status)] = (counts[tostring(status)] or 0) + n
    end
    sent = sent + (t:get("sent") or 0)
    received = received + (t:get("received") or 0)
    local first, last = t:get("first_us") or 0, t:get("last_us") or 0
    if last > first and last - first > elapsed then elapsed = last - first end
  end
  local parts = {}
  for status, n in pairs(counts) do parts[#parts + 1] = string.format('"%s":%d', status, n) end
  local e = summary.errors
  io.write(string.format(
    '%s{"duration_us":%d,"requests":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status_errors":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f,"sent":%d,"received":%d,"stopped_after_us":%d,"statuses":{%s}}\\n',
    "BENCH_RESULT ", summary.duration, summary.requests, summary.bytes, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, sent, received, elapsed,
    table.concat(parts, ",")))
end
"""

_LIST = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local clock = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, clock)  -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1000000 + tonumber(clock.tv_nsec) / 1000
end

local prepared = {{}}
local stop_after = {stop_after}
counts, sent, received, first_us, last_us = {{}}, 0, 0, 0, 0

function init(args)
  for token in io.lines({token_file}) do
    prepared[#prepared + 1] = wrk.format("GET", {path}, {{["Authorization"] = "Bearer " .. token}})
  end
end

function request()
  if sent == 0 then first_us = now_us() end
  sent = sent + 1
  return prepared[(sent - 1) % #prepared + 1]
end

function response(status, headers, body)
  received = received + 1
  counts[status] = (counts[status] or 0) + 1
  if received == stop_after then
    last_us = now_us()
    wrk.thread:stop()
    io.stderr:write("BENCH_STOPPED\\n")
  end
end
"""


_PATHS = """
counts, sent, received = {{}}, 0, 0
local path = {path}

function request()
  sent = sent + 1
  return wrk.format(nil, path .. "/" .. sent)
end

function response(status, headers, body)
  received = received + 1
  counts[status] = (counts[status] or 0) + 1
end
"""


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


@dataclass
class Load:
    """What to send: a path, static headers, or a token list cycled through; or static
    headers with a new path under ``path`` each time (``vary_path``)."""

    path: str
    headers: dict[str, str] = field(default_factory=dict)
    token_file: Path | None = None
    stop_after: int = 0  # with token_file: stop after this many responses (0 = run -d long)
    vary_path: bool = False

    def script(self) -> str:
        if self.vary_path:
            return _PATHS.format(path=lua_string(self.path)) + _DONE
        if self.token_file is None:
            return _DONE
        listing = _LIST.format(
            stop_after=self.stop_after,
            token_file=lua_string(str(self.token_file)),
            path=lua_string(self.path),
        )
        return listing + _DONE


@dataclass
class Result:
    requests_per_s: float
    requests: int
    duration_s: float
    stopped: bool  # ended by stop_after (duration_s is then the time to that response)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: int
    statuses: dict[str, int]  # only with a token list (wrk's response() counts them)
    status_errors: int  # wrk's own count of responses with status >= 400
    sent: int  # requests written (token-list runs only)
    wrk_cpu_s: float
    raw: dict[str, object]


def run(
    wrk: str,
    url: str,
    load: Load,
    script: Path,
    *,
    duration: int,
    connections: int,
    pin: list[str],
) -> Result:
    """One wrk run; with ``load.stop_after`` it is interrupted as soon as the Lua side stops
    (wrk would otherwise sit out the rest of ``duration``)."""
    script.write_text(load.script())
    command = [*pin, wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    for name, value in load.headers.items():
        command += ["-H", f"{name}: {value}"]
    command += ["-s", str(script), url + load.path]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines = []
    try:
        for line in process.stdout:  # unbuffered stderr first; wrk's stdout comes at exit
            if line.startswith(STOPPED_MARK):
                process.send_signal(signal.SIGINT)  # wrk: stop now, report, call done()
            else:
                lines.append(line)
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        process.kill()
        process.wait()
        raise
    process.returncode = os.waitstatus_to_exitcode(status)
    output = "".join(lines)
    reported = next((ln for ln in lines if ln.startswith(RESULT_MARK)), None)
    if process.returncode != 0 or reported is None:
        raise BenchError(f"wrk failed ({process.returncode}): {output.strip()[-2000:]}")
    raw = json.loads(reported[len(RESULT_MARK) :])
    stopped = bool(raw["stopped_after_us"]) and load.stop_after > 0
    duration_s = (raw["stopped_after_us"] if stopped else raw["duration_us"]) / 1e6
    completed = load.stop_after if stopped else raw["requests"]
    return Result(
        requests_per_s=completed / duration_s,
        requests=raw["requests"],
        duration_s=duration_s,
        stopped=stopped,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        statuses=raw["statuses"],
        status_errors=raw["status_errors"],
        sent=raw["sent"],
        wrk_cpu_s=usage.ru_utime + usage.ru_stime,
        raw=raw,
    )
