"""Issue 22's measurements: several workers (`WORKERS`) and the cache of repeated inputs (`CACHE_MB`).

    python -m bench.workers                                   # every part below; bench/workers.json
    python -m bench.workers --parts zero_cost,minilm,cache    # without the two 150 s soaks
    python -m bench.workers --parts soak --soak-seconds 150 --soak-cache-mb 8
    python -m bench.workers --before /tmp/main-checkout       # that checkout's service joins the MiniLM rows
    python -m bench.workers --device cuda --workers 1,2,4     # a GPU host (bench/gpu_bench.sh runs it)

Parts (servers of one part run side by side and are measured in interleaved rounds, medians reported;
`wrk` is the load, one text a request; the cache is off, CACHE_MB=0, except in `cache` and `soak`):
- zero_cost: the 1-layer, 32-wide model (bench/gpu_model.py) served with WORKERS=1 and WORKERS=2 (or
  `--workers`): req/s at 64 connections and p50 at 1. Goal: WORKERS=2 >= 1.15 x WORKERS=1 req/s, no errors.
- minilm: the embedded all-MiniLM-L6-v2, the same worker counts (and `--before`'s service, the code
  before this issue) at 1, 8 and 32 connections. Goal: the default (WORKERS=auto: 1 on a CPU) loses
  nothing against `--before` (>= 0.95 x, this machine's noise).
- cache: MiniLM with the cache on (CACHE_MB=64), one connection: the same query every request against
  ever-new queries (never repeated: a counter in each). Goal: p50 same <= 0.3 x p50 new.
- soak: load_tests/soak.py's ever-new texts (5-30 words, so that many of them fill the cache) for
  `--soak-seconds` against a server with CACHE_MB=0 and then one with `--soak-cache-mb`: RSS at the
  end and the cache's bytes.
  Goal: RSS cached <= RSS uncached + 1.1 x CACHE_MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import wrk as wrk_tool  # noqa: E402
from bench.baselines import load_corpus  # noqa: E402
from bench.systems import tree_cpu_seconds  # noqa: E402
from load_tests.processes import ServerProcess, process_env  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
PARTS = ("zero_cost", "minilm", "cache", "soak")
WORKERS_GOAL = 1.15
NO_LOSS = 0.95
CACHE_P50_GOAL = 0.3
ZERO_COST = "zero-cost"
MINILM = "all-MiniLM-L6-v2"


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


class Server:
    """One server of a part: its process, the bodies files wrk posts, its points by connections."""

    def __init__(self, name: str, process: ServerProcess, model: str) -> None:
        self.name, self.process, self.model = name, process, model
        self.points: dict[int, list[dict[str, Any]]] = {}


def start(name: str, env: dict[str, str], logs: Path, before: Path | None = None) -> ServerProcess:
    log = logs / f"bench_workers_{name}.log"
    if before is not None:  # another checkout's service: the same run, the old code
        return ServerProcess.bentoml(log, cwd=before, env=process_env({**env, "PYTHONPATH": str(before)}))
    return ServerProcess.bentoml(log, env=process_env(env))


def point(wrk: wrk_tool.Wrk, server: Server, script: Path, bodies: Path, connections: int, seconds: float) -> dict[str, Any]:
    pid = server.process.proc.pid
    cpu0 = tree_cpu_seconds(pid)
    result = wrk_tool.run(wrk, server.process.url + "/v1/embeddings", script, bodies, connections, seconds)
    result["server_cpu_ms_per_request"] = round(1000 * (tree_cpu_seconds(pid) - cpu0) / max(1, result["requests"]), 3)
    return result


def summarize(points: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "requests_per_s": _median([p["requests_per_s"] for p in points]),
        "p50_ms": _median([p["p50_ms"] for p in points]),
        "p99_ms": _median([p["p99_ms"] for p in points]),
        "server_cpu_ms_per_request": _median([p["server_cpu_ms_per_request"] for p in points]),
        "errors": sum(p["errors"] for p in points),
        "rounds_requests_per_s": [round(p["requests_per_s"], 1) for p in points],
        "rounds_p50_ms": [p["p50_ms"] for p in points],
    }


def measure(args: argparse.Namespace, wrk: wrk_tool.Wrk, servers: list[Server], texts: list[str],
            connections: list[int], label: str) -> dict[str, Any]:
    """Interleaved rounds: for each round, each connection count, each server in turn."""
    inputs = {s.name: wrk_tool.write_inputs(args.scratch / label, s.name, [{"model": s.model, "input": [t]} for t in texts])
              for s in servers}
    for s in servers:  # warm-up: every worker's connections, then one
        point(wrk, s, *inputs[s.name], max(connections), 2)
    for r in range(args.rounds):
        for c in connections:
            for s in servers:
                p = point(wrk, s, *inputs[s.name], c, args.seconds)
                s.points.setdefault(c, []).append(p)
                print(f"  {label} round {r + 1} c={c:<3} {s.name:<12} {p['requests_per_s']:8.1f} req/s  "
                      f"p50 {p['p50_ms']} ms  cpu/req {p['server_cpu_ms_per_request']} ms  errors {p['errors']}",
                      flush=True)
    return {s.name: {str(c): summarize(pts) for c, pts in s.points.items()} for s in servers}


def run_servers(args: argparse.Namespace, specs: dict[str, tuple[dict[str, str], Path | None]]) -> dict[str, ServerProcess]:
    started = {name: start(name, env, args.logs, before) for name, (env, before) in specs.items()}
    try:
        for name, server in started.items():
            print(f"  {name} ready in {server.wait_ready(timeout=300):.1f} s", flush=True)
    except Exception:
        for server in started.values():
            server.stop()
        raise
    return started


def zero_cost_part(args: argparse.Namespace, wrk: wrk_tool.Wrk, sentences: list[str]) -> dict[str, Any]:
    from bench.gpu_model import build_zero_cost
    from bench.zero_cost import zero_cost_source
    from runners.settings import default_model_path

    folder = build_zero_cost(zero_cost_source(default_model_path()), args.scratch / "zero-cost-model")
    base = {"MODEL_NAMES": str(folder), "SERVED_MODEL_NAMES": ZERO_COST, "CACHE_MB": "0", **args.device_env}
    specs = {f"workers={n}": ({**base, "WORKERS": str(n)}, None) for n in args.workers}
    processes = run_servers(args, specs)
    try:
        servers = [Server(name, p, ZERO_COST) for name, p in processes.items()]
        systems = measure(args, wrk, servers, sentences, [args.workers_connections, 1], "zero_cost")
    finally:
        for p in processes.values():
            p.stop()
    one, two = f"workers={args.workers[0]}", f"workers={args.workers[1]}" if len(args.workers) > 1 else None
    out: dict[str, Any] = {"systems": systems, "connections": [args.workers_connections, 1]}
    if two:
        high = str(args.workers_connections)
        r = _ratio(systems[two][high]["requests_per_s"], systems[one][high]["requests_per_s"])
        clean = systems[two][high]["errors"] == systems[one][high]["errors"] == 0
        out["ratio"] = {f"{two} / {one} req/s @{high}": r}
        out["goals"] = {f"zero-cost: {two} >= {WORKERS_GOAL} x {one} req/s @{high}, no errors":
                        None if r is None else (r >= WORKERS_GOAL and clean)}
    return out


def minilm_part(args: argparse.Namespace, wrk: wrk_tool.Wrk, sentences: list[str]) -> dict[str, Any]:
    base = {"CACHE_MB": "0", **args.device_env}
    specs: dict[str, tuple[dict[str, str], Path | None]] = {f"workers={n}": ({**base, "WORKERS": str(n)}, None)
                                                            for n in args.workers}
    if args.before is not None:
        specs["before"] = (dict(base), args.before)
    processes = run_servers(args, specs)
    try:
        servers = [Server(name, p, MINILM) for name, p in processes.items()]
        systems = measure(args, wrk, servers, sentences, args.minilm_connections, "minilm")
    finally:
        for p in processes.values():
            p.stop()
    default = f"workers={args.auto_workers}"  # what WORKERS=auto gives on this host
    out: dict[str, Any] = {"systems": systems, "connections": args.minilm_connections, "default": default,
                           "ratios": {}, "goals": {}}
    for c in map(str, args.minilm_connections):
        rate = {name: systems[name][c]["requests_per_s"] for name in systems}
        for name in systems:
            if name != default:
                out["ratios"][f"{name} / {default} @{c}"] = _ratio(rate[name], rate[default])
        if "before" in systems:
            r = _ratio(rate[default], rate["before"])
            out["goals"][f"minilm: WORKERS=auto ({default}) >= {NO_LOSS} x before @{c}"] = None if r is None else r >= NO_LOSS
    return out


def cache_part(args: argparse.Namespace, wrk: wrk_tool.Wrk, sentences: list[str]) -> dict[str, Any]:
    processes = run_servers(args, {"cache": ({"CACHE_MB": "64", **args.device_env}, None)})
    server = Server("cache", processes["cache"], MINILM)
    try:
        same = wrk_tool.write_inputs(args.scratch / "cache", "same", [{"model": MINILM, "input": [sentences[0]]}])
        rows: dict[str, list[dict[str, Any]]] = {"same": [], "new": []}
        point(wrk, server, *same, 1, 2)  # warm-up; the query is cached from here on
        for r in range(args.rounds):
            # Ever-new: texts with a counter, a file of its own per round (wrk cycles through a file).
            new_texts = [f"{sentences[i % len(sentences)]} #{r}-{i}" for i in range(args.new_texts)]
            new = wrk_tool.write_inputs(args.scratch / "cache", f"new{r}", [{"model": MINILM, "input": [t]} for t in new_texts])
            for kind, inputs in (("same", same), ("new", new)):
                p = point(wrk, server, *inputs, 1, args.seconds)
                rows[kind].append(p)
                print(f"  cache round {r + 1} {kind:<4} {p['requests_per_s']:8.1f} req/s  p50 {p['p50_ms']} ms  "
                      f"errors {p['errors']}", flush=True)
            if rows["new"][-1]["requests"] >= args.new_texts:
                print(f"  warning: {rows['new'][-1]['requests']} requests >= {args.new_texts} new texts: some repeated",
                      flush=True)
        metrics = httpx.get(server.process.url + "/metrics").text
    finally:
        server.process.stop()
    summary = {kind: summarize(points) for kind, points in rows.items()}
    r = _ratio(summary["same"]["p50_ms"], summary["new"]["p50_ms"])
    return {
        "systems": summary,
        "cache_metrics": [line for line in metrics.splitlines() if line.startswith("embed_rerank_cache_")],
        "ratio": {"p50 same / p50 new @1": r},
        "goals": {f"cache: p50 same query <= {CACHE_P50_GOAL} x p50 ever-new @1": None if r is None else r <= CACHE_P50_GOAL},
    }


def soak_part(args: argparse.Namespace) -> dict[str, Any]:
    from load_tests.soak import soak

    out: dict[str, Any] = {"seconds": args.soak_seconds, "connections": args.soak_connections,
                           "max_words": args.soak_max_words, "runs": {}}
    for mb in (0, args.soak_cache_mb):
        name = f"CACHE_MB={mb}"
        processes = run_servers(args, {f"soak_cache{mb}": ({"CACHE_MB": str(mb), **args.device_env}, None)})
        server = processes[f"soak_cache{mb}"]
        try:
            report = asyncio.run(soak(server.url, server.proc.pid, args.soak_seconds, args.soak_connections, seed=22,
                                      max_words=args.soak_max_words))
            cache = {line.split()[0]: float(line.split()[1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
                     if line.startswith(("embed_rerank_cache_bytes ", "embed_rerank_cache_entries "))}
        finally:
            server.stop()
        report.pop("samples", None)
        report["cache"] = cache
        out["runs"][name] = report
        print(f"  soak {name}: RSS {report['rss_start_mb']} -> {report['rss_end_mb']} MB (max {report['rss_max_mb']}), "
              f"{report['requests_ok']} ok, {report['requests_failed']} failed, cache {cache}", flush=True)
    off, on = out["runs"]["CACHE_MB=0"], out["runs"][f"CACHE_MB={args.soak_cache_mb}"]
    diff = round(on["rss_end_mb"] - off["rss_end_mb"], 1)
    mb = args.soak_cache_mb * 1.048576  # MiB in MB, as RSS is reported
    out["rss_end_difference_mb"] = diff
    out["cache_full"] = on["cache"].get("embed_rerank_cache_bytes", 0) >= 0.9 * args.soak_cache_mb * 2**20
    out["goals"] = {f"soak: RSS with a full {args.soak_cache_mb} MiB cache <= RSS without + 1.1 x CACHE_MB":
                    (diff <= 1.1 * mb and out["cache_full"]) if not (off["requests_failed"] or on["requests_failed"]) else False}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    wrk, why = wrk_tool.find_wrk(args.wrk, install=False)
    _, sentences = load_corpus()
    return run_parts(args, wrk, sentences, why)


def run_parts(args: argparse.Namespace, wrk: wrk_tool.Wrk | None, sentences: list[str], why: str = "no wrk") -> dict[str, Any]:
    """The parts in `args.parts` (bench.run calls this too, with its own wrk and arguments)."""
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.workers", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "rounds": args.rounds,
        "seconds_per_point": args.seconds,
        "device": args.device,
        "goals": {},
    }
    for part in args.parts:
        if part != "soak" and wrk is None:
            result[part] = {"skipped": why}
            continue
        print(f"{part} …", flush=True)
        started = time.perf_counter()
        try:
            if part == "zero_cost":
                result[part] = zero_cost_part(args, wrk, sentences)
            elif part == "minilm":
                result[part] = minilm_part(args, wrk, sentences)
            elif part == "cache":
                result[part] = cache_part(args, wrk, sentences)
            else:
                result[part] = soak_part(args)
        except Exception as exc:  # noqa: BLE001 - the other parts are still measured
            print(f"  {part} failed: {exc}", file=sys.stderr, flush=True)
            result[part] = {"failed": str(exc)[-1500:]}
        result[part]["wall_s"] = round(time.perf_counter() - started, 1)
        result["goals"] |= result[part].get("goals", {})
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def add_arguments(parser: argparse.ArgumentParser, before: bool = True) -> None:
    """This module's options; bench.run adds them with `before=False` (bench.mixed's --before serves both)."""
    group = parser.add_argument_group("workers and cache (bench/workers.py, issue 22)")
    group.add_argument("--workers", default=None, help="worker counts to compare (default 1,2 on a CPU, 1,2,4 on a GPU)")
    group.add_argument("--workers-connections", type=int, default=64,
                       help="connections of the zero-cost req/s point (default 64)")
    group.add_argument("--minilm-connections", default="1,8,32", help="MiniLM connection counts (default 1,8,32)")
    if before:
        group.add_argument("--before", type=Path, default=None,
                           help="a checkout of the code before this issue: its service joins the MiniLM rows")
    group.add_argument("--new-texts", type=int, default=5000, help="ever-new queries per cache round (default 5000)")
    group.add_argument("--soak-seconds", type=float, default=150.0)
    group.add_argument("--soak-connections", type=int, default=16)
    group.add_argument("--soak-cache-mb", type=int, default=32,
                       help="CACHE_MB of the cached soak (default 32: the soak's texts fill it within 150 s here)")
    group.add_argument("--soak-max-words", type=int, default=30,
                       help="longest soak text in words (default 30: short texts, many of them, so the cache fills)")


def finish_arguments(args: argparse.Namespace) -> None:
    gpu = args.device.startswith("cuda")
    args.workers = [int(w) for w in (args.workers or ("1,2,4" if gpu else "1,2")).split(",") if w.strip()]
    args.minilm_connections = [int(c) for c in str(args.minilm_connections).split(",") if c.strip()]
    args.device_env = {"DEVICE": args.device.split(":")[0]} if args.device != "cpu" else {}
    from runners.settings import load_settings
    from runners.workers import worker_count

    env = {k: v for k, v in os.environ.items() if k not in ("WORKERS", "MODEL_NAMES")} | args.device_env
    args.auto_workers = worker_count(load_settings(env), env)
    if args.auto_workers not in args.workers:
        args.workers = sorted({*args.workers, args.auto_workers})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated from {', '.join(PARTS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk point")
    parser.add_argument("--wrk", default=None)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "workers.json")
    parser.add_argument("--logs", type=Path, default=ROOT / "reports")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}: choose from {', '.join(PARTS)}")
    finish_arguments(args)
    args.logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as scratch:
        args.scratch = Path(scratch)
        result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
