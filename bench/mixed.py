"""Real traffic: mixed lengths (issue 19), against the same model in-process and infinity's server.

    python -m bench.mixed                        # 3 rounds: bench/mixed.json (bench.run runs it too)
    python -m bench.mixed --rounds 1 --seconds 5 --targets service --out /tmp/mixed

What it sends and what it compares, on the same texts:
- mixed:   `--connections` (16) wrk connections, each request one text of 3-40 random `word12345`
           words (~4.5 tokens a word, up to ~184 tokens) and one of 2 words: texts/s = 2 x req/s;
- mixed_high: the same at `--high-connections` (32), where ONNX int8 is compared with torch;
- reference: sentence-transformers `encode` in this process on windows of as many texts as the
           connections hold (32): in arrival order as one padded batch, and sorted by length in
           batches of 8 and of 4 (what a server that sees only that window could do);
- bulk:    one request of 300 texts of ~242 tokens, against `encode(batch_size=8)` on the same texts.
Systems: the service (torch), the service with BACKEND=optimum (ONNX int8) and BACKEND=ctranslate2,
infinity's own server (`infinity_emb v2`) and vLLM's pooling server (bench/vllm_peer.py; left out with
one line saying why when its venv cannot be made). Rounds interleave the systems; numbers are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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

from bench import vllm_peer  # noqa: E402
from bench import wrk as wrk_tool  # noqa: E402
from bench.baselines import machine, served_model  # noqa: E402
from bench.load import ratio  # noqa: E402
from bench.systems import COMPUTE, infinity_server_missing  # noqa: E402
from load_tests.processes import ServerProcess, process_env  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
SYSTEMS = {  # name: extra environment of the service, or None for a peer (PEERS)
    "service": {},
    "service_onnx_int8": {"BACKEND": "optimum", "ONNX_QUANTIZATION": "int8"},
    "service_ct2": {"BACKEND": "ctranslate2"},
    "infinity_server": None,
    "vllm": None,
}
PEERS = ("infinity_server", "vllm")  # served as "bench-model"
BULK_TEXTS, BULK_TOKENS = 300, 242


def word(rng: random.Random) -> str:
    return f"word{rng.randint(0, 99999):05d}"


def mixed_requests(n: int, seed: int = 0) -> list[list[str]]:
    """Each request: one text of 3-40 words beside one of 2 words."""
    rng = random.Random(seed)
    return [[" ".join(word(rng) for _ in range(rng.randint(3, 40))), " ".join(word(rng) for _ in range(2))]
            for _ in range(n)]


def bulk_texts(tokenizer: Any, n: int = BULK_TEXTS, tokens: int = BULK_TOKENS, seed: int = 1) -> list[str]:
    """`n` texts of about `tokens` tokens each (special tokens included), as the model's tokenizer counts."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [word(rng) for _ in range(tokens // 4)]
        while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
            words.append(word(rng))
        while len(tokenizer(" ".join(words))["input_ids"]) > tokens:
            words.pop()
        texts.append(" ".join(words))
    return texts


def reference(st_model: Any, requests: list[list[str]], window: int, seconds: float) -> dict[str, float]:
    """texts/s of sentence-transformers on consecutive windows of `window` texts, per batching."""
    texts = [t for r in requests for t in r]
    windows = [texts[i:i + window] for i in range(0, len(texts) - window + 1, window)]
    out = {}
    for name, batch_size in (("arrival_padded", window), ("sorted_8", 8), ("sorted_4", 4)):
        done, started = 0, time.perf_counter()
        for chunk in windows:
            if name == "arrival_padded":
                st_model.encode(chunk, batch_size=batch_size)  # one batch: padded to its longest
            else:
                st_model.encode(sorted(chunk, key=len), batch_size=batch_size)  # encode sorts by length too
            done += len(chunk)
            if time.perf_counter() - started > seconds:
                break
        out[name] = done / (time.perf_counter() - started)
    return out


