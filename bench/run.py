"""One command, one run: the service against its engine, infinity's own server, a plain
sentence-transformers loop and the hardware's matrix-multiply limit, on the same corpus and model.

    python -m bench.run                     # CPU, concurrency 1/8/32, 3 rounds of 5 s: bench/results.{json,png}
    python -m bench.run --quick             # one concurrency, one short round, no infinity server
    python -m bench.run --device cuda --concurrency 1,8,32,128,512 --out $OUT     # see bench/gpu_bench.sh

What is measured (every load is one-sentence requests, closed loop: each of N clients sends its
next request as soon as the last one is answered):
- engine:          the Infinity engine in this process, built by the service's own `load_model`
                   from the service's own settings (same EngineArgs), called as `engine.embed([text])`;
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
import time
from collections.abc import Awaitable, Callable
from itertools import count
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from load_tests.run_load_test import ServerProcess, executable, free_port  # noqa: E402

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
        await self.loaded.engine.astart()
        await self.loaded.engine.embed(sentences=["warm up"])
        self.load_s = time.perf_counter() - t0

    async def send(self, text: str) -> bool:
        embeddings, _ = await self.loaded.engine.embed(sentences=[text])
        return len(embeddings) == 1

    async def stop(self) -> None:
        if self.loaded is not None:
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
    return ServerProcess.bentoml(logs / "bench_service.log", env=env)


# BACKEND=optimum variants of the service (issue 8): measured beside the torch service, same load.
BACKEND_VARIANTS = {
    "onnx-fp32": {"BACKEND": "optimum", "ONNX_QUANTIZATION": "fp32"},
    "onnx-int8": {"BACKEND": "optimum", "ONNX_QUANTIZATION": "int8"},
}


def start_service_variant(variant: str, device: str, logs: Path) -> ServerProcess:
    env = dict(BACKEND_VARIANTS[variant], ONNX_CACHE_DIR=str(logs / "onnx-cache"))
    if device != "cpu":
        env["DEVICE"] = device
    return ServerProcess.bentoml(logs / f"bench_service_{variant}.log", env=env)


def infinity_server_missing() -> str | None:
    """Why `infinity_emb v2` cannot start here (its server extras are not project dependencies), or None."""
    import importlib.util

    needed = ("prometheus_fastapi_instrumentator", "orjson", "uvicorn", "fastapi", "typer")
    absent = [name for name in needed if importlib.util.find_spec(name) is None]
    if absent:
        return f"missing {', '.join(absent)} (pip install prometheus-fastapi-instrumentator orjson)"
    return None


def start_infinity(path: str, device: str, logs: Path) -> ServerProcess:
    port = free_port()
    argv = [
        executable("infinity_emb"), "v2", "--model-id", path, "--served-model-name", "bench-model",
        "--port", str(port), "--host", "127.0.0.1", "--engine", "torch", "--device", device.split(":")[0],
        "--batch-size", "32", "--bettertransformer", "false", "--lengths-via-tokenize", "true",
    ]
    env = {"INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return ServerProcess(argv, f"http://127.0.0.1:{port}", logs / "bench_infinity.log", env, ready_path="/health")


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
    result: dict[str, Any] = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]),
        "machine": machine(),
        "device": args.device,
        "model_path": path,
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

    # Servers start first, in the background, while this process loads the engine.
    servers: dict[str, ServerProcess] = {}
    if not args.service_url and not args.skip_service:
        servers["service"] = start_service(args.device, logs)
    for variant in args.backends:
        servers[f"service_{variant}"] = start_service_variant(variant, args.device, logs)
    missing = infinity_server_missing()
    if not args.skip_infinity_server and not args.infinity_url and missing:
        print(f"infinity server skipped: {missing}", flush=True)
        result["skipped"] = {"infinity_server": missing}
    elif not args.skip_infinity_server and not args.infinity_url:
        servers["infinity_server"] = start_infinity(path, args.device, logs)

    targets: list[Any] = []
    try:
        # The engine loads here while the servers start; the device and the baseline are measured
        # once all of them are up and idle.
        startup: dict[str, Any] = {}
        if not args.skip_engine:
            engine = EngineTarget()
            await engine.start()
            targets.append(engine)
            startup["engine_load_s"] = round(engine.load_s, 2)
        for name, server in servers.items():
            startup[f"{name}_ready_s"] = round(await asyncio.to_thread(server.wait_ready), 2)
        result["startup_s"] = startup
        print(f"started: {startup}", flush=True)

        print("matrix-multiply throughput …", flush=True)
        result["matmul"] = matmul_gflops(args.device, args.matmul_n, args.matmul_repeats, 3)
        print(f"  {result['matmul']['gflops_best']:.0f} GFLOP/s ({result['matmul']['dtype']})", flush=True)

        print("sentence-transformers baseline …", flush=True)
        kwargs = {"model_kwargs": {"torch_dtype": torch.float16}} if args.device.startswith("cuda") else {}
        st_model = SentenceTransformer(path, device=args.device, **kwargs)
        result["model"] = model_facts(st_model, sentences, corpus)
        pools = {"sentences": sentences} if args.quick else {"sentences": sentences, "corpus": corpus}
        result["st_baseline"] = st_baseline(st_model, pools, args.rounds, args.st_seconds)
        for name, row in result["st_baseline"].items():
            print(f"  {name}: {row['texts_per_s']['median']:.0f} texts/s", flush=True)
        del st_model

        pids = {name: server.proc.pid for name, server in servers.items()}
        service_url = args.service_url or (servers["service"].url if "service" in servers else None)
        if service_url:
            targets.append(HttpTarget("service", service_url, "/v1/embeddings", served_name, pids.get("service")))
        infinity_url = args.infinity_url or (servers["infinity_server"].url if "infinity_server" in servers else None)
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

        # Warm every system at the highest concurrency, then measure in interleaved rounds.
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

    facts, mm = result["model"], result["matmul"]
    peak = mm["gflops_best"]
    limit: dict[str, Any] = {"matmul_gflops": round(peak, 1), "matmul_dtype": mm["dtype"]}
    top = max(cs)
    for name in systems:
        texts_s = tps(name, top)
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
    r_inf = result["ratios"]["service/infinity_server"].get(str(top))
    goals[f"service >= infinity_server @{top}"] = None if r_inf is None else r_inf >= 1.0
    r_p50 = result["ratios"]["p50 service/infinity_server"].get(str(top))
    goals[f"service p50 <= infinity_server p50 @{top}"] = None if r_p50 is None else r_p50 <= 1.0
    if "onnx-int8" in args.backends:
        r_int8 = result["ratios"]["service_onnx-int8/service"].get(str(top))
        goals[f"service onnx-int8 >= 2 x service torch @{top}"] = None if r_int8 is None else r_int8 >= 2.0
    result["goals"] = goals
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - t_total, 1)
    return result


# ---- the plot ----


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    cs = result["load"]["concurrency"]
    colors = {"engine": "tab:gray", "service": "tab:blue", "infinity_server": "tab:orange",
              "service_onnx-fp32": "tab:brown", "service_onnx-int8": "tab:red"}
    fig, (ax_t, ax_l, ax_f) = plt.subplots(1, 3, figsize=(16, 4.8))
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
    m = result["machine"]
    fig.suptitle(f"all-MiniLM-L6-v2 on {m.get('gpu') or m['cpu']} ({m['cpus']} CPUs), {result['created']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: concurrency 1, one 1.5 s round, no infinity server, small matmul")
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
    parser.add_argument("--skip-service", action="store_true", help="no service (e.g. bentoml missing on a GPU host)")
    parser.add_argument("--skip-engine", action="store_true", help="no in-process engine (e.g. infinity missing)")
    parser.add_argument("--service-url", default=None, help="measure this running service instead of starting one")
    parser.add_argument("--infinity-url", default=None, help="measure this running infinity server")
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for results.json and results.png")
    parser.add_argument("--logs", type=Path, default=ROOT / "reports", help="folder for the servers' logs")
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    gpu = args.device.startswith("cuda")
    args.matmul_n = args.matmul_n or (8192 if gpu else 2048)
    args.matmul_repeats = args.matmul_repeats or (20 if gpu else 8)
    if args.backends is None:
        args.backends = [] if (gpu or args.quick or args.service_url) else list(BACKEND_VARIANTS)
    else:
        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in args.backends if b not in BACKEND_VARIANTS]
        if unknown:
            parser.error(f"unknown backend variant(s) {unknown}: choose from {', '.join(BACKEND_VARIANTS)}")
    if args.quick:
        args.concurrency, args.rounds, args.seconds = [1], 1, 1.5
        args.warmup_seconds, args.st_seconds, args.skip_infinity_server = 0.5, 0.5, True
        args.matmul_n, args.matmul_repeats = min(args.matmul_n, 1024), 3
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
    result = asyncio.run(run_bench(args))
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    wrote = [args.out / "results.json"]
    try:
        plot(result, args.out / "results.png")
        wrote.append(args.out / "results.png")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    print(json.dumps({"ratios": result["ratios"], "goals": result["goals"], "wall_s": result["wall_s"]}, indent=2))
    print(f"wrote {' and '.join(map(str, wrote))}")
    errors = sum(p["errors"] for s in result["systems"].values() for p in s.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
