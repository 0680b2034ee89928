"""Limits on what a request costs, not only on what it carries (issue 32): a prompt copied onto every
text, a query copied onto every document, content parts of one input, chunks, token-id rows, deep JSON,
forged log lines.

Three layers: each hostile request replayed against a real `bentoml serve` (a 4xx within 1 s, a lone
query meanwhile within 1.5 s, worker RSS +< 50 MB, nothing logged that a request wrote); the same
against the RunPod worker where jobs reach the code; and a property test over the request schemas: for
any body a schema accepts, what reaches a model stays within the limits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import checkpoints
import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from load_tests.processes import ServerProcess, hermetic_env
from runners.api.schemas import CohereEmbedRequest, EmbeddingRequest, RerankRequest, V2RerankRequest
from runners.capabilities.queries import RerankQuery
from runners.errors import ServiceError
from runners.models.token_inputs import TokenRequest
from runners.settings import load_settings

PYTHON = sys.executable
LONE = {"input": "is the lone query answered while the hostile one is refused?"}


# ---- against a real server ----


@pytest.fixture(scope="module")
def rerankers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cost-checkpoints")
    return {"cross-encoder": checkpoints.build_bert_classifier(base / "tiny-cross-encoder", num_labels=1),
            "qwen3-reranker": checkpoints.build_qwen3_reranker(base / "tiny-Qwen3-Reranker")}


@pytest.fixture(scope="module")
def server(start_server, rerankers: dict[str, Path], default_model_path: str) -> ServerProcess:
    names = ";".join([default_model_path, str(rerankers["cross-encoder"]), str(rerankers["qwen3-reranker"])])
    return start_server({"MODEL_NAMES": names, "SERVED_MODEL_NAMES": "minilm;cross-encoder;qwen3-reranker",
                         "CACHE_MB": "0"})


def _worker_rss(server: ServerProcess) -> int:
    return sum(p.memory_info().rss for p in psutil.Process(server.proc.pid).children(recursive=True))


def replay(url: str, post: Callable[[], httpx.Response], lone: Callable[[], httpx.Response]) -> dict[str, Any]:
    """The hostile request in a thread, a lone query 50 ms into it: status and seconds of each."""
    out: dict[str, Any] = {}

    def hostile() -> None:
        started = time.perf_counter()
        res = post()
        out["status"], out["body"], out["seconds"] = res.status_code, res.text, time.perf_counter() - started

    thread = threading.Thread(target=hostile)
    thread.start()
    time.sleep(0.05)
    started = time.perf_counter()
    res = lone()
    out["lone_status"], out["lone_seconds"] = res.status_code, time.perf_counter() - started
    thread.join(30)
    return out


def _hostile_bodies() -> dict[str, tuple[str, bytes]]:
    return {
        # 1. an instruction copied onto every text: an 8 MB body that would be ~16 GiB of prompted texts
        "instruction": ("/v1/embeddings", json.dumps({"model": "minilm", "input": ["a"] * 2048,
                                                      "instruction": "x" * 8_000_000}).encode()),
        "instruction-2mb": ("/embed", json.dumps({"model": "minilm", "input": ["a"] * 512,
                                                  "instruction": "x" * 2_000_000}).encode()),
        # 2. a query copied onto every document, ~200 M characters from a ~110 KB body
        "rerank-cross-encoder": ("/rerank", json.dumps({"model": "cross-encoder", "query": "q" * 100_000,
                                                        "documents": ["d"] * 2048}).encode()),
        "rerank-qwen3": ("/v2/rerank", json.dumps({"model": "qwen3-reranker", "query": "q" * 100_000,
                                                   "documents": ["d"] * 2048}).encode()),
        "rerank-instruction": ("/rerank", json.dumps({"model": "qwen3-reranker", "query": "q", "instruction": "i" * 60_000,
                                                      "documents": ["d"] * 300}).encode()),
        # 3. one Cohere input of 47,000 text parts
        "cohere-parts": ("/v2/embed", json.dumps({"model": "minilm", "input_type": "search_document", "inputs": [
            {"content": [{"type": "text", "text": "a"}] * 47_000}]}).encode()),
        # token-id rows that decode to more than any text may have
        "token-rows": ("/v1/embeddings", json.dumps({"model": "minilm", "input": [[1996] * 200_000]}).encode()),
        # 5. deep JSON on TEI's root route and on a native one
        "deep-tei": ("/tei", b"[" * 100_000),
        "deep-native": ("/embed", b'{"input": ' + b"[" * 100_000),
    }


@pytest.mark.parametrize("case", list(_hostile_bodies()))
def test_hostile_request_is_refused_at_once_and_others_go_on(server: ServerProcess, case: str) -> None:
    path, body = _hostile_bodies()[case]
    before = _worker_rss(server)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        out = replay(server.url, lambda: client.post(path, content=body, headers={"content-type": "application/json"}),
                     lambda: httpx.post(server.url + "/embed", json={**LONE, "model": "minilm"}, timeout=60))
    grown = (_worker_rss(server) - before) / 2**20
    assert 400 <= out["status"] < 500, out
    assert out["seconds"] < 1.0, out
    assert out["lone_status"] == 200 and out["lone_seconds"] < 1.5, out
    assert grown < 50, f"worker RSS grew {grown:.0f} MB"
    error = json.loads(out["body"])
    message = error["error"] if path.startswith("/tei") else error["error"]["message"]
    expected = {"instruction": "MAX_CHARS_PER_TEXT", "instruction-2mb": "MAX_CHARS_PER_TEXT",
                "rerank-cross-encoder": "MAX_CHARS_PER_REQUEST", "rerank-qwen3": "MAX_CHARS_PER_TEXT",
                "rerank-instruction": "MAX_CHARS_PER_REQUEST", "cohere-parts": "MAX_ITEMS_PER_REQUEST",
                "token-rows": "MAX_CHARS_PER_TEXT", "deep-tei": "not valid JSON", "deep-native": "not valid JSON"}[case]
    assert expected in message, message


def test_a_query_within_the_text_limit_times_many_documents_meets_the_request_budget(server: ServerProcess) -> None:
    """Each part within its own limit, the product over MAX_CHARS_PER_REQUEST: 9,000 x 2,048 = 18.4 M."""
    body = {"model": "cross-encoder", "query": "q" * 9_000, "documents": ["d"] * 2048}
    res = httpx.post(server.url + "/rerank", json=body, timeout=60)
    assert res.status_code == 413, res.text
    error = res.json()["error"]
    assert error["code"] == "too_many_characters" and "MAX_CHARS_PER_REQUEST=16777216" in error["message"], error
    # An embedding model reads the query once: the same request is served (by cosine).
    res = httpx.post(server.url + "/rerank", json={**body, "model": "minilm", "documents": ["d"] * 64}, timeout=60)
    assert res.status_code == 200, res.text


def test_no_request_can_forge_a_log_line(server: ServerProcess) -> None:
    forged = "FORGED INFO embed_rerank.access POST /embed 200"
    httpx.post(server.url + "/%0a" + forged.replace(" ", "%20"), json=LONE)
    httpx.post(server.url + "/embed%0d%0a" + forged.replace(" ", "%20"), json=LONE)
    httpx.post(server.url + "/embed", json=LONE, headers={"x-request-id": "abc\x1b[2K" + forged})
    time.sleep(0.3)
    lines = server.log().splitlines()
    assert not [line for line in lines if line.startswith("FORGED") or line.startswith("\r")], lines[-20:]
    assert any("\\nFORGED INFO" in line for line in lines)  # escaped, on the access line it belongs to


def test_json_log_lines_stay_json(start_server) -> None:
    server = start_server({"LOG_FORMAT": "json", "MODEL_WARMUP": "false"})
    httpx.post(server.url + "/%0a%7B%22level%22%3A%22error%22%7D", json=LONE)
    time.sleep(0.3)
    ours = [line for line in server.log().splitlines() if '"logger": "embed_rerank' in line]
    assert ours and all(isinstance(json.loads(line), dict) for line in ours)
    assert any(json.loads(line).get("path") == '/\n{"level":"error"}' for line in ours)


# ---- the RunPod worker ----


def test_runpod_jobs_meet_the_same_limits(tmp_path: Path, rerankers: dict[str, Path], default_model_path: str) -> None:
    env = hermetic_env({"RUNPOD_VOLUME_PATH": str(tmp_path / "no-volume"), "BAKED_MODELS_DIR": str(tmp_path / "none"),
                        "MODEL_NAMES": f"{default_model_path};{rerankers['cross-encoder']}",
                        "SERVED_MODEL_NAMES": "minilm;cross-encoder", "CACHE_MB": "0"},
                       drop=("HF_HOME", "RUN_AS_USER"), drop_prefixes=("RUNPOD_",))
    with ServerProcess.runpod_worker(tmp_path / "worker.log", env=env, python=PYTHON) as worker, \
            httpx.Client(base_url=worker.url, timeout=120) as client:
        worker.wait_ready(120)
        assert len(client.post("/runsync", json={"input": LONE}).json()["output"]["data"]) == 1  # engines loaded
        jobs = {
            "instruction": {"input": ["a"] * 512, "instruction": "x" * 2_000_000},
            "openai": {"openai_route": "/v1/embeddings",
                       "openai_input": {"model": "minilm", "input": ["a"] * 512, "instruction": "x" * 2_000_000}},
            "rerank": {"model": "cross-encoder", "query": "q" * 100_000, "docs": ["d"] * 2048},
        }
        for name, job in jobs.items():
            started = time.perf_counter()
            answer = client.post("/runsync", json={"input": job}).json()
            seconds = time.perf_counter() - started
            assert answer["status"] == "FAILED", (name, str(answer)[:300])
            limit = "MAX_CHARS_PER_REQUEST" if name == "rerank" else "MAX_CHARS_PER_TEXT"
            assert "413" in answer["error"] and limit in answer["error"], (name, answer["error"][:300])
            assert seconds < 1.5, (name, seconds)  # the job's trip through runpod's local API included
        # runpod parses the job itself (lone surrogates pass its parser): the service's own check answers
        surrogate = client.post("/runsync", content=b'{"input": {"input": ["ok", "bad \\ud800"]}}',
                                headers={"content-type": "application/json"}).json()
        assert surrogate["status"] == "FAILED" and "lone UTF-16 surrogate" in surrogate["error"], surrogate
        lone = client.post("/runsync", json={"input": LONE}).json()
        assert len(lone["output"]["data"]) == 1


# ---- the property test: what reaches a model, for any body the schemas accept ----

LIMITS = {"MAX_ITEMS_PER_REQUEST": "8", "MAX_CHARS_PER_TEXT": "300", "MAX_CHARS_PER_REQUEST": "1200",
          "MAX_CHUNKS_PER_INPUT": "4", "CACHE_MB": "0", "MODEL_WARMUP": "false"}


class Recorded:
    """Every item a model's scheduler is handed, by model, while the service runs for real."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, list[Any]]] = []

    def spy(self, model: Any) -> None:
        run = model.scheduler.run

        async def recorded(inputs: Any, lengths: Any = None) -> Any:
            self.calls.append((model, list(inputs)))
            return await run(inputs, lengths)

        model.scheduler.run = recorded


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def limited(loop: asyncio.AbstractEventLoop, rerankers: dict[str, Path], default_model_path: str) -> Iterator[Any]:
    from runners.capabilities.service import InferenceService

    names = ";".join([default_model_path, str(rerankers["cross-encoder"]), str(rerankers["qwen3-reranker"])])
    service = InferenceService(load_settings({"MODEL_NAMES": names, "SERVED_MODEL_NAMES": "minilm;cross-encoder;qwen3",
                                              **LIMITS}))
    loop.run_until_complete(service.start())
    recorded = Recorded()
    for model in service.registry.models:
        recorded.spy(model)
    yield service, recorded
    loop.run_until_complete(service.stop())