def bulk_reference(st_model: Any, texts: list[str]) -> float:
    started = time.perf_counter()
    st_model.encode(texts, batch_size=8)
    return len(texts) / (time.perf_counter() - started)


def bulk_http(url: str, path: str, model: str, texts: list[str]) -> float:
    started = time.perf_counter()
    response = httpx.post(url + path, json={"model": model, "input": texts}, timeout=600)
    response.raise_for_status()
    assert len(response.json()["data"]) == len(texts)
    return len(texts) / (time.perf_counter() - started)


def start(name: str, path: str, logs: Path, before: Path | None = None,
          vllm_python: Path | None = None) -> ServerProcess:
    if name == "vllm":
        return vllm_peer.start_server(vllm_python or vllm_peer.venv_python(vllm_peer.venv_dir()), path, logs,
                                      "mixed_vllm")
    if name == "service_before":  # another checkout's service (--before ROOT): the same run, the old code
        return ServerProcess.bentoml(logs / "bench_mixed_before.log", cwd=before,
                                     env=process_env({"PYTHONPATH": str(before)}))
    env = SYSTEMS[name]
    if env is None:
        return ServerProcess.infinity(path, "cpu", logs / "bench_mixed_infinity.log")
    extra = dict(env, ONNX_CACHE_DIR=str(logs / "onnx-cache")) if env.get("BACKEND") == "optimum" else dict(env)
    return ServerProcess.bentoml(logs / f"bench_mixed_{name}.log", env=process_env(extra))


def summarize(points: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(points), 2), "rounds": [round(p, 2) for p in points]}


async def mixed_part(args: argparse.Namespace, wrk: wrk_tool.Wrk) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    path, served_name = served_model()
    requests = mixed_requests(3000)
    targets = selected_targets(args)
    if args.before is not None:
        targets.append("service_before")
    servers = {name: start(name, path, args.logs, args.before, getattr(args, "vllm_python", None))
               for name in targets}
    st_model = COMPUTE.run(lambda: SentenceTransformer(path, device="cpu"))
    bulk = bulk_texts(st_model.tokenizer)
    folder = args.scratch / "mixed"
    raw: dict[str, dict[str, list[float]]] = {name: {} for name in [*targets, "reference"]}
    result: dict[str, Any] = {"connections": args.connections, "high_connections": args.high_connections,
                              "seconds_per_point": args.mixed_seconds, "rounds": args.mixed_rounds,
                              "request": "one text of 3-40 `word12345` words + one of 2 words (texts/s = 2 x req/s)",
                              "bulk": f"one request of {BULK_TEXTS} texts of {BULK_TOKENS} tokens"}
    try:
        for server in servers.values():
            await asyncio.to_thread(server.wait_ready, 300)
        inputs = {}
        for name in targets:
            model = "bench-model" if name in PEERS else served_name
            bodies = [{"model": model, "input": r} for r in requests]
            inputs[name] = wrk_tool.write_inputs(folder, name, bodies)
            await asyncio.to_thread(bulk_http, servers[name].url, route(name), model, bulk[:8])  # warm
        for round_no in range(args.mixed_rounds):
            print(f"mixed traffic, round {round_no + 1}/{args.mixed_rounds} …", flush=True)
            for name in targets:
                script, bodies = inputs[name]
                for key, connections in (("mixed", args.connections), ("mixed_high", args.high_connections)):
                    point = await asyncio.to_thread(wrk_tool.run, wrk, servers[name].url + route(name), script, bodies,
                                                    connections, args.mixed_seconds)
                    raw[name].setdefault(key, []).append(2 * point["requests_per_s"])
                    raw[name].setdefault(f"{key}_p50_ms", []).append(point["p50_ms"] or 0.0)
                    raw[name].setdefault(f"{key}_errors", []).append(point["errors"])
                model = "bench-model" if name in PEERS else served_name
                await asyncio.sleep(1.0)  # the batches of wrk's last requests still run after it stops
                raw[name].setdefault("bulk", []).append(
                    await asyncio.to_thread(bulk_http, servers[name].url, route(name), model, bulk))
            ref = await asyncio.to_thread(COMPUTE.run, lambda: reference(st_model, requests, 2 * args.connections,
                                                                         args.mixed_seconds))
            for key, value in ref.items():
                raw["reference"].setdefault(key, []).append(value)
            bulk_ref = await asyncio.to_thread(COMPUTE.run, lambda: bulk_reference(st_model, bulk))
            raw["reference"].setdefault("bulk_batch_8", []).append(bulk_ref)
    finally:
        if "vllm" in servers:
            result["vllm_threads"] = vllm_peer.thread_layout(servers["vllm"].log())
        await asyncio.gather(*(asyncio.to_thread(s.stop, 5.0 if n == "infinity_server" else 20.0)
                               for n, s in servers.items()))
    if "vllm" in targets:
        result["vllm_versions"] = vllm_peer.versions(getattr(args, "vllm_python", None))
    systems = {name: {key: summarize(values) if not key.endswith("_errors") else sum(values)
                      for key, values in by_key.items()} for name, by_key in raw.items()}
    result["texts_per_s"] = systems
    result["ratios"] = ratios(systems)
    result["goals"] = goals(result["ratios"])
    return result


