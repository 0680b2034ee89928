"""Several models in one process: routing, cross-encoder rerank and classification checked
against scores computed straight from transformers."""

from __future__ import annotations

import cohere
import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

QUERY = "where is the eiffel tower"
DOCS = ["the eiffel tower is in paris france", "cats sat on the mat", "berlin is in germany",
        "a long text about the river and the museum and the tower in the city of paris " * 3]


@pytest.fixture(scope="module")
def client(models_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=models_server.url + "/v1", api_key="unused")


def direct_logits(path, pairs=None, texts=None) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if pairs is not None:
        feats = tok([p[0] for p in pairs], [p[1] for p in pairs], padding=True, truncation="longest_first",
                    return_tensors="pt")
    else:
        feats = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**feats).logits.float().numpy()


def test_routing_by_name(client):
    minilm = client.embeddings.create(model="minilm", input="hello").data[0].embedding
    qwen = client.embeddings.create(model="qwen3-embedding", input="hello").data[0].embedding
    assert (len(minilm), len(qwen)) == (384, 32)


def test_routing_by_capability(models_server):
    url = models_server.url
    assert httpx.post(url + "/embed", json={"input": "x"}).json()["model"] == "minilm"
    assert httpx.post(url + "/rerank", json={"query": "q", "docs": ["a"]}).json()["model"] == "cross-encoder"
    assert httpx.post(url + "/classify", json={"input": ["x"]}).json()["model"] == "classifier"


def test_unknown_model_is_404_and_wrong_capability_400(client, models_server):
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert "minilm" in err.value.body["message"]
    res = httpx.post(models_server.url + "/embed", json={"input": "x", "model": "cross-encoder"})
    assert res.status_code == 400 and res.json()["error"]["code"] == "unsupported_capability"


def test_models_lists_every_model(client):
    by_id = {m.id: m.model_extra for m in client.models.list().data}
    assert list(by_id) == ["minilm", "cross-encoder", "classifier", "qwen3-reranker", "qwen3-reranker-seq-cls",
                           "qwen3-embedding"]
    assert by_id["cross-encoder"]["rerank_via"] == "cross-encoder"
    assert by_id["qwen3-reranker"]["rerank_via"] == "qwen3-yes-no"
    assert by_id["classifier"]["labels"] == ["negative", "neutral", "positive"]
    assert by_id["minilm"]["batch_size"] == 16 and by_id["qwen3-embedding"]["batch_size"] == 8


def test_cross_encoder_scores_order_and_fields(models_server, tiny_models):
    logits = direct_logits(tiny_models["cross-encoder"], pairs=[(QUERY, d) for d in DOCS])[:, 0]
    probs = 1 / (1 + np.exp(-logits))
    order = sorted(range(len(DOCS)), key=lambda i: -probs[i])
    assert len(set(np.round(probs, 4))) == len(DOCS), "tiny model gives ties; the order check would be weak"
    url = models_server.url
    native = httpx.post(url + "/rerank", json={"model": "cross-encoder", "query": QUERY, "docs": DOCS,
                                               "return_docs": True, "top_n": 3}).json()
    assert [r["index"] for r in native["results"]] == order[:3]
    for r in native["results"]:
        assert abs(r["relevance_score"] - probs[r["index"]]) < 1e-4
        assert r["document"] == DOCS[r["index"]]
    raw = httpx.post(url + "/v1/rerank", json={"model": "cross-encoder", "query": QUERY, "documents": DOCS,
                                               "raw_scores": True, "return_documents": False}).json()
    assert [r["index"] for r in raw["results"]] == order
    for r in raw["results"]:
        assert abs(r["relevance_score"] - logits[r["index"]]) < 1e-4 and "document" not in r
    v1 = httpx.post(url + "/v1/rerank", json={"model": "cross-encoder", "query": QUERY,
                                              "documents": [{"text": d} for d in DOCS]}).json()
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in v1["results"])


def test_cohere_sdk_v2_rerank_cross_encoder(models_server, tiny_models):
    logits = direct_logits(tiny_models["cross-encoder"], pairs=[(QUERY, d) for d in DOCS])[:, 0]
    probs = 1 / (1 + np.exp(-logits))
    co = cohere.ClientV2(api_key="unused", base_url=models_server.url)
    res = co.rerank(model="cross-encoder", query=QUERY, documents=DOCS, top_n=2)
    assert [r.index for r in res.results] == sorted(range(len(DOCS)), key=lambda i: -probs[i])[:2]
    assert all(abs(r.relevance_score - probs[r.index]) < 1e-4 for r in res.results)


def test_classify_probabilities_and_raw_scores(models_server, tiny_models):
    texts = ["good fast model", "bad slow car"]
    logits = direct_logits(tiny_models["classifier"], texts=texts)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    res = httpx.post(models_server.url + "/classify", json={"input": texts}).json()
    raw = httpx.post(models_server.url + "/classify", json={"input": texts, "raw_scores": True}).json()
    labels = ["negative", "neutral", "positive"]
    for row, want, raw_row, want_raw in zip(res["data"], probs, raw["data"], logits):
        got = {x["label"]: x["score"] for x in row}
        assert all(abs(got[label] - want[i]) < 1e-4 for i, label in enumerate(labels))
        assert row[0]["score"] == max(got.values())
        got_raw = {x["label"]: x["score"] for x in raw_row}
        assert all(abs(got_raw[label] - want_raw[i]) < 1e-4 for i, label in enumerate(labels))


def test_v2_max_tokens_per_doc_truncates_documents(models_server, tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["cross-encoder"])
    cut = [tok.decode(tok(d, add_special_tokens=False)["input_ids"][:3]) for d in DOCS]
    logits = direct_logits(tiny_models["cross-encoder"], pairs=[(QUERY, d) for d in cut])[:, 0]
    probs = 1 / (1 + np.exp(-logits))
    res = httpx.post(models_server.url + "/v2/rerank", json={"model": "cross-encoder", "query": QUERY,
                                                             "documents": DOCS, "max_tokens_per_doc": 3}).json()
    assert [r["index"] for r in res["results"]] == sorted(range(len(DOCS)), key=lambda i: -probs[i])
    assert all(abs(r["relevance_score"] - probs[r["index"]]) < 1e-4 for r in res["results"])
