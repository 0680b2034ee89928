"""The cache of repeated inputs (CACHE_MB, runners/engine/cache.py): its key, its bound, its metrics.

The LRU and its byte count alone; then the real MiniLM in this process (InferenceService, one event
loop for the module), where each test counts what reached the model's scheduler. Over HTTP, the
metrics are checked on the shared default server (tests/test_http_default.py's) and the bound under a
soak in tests/test_memory.py.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from runners import metrics
from runners.capabilities.queries import EmbedQuery, RerankQuery
from runners.engine.cache import ENTRY_OVERHEAD, ResultCache, cacheable, owned
from runners.settings import load_settings

# ---- the LRU alone ----


def _vector(seed: int, dims: int = 384) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


def test_least_recently_used_goes_first_and_the_bound_holds():
    one = ENTRY_OVERHEAD + sys.getsizeof("text 0") + 384 * 4
    cache = ResultCache(3 * one + 10)
    for i in range(3):
        assert cache.put((1, "embed", f"text {i}"), _vector(i), 5)
    assert cache.get((1, "embed", "text 0"))[1] == 5  # now the most recently used
    cache.put((1, "embed", "text 3"), _vector(3), 6)
    assert cache.get((1, "embed", "text 1")) is None  # the least recently used was evicted
    assert [cache.get((1, "embed", f"text {i}")) is not None for i in (0, 2, 3)] == [True] * 3
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    for i in range(4, 200):
        cache.put((1, "embed", f"text {i}"), _vector(i), 1)
        assert cache.bytes <= cache.max_bytes
    assert not cache.put((1, "embed", "x" * 10_000), _vector(0), 1)  # larger than the whole cache
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_entries_are_private_read_only_copies():
    batch = np.stack([_vector(1), _vector(2)])
    cache = ResultCache(1 << 20)
    cache.put((1, "embed", "a"), batch[0], 3)
    kept, tokens = cache.get((1, "embed", "a"))
    assert tokens == 3 and kept.base is None and not kept.flags.writeable  # not a view that keeps the batch
    batch[0] = 0
    assert np.array_equal(kept, _vector(1))
    with pytest.raises(ValueError):
        kept[0] = 1.0
    assert owned(np.float32(0.5)) == np.float32(0.5) and owned({"dense": 1}) is None and owned(True) is None
    assert cacheable(["a", "b"]) and cacheable([("q", "d")]) and cacheable([("q", "d", "instruction")])
    assert not cacheable([b"image bytes"]) and not cacheable([("q", "d", "e", "f")]) and not cacheable([("q", 1)])
    assert not cacheable([object()])


def test_counted_bytes_match_what_python_allocates():
    """The bound is on memory, not only on the vectors: an entry's count (text, vector, ENTRY_OVERHEAD)
    is within 10 % of what tracemalloc sees the cache take."""
    texts = [f"query number {i} about rivers and stones in winter" for i in range(3000)]
    vectors = [_vector(i) for i in range(64)]
    cache = ResultCache(1 << 30)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, text in enumerate(texts):
            cache.put((7, "embed", text), vectors[i % 64], 12)
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    taken += sum(sys.getsizeof(t) for t in texts)  # the texts existed before; the cache keeps them alive
    assert cache.bytes == pytest.approx(taken, rel=0.10), (cache.bytes, taken)


# ---- the real model, in this process ----


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _service(loop, default_model_path: str, **env: str):
    from runners.capabilities.service import InferenceService

    service = InferenceService(load_settings({"MODEL_NAMES": default_model_path, "SERVED_MODEL_NAMES": "mini", **env}))
    loop.run_until_complete(service.start())
    model = service.registry.models[0]
    seen: list[list] = []
    run = model.scheduler.run

    async def recorded(inputs, lengths=None):
        seen.append(list(inputs))
        return await run(inputs, lengths)

    model.scheduler.run = recorded
    return service, seen


@pytest.fixture(scope="module")
def cached(loop, default_model_path):
    service, seen = _service(loop, default_model_path)
    assert service.registry.cache.max_bytes == 64 << 20  # CACHE_MB=auto on a CPU
    yield service, seen
    loop.run_until_complete(service.stop())


def _counts() -> tuple[float, float]:
    hits, misses = metrics.cache_counters("mini")
    return hits._value.get(), misses._value.get()


def _embed(loop, service, texts, **fields):
    return loop.run_until_complete(service.embed(EmbedQuery(texts=texts, token_ids=None, **fields)))


def test_a_repeated_text_skips_the_model_and_keeps_its_usage(loop, cached):
    service, seen = cached
    first = _embed(loop, service, ["the river runs under the old stone bridge"])
    hits, misses = _counts()
    seen.clear()
    again = _embed(loop, service, ["the river runs under the old stone bridge"])
    assert seen == []  # neither tokenized nor run
    assert again["data"] == first["data"] and again["usage"] == first["usage"] and first["usage"]["prompt_tokens"] > 2
    assert _counts() == (hits + 1, misses)


def test_a_request_that_mixes_hits_and_misses_runs_only_the_misses(loop, cached):
    service, seen = cached
    known = _embed(loop, service, ["a known sentence about winter"])
    new = "a new sentence about the paper market"
    hits, misses = _counts()
    seen.clear()
    mixed = _embed(loop, service, ["a known sentence about winter", new, new])
    assert seen == [[new]]  # once, though the request has it twice
    assert _counts() == (hits + 2, misses + 1)
    alone = _embed(loop, service, [new])
    assert [d["embedding"] for d in mixed["data"]] == [known["data"][0]["embedding"]] + [alone["data"][0]["embedding"]] * 2
    assert mixed["usage"]["prompt_tokens"] == known["usage"]["prompt_tokens"] + 2 * alone["usage"]["prompt_tokens"]


def test_what_changes_the_text_is_a_miss_what_shapes_the_vector_is_not(loop, cached, default_model_path):
    """The key is the text as the model reads it: an instruction (or a prompt) changes it, a left
    truncation changes it. `dimensions`, `normalize` and the output type are applied to the cached raw
    vector per request: the same entry, and the same answer as without the cache."""
    service, seen = cached
    text = "engines hum quietly in the winter light"
    base = _embed(loop, service, [text])
    seen.clear()
    _embed(loop, service, [text], instruction="Represent this sentence for searching: ")
    assert seen == [["Represent this sentence for searching: " + text]]
    seen.clear()
    long = " ".join(["stone river light"] * 200)
    right = _embed(loop, service, [long])
    left = _embed(loop, service, [long], truncate_left=True)
    assert len(seen) == 2 and seen[0] != seen[1] and right["data"] != left["data"]
    seen.clear()
    shaped = {
        "dims": _embed(loop, service, [text], dimensions=64),
        "raw": _embed(loop, service, [text], normalize=False),
        "base64": _embed(loop, service, [text], encoding_format="base64"),
        "ubinary": _embed(loop, service, [text], embedding_types=("ubinary",)),
    }
    assert seen == []
    uncached, _ = _service(loop, default_model_path, CACHE_MB="0")
    try:
        for name, fields in {"dims": {"dimensions": 64}, "raw": {"normalize": False},
                             "base64": {"encoding_format": "base64"}, "ubinary": {"embedding_types": ("ubinary",)}}.items():
            assert shaped[name]["data"] == _embed(loop, uncached, [text], **fields)["data"], name
    finally:
        loop.run_until_complete(uncached.stop())
    assert base["data"][0]["embedding"][:3] != shaped["dims"]["data"][0]["embedding"][:3]  # re-normalized at 64


def test_rerank_shares_the_cache_and_a_reload_starts_empty(loop, default_model_path):
    service, seen = _service(loop, default_model_path, CACHE_MB="1")
    try:
        query = RerankQuery(query="where do bees live", documents=["in a hive", "under the sea"])
        first = loop.run_until_complete(service.rerank(query))
        seen.clear()
        again = loop.run_until_complete(service.rerank(query))
        assert seen == [] and again["results"] == first["results"] and again["usage"] == first["usage"]
        loop.run_until_complete(service.stop())
        assert len(service.registry.cache) == 0
        loop.run_until_complete(service.start())
        model = service.registry.models[0]
        calls: list = []
        run = model.scheduler.run

        async def recorded(inputs, lengths=None):
            calls.append(list(inputs))
            return await run(inputs, lengths)

        model.scheduler.run = recorded
        loop.run_until_complete(service.rerank(query))
        assert calls, "a model loaded again must not answer from the cache of the one before"
    finally:
        loop.run_until_complete(service.stop())


def test_cache_mb_zero_turns_it_off(loop, default_model_path):
    service, seen = _service(loop, default_model_path, CACHE_MB="0")
    try:
        hits, misses = _counts()
        for _ in range(2):
            _embed(loop, service, ["the same text twice"])
        assert len(seen) == 2 and _counts() == (hits, misses) and not service.registry.cache.enabled
    finally:
        loop.run_until_complete(service.stop())


@pytest.mark.parametrize(("value", "expected"), [("", -1), ("auto", -1), ("0", 0), ("512", 512)])
def test_cache_mb_setting(value, expected):
    assert load_settings({"CACHE_MB": value}).cache_mb == expected


def test_bad_cache_mb_names_the_variable():
    from runners.settings import SettingsError

    for bad in ("-1", "lots", "1.5"):
        with pytest.raises(SettingsError, match=r"^CACHE_MB='.*' is not valid: use auto or a whole number >= 0"):
            load_settings({"CACHE_MB": bad})


# ---- over HTTP ----


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_hits_and_misses_are_in_metrics(default_server):
    url = default_server.url
    name = 'model="all-MiniLM-L6-v2"}'

    def read() -> tuple[float, float]:
        text = httpx.get(url + "/metrics").text
        return _metric(text, "embed_rerank_cache_hits_total{" + name), _metric(text, "embed_rerank_cache_misses_total{" + name)

    hits, misses = read()
    with httpx.Client() as client:  # one connection: one worker, one cache
        body = {"input": ["cache metrics one", "cache metrics two"]}
        first = client.post(url + "/v1/embeddings", json=body).json()
        second = client.post(url + "/v1/embeddings", json=body).json()
    assert second["data"] == first["data"] and second["usage"] == first["usage"]
    assert read() == (hits + 2, misses + 2)
    text = httpx.get(url + "/metrics").text
    assert 0 < _metric(text, "embed_rerank_cache_bytes") <= 64 << 20 and _metric(text, "embed_rerank_cache_entries") >= 2