def selected_targets(args: argparse.Namespace) -> list[str]:
    """--mixed-targets less the peers that cannot run here (each says why once)."""
    targets = []
    for name in args.mixed_targets:
        if name == "infinity_server" and (why := infinity_server_missing()):
            print(f"mixed: infinity server skipped: {why}", flush=True)
        elif name == "vllm" and vllm_peer.available(args):
            pass  # available() printed the line
        else:
            targets.append(name)
    return targets


def route(name: str) -> str:
    return "/embeddings" if name == "infinity_server" else "/v1/embeddings"


def ratios(systems: dict[str, Any]) -> dict[str, float | None]:
    def median(name: str, key: str) -> float | None:
        return systems.get(name, {}).get(key, {}).get("median")

    return {
        "service / sorted_8 reference (mixed)": ratio(median("service", "mixed"), median("reference", "sorted_8")),
        "service / infinity_server (mixed)": ratio(median("service", "mixed"), median("infinity_server", "mixed")),
        "service / arrival_padded reference (mixed)": ratio(median("service", "mixed"),
                                                            median("reference", "arrival_padded")),
        "service / encode(batch_size=8) (bulk)": ratio(median("service", "bulk"), median("reference", "bulk_batch_8")),
        "onnx_int8 / torch (mixed_high)": ratio(median("service_onnx_int8", "mixed_high"), median("service", "mixed_high")),
        "ct2 / torch (mixed)": ratio(median("service_ct2", "mixed"), median("service", "mixed")),
        "service / service_before (mixed)": ratio(median("service", "mixed"), median("service_before", "mixed")),
        "service / service_before (mixed_high)": ratio(median("service", "mixed_high"),
                                                       median("service_before", "mixed_high")),
        "service / service_before (bulk)": ratio(median("service", "bulk"), median("service_before", "bulk")),
        "service / vllm (mixed)": ratio(median("service", "mixed"), median("vllm", "mixed")),
        "onnx_int8 / vllm (mixed)": ratio(median("service_onnx_int8", "mixed"), median("vllm", "mixed")),
        "service / vllm (mixed_high)": ratio(median("service", "mixed_high"), median("vllm", "mixed_high")),
        "service / vllm (bulk)": ratio(median("service", "bulk"), median("vllm", "bulk")),
        "onnx_int8 / vllm (bulk)": ratio(median("service_onnx_int8", "bulk"), median("vllm", "bulk")),
    }


