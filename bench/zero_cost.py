"""The zero-cost model: what each server adds around a forward pass that costs nothing.

A 1-layer, 32-wide model (bench/gpu_model.py) served by the service, by `infinity_emb v2` and by a bare
BentoML route that returns a fixed vector (bench/bare_service.py, with and without OpenTelemetry),
loaded by bench.load's client at many connections (req/s) and at one (p50/p99).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from bench.load import LoadClient, LoadTarget, fmt, ratio, summarize_points
from bench.systems import COMPUTE, HttpTarget, infinity_server_missing
from load_tests.processes import ServerProcess, process_env

ZERO_COST_SERVED = "zero-cost"
ZERO_COST_GOAL_RATIO = 1.0
ZERO_COST_GOAL_P50_MS = 3.5
ZERO_COST_LABELS = {
    "service": "this service, POST /v1/embeddings",
    "infinity_server": "infinity_emb v2, POST /embeddings",
    "bare": "bare BentoML route, tracing excluded",
    "bare_traced": "bare BentoML route, traced (BentoML's default)",
}


def zero_cost_source(path: str) -> Path:
    """A folder with the tokenizer and sentence-transformers files: the served model's, else the embedded one's."""
    folder = Path(path)
    if (folder / "tokenizer_config.json").is_file() and (folder / "modules.json").is_file():
        return folder
    from runners.settings import default_model_path

    return Path(default_model_path())


def start_zero_cost(folder: Path, args: argparse.Namespace) -> dict[str, tuple[ServerProcess, LoadTarget]]:
    """The zero-cost rows' servers, started together: (a) the service, (b) infinity's server, (c) bare routes."""
    logs, device = args.logs, args.device
    started: dict[str, tuple[ServerProcess, LoadTarget]] = {}

    def add(name: str, server: ServerProcess, path: str, model: str) -> None:
        started[name] = (server, LoadTarget(name, server.url, path, model, server.proc.pid))

    if not args.skip_service:
        env = {"MODEL_NAMES": str(folder), "SERVED_MODEL_NAMES": ZERO_COST_SERVED}
        if device != "cpu":
            env["DEVICE"] = device
        add("service", ServerProcess.bentoml(logs / "bench_zero_cost_service.log", env=process_env(env)), "/v1/embeddings",
            ZERO_COST_SERVED)
    if not args.skip_infinity_server and not infinity_server_missing():
        add("infinity_server", ServerProcess.infinity(str(folder), device, logs / "bench_zero_cost_infinity.log"),
            "/embeddings", "bench-model")
    if not args.skip_service:  # the bare routes need bentoml like the service does
        for name, traced in (("bare", "0"), ("bare_traced", "1")):
            server = ServerProcess.bentoml(logs / f"bench_zero_cost_{name}.log", target="bench.bare_service:BareService",
                                           env=process_env({"BARE_SERVICE_TRACING": traced}))
            add(name, server, "/v1/embeddings", ZERO_COST_SERVED)
    return started


def zero_cost_ratios(systems: dict[str, Any], high: int, low: int) -> tuple[dict[str, Any], dict[str, bool | None]]:
    """(ratios, goals) of the zero-cost rows: service against infinity's server and the bare route."""

    def get(name: str, c: int, key: str) -> float | None:
        return systems.get(name, {}).get(str(c), {}).get(key)

    ratios = {
        f"service/infinity_server req/s @{high}": ratio(get("service", high, "requests_per_s"),
                                                        get("infinity_server", high, "requests_per_s")),
        f"service/bare req/s @{high}": ratio(get("service", high, "requests_per_s"), get("bare", high, "requests_per_s")),
        f"bare/bare_traced req/s @{high}": ratio(get("bare", high, "requests_per_s"),
                                                 get("bare_traced", high, "requests_per_s")),
        f"service p50 ms @{low}": get("service", low, "p50_ms"),
        f"infinity_server p50 ms @{low}": get("infinity_server", low, "p50_ms"),
        f"service - bare p50 ms @{low}": (round(get("service", low, "p50_ms") - get("bare", low, "p50_ms"), 3)
                                          if get("service", low, "p50_ms") is not None
                                          and get("bare", low, "p50_ms") is not None else None),
    }
    # a point with failed requests measured something else (a fast 404, a refusal): no verdict on it
    clean = {c: all(systems.get(n, {}).get(str(c), {}).get("errors", 0) == 0 for n in ("service", "infinity_server"))
             for c in (high, low)}
    r_inf = ratios[f"service/infinity_server req/s @{high}"] if clean[high] else None
    p50 = ratios[f"service p50 ms @{low}"] if clean[low] else None
    goals = {
        f"zero-cost: service >= {ZERO_COST_GOAL_RATIO:g} x infinity_server req/s @{high}":
            None if r_inf is None else r_inf >= ZERO_COST_GOAL_RATIO,
        f"zero-cost: service p50 <= {ZERO_COST_GOAL_P50_MS:g} ms @{low}":
            None if p50 is None else p50 <= ZERO_COST_GOAL_P50_MS,
    }
    return ratios, goals


