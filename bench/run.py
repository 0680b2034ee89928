"""One command, one run: the service against its engine, infinity's own server, a plain
sentence-transformers loop and the hardware's matrix-multiply limit, on the same corpus and model.

    python -m bench.run                     # CPU, concurrency 1/8/32, 3 rounds of 5 s: bench/results.{json,png}
    python -m bench.run --quick             # one concurrency, one short round, no infinity server
    python -m bench.run --device cuda --concurrency 1,8,32,128,512 --out $OUT     # see bench/gpu_bench.sh
    python -m bench.run --skip-sweep --skip-hol --skip-forward   # only the zero-cost rows (any part: --skip-*)

What is measured (every load is one-sentence requests, closed loop: each of N clients sends its
next request as soon as the last one is answered):
- engine:          the model's engine in this process, built by the service's own `load_model` from the
                   service's own settings: its batch scheduler around Infinity's replica,
                   `scheduler.run([text])` (before the scheduler: Infinity's engine, `engine.embed([text])`);
- service:         `bentoml serve service:EmbeddingService`, POST /v1/embeddings over HTTP (httpx);
- infinity_server: `infinity_emb v2` on the same model folder, POST /embeddings, same client and load;
- st_baseline:     `SentenceTransformer.encode` in batches of 32, on the one-sentence pool and on the
                   whole corpus (mixed lengths up to long paragraphs);
- limit:           FLOPs per token of the model times the tokens per second each system reached,
                   against the best measured throughput of a large matrix product on the device.

Rounds are interleaved (for each round, each concurrency, each system in turn), so that a busy
neighbour on a shared machine slows all systems alike; the numbers are medians over rounds, and
the ratios are taken between medians of the same run. Each point also records the CPU time spent per
text by the server's process tree (for the engine: this process) and by the client (this process),
which shows where the CPU goes when the client shares the machine with the server.

Then three parts about the batch scheduler (issue 12), each skippable:
- forward (--skip-forward): the raw forward pass of one short text in this process (bench/forward.py),
                   against the service's one-client p50 over HTTP, by wrk (`-c 1`) and by httpx (the sweep's);
- hol (--skip-hol): one client sends one 600-text request of ~150-word texts while another sends one-text
                   queries: their worst and median latency during it, against idle, and the bulk
                   request's duration with and without them (bench/hol.py);
- zero_cost (--skip-zero-cost): a 1-layer, 32-wide model (bench/gpu_model.py) served by the service,
                   by `infinity_emb v2` and by a bare BentoML route that returns a fixed vector
                   (bench/bare_service.py, with and without OpenTelemetry), loaded by Debian's wrk
                   (bench/wrk.py; 64 connections for req/s, 1 for p50/p99), after the servers above
                   have stopped. Without wrk these rows are skipped unless --load-client httpx|auto.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import hol  # noqa: E402
from bench import wrk as wrk_tool  # noqa: E402
from bench.forward import GOAL_GAP_MS, gap_report, raw_forward  # noqa: E402
from load_tests.processes import ServerProcess, process_env  # noqa: E402

CORPUS_PATH = ROOT / "load_tests" / "corpus.txt"
BENCH_DIR = Path(__file__).resolve().parent
FLOPS_FORMULA = (
    "FLOPs/token = 2 * N_linear + 4 * n_layers * L * d_model; N_linear = weights of every nn.Linear of the "
    "encoder layers (Q, K, V, O, FFN in and out; embeddings, biases, LayerNorm and the per-sequence pooler "
    "left out), L = mean tokens per text (special tokens included), 4*n_layers*L*d_model = the QK^T and "
    "attention*V products. Counted on real tokens: padding inside a batch is not useful work."
)

Send = Callable[[str], Awaitable[bool]]


# ---- corpus and model facts ----


def load_corpus() -> tuple[list[str], list[str]]:
    """(every non-empty line, the one-sentence lines)."""
    lines = [line.strip() for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    sentences = [line for line in lines if ". " not in line and len(line) < 200]
    return lines, sentences


def served_model() -> tuple[str, str]:
    """(path, served name) of the service's first model: the embedded default unless MODEL_NAMES is set."""
    from runners.settings import load_settings

    spec = load_settings().models[0]
    return spec.name_or_path, spec.served_name


def model_facts(st_model: Any, sentences: list[str], corpus: list[str]) -> dict[str, Any]:
    import torch

    auto = st_model[0].auto_model
    cfg = auto.config
    layers = auto.encoder.layer if hasattr(auto, "encoder") else []
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    embedding = sum(p.numel() for p in auto.embeddings.parameters()) if hasattr(auto, "embeddings") else 0
    tokenizer = st_model.tokenizer
    max_len = st_model.max_seq_length

    def mean_tokens(texts: list[str]) -> float:
        ids = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
        return sum(map(len, ids)) / len(ids)

    n_layers, d_model = cfg.num_hidden_layers, cfg.hidden_size
    tokens_sentence, tokens_corpus = mean_tokens(sentences), mean_tokens(corpus)

    def flops(length: float) -> float:
        return 2 * linear + 4 * n_layers * length * d_model

    return {
        "n_layers": n_layers,
        "d_model": d_model,
        "d_ff": getattr(cfg, "intermediate_size", None),
        "parameters": sum(p.numel() for p in auto.parameters()),
        "embedding_parameters": embedding,
        "linear_parameters": linear,
        "mean_tokens_sentence": round(tokens_sentence, 2),
        "mean_tokens_corpus": round(tokens_corpus, 2),
        "flops_per_token_sentence": flops(tokens_sentence),
        "flops_per_token_corpus": flops(tokens_corpus),
        "formula": FLOPS_FORMULA,
    }


