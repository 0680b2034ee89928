"""Head-of-line blocking: one-text queries while a single 600-text request is being embedded.

One client sends one bulk request (600 texts of about 150 words, cut from load_tests/corpus.txt) while
another sends one-text queries in a closed loop. A scheduler that runs the bulk request's batches one
after the other, ahead of everything that arrives later, makes each query wait for the whole bulk
request; one that interleaves them keeps the queries near their idle latency. Per target:
- idle:   one-text queries, one after the other, nothing else running (median);
- alone:  the bulk request's duration with nothing else running;
- with:   the bulk request's duration while the queries run, and the latency of every query whose
          flight overlapped the bulk request's (worst and median).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

BULK_TEXTS = 600
WORDS_PER_TEXT = 150
GOAL_WORST_MS = 1500.0
GOAL_SLOWDOWN = 0.10


def bulk_texts(lines: list[str], n: int = BULK_TEXTS, words: int = WORDS_PER_TEXT) -> list[str]:
    """`n` distinct texts of `words` words each: windows over the corpus' words, wrapping around."""
    pool = " ".join(lines).split()
    if not pool:
        raise ValueError("empty corpus")
    step = words + 7  # not a divisor of the pool's length in practice: the windows do not repeat soon
    return [" ".join(pool[(i * step + k) % len(pool)] for k in range(words)) for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) without numpy."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def round_report(bulk_alone_s: float, bulk_window: tuple[float, float],
                 queries: list[tuple[float, float]]) -> dict[str, Any]:
    """One round: the bulk request alone, and with queries as (start, end) times on the bulk window's clock."""
    start, end = bulk_window
    during = [(q_end - q_start) * 1000 for q_start, q_end in queries if q_start < end and q_end > start]
    with_s = end - start
    return {
        "bulk_alone_s": bulk_alone_s,
        "bulk_with_queries_s": with_s,
        "bulk_slowdown": with_s / bulk_alone_s - 1 if bulk_alone_s > 0 else None,
        "queries": len(queries),
        "queries_during_bulk": len(during),
        "query_worst_ms": max(during) if during else None,
        "query_p50_ms": percentile(during, 50) if during else None,
        "query_p99_ms": percentile(during, 99) if during else None,
    }


def summarize(rounds: list[dict[str, Any]], idle_ms: list[float]) -> dict[str, Any]:
    """Medians over rounds; the worst query is the worst of all rounds."""

    def median(key: str) -> float | None:
        values = [r[key] for r in rounds if r.get(key) is not None]
        return statistics.median(values) if values else None

    alone, with_q = median("bulk_alone_s"), median("bulk_with_queries_s")
    worsts = [r["query_worst_ms"] for r in rounds if r.get("query_worst_ms") is not None]
    return {
        "idle_p50_ms": percentile(idle_ms, 50) if idle_ms else None,
        "bulk_alone_s": alone,
        "bulk_with_queries_s": with_q,
        "bulk_slowdown": with_q / alone - 1 if alone and with_q else None,
        "query_worst_ms": max(worsts) if worsts else None,
        "query_p50_ms": median("query_p50_ms"),
        "queries_during_bulk": median("queries_during_bulk"),
        "rounds": rounds,
    }


def goals(summary: dict[str, Any]) -> dict[str, bool | None]:
    worst, slowdown = summary.get("query_worst_ms"), summary.get("bulk_slowdown")
    return {
        f"worst query during bulk <= {GOAL_WORST_MS:.0f} ms": None if worst is None else worst <= GOAL_WORST_MS,
        f"bulk slower by <= {GOAL_SLOWDOWN:.0%} with queries": None if slowdown is None else slowdown <= GOAL_SLOWDOWN,
    }


async def measure(url: str, path: str, model: str, queries: list[str], bulk: list[str], rounds: int = 1,
                  idle_queries: int = 30, lead_s: float = 0.3, timeout_s: float = 900.0,
                  warm_texts: int = 64) -> dict[str, Any]:
    """The head-of-line report for one HTTP route taking the OpenAI body ({"input": [...], "model": ...}).

    `warm_texts` of the bulk texts go once, unmeasured, first: on a GPU the first batches of new shapes
    pick their kernels, which would make the first measured bulk request look slower than the rest.
    """
    import httpx

    async def post(client: httpx.AsyncClient, texts: list[str]) -> None:
        response = await client.post(path, json={"input": texts, "model": model})
        if response.status_code != 200 or len(response.json()["data"]) != len(texts):
            raise RuntimeError(f"{url}{path}: {response.status_code} {response.text[:300]}")

    timeout = httpx.Timeout(timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as bulk_client, \
            httpx.AsyncClient(base_url=url, timeout=timeout) as query_client:
        await post(bulk_client, bulk[:warm_texts])
        idle_ms = []
        for i in range(idle_queries):
            t0 = time.perf_counter()
            await post(query_client, [queries[i % len(queries)]])
            idle_ms.append((time.perf_counter() - t0) * 1000)

        async def timed_bulk() -> tuple[float, float]:
            t0 = time.perf_counter()
            await post(bulk_client, bulk)
            return t0, time.perf_counter()

        async def with_queries() -> tuple[tuple[float, float], list[tuple[float, float]]]:
            flights: list[tuple[float, float]] = []
            stop = asyncio.Event()

            async def loop() -> None:
                i = 0
                while not stop.is_set():
                    t0 = time.perf_counter()
                    await post(query_client, [queries[i % len(queries)]])
                    flights.append((t0, time.perf_counter()))
                    i += 1

            task = asyncio.create_task(loop())
            await asyncio.sleep(lead_s)
            try:
                window = await timed_bulk()
            finally:
                stop.set()
                await task
            return window, flights

        reports = []
        for r in range(rounds):
            # alternate which comes first, so that neither always runs on a freshly warmed server
            if r % 2 == 0:
                t0, t1 = await timed_bulk()
                window, flights = await with_queries()
            else:
                window, flights = await with_queries()
                t0, t1 = await timed_bulk()
            reports.append(round_report(t1 - t0, window, flights))
    return summarize(reports, idle_ms)
