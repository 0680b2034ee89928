"""Long inputs (issue 21): chunked and late-chunked throughput on long documents next to plain texts, in
tokens the model read per second (`usage.total_tokens` / wall seconds), and one 100,000-token document.

The part starts its own service (MAX_CHARS_PER_TEXT=1000000 and MAX_CHUNKS_PER_INPUT=512, so that the
100,000-token document is served, not refused) with the default model, and measures, each for
`--long-seconds` with `--long-concurrency` clients sending one request after another:
- plain:   /embed with 16 texts of ~200 tokens (each fits the window: nothing to cut);
- chunked: /embed with one ~10,000-token document, `chunking: {"pooling": "mean"}` (windows of the
           model's 256 tokens, no overlap);
- late:    /embed with the same kind of document as 40 consecutive pieces, `late_chunking: true`;
- huge:    one 100,000-token document with chunking while one client sends one-text queries in a
           closed loop: its duration and tokens/s, the queries' median and worst latency during it,
           and the server's resident memory (all its processes) before, after it, and after a second one.

    python -m bench.long_inputs                  # writes bench/long_inputs.json
    python -m bench.run --skip-sweep --skip-hol --skip-forward --skip-zero-cost --out /tmp/b   # as a part of bench.run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from load_tests.processes import ServerProcess, process_env  # noqa: E402

WORDS = ("the river city bank old bridge north market stone tower rain winter garden museum library train "
         "station morning evening light engineer council harbour school children music festival summer bread "
         "coffee wine mountain valley report budget meeting").split()
ENV = {"MAX_CHARS_PER_TEXT": "1000000", "MAX_CHUNKS_PER_INPUT": "512"}


_tokenizer: Any = None


def token_counts(texts: list[str]) -> list[int]:
    """Tokens of the default model's tokenizer, special tokens left out."""
    global _tokenizer
    if _tokenizer is None:
        from transformers import AutoTokenizer

        from runners.settings import default_model_path

        _tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    return [len(ids) for ids in _tokenizer(texts, add_special_tokens=False)["input_ids"]]


def document(tokens: int, seed: int) -> str:
    """Sentences of 6-15 words, `tokens` tokens long or a sentence more (sentences tokenize apart: the
    tokenizer splits at spaces)."""
    import random

    rng = random.Random(seed)
    out: list[str] = []
    count = 0
    while count < tokens:
        batch = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 15))).capitalize() + "." for _ in range(64)]
        for sentence, n in zip(batch, token_counts(batch)):
            if count >= tokens:
                break
            out.append(sentence)
            count += n
    return " ".join(out)