# ---- measurements ----


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": [round(v, 3) for v in values],
    }


async def closed_loop(send: Send, texts: list[str], concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` clients, each sending one text after the other for `seconds`."""
    import numpy as np

    latencies: list[float] = []
    errors = 0
    picks = count()
    started = time.perf_counter()
    deadline = started + seconds

    async def client() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            text = texts[next(picks) % len(texts)]
            t0 = time.perf_counter()
            try:
                ok = await send(text)
            except Exception:  # noqa: BLE001 - a failed request is counted, the load goes on
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([float("nan")])
    return {
        "texts_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
    }


def matmul_gflops(device: str, n: int, repeats: int, rounds: int) -> dict[str, Any]:
    """Throughput of an n×n×n matrix product in the dtype the model runs in on this device."""
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        a @ b
    sync()
    results = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        results.append(2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "threads": torch.get_num_threads(),
        "gflops_rounds": [round(x, 1) for x in results],
        "gflops_best": max(results),
        "gflops_median": statistics.median(results),
    }


def st_baseline(st_model: Any, pools: dict[str, list[str]], rounds: int, seconds: float) -> dict[str, Any]:
    """`model.encode(texts, batch_size=32)` over each pool, repeated to fill about `seconds` per round."""
    out: dict[str, Any] = {}
    for name, texts in pools.items():
        st_model.encode(texts[:64], batch_size=32, show_progress_bar=False)  # warm
        per_round = []
        for _ in range(rounds):
            done, t0 = 0, time.perf_counter()
            while True:
                st_model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
                done += len(texts)
                if time.perf_counter() - t0 >= seconds:
                    break
            per_round.append(done / (time.perf_counter() - t0))
        out[name] = {"texts_per_s": summarize(per_round), "texts": len(texts)}
    return out


# ---- the systems under load ----


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (a server and its workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class EngineTarget:
    """The Infinity engine, built exactly as the service builds it, called in this process."""

    name = "engine"

    def __init__(self) -> None:
        self.loaded: Any = None
        self.load_s = 0.0

    def server_cpu(self) -> float | None:
        return own_cpu_seconds()  # the engine's threads and the (tiny) client loop, one process

    async def start(self) -> None:
        from runners.engines import load_model
        from runners.settings import load_settings

        settings = load_settings()
        t0 = time.perf_counter()
        self.loaded = await asyncio.to_thread(load_model, settings.models[0], settings)
        if hasattr(self.loaded, "scheduler"):  # the service's own batch loop around infinity's replica
            self.loaded.scheduler.start()
        else:  # before the scheduler: infinity's AsyncEmbeddingEngine
            await self.loaded.engine.astart()
        await self.send("warm up")
        self.load_s = time.perf_counter() - t0

    async def send(self, text: str) -> bool:
        if hasattr(self.loaded, "scheduler"):
            embeddings, _ = await self.loaded.scheduler.run([text])
        else:
            embeddings, _ = await self.loaded.engine.embed(sentences=[text])
        return len(embeddings) == 1

    async def stop(self) -> None:
        if self.loaded is None:
            return
        if hasattr(self.loaded, "scheduler"):
            await asyncio.to_thread(self.loaded.scheduler.stop)
        else:
            await self.loaded.engine.astop()


class HttpTarget:
    """An HTTP embedding route: one pooled async client, the OpenAI body with one text."""

    def __init__(self, name: str, url: str, path: str, model: str, pid: int | None = None) -> None:
        self.name, self.url, self.path, self.model, self.pid = name, url, path, model, pid
        self.client: Any = None

    def server_cpu(self) -> float | None:
        return tree_cpu_seconds(self.pid) if self.pid else None

    async def start(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
        self.client = httpx.AsyncClient(base_url=self.url, limits=limits, timeout=120.0)
        if not await self.send("warm up"):
            raise RuntimeError(f"{self.name} at {self.url}{self.path} did not answer a one-text request")

    async def send(self, text: str) -> bool:
        response = await self.client.post(self.path, json={"input": [text], "model": self.model})
        return response.status_code == 200 and len(response.json()["data"]) == 1

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def start_service(device: str, logs: Path) -> ServerProcess:
    env = {"DEVICE": device} if device != "cpu" else {}
    return ServerProcess.bentoml(logs / "bench_service.log", env=process_env(env))


# BACKEND=optimum variants of the service (issue 8): measured beside the torch service, same load.
BACKEND_VARIANTS = {
    "onnx-fp32": {"BACKEND": "optimum", "ONNX_QUANTIZATION": "fp32"},
    "onnx-int8": {"BACKEND": "optimum", "ONNX_QUANTIZATION": "int8"},
}


def start_service_variant(variant: str, device: str, logs: Path) -> ServerProcess:
    env = dict(BACKEND_VARIANTS[variant], ONNX_CACHE_DIR=str(logs / "onnx-cache"))
    if device != "cpu":
        env["DEVICE"] = device
    return ServerProcess.bentoml(logs / f"bench_service_{variant}.log", env=process_env(env))


def infinity_server_missing() -> str | None:
    """Why `infinity_emb v2` cannot start here (its server extras are not project dependencies), or None."""
    import importlib.util

    needed = ("prometheus_fastapi_instrumentator", "orjson", "uvicorn", "fastapi", "typer")
    absent = [name for name in needed if importlib.util.find_spec(name) is None]
    if absent:
        return f"missing {', '.join(absent)} (pip install prometheus-fastapi-instrumentator orjson)"
    return None


# ---- load from wrk (or, where wrk cannot run, the httpx closed loop) ----


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


# ---- zero-cost model: what each server adds around a forward pass that costs nothing ----

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

    folder = await asyncio.to_thread(build_zero_cost, source, args.scratch / "zero-cost-model")
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


# ---- the run ----


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    if args.device != "cpu":
        os.environ["DEVICE"] = args.device  # the engine's settings, as the service reads them
    from runners.settings import apply_offline_defaults, load_settings

    apply_offline_defaults(load_settings())
    corpus, sentences = load_corpus()
    path, served_name = served_model()
    logs = args.logs
    t_total = time.perf_counter()
    sweep, hol_on, forward_on = not args.skip_sweep, not args.skip_hol, not args.skip_forward
    result: dict[str, Any] = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]),
        "machine": machine(),
        "device": args.device,
        "model_path": path,
        "parts": {"sweep": sweep, "forward": forward_on, "hol": hol_on, "zero_cost": not args.skip_zero_cost},
        "load": {
            "request": "one sentence per request (POST body {'input': [text], 'model': …})",
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "seconds_per_point": args.seconds,
            "sentence_pool": len(sentences),
            "corpus_lines": len(corpus),
            "client": "httpx.AsyncClient in the benchmark process, on the same machine",
        },
    }
    skipped: dict[str, str] = {}
    goals: dict[str, Any] = {}
    interrupted: list[str] = []

    load_client: LoadClient | None = None
    if not args.skip_zero_cost or forward_on or sweep:
        load_client, why = resolve_load_client(args)
        if load_client is None:
            print(f"wrk rows skipped (zero-cost model, wrk one-client p50): {why}", flush=True)
            skipped["wrk"] = why
        else:
            result["load_client"] = load_client.description

    # Servers start first, in the background, while this process loads the engine.
    servers: dict[str, ServerProcess] = {}
    if (sweep or hol_on or forward_on) and not args.service_url and not args.skip_service:
        servers["service"] = start_service(args.device, logs)
    for variant in args.backends if sweep else []:
        servers[f"service_{variant}"] = start_service_variant(variant, args.device, logs)
    want_infinity = sweep or (hol_on and "infinity_server" in args.hol_targets)
    missing = infinity_server_missing()
    if want_infinity and not args.skip_infinity_server and not args.infinity_url and missing:
        print(f"infinity server skipped: {missing}", flush=True)
        skipped["infinity_server"] = missing
    elif want_infinity and not args.skip_infinity_server and not args.infinity_url:
        servers["infinity_server"] = ServerProcess.infinity(path, args.device, logs / "bench_infinity.log")

    targets: list[Any] = []
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {}
    try:
        # The engine loads here while the servers start; the device and the baseline are measured
        # once all of them are up and idle.
        startup: dict[str, Any] = {}
        if sweep and not args.skip_engine:
            engine = EngineTarget()
            await engine.start()
            targets.append(engine)
            startup["engine_load_s"] = round(engine.load_s, 2)
        for name, server in servers.items():
            startup[f"{name}_ready_s"] = round(await asyncio.to_thread(server.wait_ready), 2)
        result["startup_s"] = startup
        print(f"started: {startup}", flush=True)

        if sweep:
            print("matrix-multiply throughput …", flush=True)
            result["matmul"] = matmul_gflops(args.device, args.matmul_n, args.matmul_repeats, 3)
            print(f"  {result['matmul']['gflops_best']:.0f} GFLOP/s ({result['matmul']['dtype']})", flush=True)

        if sweep or forward_on:
            kwargs = {"model_kwargs": {"torch_dtype": torch.float16}} if args.device.startswith("cuda") else {}
            st_model = SentenceTransformer(path, device=args.device, **kwargs)
            result["model"] = model_facts(st_model, sentences, corpus)
            if sweep:
                print("sentence-transformers baseline …", flush=True)
                pools = {"sentences": sentences} if args.quick else {"sentences": sentences, "corpus": corpus}
                result["st_baseline"] = st_baseline(st_model, pools, args.rounds, args.st_seconds)
                for name, row in result["st_baseline"].items():
                    print(f"  {name}: {row['texts_per_s']['median']:.0f} texts/s", flush=True)
            if forward_on:
                print("raw forward pass of one text …", flush=True)
                result["forward"] = {"raw": raw_forward(st_model, sentences, args.device, args.forward_runs)}
                print(f"  forward {result['forward']['raw']['forward_ms']:.2f} ms, "
                      f"tokenize {result['forward']['raw']['tokenize_ms']:.2f} ms", flush=True)
            if not forward_on:
                del st_model

        pids = {name: server.proc.pid for name, server in servers.items()}
        service_url = args.service_url or (servers["service"].url if "service" in servers else None)
        infinity_url = args.infinity_url or (servers["infinity_server"].url if "infinity_server" in servers else None)
        if sweep:
            if service_url:
                targets.append(HttpTarget("service", service_url, "/v1/embeddings", served_name, pids.get("service")))
            if infinity_url:
                targets.append(
                    HttpTarget("infinity_server", infinity_url, "/embeddings", "bench-model", pids.get("infinity_server"))
                )
            for variant in args.backends:
                name = f"service_{variant}"
                targets.append(HttpTarget(name, servers[name].url, "/v1/embeddings", served_name, pids.get(name)))
            for target in targets:
                if isinstance(target, HttpTarget):
                    await target.start()
            raw = await sweep_rounds(args, targets, sentences)
            if load_client is not None and load_client.kind == "wrk":
                wrk_targets = [LoadTarget(t.name, t.url, t.path, t.model, pids.get(t.name))
                               for t in targets if isinstance(t, HttpTarget)]
                result["systems_wrk"] = summarize_points(await wrk_sweep(args, load_client, wrk_targets, sentences))

        # From here on a SIGINT (gpu_bench.sh's time budget) ends the part under way and skips the rest,
        # and what was measured is still written.
        if forward_on and service_url:
            try:
                result["forward"]["service_one_client"] = await one_client_p50(
                    args, load_client, LoadTarget("service", service_url, "/v1/embeddings", served_name,
                                                  pids.get("service")), sentences,
                    ran_sweep_at_1=sweep and 1 in args.concurrency,
                    raw_round=lambda: raw_forward(st_model, sentences, args.device, max(50, args.forward_runs // 2)))
            except asyncio.CancelledError:
                interrupted.append("forward")

        if hol_on and not interrupted:
            result["hol"] = await hol_part(args, {"service": service_url, "infinity_server": infinity_url},
                                           served_name, corpus, sentences)
            if result["hol"].get("interrupted"):
                interrupted.append("hol")
    finally:
        for target in targets:
            try:
                await target.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others too
                print(f"stopping {target.name}: {exc}", file=sys.stderr)
        # Stopped together: infinity's server does not exit on SIGTERM (its engine threads are not
        # daemons), so it gets a short grace before SIGKILL.
        await asyncio.gather(*(asyncio.to_thread(server.stop, 5.0 if name == "infinity_server" else 20.0)
                               for name, server in servers.items()))

    if sweep:
        goals |= sweep_report(args, result, raw)
    if forward_on:
        forward = result["forward"]
        p50s = dict(forward.get("service_one_client", {}).get("p50_ms", {}))
        if sweep and 1 in args.concurrency:
            p50s.setdefault("httpx", result["systems"].get("service", {}).get("1", {}).get("p50_ms"))
        forward |= gap_report(forward["raw"], p50s, forward.get("service_one_client", {}).get("gap_ms_rounds"))
        goals |= forward["goals"]
    if "hol" in result:
        for name, goal in result["hol"].get("goals", {}).items():
            goals |= {f"hol {name}: {k}": v for k, v in goal.items()}

    if not args.skip_zero_cost and interrupted:
        result["zero_cost"] = {"skipped": f"interrupted (SIGINT) during {interrupted[0]}, before it started"}
    elif not args.skip_zero_cost and load_client is not None:
        print("zero-cost model: server overhead …", flush=True)
        try:
            result["zero_cost"] = await zero_cost_part(args, load_client, zero_cost_source(path), sentences)
        except asyncio.CancelledError:
            result["zero_cost"] = {"skipped": "interrupted (SIGINT) while its servers started", "interrupted": True}
        goals |= result["zero_cost"].get("goals", {})
        if result["zero_cost"].get("interrupted"):
            interrupted.append("zero_cost")
    elif not args.skip_zero_cost:
        result["zero_cost"] = {"skipped": skipped.get("wrk", "no load client")}

    if skipped:
        result["skipped"] = skipped
    if interrupted:
        result["interrupted"] = interrupted
    result["goals"] = goals
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - t_total, 1)
    return result


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


async def one_client_p50(args: argparse.Namespace, client: LoadClient | None, target: LoadTarget,
                         sentences: list[str], ran_sweep_at_1: bool,
                         raw_round: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The service's one-client p50 by the lightest client here: wrk if it runs (else the sweep's httpx figure).
    With `raw_round`, each round first measures the raw forward pass again (the server idle), so that each
    round's gap compares two measurements taken seconds apart."""
    clients: list[LoadClient] = [client] if client is not None and client.kind == "wrk" else []
    if not ran_sweep_at_1:  # no httpx figure from the sweep: measure one
        clients.append(LoadClient(None, args.scratch / "wrk", 1, "httpx.AsyncClient in the benchmark process"))
    out: dict[str, Any] = {"p50_ms": {}, "seconds_per_point": args.forward_seconds, "rounds": args.rounds,
                           "gap_ms_rounds": {}}
    for c in clients:
        await c.point(target, sentences, 1, 1)
        points, raws = [], []
        for _ in range(args.rounds):
            if raw_round is not None:
                raws.append(raw_round()["forward_ms"])
            points.append(await c.point(target, sentences, 1, args.forward_seconds))
        if raws:
            out[f"{c.kind}_raw_forward_ms_rounds"] = [round(r, 3) for r in raws]
            out["gap_ms_rounds"][c.kind] = [round(p["p50_ms"] - r, 3) for p, r in zip(points, raws)
                                            if p["p50_ms"] is not None]
        p50s = [p["p50_ms"] for p in points if p["p50_ms"] is not None]  # None: no answer within the point
        out["p50_ms"][c.kind] = round(statistics.median(p50s), 3) if p50s else None
        out[f"{c.kind}_p50_ms_rounds"] = [None if p is None else round(p, 3) for p in (q["p50_ms"] for q in points)]
        out[f"{c.kind}_errors"] = sum(p["errors"] for p in points)
        print(f"  service one client ({c.kind}): p50 {fmt(out['p50_ms'][c.kind], 2)} ms", flush=True)
    return out


async def hol_part(args: argparse.Namespace, urls: dict[str, str | None], served_name: str, corpus: list[str],
                   sentences: list[str]) -> dict[str, Any]:
    """Head-of-line report for each of --hol-targets that is running."""
    bulk = hol.bulk_texts(corpus, args.hol_texts, args.hol_words)
    routes = {"service": ("/v1/embeddings", served_name), "infinity_server": ("/embeddings", "bench-model")}
    out: dict[str, Any] = {
        "bulk": {"texts": len(bulk), "words_per_text": args.hol_words,
                 "chars_per_text_mean": round(sum(map(len, bulk)) / len(bulk), 1)},
        "queries": "one sentence per request, one client in a closed loop (httpx), while the bulk request runs",
        "rounds": args.hol_rounds,
        "targets": {},
        "goals": {},
    }
    for name in args.hol_targets:
        url = urls.get(name)
        if not url:
            out.setdefault("skipped", {})[name] = "not running in this run"
            continue
        path, model = routes[name]
        print(f"head-of-line: {name}, {len(bulk)} texts of {args.hol_words} words …", flush=True)
        try:
            # a GPU picks kernels per new shape: warm with the whole bulk request there (a CPU does not need to)
            warm = len(bulk) if args.device.startswith("cuda") else min(64, len(bulk))
            summary = await hol.measure(url, path, model, sentences, bulk, rounds=args.hol_rounds, warm_texts=warm)
        except asyncio.CancelledError:
            print(f"  head-of-line {name} interrupted", flush=True)
            out["interrupted"] = True
            break
        except Exception as exc:  # noqa: BLE001 - recorded, counted as an error, the other parts go on
            print(f"  head-of-line {name} failed: {exc}", file=sys.stderr, flush=True)
            out["targets"][name] = {"error": str(exc)[:2000]}
            continue
        out["targets"][name] = summary
        out["goals"][name] = hol.goals(summary)
        print(f"  idle p50 {summary['idle_p50_ms']:.1f} ms; during bulk: worst {summary['query_worst_ms'] or 0:.0f} ms, "
              f"p50 {summary['query_p50_ms'] or 0:.1f} ms ({summary['queries_during_bulk']} queries); bulk alone "
              f"{summary['bulk_alone_s']:.2f} s, with queries {summary['bulk_with_queries_s']:.2f} s", flush=True)
    return out


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
    if "onnx-int8" in args.backends:
        r_int8 = result["ratios"]["service_onnx-int8/service"].get(str(top))
        goals[f"service onnx-int8 >= 2 x service torch @{top}"] = None if r_int8 is None else r_int8 >= 2.0
    return goals


# ---- the plot and the table ----


def plot(result: dict[str, Any], path: Path) -> bool:
    """results.png: the sweep's row (throughput, latency, FLOP/s) and a row for the other parts; False if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = bool(result.get("systems"))
    extra = any(key in result and "skipped" not in result[key] for key in ("zero_cost", "hol", "forward"))
    rows = int(sweep) + int(extra)
    if not rows:
        return False
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.8 * rows), squeeze=False)
    if sweep:
        plot_sweep(result, axes[0])
    if extra:
        plot_parts(result, axes[rows - 1])
    m = result["machine"]
    fig.suptitle(f"all-MiniLM-L6-v2 on {m.get('gpu') or m['cpu']} ({m['cpus']} CPUs), {result['created']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sweep(result: dict[str, Any], axes: Any) -> None:
    ax_t, ax_l, ax_f = axes
    systems = result["systems"]
    cs = result["load"]["concurrency"]
    colors = {"engine": "tab:gray", "service": "tab:blue", "infinity_server": "tab:orange",
              "service_onnx-fp32": "tab:brown", "service_onnx-int8": "tab:red"}
    for name, by_c in systems.items():
        ax_t.plot(cs, [by_c[str(c)]["texts_per_s"] for c in cs], "o-", label=name, color=colors.get(name))
        ax_l.plot(cs, [by_c[str(c)]["p50_ms"] for c in cs], "o-", label=f"{name} p50", color=colors.get(name))
        ax_l.plot(cs, [by_c[str(c)]["p99_ms"] for c in cs], "x--", label=f"{name} p99", color=colors.get(name))
    st = result["st_baseline"]["sentences"]["texts_per_s"]["median"]
    ax_t.axhline(st, color="tab:green", linestyle=":", label="sentence-transformers encode(batch 32)")
    ax_t.set(xscale="log", xlabel="concurrent one-sentence requests", ylabel="texts/s (median of rounds)",
             title="Throughput", xticks=cs, xticklabels=[str(c) for c in cs], ylim=(0, None))
    ax_l.set(xscale="log", yscale="log", xlabel="concurrent one-sentence requests", ylabel="latency, ms",
             title="Latency", xticks=cs, xticklabels=[str(c) for c in cs])
    limit = result["limit"]
    bars = {k: v["fraction"] for k, v in limit.items() if isinstance(v, dict)}
    ax_f.barh(list(bars), [100 * v for v in bars.values()], color="tab:purple")
    ax_f.set(xlabel=f"% of measured {limit['matmul_dtype']} matmul ({limit['matmul_gflops']:.0f} GFLOP/s)",
             title="Useful FLOP/s against the device's matmul")
    for ax in (ax_t, ax_l):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)


def plot_parts(result: dict[str, Any], axes: Any) -> None:
    ax_z, ax_h, ax_r = axes
    zc = result.get("zero_cost", {})
    if zc.get("systems"):
        high, low = zc["connections"]
        names = list(zc["systems"])
        rps = [zc["systems"][n].get(str(high), {}).get("requests_per_s", 0) for n in names]
        ax_z.barh(names, rps, color="tab:blue")
        for i, n in enumerate(names):
            p50 = zc["systems"][n].get(str(low), {}).get("p50_ms")
            if p50 is not None:
                ax_z.text(rps[i], i, f" p50@{low} {p50:.2f} ms", va="center", fontsize=7)
        ax_z.invert_yaxis()
        client = "wrk" if zc.get("load_client", "").startswith("wrk") else "httpx"
        ax_z.set(xlabel=f"req/s at {high} connections ({client}; bar labels: p50 at {low})",
                 title="Zero-cost model (1 layer, 32 wide): server overhead")
        ax_z.grid(True, axis="x", alpha=0.3)
    else:
        ax_z.axis("off")
    hol_targets = result.get("hol", {}).get("targets", {})
    if hol_targets:
        names = list(hol_targets)
        keys = (("idle_p50_ms", "idle p50"), ("query_p50_ms", "p50 during bulk"), ("query_worst_ms", "worst during bulk"))
        width = 0.8 / len(keys)
        for j, (key, label) in enumerate(keys):
            ax_h.bar([i + j * width for i in range(len(names))], [hol_targets[n].get(key) or 0 for n in names],
                     width, label=label)
        ax_h.axhline(hol.GOAL_WORST_MS, color="tab:red", linestyle=":", label="goal: worst")
        ax_h.set_xticks([i + width for i in range(len(names))],
                        [f"{n}\nbulk {100 * (hol_targets[n].get('bulk_slowdown') or 0):+.0f} % with queries" for n in names])
        bulk = result["hol"]["bulk"]
        ax_h.set(yscale="log", ylabel="one-text query latency, ms",
                 title=f"Head-of-line: queries during one {bulk['texts']}-text request")
        ax_h.legend(fontsize=7)
        ax_h.grid(True, axis="y", alpha=0.3)
    else:
        ax_h.axis("off")
    fwd = result.get("forward", {})
    if fwd.get("raw"):
        bars = {"tokenize": fwd["raw"]["tokenize_ms"], "raw forward": fwd["raw"]["forward_ms"]}
        bars |= {f"service p50 ({k})": v for k, v in fwd.get("service_p50_ms", {}).items()}
        ax_r.barh(list(bars), list(bars.values()), color="tab:green")
        ax_r.axvline(fwd["raw"]["forward_ms"] + GOAL_GAP_MS, color="tab:red", linestyle=":",
                     label=f"goal: forward + {GOAL_GAP_MS:g} ms")
        ax_r.invert_yaxis()
        ax_r.set(xlabel="ms (medians)", title="One client against the raw forward pass")
        ax_r.legend(fontsize=7)
        ax_r.grid(True, axis="x", alpha=0.3)
    else:
        ax_r.axis("off")


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def tables(result: dict[str, Any]) -> str:
    """Markdown tables of every part that ran, and the goals."""
    out: list[str] = []
    sweeps = (("systems", "Concurrency sweep (httpx closed loops, one sentence a request)", "texts_per_s",
               "server_cpu_ms_per_text"),
              ("systems_wrk", "The sweep's HTTP points by wrk (a client that leaves the cores to the server)",
               "requests_per_s", "server_cpu_ms_per_request"))
    for key, title, rate, cpu in sweeps:
        if not result.get(key):
            continue
        out += ["", title, "", "| system | clients | texts/s | p50 ms | p99 ms | server CPU ms/text |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, by_c in result[key].items():
            for c, p in by_c.items():
                out.append(f"| {name} | {c} | {fmt(p.get(rate))} | {fmt(p.get('p50_ms'))} | "
                           f"{fmt(p.get('p99_ms'))} | {fmt(p.get(cpu))} |")
    if result.get("systems_wrk"):
        out += [f"- {k}: " + ", ".join(f"{fmt(v, 2)} @{c}" for c, v in by_c.items())
                for k, by_c in result.get("ratios", {}).items() if "(wrk)" in k]
    zc = result.get("zero_cost", {})
    if zc.get("systems"):
        high, low = zc["connections"]
        partial = " (interrupted: partial)" if zc.get("interrupted") else ""
        out += ["", f"Zero-cost model (1 layer, 32 wide), {zc['load_client']}{partial}", "",
                f"| system | req/s @{high} | p50 ms @{high} | p99 ms @{high} | p50 ms @{low} | p99 ms @{low} "
                f"| server CPU ms/req @{high} |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, by_c in zc["systems"].items():
            h, lo = by_c.get(str(high), {}), by_c.get(str(low), {})
            out.append(f"| {ZERO_COST_LABELS.get(name, name)} | {fmt(h.get('requests_per_s'), 0)} | "
                       f"{fmt(h.get('p50_ms'), 2)} | {fmt(h.get('p99_ms'), 2)} | {fmt(lo.get('p50_ms'), 2)} | "
                       f"{fmt(lo.get('p99_ms'), 2)} | {fmt(h.get('server_cpu_ms_per_request'), 2)} |")
        out += [f"- {k}: {fmt(v, 3)}" for k, v in zc.get("ratios", {}).items()]
        out += [f"- left out, did not start or answer: {k}: {(v.strip().splitlines() or [''])[-1][:200]}"
                for k, v in zc.get("failed", {}).items()]
    elif "zero_cost" in result:
        out += ["", f"Zero-cost model rows skipped: {zc.get('skipped')}"]
    hol_part_ = result.get("hol", {})
    if hol_part_.get("targets"):
        bulk = hol_part_["bulk"]
        out += ["", f"Head-of-line: one request of {bulk['texts']} texts ({bulk['words_per_text']} words each) "
                    "while one client sends one-text queries", "",
                "| system | idle p50 ms | p50 ms during bulk | worst ms during bulk | queries during bulk "
                "| bulk alone s | bulk with queries s | bulk slowdown |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, s in hol_part_["targets"].items():
            slowdown = s.get("bulk_slowdown")
            out.append(f"| {name} | {fmt(s.get('idle_p50_ms'))} | {fmt(s.get('query_p50_ms'))} | "
                       f"{fmt(s.get('query_worst_ms'), 0)} | {fmt(s.get('queries_during_bulk'), 0)} | "
                       f"{fmt(s.get('bulk_alone_s'), 2)} | {fmt(s.get('bulk_with_queries_s'), 2)} | "
                       f"{'–' if slowdown is None else f'{100 * slowdown:+.1f} %'} |")
    fwd = result.get("forward", {})
    if fwd.get("raw"):
        raw = fwd["raw"]
        out += ["", f"One client against the raw forward pass ({raw['dtype']}, {raw['torch_threads']} torch threads, "
                    f"median of {raw['runs']})", "",
                "| raw forward ms | tokenize ms | service p50 ms | service p50 - forward ms |", "|---:|---:|---|---|"]
        p50s = ", ".join(f"{v:.2f} ({k})" for k, v in fwd.get("service_p50_ms", {}).items()) or "–"
        gaps = ", ".join(f"{v:+.2f} ({k})" for k, v in fwd.get("gap_ms", {}).items()) or "–"
        out.append(f"| {raw['forward_ms']:.2f} | {raw['tokenize_ms']:.2f} | {p50s} | {gaps} |")
    if result.get("goals"):
        out += ["", "Goals", ""] + [f"- {k}: {fmt(v)}" for k, v in result["goals"].items()]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: concurrency 1, one 1.5 s round, no infinity server, small matmul; "
                             "no zero-cost or head-of-line part")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measured point")
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--st-seconds", type=float, default=3.0, help="seconds per sentence-transformers round")
    parser.add_argument("--matmul-n", type=int, default=None, help="matrix size (default 2048 CPU, 8192 GPU)")
    parser.add_argument("--matmul-repeats", type=int, default=None)
    parser.add_argument("--backends", default=None,
                        help="service variants besides torch, comma-separated from: "
                             f"{', '.join(BACKEND_VARIANTS)} (default: all on a CPU, none with --quick or on a GPU)")
    parser.add_argument("--skip-infinity-server", action="store_true")
    parser.add_argument("--skip-service", action="store_true",
                        help="no service and no bare BentoML route (e.g. bentoml missing on a GPU host)")
    parser.add_argument("--skip-engine", action="store_true", help="no in-process engine (e.g. infinity missing)")
    parser.add_argument("--service-url", default=None, help="measure this running service instead of starting one")
    parser.add_argument("--infinity-url", default=None, help="measure this running infinity server")
    parts = parser.add_argument_group("parts besides the concurrency sweep (issue 12)")
    parts.add_argument("--skip-sweep", action="store_true",
                       help="no concurrency sweep (engine, servers, matmul, sentence-transformers baseline)")
    parts.add_argument("--skip-zero-cost", action="store_true",
                       help="no zero-cost-model rows (service, infinity server, bare BentoML route under wrk)")
    parts.add_argument("--skip-hol", action="store_true", help="no head-of-line measurement")
    parts.add_argument("--skip-forward", action="store_true", help="no raw-forward-pass against one-client p50")
    parts.add_argument("--load-client", choices=("wrk", "httpx", "auto"), default="wrk",
                       help="the zero-cost rows' and one-client p50's load generator: wrk (skip them without it; "
                            "default), httpx (this process), auto (wrk, else httpx)")
    parts.add_argument("--wrk", default=None, help="path of a wrk binary (default: PATH, .gpu_bundle/wrk, apt-get)")
    parts.add_argument("--no-install-wrk", action="store_true", help="do not apt-get install wrk when missing")
    parts.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parts.add_argument("--zero-cost-connections", type=int, default=64,
                       help="connections of the throughput point (default 64; latency is at 1)")
    parts.add_argument("--zero-cost-seconds", type=float, default=3.0,
                       help="seconds per zero-cost point (whole seconds under wrk; default 3)")
    parts.add_argument("--hol-targets", default=None,
                       help="service,infinity_server (default: service on a CPU, both on a GPU)")
    parts.add_argument("--hol-texts", type=int, default=hol.BULK_TEXTS, help="texts in the bulk request (default 600)")
    parts.add_argument("--hol-words", type=int, default=hol.WORDS_PER_TEXT, help="words per bulk text (default 150)")
    parts.add_argument("--hol-rounds", type=int, default=None,
                       help="bulk alone + bulk with queries, times, alternating which goes first (default 2 CPU, 3 GPU)")
    parts.add_argument("--forward-runs", type=int, default=None, help="raw forward passes (default 200 CPU, 500 GPU)")
    parts.add_argument("--forward-seconds", type=float, default=3.0, help="seconds per one-client p50 round")
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for results.json and results.png")
    parser.add_argument("--logs", type=Path, default=ROOT / "reports", help="folder for the servers' logs")
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    gpu = args.device.startswith("cuda")
    args.matmul_n = args.matmul_n or (8192 if gpu else 2048)
    args.matmul_repeats = args.matmul_repeats or (20 if gpu else 8)
    args.forward_runs = args.forward_runs or (500 if gpu else 200)
    args.hol_rounds = args.hol_rounds or (3 if gpu else 2)
    if args.backends is None:
        args.backends = [] if (gpu or args.quick or args.service_url) else list(BACKEND_VARIANTS)
    else:
        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in args.backends if b not in BACKEND_VARIANTS]
        if unknown:
            parser.error(f"unknown backend variant(s) {unknown}: choose from {', '.join(BACKEND_VARIANTS)}")
    if args.hol_targets is None:
        args.hol_targets = ["service", "infinity_server"] if gpu else ["service"]
    else:
        args.hol_targets = [t.strip() for t in args.hol_targets.split(",") if t.strip()]
        unknown = [t for t in args.hol_targets if t not in ("service", "infinity_server")]
        if unknown:
            parser.error(f"unknown --hol-targets {unknown}: choose from service, infinity_server")
    if args.quick:
        args.concurrency, args.rounds, args.seconds = [1], 1, 1.5
        args.warmup_seconds, args.st_seconds, args.skip_infinity_server = 0.5, 0.5, True
        args.matmul_n, args.matmul_repeats = min(args.matmul_n, 1024), 3
        args.skip_zero_cost = args.skip_hol = True
        args.forward_runs, args.forward_seconds = 50, 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out, args.logs = args.out.resolve(), args.logs.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Importing infinity_emb turns on INFO logging with a rich handler: a line per httpx request would
    # cost the client CPU that the servers need.
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    # the zero-cost model and wrk's bodies: not results, and not for --logs (gpu_bench.sh brings that folder back)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as scratch:
        args.scratch = Path(scratch)
        result = asyncio.run(run_bench(args))
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    wrote = [args.out / "results.json"]
    try:
        if plot(result, args.out / "results.png"):
            wrote.append(args.out / "results.png")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    print(tables(result))
    print(json.dumps({"ratios": result.get("ratios"), "goals": result["goals"], "wall_s": result["wall_s"]}, indent=2))
    print(f"wrote {' and '.join(map(str, wrote))}")
    return 1 if count_errors(result) else 0


def count_errors(result: dict[str, Any]) -> int:
    """Failed requests of every part: any makes the run exit 1."""
    errors = sum(p["errors"] for s in result.get("systems", {}).values() for p in s.values())
    errors += sum(p["errors"] for s in result.get("zero_cost", {}).get("systems", {}).values() for p in s.values())
    one_client = result.get("forward", {}).get("service_one_client", {})
    errors += sum(v for k, v in one_client.items() if k.endswith("_errors"))
    errors += sum("error" in t for t in result.get("hol", {}).get("targets", {}).values())
    errors += len(result.get("zero_cost", {}).get("failed", {}))
    return errors


if __name__ == "__main__":
    sys.exit(main())
