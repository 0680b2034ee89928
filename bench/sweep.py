"""The concurrency sweep: every system at each client count in interleaved rounds (httpx closed loops,
then wrk), and its report: medians, ratios between systems, the FLOP/s limit and the goals."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from bench.load import LoadClient, LoadTarget, fmt, ratio
from bench.systems import closed_loop, own_cpu_seconds


async def sweep_rounds(args: argparse.Namespace, targets: list[Any],
                       sentences: list[str]) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Warm every system at the highest concurrency, then measure in interleaved rounds."""
    for target in targets:
        await closed_loop(target.send, sentences, max(args.concurrency), args.warmup_seconds)
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {t.name: {c: [] for c in args.concurrency} for t in targets}
    for r in range(args.rounds):
        for c in args.concurrency:
            for target in targets:
                server0, client0 = target.server_cpu(), own_cpu_seconds()
                point = await closed_loop(target.send, sentences, c, args.seconds)
                server1, client1 = target.server_cpu(), own_cpu_seconds()
                texts = max(1, point["requests"])
                if server0 is not None and server1 is not None:
                    point["server_cpu_ms_per_text"] = 1000 * (server1 - server0) / texts
                if target.name != "engine":
                    point["client_cpu_ms_per_text"] = 1000 * (client1 - client0) / texts
                raw[target.name][c].append(point)
                print(f"  round {r + 1} c={c:<4} {target.name:<16} {point['texts_per_s']:8.1f} texts/s  "
                      f"p50 {point['p50_ms']:7.1f} ms  p99 {point['p99_ms']:7.1f} ms  "
                      f"cpu/text server {point.get('server_cpu_ms_per_text', float('nan')):5.1f} ms "
                      f"client {point.get('client_cpu_ms_per_text', 0.0):4.1f} ms  errors {point['errors']}",
                      flush=True)
    return raw


async def wrk_sweep(args: argparse.Namespace, client: LoadClient, targets: list[LoadTarget],
                    sentences: list[str]) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """The sweep's HTTP points again with wrk as the client: the httpx client costs 2.5-4 ms of CPU a
    request on the server's own cores, wrk a small fraction of that, so these rows are the servers' own
    throughput against the in-process engine (interleaved rounds, like the sweep)."""
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {t.name: {c: [] for c in args.concurrency} for t in targets}
    for target in targets:
        await client.point(target, sentences, max(args.concurrency), 1)
    for r in range(args.rounds):
        for c in args.concurrency:
            for target in targets:
                point = await client.point(target, sentences, c, args.seconds)
                raw[target.name][c].append(point)
                print(f"  wrk round {r + 1} c={c:<4} {target.name:<16} {point['requests_per_s']:8.1f} texts/s  "
                      f"p50 {fmt(point['p50_ms'], 1):>7} ms  cpu/text server "
                      f"{fmt(point.get('server_cpu_ms_per_request'), 1):>5} ms  errors {point['errors']}", flush=True)
    return raw


