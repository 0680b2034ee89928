"""Inputs longer than the window (issue 21, docs/api.md "Long inputs"): chunking, late chunking, token
vectors of an ordinary embedding model, and truncation that says so, against a real server with the
packaged all-MiniLM-L6-v2 (window 256), checked against a reference computed here with transformers
directly (AutoModel + AutoTokenizer on the same folder: mean pooling over the last hidden states,
normalized, as the model's sentence-transformers modules do).
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

WORDS = ("the river city bank old bridge north market stone tower rain winter garden museum library train "
         "station morning evening light naïve café déjà vu engineer council harbour 1889 42.5% e-mail "
         "re-opened school children music festival summer bread coffee wine mountain").split()


def long_text(tokens: int, seed: int = 0) -> str:
    """Sentences of WORDS, about `tokens` tokens of all-MiniLM-L6-v2 long."""
    rng = np.random.default_rng(seed)
    sentences, count = [], 0
    while count < tokens:
        words = list(rng.choice(WORDS, int(rng.integers(6, 16))))
        sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence)
        count += len(words) * 1.3 + 1
    return " ".join(sentences)


@pytest.fixture(scope="module")
def server(start_server) -> Any:
    # A 100,000-token text is ~600,000 characters: MAX_CHARS_PER_TEXT lets it through to MAX_CHUNKS_PER_INPUT.
    return start_server({"MAX_CHARS_PER_TEXT": "1000000"})


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


@pytest.fixture(scope="module")
def reference(default_model_path: str) -> Any:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModel.from_pretrained(default_model_path).eval()

    class Reference:
        def ids(self, text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        def offsets(self, text: str) -> list[tuple[int, int]]:
            return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

        def hidden(self, ids: list[int]) -> np.ndarray:
            """Last hidden states of [CLS] ids [SEP]."""
            row = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]
            with torch.inference_mode():
                return model(input_ids=torch.tensor([row])).last_hidden_state[0].numpy()

        def embed(self, ids: list[int]) -> np.ndarray:
            return unit(self.hidden(ids).mean(0))

    return Reference()


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def cos(a: Any, b: Any) -> float:
    return float(unit(a) @ unit(b))


def post(url: str, path: str, body: dict[str, Any], status: int = 200) -> Any:
    res = httpx.post(url + path, json=body, timeout=120)
    assert res.status_code == status, res.text
    return res


TEXT = long_text(1500)


def test_chunks_are_the_models_embedding_of_their_own_tokens(url, reference):
    ids = reference.ids(TEXT)
    assert 1400 <= len(ids) <= 1700
    offsets = reference.offsets(TEXT)
    body = post(url, "/embed", {"input": [TEXT, "a short text"],
                                "chunking": {"size": 200, "overlap": 20, "pooling": "none"}}).json()
    chunks = body["data"][0]["chunks"]
    assert "embedding" not in body["data"][0]
    assert chunks[0]["start_token"] == 0 and chunks[-1]["end_token"] == len(ids)  # the whole text
    for a, b in zip(chunks, chunks[1:]):
        assert b["start_token"] == a["end_token"] - 20  # neighbours share the overlap, nothing is skipped
    for c in chunks:
        assert c["end_token"] - c["start_token"] <= 198  # size 200 less [CLS] and [SEP]
        assert (c["start_char"], c["end_char"]) == (offsets[c["start_token"]][0], offsets[c["end_token"] - 1][1])
        want = reference.embed(ids[c["start_token"]:c["end_token"]])
        assert cos(c["embedding"], want) >= 0.999
        assert abs(np.linalg.norm(c["embedding"]) - 1) < 1e-4
    short = body["data"][1]["chunks"]
    assert len(short) == 1 and short[0]["start_char"] == 0 and short[0]["end_char"] == len("a short text")
    # usage: every window as the model read it, [CLS] and [SEP] included
    windows = len(chunks) + 1
    read = sum(c["end_token"] - c["start_token"] for c in chunks) + len(reference.ids("a short text")) + 2 * windows
    assert body["usage"] == {"prompt_tokens": read, "total_tokens": read}

    # "mean": the chunks' vectors weighted by their tokens, normalized
    mean = post(url, "/embed", {"input": TEXT, "chunking": {"size": 200, "overlap": 20}}).json()["data"][0]["embedding"]
    weights = np.array([c["end_token"] - c["start_token"] for c in chunks], dtype=np.float64)
    want = (np.array([c["embedding"] for c in chunks]) * weights[:, None]).sum(0) / weights.sum()
    assert cos(mean, want) >= 0.9999 and abs(np.linalg.norm(mean) - 1) < 1e-4

    # defaults: windows of the model's 256 tokens, no overlap
    default = post(url, "/embed", {"input": TEXT, "chunking": {"pooling": "none"}}).json()["data"][0]["chunks"]
    assert [c["end_token"] - c["start_token"] for c in default[:-1]] == [254] * (len(default) - 1)
    assert default[-1]["end_token"] == len(ids) and len(default) == -(-len(ids) // 254)


def test_late_chunking_pools_each_piece_from_one_pass(url, reference):
    pieces = ["The Eiffel Tower was finished in 1889.", "It is 330 metres tall and stands in Paris.",
              "Berlin is the capital of Germany; its café culture is naïve about nothing."]
    body = post(url, "/v1/embeddings", {"input": pieces, "late_chunking": True}).json()
    document = " ".join(pieces)
    hidden = reference.hidden(reference.ids(document))[1:-1]  # without [CLS] and [SEP]
    offsets = reference.offsets(document)
    start = 0
    for i, piece in enumerate(pieces):
        mine = [j for j, (a, b) in enumerate(offsets) if a >= start and b <= start + len(piece) and b > a]
        assert cos(body["data"][i]["embedding"], hidden[mine].mean(0)) >= 0.999
        start += len(piece) + 1
    # not the same as embedding each piece alone: the context is in the vector
    alone = reference.embed(reference.ids(pieces[1]))
    assert cos(body["data"][1]["embedding"], alone) < 0.99

    # longer than the window: macro-windows; pieces inside the first window are read in its context
    long_pieces = [long_text(40, seed=i) for i in range(40)]
    got = post(url, "/embed", {"input": long_pieces, "late_chunking": True}).json()
    assert len(got["data"]) == 40
    document = " ".join(long_pieces)
    ids, offsets = reference.ids(document), reference.offsets(document)
    assert len(ids) > 1000
    hidden = reference.hidden(ids[:254])[1:-1]
    start = 0
    for i, piece in enumerate(long_pieces):
        mine = [j for j, (a, b) in enumerate(offsets) if a >= start and b <= start + len(piece)]
        if mine[-1] >= 254:
            break
        assert cos(got["data"][i]["embedding"], hidden[mine].mean(0)) >= 0.999
        start += len(piece) + 1
    assert i >= 3
    for item in got["data"]:
        assert abs(np.linalg.norm(item["embedding"]) - 1) < 1e-4


def test_truncation_is_refused_or_visible(url, reference):
    n = len(reference.ids(TEXT)) + 2
    for path, body in (("/embed", {"input": TEXT, "truncate": False}),
                       ("/v1/embeddings", {"input": [TEXT], "truncate": False}),
                       ("/v2/embed", {"texts": [TEXT], "truncate": "NONE"})):
        error = post(url, path, body, 413).json()["error"]
        assert error["code"] == "text_too_long"
        assert f"has {n} tokens" in error["message"] and "at most 256 tokens" in error["message"]
        assert "chunking" in error["message"]
    tei = post(url, "/tei/embed", {"inputs": TEXT, "truncate": False}, 413).json()
    assert "chunking" in tei["error"] and tei["error_type"] == "Validation"

    res = post(url, "/v1/embeddings", {"input": [TEXT, "short", TEXT]})
    assert res.headers["x-truncated-inputs"] == "2" and res.json()["usage"]["truncated"] == 2
    assert res.json()["usage"]["prompt_tokens"] == 256 * 2 + 3
    plain = post(url, "/v1/embeddings", {"input": ["short"]})
    assert "x-truncated-inputs" not in plain.headers and "truncated" not in plain.json()["usage"]
    left = post(url, "/tei/embed", {"inputs": [TEXT], "truncation_direction": "left"})
    assert left.headers["x-truncated-inputs"] == "1"
    cohere = post(url, "/v2/embed", {"texts": [TEXT, "short"], "input_type": "search_document"})
    assert cohere.headers["x-truncated-inputs"] == "1" and "1 of 2 texts" in cohere.json()["meta"]["warnings"][0]
    # chunking reads everything: nothing is cut
    chunked = post(url, "/v2/embed", {"texts": [TEXT], "chunking": True, "embedding_types": ["float", "ubinary"]})
    assert "x-truncated-inputs" not in chunked.headers and len(chunked.json()["embeddings"]["ubinary"][0]) == 48


@pytest.mark.parametrize("path,body,status,needle", [
    ("/embed", {"input": "x", "chunking": True, "late_chunking": True}, 400, "not both"),
    ("/embed", {"input": "x", "chunking": True, "output": "sparse"}, 400, "dense vectors"),
    ("/embed", {"input": "x", "late_chunking": True, "output": ["dense", "tokens"]}, 400, "dense vectors"),
    ("/embed", {"input": "x", "chunking": {"size": 300}}, 400, "larger than the window"),
    ("/embed", {"input": "x", "chunking": {"size": 2}}, 400, "leaves no room"),
    ("/embed", {"input": "x", "chunking": {"size": 100, "overlap": 98}}, 400, "must be smaller"),
    ("/embed", {"input": "x", "chunking": {"pooling": "max"}}, 422, "pooling"),
    ("/embed", {"input": "x", "chunking": {"overlap": -1}}, 422, "overlap"),
    ("/v2/embed", {"texts": ["x"], "chunking": {"pooling": "none"}}, 400, "/embed or /v1/embeddings"),
])
def test_bad_chunking_requests(url, path, body, status, needle):
    error = post(url, path, body, status).json()["error"]
    assert needle in error["message"], error


def test_chunking_with_token_ids_dimensions_and_quantized_types(url, reference):
    ids = reference.ids(TEXT)
    from_ids = post(url, "/v1/embeddings", {"input": ids, "chunking": {"pooling": "none"}}).json()["data"][0]["chunks"]
    from_text = post(url, "/v1/embeddings", {"input": TEXT, "chunking": {"pooling": "none"}}).json()["data"][0]["chunks"]
    assert [(c["start_token"], c["end_token"]) for c in from_ids] == [(c["start_token"], c["end_token"]) for c in from_text]
    assert cos(from_ids[1]["embedding"], from_text[1]["embedding"]) >= 0.999
    binary = post(url, "/embed", {"input": TEXT, "embedding_type": "ubinary",
                                  "chunking": {"pooling": "none"}}).json()["data"][0]["chunks"]
    assert [c["embedding"] for c in binary] == [
        np.packbits(np.asarray(c["embedding"]) > 0).tolist() for c in from_text]
    small = post(url, "/embed", {"input": TEXT, "dimensions": 64, "chunking": True}).json()["data"][0]["embedding"]
    assert len(small) == 64 and abs(np.linalg.norm(small) - 1) < 1e-4
    raw = post(url, "/embed", {"input": TEXT, "normalize": False, "chunking": {"pooling": "none"}}).json()
    assert abs(np.linalg.norm(raw["data"][0]["chunks"][0]["embedding"]) - 1) > 1e-3
    encoded = post(url, "/embed", {"input": TEXT, "encoding_format": "base64", "chunking": {"pooling": "none"}}).json()
    first = np.frombuffer(base64.b64decode(encoded["data"][0]["chunks"][0]["embedding"]), dtype="<f4")
    assert cos(first, from_text[0]["embedding"]) >= 0.99999


def test_token_vectors_of_an_ordinary_embedding_model(url, reference):
    texts = ["hello world", "late chunking needs token vectors"]
    got = post(url, "/tei/embed_all", {"inputs": texts}).json()
    for text, vectors in zip(texts, got):
        np.testing.assert_allclose(vectors, reference.hidden(reference.ids(text)), atol=2e-4)
    both = post(url, "/embed", {"input": texts[0], "output": ["dense", "tokens"]}).json()["data"][0]
    assert cos(both["embedding"], reference.embed(reference.ids(texts[0]))) >= 0.9999
    assert np.asarray(both["token_embeddings"]).shape == (4, 384)
    model = httpx.get(url + "/v1/models").json()["data"][0]
    assert model["outputs"] == ["dense", "tokens"] and model["pooling"] == "mean"


def test_openai_sdk_sends_chunking_in_extra_body(url, reference):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    res = client.embeddings.create(model="all-MiniLM-L6-v2", input=[TEXT],
                                   extra_body={"chunking": {"pooling": "none", "size": 128}})
    # The SDK asks for base64 unless told otherwise, and decodes `embedding` only: chunks stay base64.
    chunks = res.data[0].model_extra["chunks"]
    ids = reference.ids(TEXT)
    assert chunks[-1]["end_token"] == len(ids)
    vector = np.frombuffer(base64.b64decode(chunks[2]["embedding"]), dtype="<f4")
    assert cos(vector, reference.embed(ids[chunks[2]["start_token"]:chunks[2]["end_token"]])) >= 0.999
    late = client.embeddings.create(model="all-MiniLM-L6-v2", input=["first piece.", "second piece."],
                                    extra_body={"late_chunking": True})
    assert len(late.data) == 2 and len(late.data[0].embedding) == 384


def _small_requests(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            started = time.perf_counter()
            assert client.post("/embed", json={"input": "a small query"}).status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)


def _worker_rss(server: Any) -> float:
    """MB resident in the server's processes."""
    root = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


