"""Warm-keeper for a RunPod serverless endpoint of this project.

Every 180 to 300 seconds, at random, it sends one valid embed job and one valid rerank job (in
random order, with freshly composed texts) to `https://api.runpod.ai/v2/<id>/runsync`, checks the
answers, and logs one JSON line per job with its latency and RunPod's `delayTime` (queue plus cold
start) and `executionTime`:

    RUNPOD_API_KEY=... python -m load_tests.warmkeeper --endpoint-id <id>
    python -m load_tests.warmkeeper --endpoint-url http://127.0.0.1:8000 --iterations 1   # local API

Why these jobs: a ping that fails validation never reaches the GPU (the old worker's keeper sent
invalid requests, so it kept nothing warm and hid broken deployments). These jobs run the real
path: tokenizer, model forward pass and, for rerank, the reranker the endpoint serves (found once
with a `/v1/models` job unless `--embed-model` / `--rerank-model` name them). Texts vary so no
cache answers for the model; a failed or wrong answer makes the exit code 1.

Cost reasoning. RunPod bills a flex worker per second from the moment it starts until it goes idle
for the endpoint's idle timeout (5 s by default), cold start included. A worker that went back
(scaled to zero) pays a cold start of 15 to 20 s on the next job (model load; the old worker
measured 200 ms warm), and that job waits for it. Per day, with a mean interval of 240 s, this
keeper sends about 360 pairs of jobs:

- idle timeout left short (5 s): each ping costs its run (under a second warm) plus the idle
  timeout, about 6 s, so roughly 36 GPU-minutes a day; RunPod's FlashBoot keeps such a recently
  used worker quick to start again, so real requests between pings rarely meet a full cold start.
  At an example flex price of $0.00019/s (a 24 GB GPU; check current prices) that is about $0.40
  a day, against 15 to 20 s of cold start for the first user after every idle period.
- idle timeout raised above the interval (over 300 s): the worker never stops, 86,400 billed
  seconds a day (about $16 at the same example price). Then an active worker (minimum workers 1,
  billed at RunPod's discounted active rate) is cheaper than a keeper and starts nothing cold:
  use that instead, and this keeper only as a health probe.

The random interval (rather than a fixed period) keeps pings from lining up with the idle timeout
or RunPod's scaling checks, and spreads them when several keepers watch one endpoint. Stop it
when real traffic keeps the endpoint warm anyway: every ping is billed GPU time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("warmkeeper")

RUNPOD_API = "https://api.runpod.ai/v2"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")

SUBJECTS = [
    "the new billing system", "a solar panel installer", "our mobile app", "the city library",
    "a small coffee roaster", "the quarterly sales report", "an electric bicycle", "the support team",
    "a marathon runner", "the weather station", "a machine learning model", "the hotel near the station",
    "a vegetable garden", "the train timetable", "a used car", "the database migration",
]
VERBS = [
    "reduces", "explains", "improves", "delays", "compares", "schedules", "recommends", "measures",
    "replaces", "documents", "protects", "simplifies",
]
OBJECTS = [
    "energy costs in winter", "the onboarding of new customers", "response times at peak hours",
    "the warranty terms", "water use in dry summers", "the privacy settings", "delivery routes",
    "late payments", "noise at night", "the results of last season", "battery life", "error rates",
]
QUESTIONS = [
    "How do I {verb} {obj}?", "Which option {verb}s {obj} best?", "What {verb}s {obj}?",
    "Why does {subj} affect {obj}?", "Where can I read how {subj} handles {obj}?",
]
DETAILS = [
    "according to the latest review", "in most cases", "since the last update", "for teams of any size",
    "without extra hardware", "as the manual describes", "when the load is high", "in three steps",
]


def sentence(rng: random.Random) -> str:
    text = f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.6:
        text += f" {rng.choice(DETAILS)}"
    return text + f" (note {rng.randrange(10_000)})."


def question(rng: random.Random) -> str:
    template = rng.choice(QUESTIONS)
    return template.format(verb=rng.choice(VERBS).rstrip("s"), obj=rng.choice(OBJECTS), subj=rng.choice(SUBJECTS))


def embed_job(rng: random.Random, model: str | None) -> dict[str, Any]:
    texts = [sentence(rng) for _ in range(rng.randint(1, 8))]
    job: dict[str, Any] = {"input": texts, "input_type": rng.choice(["query", "document"])}
    if model:
        job["model"] = model
    return job


def rerank_job(rng: random.Random, model: str | None) -> dict[str, Any]:
    job: dict[str, Any] = {"query": question(rng), "docs": [sentence(rng) for _ in range(rng.randint(3, 10))]}
    if rng.random() < 0.5:
        job["return_docs"] = True
    if model:
        job["model"] = model
    return job


def check_output(kind: str, job: dict[str, Any], output: Any) -> str | None:
    """What is wrong with an answer, or None."""
    if isinstance(output, list) and len(output) == 1:
        output = output[0]
    if not isinstance(output, dict):
        return f"output is {type(output).__name__}, not an object"
    if kind == "embed":
        data = output.get("data")
        if not isinstance(data, list) or len(data) != len(job["input"]):
            return f"expected {len(job['input'])} embeddings, got {len(data) if isinstance(data, list) else data!r}"
        for item in data:
            vector = item.get("embedding") if isinstance(item, dict) else None
            if not isinstance(vector, list) or not vector or not all(math.isfinite(x) for x in vector):
                return "an embedding is empty or not finite"
        return None
    if kind == "rerank":
        results = output.get("results")
        if not isinstance(results, list) or not results:
            return "no rerank results"
        indices = [r.get("index") for r in results]
        scores = [r.get("relevance_score") for r in results]
        if sorted(indices) != list(range(len(job["docs"]))):
            return f"indices {indices} are not the positions of the {len(job['docs'])} documents"
        if any(not isinstance(s, (int, float)) for s in scores) or scores != sorted(scores, reverse=True):
            return "results are not sorted by relevance_score"
        return None
    if kind == "models":
        return None if isinstance(output.get("data"), list) else "no model list"
    return None


@dataclass
class Endpoint:
    url: str
    api_key: str | None
    timeout: float

    def _request(self, method: str, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:300]
            raise RuntimeError(f"HTTP {exc.code} from {self.url}{path}: {body}") from None

    def run(self, job_input: dict[str, Any]) -> dict[str, Any]:
        """`/runsync`, then `/status/{id}` while RunPod still queues or runs it (a cold start)."""
        deadline = time.monotonic() + self.timeout
        answer = self._request("POST", "/runsync", {"input": job_input})
        while answer.get("status") not in TERMINAL and answer.get("id") and time.monotonic() < deadline:
            time.sleep(2)
            answer = self._request("GET", f"/status/{answer['id']}", None)
        return answer


def send(endpoint: Endpoint, kind: str, job: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    record: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind, "model": job.get("model")}
    try:
        answer = endpoint.run(job)
    except Exception as exc:  # noqa: BLE001 - a keeper logs the failure and goes on
        answer, problem = {}, f"{type(exc).__name__}: {exc}"
    else:
        status = answer.get("status")
        problem = None if status == "COMPLETED" else f"job {status}: {answer.get('error')}"
        problem = problem or check_output(kind, job, answer.get("output"))
    record.update(
        status=answer.get("status", "NO_ANSWER"),
        ok=problem is None,
        latency_ms=round((time.perf_counter() - started) * 1000, 1),
        delay_ms=answer.get("delayTime"),
        execution_ms=answer.get("executionTime"),
        items=len(job.get("input") or job.get("docs") or []),
    )
    if problem:
        record["error"] = problem
    print(json.dumps(record), flush=True)
    return record


def _pick_models(output: Any) -> tuple[str | None, str | None]:
    if isinstance(output, list) and len(output) == 1:
        output = output[0]
    models = output.get("data", []) if isinstance(output, dict) else []
    embed = next((m["id"] for m in models if "embed" in (m.get("capabilities") or [])), None)
    rerankers = [m for m in models if "rerank" in (m.get("capabilities") or [])]
    dedicated = [m for m in rerankers if m.get("rerank_via") not in (None, "embedding-cosine")]
    rerank = (dedicated or rerankers or [{"id": None}])[0]["id"]
    return embed, rerank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Keep a RunPod endpoint of this project warm with valid jobs.")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--endpoint-id", default=os.environ.get("RUNPOD_ENDPOINT_ID"), help="RunPod endpoint id")
    target.add_argument("--endpoint-url", help="base URL instead of https://api.runpod.ai/v2/<id> (e.g. a local API)")
    parser.add_argument("--api-key-env", default="RUNPOD_API_KEY", help="variable holding the API key")
    parser.add_argument("--min-interval", type=float, default=180.0, help="seconds between pings, at least")
    parser.add_argument("--max-interval", type=float, default=300.0, help="seconds between pings, at most")
    parser.add_argument("--iterations", type=int, default=0, help="stop after this many pings (0: no limit)")
    parser.add_argument("--max-runtime", type=float, default=0.0, help="stop after this many seconds (0: no limit)")
    parser.add_argument("--embed-model", help="model for embed jobs (default: the endpoint's first embedder)")
    parser.add_argument("--rerank-model", help="model for rerank jobs (default: the endpoint's reranker)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for one job, cold start included")
    parser.add_argument("--seed", type=int, help="random seed (texts, order, intervals)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    if args.min_interval < 0 or args.max_interval < args.min_interval:
        parser.error("need 0 <= --min-interval <= --max-interval")
    if args.endpoint_url:
        url = args.endpoint_url.rstrip("/")
    elif args.endpoint_id:
        url = f"{RUNPOD_API}/{args.endpoint_id}"
    else:
        parser.error("give --endpoint-id (or RUNPOD_ENDPOINT_ID) or --endpoint-url")
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None and url.startswith(RUNPOD_API):
        parser.error(f"{args.api_key_env} is not set: RunPod needs an API key")

    rng = random.Random(args.seed)
    endpoint = Endpoint(url, api_key, args.timeout)
    started = time.monotonic()
    deadline = started + args.max_runtime if args.max_runtime > 0 else math.inf
    embed_model, rerank_model = args.embed_model, args.rerank_model
    records: list[dict[str, Any]] = []
    if not (embed_model and rerank_model):
        answer = None
        try:
            answer = endpoint.run({"openai_route": "/v1/models"})
        except Exception as exc:  # noqa: BLE001 - without the list, jobs name no model
            log.warning("cannot list the endpoint's models (%s): jobs name no model", exc)
        if answer and answer.get("status") == "COMPLETED":
            found_embed, found_rerank = _pick_models(answer.get("output"))
            embed_model = embed_model or found_embed
            rerank_model = rerank_model or found_rerank
        log.info("embed model: %s, rerank model: %s", embed_model or "(default)", rerank_model or "(default)")

    iteration = 0
    try:
        while True:
            iteration += 1
            kinds = ["embed", "rerank"]
            rng.shuffle(kinds)
            for kind in kinds:
                job = embed_job(rng, embed_model) if kind == "embed" else rerank_job(rng, rerank_model)
                records.append(send(endpoint, kind, job))
            if args.iterations and iteration >= args.iterations:
                break
            pause = rng.uniform(args.min_interval, args.max_interval)
            if time.monotonic() + pause >= deadline:
                break
            log.info("next ping in %.0f s", pause)
            time.sleep(pause)
    except KeyboardInterrupt:
        log.info("stopped")
    failed = [r for r in records if not r["ok"]]
    latencies = sorted(r["latency_ms"] for r in records)
    summary = {
        "summary": True,
        "jobs": len(records),
        "failed": len(failed),
        "runtime_s": round(time.monotonic() - started, 1),
        "latency_ms_median": latencies[len(latencies) // 2] if latencies else None,
        "latency_ms_max": latencies[-1] if latencies else None,
    }
    print(json.dumps(summary), flush=True)
    return 1 if failed or not records else 0


if __name__ == "__main__":
    sys.exit(main())