def pieces(text: str, n: int) -> list[str]:
    words = text.split()
    step = -(-len(words) // n)
    return [" ".join(words[i:i + step]) for i in range(0, len(words), step)]


async def closed_loop(client: Any, bodies: list[dict[str, Any]], seconds: float, concurrency: int) -> dict[str, Any]:
    """`concurrency` clients, each sending the next body as soon as its last is answered, for `seconds`."""
    tokens, requests, errors = 0, 0, 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()

    async def one(k: int) -> None:
        nonlocal tokens, requests, errors
        i = k
        while time.perf_counter() < deadline:
            res = await client.post("/embed", json=bodies[i % len(bodies)])
            i += concurrency
            if res.status_code != 200:
                errors += 1
                continue
            tokens += res.json()["usage"]["total_tokens"]
            requests += 1

    await asyncio.gather(*(one(k) for k in range(concurrency)))
    wall = time.perf_counter() - started
    return {"tokens_per_s": round(tokens / wall), "requests": requests, "errors": errors, "seconds": round(wall, 1),
            "tokens_per_request": round(tokens / max(requests, 1))}


def rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return round(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20, 1)


async def _queries(client: Any, stop: asyncio.Event, latencies: list[float]) -> None:
    """One-text queries, one after another, until `stop`."""
    while not stop.is_set():
        t = time.perf_counter()
        res = await client.post("/embed", json={"input": "a small query"})
        if res.status_code == 200:
            latencies.append(time.perf_counter() - t)
        await asyncio.sleep(0.05)


async def huge(client: Any, pid: int, tokens: int) -> dict[str, Any]:
    """One `tokens`-token document with chunking while one-text queries run; memory around it."""
    text = document(tokens, seed=99)
    out: dict[str, Any] = {"rss_before_mb": rss_mb(pid)}
    for run in ("first", "second"):
        stop = asyncio.Event()
        latencies: list[float] = []
        task = asyncio.create_task(_queries(client, stop, latencies))
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        res = await client.post("/embed", json={"input": text, "chunking": True}, timeout=600)
        took = time.perf_counter() - started
        stop.set()
        await task
        body = res.json()
        if res.status_code != 200:
            return out | {"error": body}
        read = body["usage"]["total_tokens"]
        out[run] = {"seconds": round(took, 2), "tokens_read": read, "tokens_per_s": round(read / took),
                    "query_median_ms": round(statistics.median(latencies) * 1000) if latencies else None,
                    "query_worst_ms": round(max(latencies) * 1000) if latencies else None, "queries": len(latencies)}
        await asyncio.sleep(1.0)
        out[f"rss_after_{run}_mb"] = rss_mb(pid)
    return out


async def long_inputs_part(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    import httpx

    server = ServerProcess.bentoml(logs / "bench_long_inputs.log",
                                   env=process_env(ENV | ({"DEVICE": args.device} if args.device != "cpu" else {})))
    try:
        await asyncio.to_thread(server.wait_ready)
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            plain = [{"input": [document(200, seed=1000 * k + i) for i in range(16)]} for k in range(8)]
            docs = [document(args.long_doc_tokens, seed=k) for k in range(4)]
            parts = {
                "plain": plain,
                "chunked": [{"input": d, "chunking": {"pooling": "mean"}} for d in docs],
                "late": [{"input": pieces(d, 40), "late_chunking": True} for d in docs],
            }
            for bodies in parts.values():  # warm: first requests of each shape
                await client.post("/embed", json=bodies[0])
            result: dict[str, Any] = {
                "model": "all-MiniLM-L6-v2 (window 256)", "device": args.device, "server_env": ENV,
                "concurrency": args.long_concurrency, "doc_tokens": args.long_doc_tokens,
            }
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in parts}
            for _ in range(args.long_rounds):  # interleaved, so a busy neighbour slows all alike
                for name, bodies in parts.items():
                    rounds[name].append(await closed_loop(client, bodies, args.long_seconds, args.long_concurrency))
                    print(f"  {name}: {rounds[name][-1]['tokens_per_s']} tokens/s", flush=True)
            for name, rows in rounds.items():
                result[name] = {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows)),
                                "rounds": rows}
            result["chunked_vs_plain"] = round(result["chunked"]["tokens_per_s"] / result["plain"]["tokens_per_s"], 2)
            result["late_vs_plain"] = round(result["late"]["tokens_per_s"] / result["plain"]["tokens_per_s"], 2)
            if args.long_huge_tokens:
                print(f"  one {args.long_huge_tokens}-token document …", flush=True)
                result["huge"] = await huge(client, server.proc.pid, args.long_huge_tokens)
            return result
    finally:
        await asyncio.to_thread(server.stop, 20.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("long inputs (issue 21): chunked throughput on long documents")
    group.add_argument("--skip-long-inputs", action="store_true", help="no long-input rows")
    group.add_argument("--long-seconds", type=float, default=8.0, help="seconds per point (default 8)")
    group.add_argument("--long-rounds", type=int, default=2, help="interleaved rounds (default 2)")
    group.add_argument("--long-concurrency", type=int, default=2, help="clients (default 2)")
    group.add_argument("--long-doc-tokens", type=int, default=10_000, help="tokens per long document (default 10000)")
    group.add_argument("--long-huge-tokens", type=int, default=100_000,
                       help="tokens of the one huge document (0: skip it; default 100000)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "long_inputs.json")
    parser.add_argument("--logs", type=Path, default=ROOT / "reports")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(long_inputs_part(args, args.logs.resolve()))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k in ("plain", "chunked", "late", "huge")}
                     | {"chunked_vs_plain": result["chunked_vs_plain"]}, indent=1, default=str)[:3000])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