@pytest.fixture
def small_traffic(url: str) -> Iterator[list[float]]:
    """One-text queries one after another, from the test's start to its end."""
    stop, latencies = threading.Event(), []
    thread = threading.Thread(target=_small_requests, args=(url, stop, latencies))
    thread.start()
    time.sleep(0.3)
    yield latencies
    stop.set()
    thread.join()


def test_a_huge_input_is_refused_by_the_chunk_limit_without_blocking(url, small_traffic):
    text = long_text(100_000, seed=7)
    started = time.perf_counter()
    error = post(url, "/embed", {"input": text, "chunking": True}, 413).json()["error"]
    took = time.perf_counter() - started
    assert error["code"] == "too_many_chunks" and "MAX_CHUNKS_PER_INPUT=256" in error["message"], error
    time.sleep(0.3)
    assert took < 10 and small_traffic and max(small_traffic) < 1.5, (took, small_traffic)


def test_a_long_input_is_answered_while_small_requests_are_too(url, server):
    # One batch of windows (8 x 256 tokens: the CPU's 2,048-token budget) is what a query may wait for;
    # timed here alone, since this machine's speed varies with its neighbours' load.
    started = time.perf_counter()
    post(url, "/embed", {"input": long_text(8 * 254, seed=4), "chunking": True})
    batch_s = time.perf_counter() - started
    before = _worker_rss(server)
    text = long_text(40 * 254, seed=3)  # ~40 windows: 5 batches
    stop, latencies = threading.Event(), []
    thread = threading.Thread(target=_small_requests, args=(url, stop, latencies))
    thread.start()
    started = time.perf_counter()
    body = post(url, "/embed", {"input": text, "chunking": {"pooling": "none"}}).json()
    took = time.perf_counter() - started
    stop.set()
    thread.join()
    assert len(body["data"][0]["chunks"]) >= 36
    # Queries keep their turns: each waits for at most about one batch, not for the whole long request.
    assert len(latencies) >= 3 and np.median(latencies) < max(1.5, 1.2 * batch_s), (batch_s, took, latencies)
    # The long request spans several batches (so the queries above ran beside it), and no query waited
    # for more than a few of them.
    assert took > 2 * batch_s and max(latencies) < max(3.0, 2.5 * batch_s), (batch_s, took, latencies)
    assert _worker_rss(server) - before < 150, (before, _worker_rss(server))


