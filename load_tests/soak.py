"""Memory soak: mixed embed and rerank traffic with ever-new texts; the workers' RSS over time.

    python -m load_tests.soak                                   # 150 s, 16 connections, a server of its own
    python -m load_tests.soak --duration 150 --connections 16 --report bench/soak_auto.json
    ALLOCATOR=system python -m load_tests.soak                  # the server on glibc's malloc
    python -m load_tests.soak --url http://127.0.0.1:3000       # a running server (loopback only)

Each connection sends, in a closed loop, either `POST /v1/embeddings` with 1-16 texts or
`POST /rerank` with one query and 4-16 documents; every text is 5-200 (`--max-words`) random words of
`load_tests/corpus.txt` with a counter, so no two texts (and few batch shapes) repeat. Every 2 s
it samples the RSS of the server's worker processes (the children of the server process; the
server itself when it has none). The report has the samples, the RSS after the warm-up, the
maximum, the end, the growth from warm-up to end and over the last third, the requests that
succeeded and failed, and the allocator each worker has mapped. Exit 1 when a request failed or
none succeeded, 2 when the server would not start. The server it starts logs to
`reports/soak_server.log`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from load_tests.processes import ServerProcess  # noqa: E402
from runners.allocator import mapped  # noqa: E402

CORPUS = Path(__file__).with_name("corpus.txt")
MB = 1024 * 1024


class TextSource:
    """Texts that never repeat: random corpus words around a running counter."""

    def __init__(self, seed: int | None = None, max_words: int = 200) -> None:
        self.words = CORPUS.read_text().split()
        self.random = random.Random(seed)
        self.counter = 0
        self.max_words = max_words

    def text(self, min_words: int = 5, max_words: int | None = None) -> str:
        self.counter += 1
        top = max(min_words, max_words or self.max_words)
        words = self.random.choices(self.words, k=self.random.randint(min_words, top) - 1)
        words.insert(self.random.randrange(len(words) + 1), f"#{self.counter}")
        return " ".join(words)

    def request(self, rerank_share: float = 0.5, model: str | None = None) -> tuple[str, str, dict[str, Any], int]:
        """(kind, path, body, items expected in the answer); `model` names the model in embedding bodies."""
        if self.random.random() < 1.0 - rerank_share:  # 0.5: the draw and the kinds of the seeds before
            texts = [self.text() for _ in range(self.random.randint(1, 16))]
            return "embed", "/v1/embeddings", {"input": texts, **({"model": model} if model else {})}, len(texts)
        docs = [self.text() for _ in range(self.random.randint(4, 16))]
        return "rerank", "/rerank", {"query": self.text(5, min(30, self.max_words)), "docs": docs}, len(docs)


def check(kind: str, body: Any, expected: int) -> str | None:
    """Why an answer is wrong, or None."""
    try:
        if kind == "embed":
            vectors = [row["embedding"] for row in body["data"]]
            if len(vectors) != expected or not all(vectors):
                return f"{len(vectors)} embeddings for {expected} texts"
        else:
            indices = sorted(row["index"] for row in body["results"])
            if indices != list(range(expected)):
                return f"rerank results {indices} for {expected} documents"
    except (KeyError, TypeError) as exc:
        return f"unexpected body ({exc!r})"
    return None


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise SystemExit(f"--url {url}: cannot resolve {host!r}; give a loopback URL such as http://127.0.0.1:3000") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"--url {url}: the soak samples the server's memory on this machine, so it only loads "
                         "loopback servers; give http://127.0.0.1:PORT")


def listening_server_pid(url: str) -> int:
    """The process that listens on the URL's port (the parent-most one: BentoML's server)."""
    port = urlsplit(url).port or 80
    try:
        pids = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
    except psutil.AccessDenied:
        pids = set()
    for pid in pids:
        try:
            if psutil.Process(pid).ppid() not in pids:
                return pid
        except psutil.NoSuchProcess:
            continue
    raise SystemExit(f"found no process of this user listening on port {port}: pass --server-pid PID "
                     "(the pid of `bentoml serve`)")


def worker_processes(server_pid: int, whole_tree: bool = False) -> list[psutil.Process]:
    """The server's children (its workers), or itself without any; with `whole_tree` itself and its children."""
    server = psutil.Process(server_pid)
    children = server.children(recursive=True)
    return [server, *children] if whole_tree else children or [server]


def rss_sample(server_pid: int, whole_tree: bool = False) -> dict[str, float]:
    """RSS in MB of each worker process (with `whole_tree`: each process of the tree), by pid."""
    sample = {}
    for proc in worker_processes(server_pid, whole_tree):
        try:
            sample[str(proc.pid)] = round(proc.memory_info().rss / MB, 1)
        except psutil.NoSuchProcess:
            continue
    return sample


def growth_pct(start: float, end: float) -> float | None:
    return round(100.0 * (end - start) / start, 1) if start else None


