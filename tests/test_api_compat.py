"""The other APIs on the same server, over raw HTTP (their client libraries: tests/test_clients.py):
TEI's shapes and errors under /tei, Cohere's /v2/embed, quantized outputs, /tokenize, exact usage,
and framework statuses in the error envelope."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

TEXTS = ["hello world", "The Eiffel Tower is in Paris.", "cats and dogs",
         "a long passage about rivers, museums and towers in old cities " * 40]


@pytest.fixture(scope="module")
def url(default_server) -> str:
    return default_server.url


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def openai_vectors(url: str, texts: list[str], **extra) -> np.ndarray:
    body = httpx.post(url + "/v1/embeddings", json={"input": texts, **extra}).json()
    return np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)


def test_usage_is_the_tokens_the_model_read(url, tokenizer):
    # Special tokens included and the long text counted at the model's window (256), not its length.
    read = sum(len(tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in TEXTS)
    assert len(tokenizer(TEXTS[-1])["input_ids"]) > 256
    for route in ("/v1/embeddings", "/embed"):
        usage = httpx.post(url + route, json={"input": TEXTS}).json()["usage"]
        assert usage == {"prompt_tokens": read, "total_tokens": read, "truncated": 1}  # the long text was cut
    meta = httpx.post(url + "/v2/embed", json={"texts": TEXTS, "input_type": "search_document"}).json()["meta"]
    assert meta["billed_units"]["input_tokens"] == read


def test_tei_embed_is_a_bare_list_equal_to_openai(url):
    got = httpx.post(url + "/tei/embed", json={"inputs": TEXTS[:3]})
    assert got.status_code == 200
    np.testing.assert_allclose(np.asarray(got.json()), openai_vectors(url, TEXTS[:3]), atol=1e-6)
    single = httpx.post(url + "/tei/embed", json={"inputs": "hello world", "normalize": False, "dimensions": 8}).json()
    assert len(single) == 1 and len(single[0]) == 8
    # The root route answers as the served model's kind: embeddings here.
    root = httpx.post(url + "/tei", json={"inputs": "hello world"}).json()
    np.testing.assert_allclose(root, openai_vectors(url, ["hello world"]), atol=1e-6)


def test_tei_truncation_left_reads_the_end(url, tokenizer):
    long = " ".join(f"w{i}" for i in range(400)) + " the end is about paris"
    right, left = (np.asarray(httpx.post(url + "/tei/embed", json={"inputs": long, "truncation_direction": d}).json()[0])
                   for d in ("right", "left"))
    ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    tail = tokenizer.decode(ids[len(ids) - 254:])
    np.testing.assert_allclose(left, openai_vectors(url, [tail])[0], atol=1e-5)
    assert float(left @ right) < 0.99
    refused = httpx.post(url + "/tei/embed", json={"inputs": long, "truncate": False})
    assert refused.status_code == 413 and refused.json()["error_type"] == "Validation"


def test_tei_rerank_tokenize_decode_info_health(url, tokenizer):
    ranks = httpx.post(url + "/tei/rerank", json={"query": "where is the eiffel tower", "texts": TEXTS[:3],
                                                  "return_text": True}).json()
    native = httpx.post(url + "/rerank", json={"query": "where is the eiffel tower", "docs": TEXTS[:3]}).json()
    assert [r["index"] for r in ranks] == [r["index"] for r in native["results"]]
    assert all(r["text"] == TEXTS[r["index"]] for r in ranks)
    [tokens] = httpx.post(url + "/tei/tokenize", json={"inputs": "hello world"}).json()
    assert [t["id"] for t in tokens] == tokenizer("hello world")["input_ids"]
    assert tokens[0] == {"id": tokenizer.cls_token_id, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert tokens[1] == {"id": tokens[1]["id"], "text": "hello", "special": False, "start": 0, "stop": 5}
    assert httpx.post(url + "/tei/decode", json={"ids": [t["id"] for t in tokens]}).json() == ["hello world"]
    info = httpx.get(url + "/tei/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_input_length"] == 256
    assert httpx.get(url + "/tei/health").status_code == 200


@pytest.mark.parametrize("path, body, status, error_type", [
    ("/tei/embed", {"inputs": []}, 400, "Empty"),
    ("/tei/embed", {"input": "typo in the field name"}, 422, "Validation"),
    ("/tei/embed", {"inputs": "x", "prompt_name": "nope"}, 422, "Validation"),
    ("/tei/rerank", {"query": "q", "texts": []}, 400, "Empty"),
    ("/tei/predict", {"inputs": "x"}, 422, "Validation"),  # no classifier served here
    ("/tei/nowhere", {"inputs": "x"}, 404, "Validation"),
])
def test_tei_errors_have_tei_shape(url, path, body, status, error_type):
    res = httpx.post(url + path, json=body)
    assert res.status_code == status, res.text
    assert set(res.json()) == {"error", "error_type"} and res.json()["error_type"] == error_type


def test_cohere_v2_embed_types_and_dimensions(url):
    # The first int8/uint8 request of a model embeds the calibration corpus (seconds on a CPU).
    body = httpx.post(url + "/v2/embed", timeout=120, json={
        "model": "all-MiniLM-L6-v2", "texts": TEXTS[:3], "input_type": "search_query",
        "embedding_types": ["float", "int8", "uint8", "binary", "ubinary"], "output_dimension": 128}).json()
    floats = np.asarray(body["embeddings"]["float"], dtype=np.float32)
    np.testing.assert_allclose(floats, openai_vectors(url, TEXTS[:3], dimensions=128), atol=1e-6)
    ubinary = np.asarray(body["embeddings"]["ubinary"])
    assert (ubinary == np.packbits(floats > 0, axis=-1)).all() and ubinary.shape == (3, 16)
    assert (np.asarray(body["embeddings"]["binary"]) == ubinary - 128).all()
    int8, uint8 = np.asarray(body["embeddings"]["int8"]), np.asarray(body["embeddings"]["uint8"])
    assert int8.min() >= -128 and int8.max() <= 127 and (uint8 == int8 + 128).all()
    assert body["texts"] == TEXTS[:3] and body["meta"]["api_version"]["version"] == "2"


def test_quantized_on_openai_and_native_routes(url):
    floats = openai_vectors(url, TEXTS[:2])
    for route in ("/v1/embeddings", "/embed"):
        ub = httpx.post(url + route, json={"input": TEXTS[:2], "embedding_type": "ubinary"}).json()["data"]
        assert [d["embedding"] for d in ub] == np.packbits(floats > 0, axis=-1).tolist()
        as_b64 = httpx.post(url + route, json={"input": TEXTS[:2], "embedding_type": "int8",
                                               "encoding_format": "base64"}).json()["data"]
        as_list = httpx.post(url + route, json={"input": TEXTS[:2], "embedding_type": "int8"}).json()["data"]
        for b, lst in zip(as_b64, as_list):
            assert np.frombuffer(base64.b64decode(b["embedding"]), dtype=np.int8).tolist() == lst["embedding"]
    bad = httpx.post(url + "/v1/embeddings", json={"input": "x", "embedding_type": "int4"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "embedding_type"


def test_tokenize_counts(url, tokenizer):
    body = httpx.post(url + "/tokenize", json={"input": TEXTS[:1] + TEXTS[-1:]}).json()
    first, long = body["data"]
    assert first["ids"] == tokenizer(TEXTS[0])["input_ids"] and first["count"] == first["count_with_special"] == 4
    assert first["count_without_special"] == 2 and not first["truncated"]
    assert long["truncated"] and body["max_tokens"] == 256
    bare = httpx.post(url + "/tokenize", json={"input": "hello world", "add_special_tokens": False}).json()
    assert bare["data"][0]["ids"] == tokenizer("hello world", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("method, path, headers, status, code", [
    ("GET", "/embed", {}, 405, "method_not_allowed"),
    ("GET", "/v1/embeddings", {}, 405, "method_not_allowed"),
    ("PUT", "/v2/embed", {}, 405, "method_not_allowed"),
])
def test_framework_statuses_are_invalid_request_errors(url, method, path, headers, status, code):
    res = httpx.request(method, url + path, headers=headers)
    assert res.status_code == status
    assert res.json()["error"]["type"] == "invalid_request_error" and res.json()["error"]["code"] == code


def test_wrong_content_type_is_a_client_error(url):
    # (BentoML's native routes read form bodies as their fields, so /embed answers those.)
    for route in ("/v1/embeddings", "/tei/embed"):
        res = httpx.post(url + route, content=b"input=hello", headers={"content-type": "application/x-www-form-urlencoded"})
        assert 400 <= res.status_code < 500, (route, res.status_code, res.text)
        err = res.json()["error"]
        assert (err["type"] == "invalid_request_error") if isinstance(err, dict) else res.json()["error_type"] == "Validation"


def test_normalize_false_gives_the_raw_pooled_vector(url, default_model_path):
    # all-MiniLM-L6-v2 ends with a Normalize module; `normalize: false` must still mean what it says (TEI's too).
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_model_path, device="cpu")
    raw = model.encode(TEXTS[:2], output_value="sentence_embedding", normalize_embeddings=False)
    without_normalize = SentenceTransformer(modules=list(model)[:-1], device="cpu").encode(TEXTS[:2])
    got = httpx.post(url + "/embed", json={"input": TEXTS[:2], "normalize": False}).json()["data"]
    np.testing.assert_allclose([d["embedding"] for d in got], without_normalize, atol=1e-5)
    assert abs(np.linalg.norm(got[0]["embedding"]) - 1) > 1e-3
    tei = httpx.post(url + "/tei/embed", json={"inputs": TEXTS[:2], "normalize": False}).json()
    np.testing.assert_allclose(tei, without_normalize, atol=1e-5)
    np.testing.assert_allclose(openai_vectors(url, TEXTS[:2]), raw, atol=1e-5)  # the default still normalizes


def test_tei_predict_and_rerank_with_a_classifier_and_a_cross_encoder(models_server):
    url = models_server.url
    native = httpx.post(url + "/classify", json={"model": "classifier", "input": ["good movie", "bad movie"]}).json()
    single = httpx.post(url + "/tei/predict", json={"model": "classifier", "inputs": "good movie"}).json()
    batch = httpx.post(url + "/tei/predict", json={"model": "classifier", "inputs": [["good movie"], ["bad movie"]]}).json()

    def rounded(rows):  # batch composition moves the last float digits
        return [[(p["label"], round(p["score"], 5)) for p in row] for row in rows]

    assert rounded([single]) == rounded(native["data"][:1]) and rounded(batch) == rounded(native["data"])
    assert len(single) == 3
    pair = httpx.post(url + "/tei/predict", json={"model": "classifier", "inputs": ["a", "b"]})
    assert pair.status_code == 422 and "/tei/rerank" in pair.json()["error"]
    ranks = httpx.post(url + "/tei/rerank", json={"query": "eiffel tower", "texts": ["paris", "cats", "tower"],
                                                  "raw_scores": True}).json()
    native_ranks = httpx.post(url + "/rerank", json={"model": "cross-encoder", "query": "eiffel tower",
                                                     "docs": ["paris", "cats", "tower"], "raw_scores": True}).json()
    assert [(r["index"], round(r["score"], 5)) for r in ranks] == \
        [(r["index"], round(r["relevance_score"], 5)) for r in native_ranks["results"]]
    info = httpx.get(url + "/tei/info", params={"model": "cross-encoder"}).json()
    assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
