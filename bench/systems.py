"""The systems under load in bench.run's concurrency sweep: the engine in this process and HTTP routes,
the servers that serve them (the service, its ONNX variants), and the closed loop that loads them.

Each system answers `send(text) -> bool` (one text a request) and `server_cpu()` (CPU seconds of the
process tree that serves it, or None).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from itertools import count
from pathlib import Path
from typing import Any

from load_tests.processes import ServerProcess, process_env
from runners.engine.passes import PassThread

# Every torch computation of a benchmark process runs on this one thread: the in-process engine's
# passes, its model load, sentence-transformers' baselines and the raw forward pass. libgomp gives each
# thread that computes an OpenMP team of its own, and two teams on these 2 cores throttle every worker
# (runners.engine.passes): the in-process references measured 1.3-2 x slow while another existed.
# The in-process engine's passes pay one hand-off to it that the service's lone model does not.
COMPUTE = PassThread("bench-compute")

Send = Callable[[str], Awaitable[bool]]


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
        from runners.engine.loaded import load_model
        from runners.settings import load_settings

        settings = load_settings()
        t0 = time.perf_counter()
        self.loaded = await asyncio.to_thread(COMPUTE.run, lambda: load_model(settings.models[0], settings))
        if hasattr(self.loaded, "scheduler"):  # the service's own batch loop around infinity's replica
            self.loaded.scheduler.passes = COMPUTE
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
    import transformers
    from transformers import PreTrainedTokenizerBase

    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        # infinity-emb 0.0.78's own replicas tokenize with it at start (this service replaces that code)
        return (f"infinity-emb's own server calls tokenizer.batch_encode_plus, which transformers "
                f"{transformers.__version__} no longer has (it exits at start)")
    return None