async def zero_cost_part(args: argparse.Namespace, client: LoadClient, source: Path,
                         sentences: list[str]) -> dict[str, Any]:
    from bench.gpu_model import ZERO_COST_CONFIG, build_zero_cost

    folder = await asyncio.to_thread(COMPUTE.run, lambda: build_zero_cost(source, args.scratch / "zero-cost-model"))
    high, low = args.zero_cost_connections, 1
    out: dict[str, Any] = {
        "model": {"path": str(folder), "config": ZERO_COST_CONFIG, "tokenizer_from": str(source),
                  "what": "random-weight BERT, mean pooling + normalize, all-MiniLM-L6-v2's tokenizer"},
        "load_client": client.description,
        "connections": [high, low],
        "rounds": args.rounds,
        "seconds_per_point": args.zero_cost_seconds,
        "labels": ZERO_COST_LABELS,
    }
    started = start_zero_cost(folder, args)
    if not started:
        out["skipped"] = "no system to measure (--skip-service and no infinity server)"
        return out
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {name: {high: [], low: []} for name in started}
    try:
        ready = await asyncio.gather(*(asyncio.to_thread(server.wait_ready) for server, _ in started.values()),
                                     return_exceptions=True)
        out["startup_s"] = {name: round(s, 2) for name, s in zip(started, ready) if isinstance(s, float)}
        print(f"zero-cost servers started: {out['startup_s']}", flush=True)
        for (name, (server, target)), outcome in zip(list(started.items()), ready):
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                probe = HttpTarget(target.name, target.url, target.path, target.model)
                await probe.start()  # one correct answer before any load
                await probe.stop()
            except Exception as exc:  # noqa: BLE001 - the other systems are still measured
                print(f"  zero-cost {name} left out: {exc}", file=sys.stderr, flush=True)
                out.setdefault("failed", {})[name] = str(exc)[-1500:]
                await asyncio.to_thread(server.stop, 5.0)
                del started[name], raw[name]
        for _, target in started.values():
            await client.point(target, sentences, high, max(1.0, args.warmup_seconds))
            await client.point(target, sentences, 1, 1)
        for r in range(args.rounds):
            for c in (high, low):
                for name, (_, target) in started.items():
                    point = await client.point(target, sentences, c, args.zero_cost_seconds)
                    raw[name][c].append(point)
                    print(f"  zero-cost round {r + 1} c={c:<3} {name:<16} {point['requests_per_s']:8.1f} req/s  "
                          f"p50 {fmt(point['p50_ms'], 2):>7} ms  p99 {fmt(point['p99_ms'], 2):>7} ms  "
                          f"cpu/req {fmt(point.get('server_cpu_ms_per_request'), 2):>5} ms  "
                          f"errors {point['errors']}", flush=True)
    except asyncio.CancelledError:
        print("zero-cost rows interrupted: keeping the points measured so far", flush=True)
        out["interrupted"] = True
    finally:
        await asyncio.gather(*(asyncio.to_thread(server.stop, 5.0 if name == "infinity_server" else 20.0)
                               for name, (server, _) in started.items()))
    out["systems"] = summarize_points(raw)
    out["ratios"], out["goals"] = zero_cost_ratios(out["systems"], high, low)
    return out
