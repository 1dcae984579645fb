"""patgate's benchmark harness: ``python -m bench`` (or ``./dev.sh bench``).

wrk against a fast upstream, nginx ``proxy_pass`` and patgate, each server pinned to its own
core; one table, a JSON file and a PNG chart in ``bench/results/``. See BENCHMARKS.md.

Modules: ``system`` (tools, machine, CPU accounting), ``processes`` (starting and stopping
what the run needs), ``upstream`` (the fast upstream), ``nginx``, ``database`` (embedded
PostgreSQL, seeding, query counting), ``patgate`` (its config and process), ``wrk``
(load and its Lua scripts), ``report`` (table, JSON, chart), ``run`` (the scenarios),
``cli`` (options and output). ``python -m bench.hotpath`` is apart: the hot path's Python
CPU per request, in process, without sockets (the figure to watch while optimizing).
"""
