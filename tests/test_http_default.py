"""End to end against the embedded default (MODEL_NAMES unset) with real client libraries."""

from __future__ import annotations

import base64
import concurrent.futures as cf

import cohere
import httpx
import numpy as np
import openai
import pytest

TEXTS = [
    "hello world",
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "cats",
    "A much longer passage about machine learning: embedding models map text to vectors so that texts with "
    "similar meaning end up close together, which search and retrieval-augmented generation rely on. " * 3,
]


@pytest.fixture(scope="module")
def st_model(default_model_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_model_path, device="cpu")


@pytest.fixture(scope="module")
def client(default_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused")


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_openai_sdk_float_vectors_equal_sentence_transformers(client, st_model):
    res = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    expected = st_model.encode(TEXTS, normalize_embeddings=True)
    assert [d.index for d in res.data] == list(range(len(TEXTS)))
    for got, want in zip(res.data, expected):
        assert len(got.embedding) == 384
        assert cosine(got.embedding, want) >= 0.9999
        assert abs(np.linalg.norm(got.embedding) - 1) < 1e-5


def test_usage_counts_tokenizer_tokens(client, st_model):
    res = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:3])
    # The tokens the model read: special tokens included, after truncation (API.md).
    tokens = sum(len(st_model.tokenize([t])["input_ids"][0]) for t in TEXTS[:3])
    assert res.usage.prompt_tokens == tokens == res.usage.total_tokens
    assert tokens != sum(len(t) for t in TEXTS[:3])


def test_openai_sdk_base64_equals_float(client):
    as_float = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:2])
    raw = httpx.post(client.base_url.join("embeddings").__str__(), json={"input": TEXTS[:2], "encoding_format": "base64"})
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw.json()["data"]]
    as_b64 = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:2], encoding_format="base64")
    for f, d, sdk in zip(as_float.data, decoded, as_b64.data):
        np.testing.assert_allclose(d, f.embedding, atol=1e-7)
        # Asked for base64 explicitly, the SDK hands back the string; asked for nothing, it requests
        # base64 itself and decodes (the float test above went that way).
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(sdk.embedding), dtype="<f4"), f.embedding, atol=1e-7)


def test_dimensions_truncate_and_renormalize(client):
    full = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[1]).data[0].embedding
    short = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[1], dimensions=64).data[0].embedding
    assert len(short) == 64
    want = np.asarray(full[:64]) / np.linalg.norm(full[:64])
    np.testing.assert_allclose(short, want, atol=1e-6)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="all-MiniLM-L6-v2", input="x", dimensions=385)
    assert err.value.status_code == 400
    assert "dimensions" in err.value.body["message"]


def test_token_id_inputs_are_decoded(client, st_model):
    ids = st_model.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    single = client.embeddings.create(model="all-MiniLM-L6-v2", input=ids)  # one [int] list: one text
    assert len(single.data) == 1
    by_ids = client.embeddings.create(model="all-MiniLM-L6-v2", input=[ids, ids[:1]])
    assert cosine(single.data[0].embedding, by_ids.data[0].embedding) >= 0.9999
    by_text = client.embeddings.create(model="all-MiniLM-L6-v2", input=["hello world", "hello"])
    for a, b in zip(by_ids.data, by_text.data):
        assert cosine(a.embedding, b.embedding) >= 0.9999
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=[[10**7]])
    assert "vocabulary" in err.value.body["message"]


def test_model_is_optional_and_aliases_resolve(default_server):
    for model in (None, "sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"):
        body = {"input": "hello"} | ({"model": model} if model else {})
        res = httpx.post(default_server.url + "/embed", json=body)
        assert res.status_code == 200, res.text
        assert res.json()["model"] == "all-MiniLM-L6-v2"