def goals(r: dict[str, float | None]) -> dict[str, bool | None]:
    def at_least(key: str, bound: float) -> bool | None:
        return None if r.get(key) is None else r[key] >= bound

    return {
        "mixed >= 1.0 x in-process sorted batches of 8": at_least("service / sorted_8 reference (mixed)", 1.0),
        "mixed >= 2.5 x infinity's server": at_least("service / infinity_server (mixed)", 2.5),
        "bulk >= 0.95 x encode(batch_size=8)": at_least("service / encode(batch_size=8) (bulk)", 0.95),
        "ONNX int8 >= 2 x torch (mixed, high connections)": at_least("onnx_int8 / torch (mixed_high)", 2.0),
        "mixed >= 1.3 x vLLM (torch)": at_least("service / vllm (mixed)", 1.3),
        "mixed >= 1.8 x vLLM (ONNX int8)": at_least("onnx_int8 / vllm (mixed)", 1.8),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mixed-length traffic (issue 19)")
    group.add_argument("--skip-mixed", action="store_true", help="no mixed-length traffic part")
    group.add_argument("--mixed-targets", default=",".join(SYSTEMS),
                       help=f"comma-separated from {', '.join(SYSTEMS)} (default: all)")
    group.add_argument("--connections", type=int, default=16, help="wrk connections of the mixed point (default 16)")
    group.add_argument("--high-connections", type=int, default=32, help="the second mixed point (default 32)")
    group.add_argument("--mixed-seconds", type=float, default=8.0, help="seconds per mixed point (default 8)")
    group.add_argument("--mixed-rounds", type=int, default=3, help="interleaved rounds (default 3)")
    group.add_argument("--skip-vllm", action="store_true",
                       help="leave vLLM's pooling server out of every part (bench/vllm_peer.py)")
    group.add_argument("--before", type=Path, default=None,
                       help="a checkout of an earlier commit: its service joins the rounds as service_before")


def table(result: dict[str, Any]) -> str:
    low, high = result["connections"], result["high_connections"]
    rows = [f"| system | mixed @{low} texts/s | mixed @{high} texts/s | bulk texts/s |", "|---|---|---|---|"]
    for name, values in result["texts_per_s"].items():
        if name == "reference":
            continue
        cells = [values.get(k, {}).get("median") for k in ("mixed", "mixed_high", "bulk")]
        p50 = values.get("mixed_p50_ms", {}).get("median")
        label = f"{name} (p50 @{low} {p50:.0f} ms)" if p50 else name
        rows.append(f"| {label} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")
    ref = result["texts_per_s"]["reference"]
    rows.append("| in-process: " + ", ".join(f"{k} {v['median']:.1f}" for k, v in ref.items()) + " | | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--seconds", dest="mixed_seconds_alias", type=float, default=None)
    parser.add_argument("--rounds", dest="mixed_rounds_alias", type=int, default=None)
    parser.add_argument("--targets", dest="mixed_targets_alias", default=None)
    parser.add_argument("--out", type=Path, default=BENCH_DIR)
    parser.add_argument("--logs", type=Path, default=ROOT / "reports")
    args = parser.parse_args(argv)
    args.mixed_seconds = args.mixed_seconds_alias or args.mixed_seconds
    args.mixed_rounds = args.mixed_rounds_alias or args.mixed_rounds
    args.mixed_targets = [t.strip() for t in (args.mixed_targets_alias or args.mixed_targets).split(",") if t.strip()]
    unknown = [t for t in args.mixed_targets if t not in SYSTEMS]
    if unknown:
        parser.error(f"unknown targets {unknown}: choose from {', '.join(SYSTEMS)}")
    os.environ.setdefault("CACHE_MB", "0")  # the rounds repeat bodies: measure the model, not the cache
    wrk, why = wrk_tool.find_wrk()
    if wrk is None:
        print(f"no wrk: {why}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-mixed-") as scratch:
        args.scratch = Path(scratch)
        result = asyncio.run(mixed_part(args, wrk))
    result["machine"] = machine()
    (args.out / "mixed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(json.dumps({"ratios": result["ratios"], "goals": result["goals"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
