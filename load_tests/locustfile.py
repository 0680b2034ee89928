"""Locust users for every serving route, with text drawn from a corpus of real English of mixed lengths.

    locust -f load_tests/locustfile.py --headless -u 8 -r 8 -t 20s --host http://127.0.0.1:3000
    LOAD_SHAPE=spike locust -f load_tests/locustfile.py --headless -u 16 -t 30s --host ...
    locust -f load_tests/locustfile.py ... --runpod-host http://127.0.0.1:8000   # or RUNPOD_URL=...

Users (relative weights; `LOAD_WEIGHTS="openai=4,embed=2,rerank=1,v2_rerank=1,runpod=2"` overrides):
- `OpenAIEmbeddingsUser`  POST /v1/embeddings  1 to 8 texts, as the OpenAI SDK sends them
- `NativeEmbedUser`       POST /embed          1 to 8 texts, half of them as one string
- `NativeRerankUser`      POST /rerank         a one-sentence query against 4 to 16 documents
- `CohereV2RerankUser`    POST /v2/rerank      the same, in Cohere v2's shape, with top_n
- `RunPodUser`            POST {RUNPOD_URL}/runsync  embed and rerank jobs; only when `--runpod-host`
                          or RUNPOD_URL is given (RUNPOD_API_KEY, if set, is sent as a bearer token)

Every response is checked (status 200 and the body's shape: one vector per text, one result per
document, a COMPLETED job), so a wrong answer counts as a failure, not only an error status.

Shape (`LOAD_SHAPE`, default steady), over the run time `-t` (default 20 s) and `-u` users:
- steady: all users for the whole run;
- step:   a quarter of the users, then half, three quarters and all, in four equal steps;
- spike:  a quarter of the users, all of them at once for the middle fifth of the run, a quarter again.

The payload builders are plain functions of a `random.Random`, so the tests check them without a server.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from locust import FastHttpUser, LoadTestShape, between, events, task

CORPUS_PATH = Path(__file__).with_name("corpus.txt")
SHAPES = ("steady", "step", "spike")
DEFAULT_RUN_TIME_S = 20
DEFAULT_WEIGHTS = {"openai": 4, "embed": 2, "rerank": 1, "v2_rerank": 1, "runpod": 2}


def load_corpus(path: Path = CORPUS_PATH) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


CORPUS = load_corpus()
# One-sentence lines make natural queries; the whole corpus (up to long paragraphs) makes documents.
SENTENCES = [line for line in CORPUS if ". " not in line and len(line) < 200]
MODEL = os.environ.get("LOAD_MODEL") or None  # None: the server's first model with the capability


def _with_model(body: dict[str, Any]) -> dict[str, Any]:
    if MODEL:
        body["model"] = MODEL
    return body


def texts(rng: random.Random, low: int = 1, high: int = 8) -> list[str]:
    return rng.sample(CORPUS, rng.randint(low, high))


def openai_embeddings_payload(rng: random.Random) -> dict[str, Any]:
    return _with_model({"input": texts(rng), "encoding_format": "float"})


def embed_payload(rng: random.Random) -> dict[str, Any]:
    batch = texts(rng)
    return _with_model({"input": batch[0] if rng.random() < 0.5 else batch})


def rerank_payload(rng: random.Random) -> dict[str, Any]:
    return _with_model({"query": rng.choice(SENTENCES), "documents": texts(rng, 4, 16), "return_documents": False})


def v2_rerank_payload(rng: random.Random) -> dict[str, Any]:
    docs = texts(rng, 4, 16)
    return _with_model({"query": rng.choice(SENTENCES), "documents": docs, "top_n": rng.randint(1, len(docs))})


def runpod_embed_job(rng: random.Random) -> dict[str, Any]:
    return {"input": _with_model({"input": texts(rng)})}


def runpod_rerank_job(rng: random.Random) -> dict[str, Any]:
    return {"input": _with_model({"query": rng.choice(SENTENCES), "docs": texts(rng, 4, 16)})}


def expected_items(payload: dict[str, Any]) -> int:
    """How many vectors (embed) or results (rerank) a correct answer to this body holds."""
    if "query" in payload:
        docs = payload.get("documents") or payload.get("docs") or []
        return min(len(docs), payload.get("top_n") or len(docs))
    value = payload["input"]
    return 1 if isinstance(value, str) else len(value)


def check_body(body: Any, payload: dict[str, Any]) -> str | None:
    """None when `body` answers `payload` correctly, else what is wrong with it."""
    if not isinstance(body, dict):
        return f"body is {type(body).__name__}, not an object"
    want = expected_items(payload)
    if "query" in payload:
        results = body.get("results")
        if not isinstance(results, list) or len(results) != want:
            return f"expected {want} results, got {results if results is None else len(results)}"
        scores = [r.get("relevance_score") for r in results]
        if any(not isinstance(s, (int, float)) for s in scores) or scores != sorted(scores, reverse=True):
            return "relevance scores missing or not sorted"
        return None
    data = body.get("data")
    if not isinstance(data, list) or len(data) != want:
        return f"expected {want} embeddings, got {data if data is None else len(data)}"
    if any(not e.get("embedding") for e in data):
        return "an embedding is empty"
    return None


def weights() -> dict[str, int]:
    """DEFAULT_WEIGHTS with LOAD_WEIGHTS="name=int,…" applied."""
    result = dict(DEFAULT_WEIGHTS)
    for part in filter(None, (p.strip() for p in os.environ.get("LOAD_WEIGHTS", "").split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in result or not value.strip().isdigit():
            raise SystemExit(f"LOAD_WEIGHTS has {part!r}: use name=integer with a name from {sorted(result)}")
        result[name.strip()] = int(value)
    return result


WEIGHTS = weights()


class _ServiceUser(FastHttpUser):
    abstract = True
    wait_time = between(0.0, 0.05)
    connection_timeout = 10.0
    network_timeout = 120.0

    def on_start(self) -> None:
        self.rng = random.Random()

    def post_checked(self, path: str, payload: dict[str, Any], name: str | None = None) -> None:
        with self.client.post(path, json=payload, name=name or path, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:300]}")
                return
            try:
                body = response.json()
            except ValueError:
                response.failure(f"not JSON: {(response.text or '')[:300]}")
                return
            problem = check_body(body, payload)
            if problem:
                response.failure(problem)
            else:
                response.success()


class OpenAIEmbeddingsUser(_ServiceUser):
    weight = WEIGHTS["openai"]

    @task
    def embeddings(self) -> None:
        self.post_checked("/v1/embeddings", openai_embeddings_payload(self.rng))


class NativeEmbedUser(_ServiceUser):
    weight = WEIGHTS["embed"]

    @task
    def embed(self) -> None:
        self.post_checked("/embed", embed_payload(self.rng))


class NativeRerankUser(_ServiceUser):
    weight = WEIGHTS["rerank"]

    @task
    def rerank(self) -> None:
        self.post_checked("/rerank", rerank_payload(self.rng))


class CohereV2RerankUser(_ServiceUser):
    weight = WEIGHTS["v2_rerank"]

    @task
    def v2_rerank(self) -> None:
        self.post_checked("/v2/rerank", v2_rerank_payload(self.rng))


class RunPodUser(_ServiceUser):
    """Jobs to a RunPod endpoint (`https://api.runpod.ai/v2/ID`) or the local API server of the worker."""

    weight = WEIGHTS["runpod"]

    def on_start(self) -> None:
        super().on_start()
        # Locust gives every user class the --host of the service; jobs go to absolute URLs instead.
        self.runsync = runpod_url(self.environment.parsed_options) + "/runsync"
        key = os.environ.get("RUNPOD_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def run_job(self, job: dict[str, Any], name: str) -> None:
        with self.client.post(
            self.runsync, json=job, headers=self.headers, name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:300]}")
                return
            try:
                body = response.json()
            except ValueError:
                response.failure(f"not JSON: {(response.text or '')[:300]}")
                return
            if body.get("status") != "COMPLETED":
                response.failure(f"job {body.get('status')}: {str(body.get('error') or body)[:300]}")
                return
            problem = check_body(body.get("output"), job["input"])
            if problem:
                response.failure(problem)
            else:
                response.success()

    @task(2)
    def embed_job(self) -> None:
        self.run_job(runpod_embed_job(self.rng), "/runsync embed")

    @task(1)
    def rerank_job(self) -> None:
        self.run_job(runpod_rerank_job(self.rng), "/runsync rerank")


def runpod_url(options: Any) -> str:
    url = (getattr(options, "runpod_host", None) or os.environ.get("RUNPOD_URL") or "").strip()
    return url.rstrip("/").removesuffix("/runsync")


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--runpod-host", default="", include_in_web_ui=True,
        help="RunPod endpoint (https://api.runpod.ai/v2/ID) or a local worker (http://127.0.0.1:8000); "
        "env RUNPOD_URL. Without it the RunPod user does not run.",
    )


@events.init.add_listener
def _choose_users(environment: Any, **_: Any) -> None:
    """The RunPod user runs only against a RunPod endpoint; users with weight 0 do not run at all."""
    keep = [
        cls for cls in environment.user_classes
        if cls.weight > 0 and (cls is not RunPodUser or runpod_url(environment.parsed_options))
    ]
    if not keep:
        raise SystemExit("no user class left to run: check LOAD_WEIGHTS and --runpod-host")
    environment.user_classes[:] = keep


def _seconds(value: Any) -> float:
    if not value:
        return float(DEFAULT_RUN_TIME_S)
    return float(value)


def shape_plan(
    shape: str, users: int, run_time: float, spawn_rate: float | None = None
) -> Callable[[float], tuple[int, float] | None]:
    """The users wanted at each moment of the run: (count, spawn rate), None once the run is over.

    `spawn_rate` (users started per second, `-r`) applies to steady and step; a spike starts its
    users four times as fast, or it would be a ramp."""
    if shape not in SHAPES:
        raise SystemExit(f"LOAD_SHAPE={shape!r}: use one of {', '.join(SHAPES)}")
    users = max(1, users)
    low = max(1, users // 4)
    rate = float(spawn_rate or users)

    def at(t: float) -> tuple[int, float] | None:
        if t >= run_time:
            return None
        if shape == "step":
            step = min(3, int(4 * t / run_time))
            return max(1, round(users * (step + 1) / 4)), rate
        if shape == "spike":
            spiking = 0.4 * run_time <= t < 0.6 * run_time
            return (users, float(users * 4)) if spiking else (low, float(users * 4))
        return users, rate

    return at


class ConfiguredShape(LoadTestShape):
    """Steady, step or spike (env LOAD_SHAPE), scaled to `-u` users over `-t` seconds."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        plan = getattr(self, "_plan", None)
        if plan is None:
            shape = os.environ.get("LOAD_SHAPE", "steady").strip().lower() or "steady"
            plan = self._plan = shape_plan(
                shape, int(options.num_users or 8), _seconds(options.run_time), options.spawn_rate
            )
        return plan(self.get_run_time())