def test_models_route_lists_capabilities(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["all-MiniLM-L6-v2"]
    extra = models[0].model_extra
    assert extra["capabilities"] == ["embed", "rerank"]
    assert extra["rerank_via"] == "embedding-cosine"


def _cosine_ranking(st_model, query, docs):
    q = st_model.encode([query], normalize_embeddings=True)[0]
    d = st_model.encode(docs, normalize_embeddings=True)
    scores = d @ q
    return scores, sorted(range(len(docs)), key=lambda i: -scores[i])


DOCS = ["Paris is the capital of France.", "Dogs are loyal animals.", "The Louvre museum is in Paris.",
        "Berlin is in Germany."]
QUERY = "Which museum is in Paris?"


def test_cohere_v2_rerank_with_embedding_fallback(default_server, st_model):
    co = cohere.ClientV2(api_key="unused", base_url=default_server.url)
    res = co.rerank(model="all-MiniLM-L6-v2", query=QUERY, documents=DOCS, top_n=3)
    scores, order = _cosine_ranking(st_model, QUERY, DOCS)
    assert [r.index for r in res.results] == order[:3]
    for r in res.results:
        assert abs(r.relevance_score - scores[r.index]) < 1e-4


def test_native_and_v1_rerank_shapes(default_server, st_model):
    scores, order = _cosine_ranking(st_model, QUERY, DOCS)
    native = httpx.post(default_server.url + "/rerank", json={"query": QUERY, "docs": DOCS, "return_docs": True}).json()
    assert [r["index"] for r in native["results"]] == order
    assert all(r["document"] == DOCS[r["index"]] for r in native["results"])
    assert native["usage"]["total_tokens"] > 0
    v1 = httpx.post(
        default_server.url + "/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2}
    ).json()
    assert [r["index"] for r in v1["results"]] == order[:2]
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in v1["results"])
    bare = httpx.post(default_server.url + "/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 100}).json()
    assert len(bare["results"]) == len(DOCS) and "document" not in bare["results"][0]


BAD_REQUESTS = [
    ("/embed", {}, 422),
    ("/embed", {"input": []}, 400),
    ("/embed", {"input": ""}, 400),
    ("/embed", {"input": None}, 422),
    ("/embed", {"input": [1.5]}, 422),
    ("/embed", {"input": {"a": [[[[1]]]]}}, 422),
    ("/embed", {"input": "x", "dimensions": -1}, 422),
    ("/embed", {"input": "x", "dimensions": 10**9}, 400),
    ("/embed", {"input": "x", "model": "nope"}, 404),
    ("/embed", {"input": "x", "encoding_format": "int8"}, 422),
    ("/embed", {"input": [[-1]]}, 400),
    ("/v1/embeddings", {"input": "x", "model": "nope"}, 404),
    ("/v1/embeddings", {"model": "all-MiniLM-L6-v2"}, 422),
    ("/rerank", {"query": "q"}, 422),
    ("/rerank", {"query": "q", "docs": ["a"], "top_n": -3}, 422),
    ("/rerank", {"query": "q", "docs": []}, 400),
    ("/v1/rerank", {"query": "q", "documents": [{"no_text": 1}]}, 422),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422),
    ("/classify", {"input": ["x"]}, 400),
    ("/nope", {"input": "x"}, 404),
]


@pytest.mark.parametrize(("route", "body", "status"), BAD_REQUESTS)
def test_bad_requests_get_their_status_in_the_envelope(default_server, route, body, status):
    res = httpx.post(default_server.url + route, json=body)
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_invalid_json_and_invalid_utf8(default_server):
    for route in ("/v1/embeddings", "/embed"):
        for raw in (b"{bad", b'{"input": "\xff\xfe"}', b"\x00" * 10):
            res = httpx.post(default_server.url + route, content=raw, headers={"content-type": "application/json"})
            assert res.status_code in (400, 422), res.text
            assert "JSON" in res.json()["error"]["message"]


def test_a_lone_surrogate_is_the_clients_error(default_server):
    """JSON may escape half a UTF-16 pair; no tokenizer can read it: the one JSON parser of every route
    refuses it, the same 400 that names the place (a RunPod job, which runpod parses itself, meets the
    service's own check: tests/test_cost_limits.py)."""
    bodies = {
        "/v1/embeddings": b'{"input": ["fine", "bad \\ud800 text"]}',
        "/embed": b'{"input": "\\udfff"}',
        "/rerank": b'{"query": "q", "documents": ["ok", "x\\ud83d"]}',
        "/v2/rerank": b'{"model": "all-MiniLM-L6-v2", "query": "\\ud800", "documents": ["ok"]}',
    }
    for route, raw in bodies.items():
        res = httpx.post(default_server.url + route, content=raw, headers={"content-type": "application/json"})
        assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_json", (route, res.text)
        assert "hex escape at line 1 column" in res.json()["error"]["message"], res.text
    assert httpx.post(default_server.url + "/embed", json={"input": "still fine \U0001F600"}).status_code == 200


def test_good_requests_succeed_while_bad_ones_arrive(default_server):
    def good(i: int) -> int:
        return httpx.post(default_server.url + "/embed", json={"input": [f"text {i}", "another"]}, timeout=60).status_code

    def bad(i: int) -> int:
        return httpx.post(default_server.url + "/embed", json={"input": [None, i]}, timeout=60).status_code

    with cf.ThreadPoolExecutor(16) as pool:
        goods = [pool.submit(good, i) for i in range(40)]
        bads = [pool.submit(bad, i) for i in range(40)]
    assert {f.result() for f in goods} == {200}
    assert {f.result() for f in bads} == {422}


def test_health_and_metrics(default_server):
    assert httpx.get(default_server.url + "/livez").status_code == 200
    assert httpx.get(default_server.url + "/readyz").status_code == 200
    metrics = httpx.get(default_server.url + "/metrics")
    assert metrics.status_code == 200 and "bentoml" in metrics.text


def test_prometheus_metrics_of_the_service(default_server):
    httpx.post(default_server.url + "/embed", json={"input": ["one", "two", "three"]})
    httpx.post(default_server.url + "/embed", json={"input": "x", "model": "nope"})
    text = httpx.get(default_server.url + "/metrics").text
    assert 'embed_rerank_items_total{capability="embed",model="all-MiniLM-L6-v2"}' in text
    assert 'embed_rerank_tokens_total{capability="embed",model="all-MiniLM-L6-v2"}' in text
    assert 'embed_rerank_errors_total{status="404",type="invalid_request_error"}' in text
    assert 'embed_rerank_queue_depth{model="all-MiniLM-L6-v2"} 0.0' in text
    assert "embed_rerank_inference_seconds_bucket" in text and "embed_rerank_request_items_bucket" in text
    assert 'embed_rerank_batch_size_count{model="all-MiniLM-L6-v2"}' in text
