"""The benchmarks' shared harness; the scenarios (bench/*.py, bench/scale/) are thin users of it.

- `server`: the server under test (`sdfunc serve` under gunicorn on a free loopback port) and the request the
  scenarios send it;
- `mariadb`: a throwaway MariaDB server (tests use it too);
- `stats`: medians, percentiles, summaries, block medians and the bootstrap interval;
- `report`: the result's header, Markdown tables and cells, writing the result out;
- `cli`: shared arguments, running one benchmark, request shapes, /proc snapshots.

The bench drives the function over HTTP, through `handler.app.create_app`, `handler.settings`, `handler.logs` and
the public pipelines API, never through the handler's inside (an import-linter contract in pyproject.toml).
"""