def test_chunking_on_a_left_padding_last_token_model_with_a_prompt(tmp_path):
    """Tiny Qwen3-Embedding (tests/checkpoints.py): no leading special token, an end-of-text token after
    the text, left padding, last-token pooling and a query prompt; in process."""
    import asyncio

    import checkpoints

    from runners.capabilities.queries import Chunking, EmbedQuery
    from runners.capabilities.service import InferenceService
    from runners.errors import BadRequest
    from runners.settings import load_settings

    folder = checkpoints.build_qwen3_embedding(tmp_path / "tiny-Qwen3-Embedding")
    texts = ["a short one", "a much longer sentence about the river, the bridge and the old town"]

    async def run() -> None:
        service = InferenceService(load_settings({"MODEL_NAMES": str(folder), "MODEL_WARMUP": "false"}))
        await service.start()
        try:
            model = service.registry.models[0]
            assert model.token_inputs and model.pooling == "lasttoken" and model.special_frame()[0] == ()
            for input_type in (None, "query"):  # the prompt goes before each window's tokens
                plain = await service.embed(EmbedQuery(texts=texts, token_ids=None, input_type=input_type))
                both = await asyncio.gather(*[  # windows and plain texts in the same batches
                    service.embed(EmbedQuery(texts=texts, token_ids=None, input_type=input_type,
                                             chunking=Chunking(pooling="none"))),
                    service.embed(EmbedQuery(texts=texts[::-1], token_ids=None, input_type=input_type))])
                for p, c in zip(plain["data"], both[0]["data"]):
                    assert float(np.dot(p["embedding"], c["chunks"][0]["embedding"])) >= 0.99999
                assert both[0]["usage"] == plain["usage"]
            long = (await service.embed(EmbedQuery(texts=[" ".join(texts * 40)], token_ids=None, input_type="query",
                                                   chunking=Chunking(size=64, pooling="none"))))["data"][0]["chunks"]
            prompt = len(model.tokenize([model.prompts["query"]], special=False)[0])
            assert long[0]["end_token"] == 64 - 1 - prompt  # size less the end-of-text token and the prompt
            with pytest.raises(BadRequest, match="pools by lasttoken"):
                await service.embed(EmbedQuery(texts=texts, token_ids=None, late_chunking=True))
        finally:
            await service.stop()

    asyncio.run(run())