def summarize(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """RSS after warm-up, max, end, growth from warm-up to end and over the last third."""
    if not samples:
        return {"rss_start_mb": None, "rss_max_mb": None, "rss_end_mb": None, "growth_pct": None,
                "growth_last_third_pct": None}
    after = [s for s in samples if s["t"] >= warmup_s] or samples[-1:]
    start, end = after[0], after[-1]
    third = start["t"] + 2 * (end["t"] - start["t"]) / 3
    last_third = next((s for s in after if s["t"] >= third), end)
    return {
        "rss_start_mb": start["rss_mb"],
        "rss_start_t": start["t"],
        "rss_max_mb": max(s["rss_mb"] for s in after),
        "rss_end_mb": end["rss_mb"],
        "growth_pct": growth_pct(start["rss_mb"], end["rss_mb"]),
        "growth_last_third_pct": growth_pct(last_third["rss_mb"], end["rss_mb"]),
    }


async def soak(url: str, server_pid: int, duration: float, connections: int = 16, warmup: float | None = None,
               interval: float = 2.0, timeout: float = 120.0, seed: int | None = None,
               max_words: int = 200, rerank_share: float = 0.5, model: str | None = None,
               whole_tree: bool = False) -> dict[str, Any]:
    """Load `url` for `duration` s while sampling the RSS of `server_pid`'s workers (`whole_tree`: of the server
    and all its children, for servers of other designs than BentoML's); the report. `rerank_share` of the
    requests are reranks (0: embeddings only), `model` goes into embedding bodies."""
    warmup = min(30.0, duration / 5) if warmup is None else warmup
    source = TextSource(seed, max_words)
    counts = {"embed": [0, 0], "rerank": [0, 0]}  # [ok, failed]
    latencies: list[float] = []
    errors: list[str] = []
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    deadline = started + duration

    async def connection(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            kind, path, body, expected = source.request(rerank_share, model)
            t0 = time.perf_counter()
            try:
                response = await client.post(url + path, json=body)
                why = (check(kind, response.json(), expected) if response.status_code == 200
                       else f"HTTP {response.status_code}: {response.text[:200]}")
            except (httpx.HTTPError, ValueError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            latencies.append(time.perf_counter() - t0)
            counts[kind][why is not None] += 1
            if why and len(errors) < 20:
                errors.append(f"{kind}: {why}")

    async def sampler(done: asyncio.Event) -> None:
        while True:
            finished = done.is_set()  # the last sample is taken once the requests in flight are answered
            per_pid = rss_sample(server_pid, whole_tree)
            samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": round(sum(per_pid.values()), 1),
                            "per_pid": per_pid})
            if finished:
                return
            try:
                await asyncio.wait_for(done.wait(), interval)
            except asyncio.TimeoutError:
                pass

    done = asyncio.Event()
    sampling = asyncio.create_task(sampler(done))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(connection(client) for _ in range(connections)))
    done.set()
    await sampling
    workers = worker_processes(server_pid, whole_tree)
    allocators = {str(p.pid): mapped(p.pid) or ("system", None) for p in workers}
    ok = counts["embed"][0] + counts["rerank"][0]
    failed = counts["embed"][1] + counts["rerank"][1]
    elapsed = time.monotonic() - started
    ordered = sorted(latencies)
    return {
        "url": url,
        "duration_s": duration,
        "elapsed_s": round(elapsed, 1),
        "connections": connections,
        "max_words": max_words,
        "warmup_s": warmup,
        "sample_interval_s": interval,
        "requests_ok": ok,
        "requests_failed": failed,
        "by_kind": {k: {"ok": v[0], "failed": v[1]} for k, v in counts.items()},
        "requests_per_s": round((ok + failed) / elapsed, 2) if elapsed else None,
        "latency_ms": {"p50": round(1000 * statistics.median(ordered), 1),
                       "p95": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 1),
                       "max": round(1000 * ordered[-1], 1)} if ordered else {},
        "texts_sent": source.counter,
        "errors": errors,
        "worker_pids": [p.pid for p in workers],
        "allocator": {pid: found[0] for pid, found in allocators.items()},
        "allocator_paths": {pid: found[1] for pid, found in allocators.items()},
        **summarize(samples, warmup),
        "samples": samples,
    }


def summary_line(report: dict[str, Any]) -> str:
    allocators = ",".join(sorted(set(report["allocator"].values()))) or "?"
    return (f"soak: {report['elapsed_s']:.0f} s, {report['connections']} connections, {report['requests_ok']} ok, "
            f"{report['requests_failed']} failed, allocator {allocators}; worker RSS {report['rss_start_mb']} MB "
            f"after {report['warmup_s']:.0f} s warm-up -> {report['rss_end_mb']} MB at end ({report['growth_pct']:+} %), "
            f"max {report['rss_max_mb']} MB, last third {report['growth_last_third_pct']:+} %")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of load (default 150)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections (default 16)")
    parser.add_argument("--url", default=None, help="a running loopback server instead of starting one")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="with --url: the server's pid (default: the process listening on the URL's port)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the growth baseline (default: a fifth of the duration, at most 30)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples (default 2)")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the texts")
    parser.add_argument("--max-words", type=int, default=200, help="longest text in words (default 200, at least 5)")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "soak.json",
                        help="the JSON report (default reports/soak.json)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.connections < 1 or args.interval <= 0 or args.max_words < 5:
        parser.error("--duration and --interval must be > 0, --connections >= 1 and --max-words >= 5")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    if args.url:
        require_loopback(args.url)
        url, pid = args.url.rstrip("/"), args.server_pid or listening_server_pid(args.url)
    else:
        server = ServerProcess.bentoml(ROOT / "reports" / "soak_server.log")
        print(f"starting the service on {server.url} (ALLOCATOR={os.environ.get('ALLOCATOR', 'auto')}) …", flush=True)
        try:
            print(f"ready in {server.wait_ready():.1f}s", flush=True)
        except (RuntimeError, TimeoutError) as exc:
            server.stop()
            print(f"could not start the service: {exc}", file=sys.stderr)
            return 2
        url, pid = server.url, server.proc.pid
    try:
        report = asyncio.run(soak(url, pid, args.duration, args.connections, args.warmup, args.interval, seed=args.seed,
                                  max_words=args.max_words))
    finally:
        if server:
            server.stop()
    report["allocator_setting"] = os.environ.get("ALLOCATOR", "auto") if server else None
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    print(summary_line(report))
    print(f"report: {args.report}")
    if report["requests_failed"] or not report["requests_ok"]:
        print("FAILED: " + ("; ".join(report["errors"][:5]) or "no request succeeded"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
