"""Start the service, run Locust headless against it for a bounded time, write CSV and HTML reports.

    python -m load_tests.run_load_test                      # 20 s, 8 users, steady, a server of its own
    python -m load_tests.run_load_test --duration 60 --users 32 --shape spike
    python -m load_tests.run_load_test --host http://127.0.0.1:3000   # a server that is already running
    python -m load_tests.run_load_test --runpod             # also start the RunPod worker's local API

Writes `reports/load_test_stats.csv` (and Locust's other CSVs), `reports/load_test.html`,
`reports/load_test.json` and `reports/server.log`. Exits 1 when any request failed (an error status
or a wrong answer, see `locustfile.check_body`) or none was made, 2 when a process would not start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from load_tests.processes import ROOT, ServerProcess, executable, process_env

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def wait_runpod_job(url: str, timeout: float = 180.0) -> float:
    """Seconds until the worker's /runsync completes a one-text embed job (its engines load lazily)."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=httpx.Timeout(120.0, connect=2.0)) as client:
        while time.monotonic() < deadline:
            try:
                response = client.post(url + "/runsync", json={"input": {"input": "warm up"}})
                if response.status_code == 200 and response.json().get("status") == "COMPLETED":
                    return time.perf_counter() - started
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{url}/runsync completed no job within {timeout:.0f}s")


def totals(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests, failures and rates from Locust's --json-file (one entry per request name)."""
    requests = sum(int(s.get("num_requests", 0)) for s in stats)
    failures = sum(int(s.get("num_failures", 0)) for s in stats)
    seconds = max((s.get("last_request_timestamp") or 0) - (s.get("start_time") or 0) for s in stats) if stats else 0
    per_name = {
        s["name"]: {
            "requests": s.get("num_requests", 0),
            "failures": s.get("num_failures", 0),
            "avg_ms": round(s["total_response_time"] / s["num_requests"], 1) if s.get("num_requests") else None,
            "max_ms": round(s.get("max_response_time") or 0, 1),
        }
        for s in stats
    }
    return {
        "requests": requests,
        "failures": failures,
        "seconds": round(seconds, 1),
        "requests_per_s": round(requests / seconds, 1) if seconds > 0 else None,
        "by_name": per_name,
    }


def run_locust(host: str, args: argparse.Namespace, reports: Path, runpod_host: str | None) -> tuple[int, dict]:
    prefix = reports / "load_test"
    json_path = reports / "load_test.json"
    json_path.unlink(missing_ok=True)
    argv = [
        executable("locust"), "-f", str(LOCUSTFILE), "--headless",
        "-u", str(args.users), "-r", str(args.spawn_rate or args.users), "-t", f"{args.duration}s",
        "--host", host, "--csv", str(prefix), "--html", str(reports / "load_test.html"),
        "--json-file", str(json_path.with_suffix("")), "--only-summary", "--stop-timeout", "10",
        "--exit-code-on-error", "1", "--loglevel", "WARNING",
    ]
    if runpod_host:
        argv += ["--runpod-host", runpod_host]
    env = process_env({"LOAD_SHAPE": args.shape})
    print(f"locust: {args.users} users, {args.shape}, {args.duration}s against {host}"
          + (f" and {runpod_host}" if runpod_host else ""), flush=True)
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, timeout=args.duration + 90)
        code = done.returncode
    except subprocess.TimeoutExpired:
        print("locust did not finish in time", file=sys.stderr)
        code = 124
    if not json_path.exists():
        return code or 1, {"requests": 0, "failures": 0, "error": "locust wrote no JSON report"}
    return code, totals(json.loads(json_path.read_text()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=int(os.environ.get("LOAD_DURATION", 20)),
                        help="seconds of load (default 20, env LOAD_DURATION)")
    parser.add_argument("--users", type=int, default=int(os.environ.get("LOAD_USERS", 8)),
                        help="peak concurrent users (default 8, env LOAD_USERS)")
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    parser.add_argument("--shape", choices=("steady", "step", "spike"), default=os.environ.get("LOAD_SHAPE", "steady"))
    parser.add_argument("--host", default=None, help="test this running server instead of starting one")
    parser.add_argument("--runpod", action="store_true", help="also start the RunPod worker (runpod_adapter) and load it")
    parser.add_argument("--runpod-host", default=os.environ.get("RUNPOD_URL"), help="load this RunPod endpoint too")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports", help="where reports go (default reports/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reports = args.reports.resolve()
    reports.mkdir(parents=True, exist_ok=True)
    servers: list[ServerProcess] = []
    try:
        host = args.host
        if not host:
            server = ServerProcess.bentoml(reports / "server.log")
            servers.append(server)
            print(f"starting the service on {server.url} …", flush=True)
            print(f"ready in {server.wait_ready():.1f}s", flush=True)
            host = server.url
        runpod_host = args.runpod_host
        if args.runpod and not runpod_host:
            worker = ServerProcess.runpod_worker(reports / "runpod_worker.log")
            servers.append(worker)
            print(f"starting the RunPod worker on {worker.url} …", flush=True)
            worker.wait_ready()
            print(f"first job done in {wait_runpod_job(worker.url):.1f}s", flush=True)
            runpod_host = worker.url
    except (RuntimeError, TimeoutError) as exc:
        print(f"could not start: {exc}", file=sys.stderr)
        for server in servers:
            server.stop()
        return 2
    try:
        code, result = run_locust(host, args, reports, runpod_host)
    finally:
        for server in servers:
            server.stop()
    summary = {"exit_code": code, "shape": args.shape, "users": args.users, "duration_s": args.duration, **result}
    (reports / "load_test_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, row in sorted(result.get("by_name", {}).items()):
        print(f"  {name:<24} {row['requests']:>6} requests  {row['failures']:>4} failed  avg {row['avg_ms']} ms")
    print(f"total: {result.get('requests', 0)} requests, {result.get('failures', 0)} failed, "
          f"{result.get('requests_per_s')} req/s; reports in {reports}")
    if result.get("failures") or not result.get("requests") or code != 0:
        print(f"FAILED: some requests failed or none was made (see {reports / 'load_test_failures.csv'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