def _chars(item: Any) -> int:
    if isinstance(item, TokenRequest):
        return len(item.text or "")
    if isinstance(item, str):
        return len(item)
    if isinstance(item, tuple):
        return sum(len(part) for part in item)
    return 0  # token ids: bounded by the window, checked below


def _check_reached(service: Any, recorded: Recorded, extra_items: int = 0) -> None:
    s = service.settings
    items = [item for _, inputs in recorded.calls for item in inputs]
    assert len(items) <= s.max_items + extra_items, len(items)
    assert sum(map(_chars, items)) <= s.max_request_chars
    for model, inputs in recorded.calls:
        for item in inputs:
            if isinstance(item, TokenRequest) and item.ids is not None:
                assert len(item.ids) <= model.max_tokens
            if isinstance(item, str):
                assert len(item) <= s.max_chars


def _run(loop: asyncio.AbstractEventLoop, call: Any) -> None:
    try:
        loop.run_until_complete(call)
    except ServiceError as exc:
        assert 400 <= exc.status < 500, exc.message


# Sizes drawn evenly (Hypothesis' own text strategy mostly draws short strings): bodies near and over the limits.
_WORDS = "ab cd é. fo " * 40
TEXT = st.one_of(st.integers(1, 420).map(lambda n: _WORDS[:n]), st.text(alphabet="ab é.", max_size=12))
TEXTS = st.one_of(TEXT, st.lists(TEXT, min_size=0, max_size=14))
INSTRUCTION = st.one_of(st.none(), st.integers(0, 1500).map(lambda n: "xyz " * (n // 4)))
IDS = st.lists(st.lists(st.integers(0, 30_000), min_size=0, max_size=400), min_size=1, max_size=10)
CHUNKING = st.one_of(st.none(), st.booleans(), st.fixed_dictionaries(
    {}, optional={"size": st.integers(1, 300), "overlap": st.integers(0, 40), "pooling": st.sampled_from(["mean", "none"])}))
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY
@given(body=st.fixed_dictionaries({"input": st.one_of(TEXTS, IDS)}, optional={
    "instruction": INSTRUCTION,
    "input_type": st.sampled_from(["query", "document"]),
    "truncate": st.booleans(),
    "chunking": CHUNKING,
    "late_chunking": st.booleans(),
    "output": st.sampled_from(["dense", "tokens"]),
}))
def test_embedding_bodies_reach_the_model_within_the_limits(loop, limited, body: dict[str, Any]) -> None:
    service, recorded = limited
    try:
        query = EmbeddingRequest.model_validate({"model": "minilm", **body}).to_query()
    except ValidationError:
        return
    recorded.calls.clear()
    _run(loop, service.embed(query))
    _check_reached(service, recorded)


@PROPERTY
@given(inputs=st.lists(st.fixed_dictionaries({"content": st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=0, max_size=12)}), min_size=0, max_size=5),
    input_type=st.sampled_from(["search_query", "search_document"]))
def test_cohere_inputs_reach_the_model_within_the_limits(loop, limited, inputs: list[Any], input_type: str) -> None:
    service, recorded = limited
    try:
        query = CohereEmbedRequest.model_validate({"model": "minilm", "inputs": inputs,
                                                   "input_type": input_type}).to_query()
    except ValidationError:
        return
    recorded.calls.clear()
    _run(loop, service.cohere_embed(query))
    _check_reached(service, recorded)


@settings(PROPERTY, max_examples=150)
@given(model=st.sampled_from(["minilm", "cross-encoder", "qwen3"]), query=TEXT,
       documents=st.lists(TEXT, min_size=0, max_size=10),
       instruction=INSTRUCTION, v2=st.booleans())
def test_rerank_bodies_reach_the_model_within_the_limits(loop, limited, model: str, query: str, documents: list[str],
                                                         instruction: str | None, v2: bool) -> None:
    service, recorded = limited
    schema = V2RerankRequest if v2 else RerankRequest
    try:
        q: RerankQuery = schema.model_validate({"model": model, "query": query, "documents": documents,
                                                "instruction": instruction}).to_query()
    except ValidationError:
        return
    recorded.calls.clear()
    _run(loop, service.rerank(q))
    _check_reached(service, recorded, extra_items=1)  # an embedding model reads the query once, beside the documents
