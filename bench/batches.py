"""The Batch API's goals (issue 29), on one server with the packaged all-MiniLM-L6-v2:

(the cache of repeated inputs off: the batch sends the texts bulk sent; both alternate over --rounds parts)

- bulk:  N mixed-length texts (3-40 words) sent as /v1/embeddings requests of --per-request texts by
         16 concurrent clients: texts/s;
- batch: the same texts as a batch of N lines (one text a line) through the official openai SDK
         (upload, create, poll, download): texts/s from create to the output downloaded, the ratio to
         bulk, and each line's vector against bulk's for the same text (cosine, the worst);
- lone:  one-text queries one after the other while a second batch runs: the worst and median latency.

    python -m bench.batches [--texts 10000] [--out bench/batches.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai

from load_tests.processes import ServerProcess, hermetic_env

BENCH_DIR = Path(__file__).resolve().parent


def texts_of(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"word{rng.randint(0, 99999):05d}" for _ in range(rng.randint(3, 40))) for _ in range(n)]


def bulk(url: str, texts: list[str], per_request: int, clients: int) -> tuple[float, list[list[float]]]:
    parts = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]

    def send(part: list[str]) -> list[list[float]]:
        with httpx.Client(timeout=600) as http:
            answer = http.post(url + "/v1/embeddings", json={"input": part})
            answer.raise_for_status()
            return [d["embedding"] for d in answer.json()["data"]]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        vectors = [v for part in pool.map(send, parts) for v in part]
    return time.perf_counter() - started, vectors


def batch(sdk: openai.OpenAI, texts: list[str], prefix: str) -> tuple[Any, float, float, Any]:
    """(the uploaded file, seconds from create to the output downloaded, upload seconds, the batch id)."""
    lines = "\n".join(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/embeddings",
                                  "body": {"input": t}}) for i, t in enumerate(texts)).encode()
    started = time.perf_counter()
    uploaded = sdk.files.create(file=("corpus.jsonl", lines), purpose="batch")
    upload_s = time.perf_counter() - started
    created = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    return created, time.perf_counter(), upload_s, uploaded


def wait(sdk: openai.OpenAI, batch_id: str) -> Any:
    while True:
        done = sdk.batches.retrieve(batch_id)
        if done.status in ("completed", "failed", "cancelled", "expired"):
            return done
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--per-request", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="bulk and batch alternate over this many parts")
    parser.add_argument("--lone-texts", type=int, default=3000, help="lines of the batch the lone queries run beside")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "batches.json")
    args = parser.parse_args()
    texts = texts_of(args.texts)
    with tempfile.TemporaryDirectory() as data, tempfile.TemporaryDirectory() as logs:
        server = ServerProcess.bentoml(Path(logs) / "server.log", env=hermetic_env({"DATA_DIR": data, "CACHE_MB": "0"}))
        try:
            server.wait_ready()
            sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            bulk(server.url, texts_of(300, seed=9), args.per_request, args.clients)  # warm: the cost model's fit
            # Rounds of the same texts, bulk then batch (then batch then bulk): the machine's other load
            # drifts, and each round compares the two under about the same.
            bulk_s = batch_s = upload_s = 0.0
            bulk_vectors, out = [], []
            size = -(-len(texts) // args.rounds)
            for r in range(args.rounds):
                part = texts[r * size:(r + 1) * size]
                for phase in (("bulk", "batch") if r % 2 == 0 else ("batch", "bulk")):
                    if phase == "bulk":
                        seconds, vectors = bulk(server.url, part, args.per_request, args.clients)
                        bulk_s += seconds
                        bulk_vectors += vectors
                        continue
                    created, started, uploaded_s, _ = batch(sdk, part, f"t{r}-")
                    done = wait(sdk, created.id)
                    out += [json.loads(x) for x in sdk.files.content(done.output_file_id).content.splitlines()
                            if x.strip()]
                    batch_s += time.perf_counter() - started
                    upload_s += uploaded_s
            by_id = {o["custom_id"]: o["response"]["body"]["data"][0]["embedding"] for o in out}
            a = np.array([by_id[f"t{i // size}-{i % size}"] for i in range(len(texts))])
            b = np.array(bulk_vectors)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            # lone queries beside a running batch
            created, _, _, _ = batch(sdk, texts[:args.lone_texts], "lone")
            latencies = []
            with httpx.Client(base_url=server.url, timeout=60) as http:
                while sdk.batches.retrieve(created.id).status in ("validating", "in_progress"):
                    t = time.perf_counter()
                    http.post("/v1/embeddings", json={"input": "a lone query"}).raise_for_status()
                    latencies.append(time.perf_counter() - t)
                    time.sleep(0.05)
            wait(sdk, created.id)
        finally:
            server.stop()
    result = {
        "texts": len(texts), "clients": args.clients, "per_request": args.per_request, "rounds": args.rounds,
        "bulk_texts_per_s": round(len(texts) / bulk_s, 1),
        "batch_texts_per_s": round(len(texts) / batch_s, 1), "batch_upload_s": round(upload_s, 2),
        "batch_over_bulk": round(bulk_s / batch_s, 3),
        "lines_out": len(out), "worst_cosine": round(float(cos.min()), 6),
        "lone_queries": len(latencies),
        "lone_worst_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "lone_median_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
    }
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
