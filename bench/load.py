"""Load points from wrk (or, where wrk cannot run, the httpx closed loop), their medians over rounds, and
how bench.run compares (`ratio`) and prints (`fmt`) their numbers."""

from __future__ import annotations

import argparse
import asyncio
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import wrk as wrk_tool
from bench.systems import HttpTarget, closed_loop, tree_cpu_seconds


@dataclass
class LoadTarget:
    """An OpenAI-style embedding route: POST `path` with {"model": model, "input": [one text]}."""

    name: str
    url: str
    path: str
    model: str
    pid: int | None = None


class LoadClient:
    """One load point = `connections` clients in a closed loop for `seconds`, one text a request."""

    def __init__(self, wrk: wrk_tool.Wrk | None, folder: Path, threads: int, description: str) -> None:
        self.wrk, self.folder, self.threads, self.description = wrk, folder, threads, description
        self.kind = "wrk" if wrk else "httpx"
        self._inputs: dict[tuple[str, str, str], tuple[Path, Path]] = {}

    async def point(self, target: LoadTarget, texts: list[str], connections: int, seconds: float) -> dict[str, Any]:
        cpu0 = tree_cpu_seconds(target.pid) if target.pid else None
        if self.wrk is not None:
            key = (target.name, target.url, target.model)  # "service" is served twice: real and zero-cost model
            if key not in self._inputs:
                bodies = [{"model": target.model, "input": [text]} for text in texts]
                self._inputs[key] = wrk_tool.write_inputs(self.folder, f"{target.name}-{len(self._inputs)}", bodies)
            script, bodies_path = self._inputs[key]
            point = await asyncio.to_thread(wrk_tool.run, self.wrk, target.url + target.path, script, bodies_path,
                                            connections, seconds, self.threads)
        else:
            http = HttpTarget(target.name, target.url, target.path, target.model)
            await http.start()
            try:
                loop = await closed_loop(http.send, texts, connections, seconds)
            finally:
                await http.stop()
            done = loop["requests"] > 0  # closed_loop's percentiles are NaN without an answer
            point = {"requests_per_s": loop["texts_per_s"], "p50_ms": loop["p50_ms"] if done else None,
                     "p99_ms": loop["p99_ms"] if done else None, "requests": loop["requests"],
                     "seconds": loop["seconds"], "errors": loop["errors"]}
        if cpu0 is not None:
            point["server_cpu_ms_per_request"] = 1000 * (tree_cpu_seconds(target.pid or 0) - cpu0) / max(
                1, point["requests"])
        return point


def resolve_load_client(args: argparse.Namespace) -> tuple[LoadClient | None, str]:
    """(the load client of the wrk rows, '') or (None, why they are skipped), as --load-client asks."""
    folder = args.scratch / "wrk"
    if args.load_client == "httpx":
        return LoadClient(None, folder, 1, "httpx.AsyncClient in the benchmark process (--load-client httpx)"), ""
    wrk, why = wrk_tool.find_wrk(args.wrk, install=not args.no_install_wrk)
    if wrk is not None:
        return LoadClient(wrk, folder, args.wrk_threads,
                          f"{wrk.version()} ({wrk.source}), {args.wrk_threads} thread(s), Lua bodies cycling through "
                          "the one-sentence pool"), ""
    if args.load_client == "auto":
        return LoadClient(None, folder, 1, f"httpx.AsyncClient in the benchmark process, because {why}; it costs "
                                           "~2.4 ms of client CPU a request, so these rows measure the client too"), ""
    return None, why


def summarize_points(raw: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per system and connection count: medians over rounds (and each round's req/s), errors summed."""
    out: dict[str, Any] = {}
    for name, by_c in raw.items():
        out[name] = {}
        for c, points in by_c.items():
            if not points:
                continue
            keys = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request")
            out[name][str(c)] = {
                key: round(statistics.median(p[key] for p in points), 3)
                for key in keys if all(p.get(key) is not None for p in points)
            } | {
                "requests_per_s_rounds": [round(p["requests_per_s"], 1) for p in points],
                "p50_ms_rounds": [round(p["p50_ms"], 3) for p in points if p.get("p50_ms") is not None],
                "errors": sum(p["errors"] for p in points),
            }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