def sweep_report(args: argparse.Namespace, result: dict[str, Any],
                 raw: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, Any]:
    """systems, ratios and limit of the concurrency sweep into `result`; returns its goals."""
    systems: dict[str, Any] = {}
    for name, by_c in raw.items():
        systems[name] = {}
        for c, points in by_c.items():
            keys = ("texts_per_s", "p50_ms", "p95_ms", "p99_ms", "server_cpu_ms_per_text", "client_cpu_ms_per_text")
            systems[name][str(c)] = {
                key: round(statistics.median(p[key] for p in points), 2) for key in keys if key in points[0]
            } | {
                "texts_per_s_rounds": [round(p["texts_per_s"], 1) for p in points],
                "errors": sum(p["errors"] for p in points),
            }
    result["systems"] = systems

    def tps(system: str, c: int) -> float | None:
        return systems.get(system, {}).get(str(c), {}).get("texts_per_s")

    def p50(system: str, c: int) -> float | None:
        return systems.get(system, {}).get(str(c), {}).get("p50_ms")

    cs = args.concurrency
    result["ratios"] = {
        "service/engine": {str(c): ratio(tps("service", c), tps("engine", c)) for c in cs},
        "infinity_server/engine": {str(c): ratio(tps("infinity_server", c), tps("engine", c)) for c in cs},
        "service/infinity_server": {str(c): ratio(tps("service", c), tps("infinity_server", c)) for c in cs},
        "p50 service/infinity_server": {str(c): ratio(p50("service", c), p50("infinity_server", c)) for c in cs},
    }
    for variant in args.backends:
        name = f"service_{variant}"
        result["ratios"][f"{name}/service"] = {str(c): ratio(tps(name, c), tps("service", c)) for c in cs}
    wrk_rows = result.get("systems_wrk", {})

    def wrk_tps(system: str, c: int) -> float | None:
        return wrk_rows.get(system, {}).get(str(c), {}).get("requests_per_s")

    if wrk_rows:
        result["ratios"]["service (wrk)/engine"] = {str(c): ratio(wrk_tps("service", c), tps("engine", c)) for c in cs}
        result["ratios"]["service (wrk)/infinity_server (wrk)"] = {
            str(c): ratio(wrk_tps("service", c), wrk_tps("infinity_server", c)) for c in cs}
    if "vllm" in systems:
        result["ratios"]["service/vllm"] = {str(c): ratio(tps("service", c), tps("vllm", c)) for c in cs}
        if wrk_rows:
            for name in ("service", *(f"service_{v}" for v in args.backends)):
                result["ratios"][f"{name} (wrk)/vllm (wrk)"] = {
                    str(c): ratio(wrk_tps(name, c), wrk_tps("vllm", c)) for c in cs}

    facts, mm = result["model"], result["matmul"]
    peak = mm["gflops_best"]
    limit: dict[str, Any] = {"matmul_gflops": round(peak, 1), "matmul_dtype": mm["dtype"]}
    top = max(cs)
    for name in systems:
        texts_s = tps(name, top) or 0.0
        tokens_s = texts_s * facts["mean_tokens_sentence"]
        gflops = tokens_s * facts["flops_per_token_sentence"] / 1e9
        limit[f"{name}@{top}"] = {"tokens_per_s": round(tokens_s, 1), "gflops": round(gflops, 2),
                                  "fraction": round(gflops / peak, 4)}
    for pool, row in result["st_baseline"].items():
        key = "sentence" if pool == "sentences" else "corpus"
        tokens_s = row["texts_per_s"]["median"] * facts[f"mean_tokens_{key}"]
        gflops = tokens_s * facts[f"flops_per_token_{key}"] / 1e9
        limit[f"st_baseline_{pool}"] = {"tokens_per_s": round(tokens_s, 1), "gflops": round(gflops, 2),
                                        "fraction": round(gflops / peak, 4)}
    result["limit"] = limit

    goals: dict[str, Any] = {}
    r_engine = result["ratios"]["service/engine"].get(str(top))
    goals[f"service >= 0.85 x engine @{top}"] = None if r_engine is None else r_engine >= 0.85
    if wrk_rows:
        r_wrk = result["ratios"]["service (wrk)/engine"].get(str(top))
        goals[f"service (wrk client) >= 0.85 x engine @{top}"] = None if r_wrk is None else r_wrk >= 0.85
    r_inf = result["ratios"]["service/infinity_server"].get(str(top))
    goals[f"service >= infinity_server @{top}"] = None if r_inf is None else r_inf >= 1.0
    r_p50 = result["ratios"]["p50 service/infinity_server"].get(str(top))
    goals[f"service p50 <= infinity_server p50 @{top}"] = None if r_p50 is None else r_p50 <= 1.0
    r_vllm = result["ratios"].get("service (wrk)/vllm (wrk)", {})
    if r_vllm.get("1") is not None:
        goals["one sentence @1 (wrk): service >= 1.2 x vLLM req/s"] = r_vllm["1"] >= 1.2
    if "onnx-int8" in args.backends:
        r_int8 = result["ratios"]["service_onnx-int8/service"].get(str(top))
        goals[f"service onnx-int8 >= 2 x service torch @{top}"] = None if r_int8 is None else r_int8 >= 2.0
    return goals
