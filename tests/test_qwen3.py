"""Qwen3-Reranker and Qwen3-Embedding served as QWEN3.md prescribes, checked against the models
computed directly (tiny random checkpoints built by the tests, real loading code)."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

from runners.models.qwen3 import DEFAULT_TASK, RERANK_PREFIX, RERANK_SUFFIX

QUERY = "what is the capital of france"
DOCS = ["paris", "The capital of France is Paris, a city on the river.\n\n  ",
        "berlin is the capital of germany and a large city " * 6, "  yes no  "]


def reference_scores(path, query: str, docs: list[str], instruction: str | None) -> tuple[np.ndarray, np.ndarray]:
    """softmax([logit_no, logit_yes])[1] from the full LM head, one prompt at a time (no padding)."""
    tok = AutoTokenizer.from_pretrained(path)
    model = Qwen3ForCausalLM.from_pretrained(path).eval()
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    prefix = tok(RERANK_PREFIX, add_special_tokens=False)["input_ids"]
    suffix = tok(RERANK_SUFFIX, add_special_tokens=False)["input_ids"]
    probs, diffs = [], []
    for doc in docs:
        body = f"<Instruct>: {instruction or DEFAULT_TASK}\n<Query>: {query}\n<Document>: {doc}"
        ids = prefix + tok(body, add_special_tokens=False)["input_ids"] + suffix
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        pair = torch.stack([logits[no], logits[yes]]).double()
        probs.append(torch.softmax(pair, 0)[1].item())
        diffs.append((pair[1] - pair[0]).item())
    return np.array(probs), np.array(diffs)


@pytest.mark.parametrize("instruction", [None, "Given a question, find the passage that answers it"])
@pytest.mark.parametrize("model", ["qwen3-reranker", "qwen3-reranker-seq-cls"])
def test_reranker_scores_equal_the_yes_no_formula(models_server, tiny_models, model, instruction):
    probs, diffs = reference_scores(tiny_models["qwen3-reranker"], QUERY, DOCS, instruction)
    body = {"model": model, "query": QUERY, "documents": DOCS} | ({"instruction": instruction} if instruction else {})
    res = httpx.post(models_server.url + "/rerank", json=body).json()
    assert [r["index"] for r in res["results"]] == sorted(range(len(DOCS)), key=lambda i: -probs[i])
    for r in res["results"]:
        assert abs(r["relevance_score"] - probs[r["index"]]) < 1e-4
    raw = httpx.post(models_server.url + "/rerank", json=body | {"raw_scores": True}).json()
    for r in raw["results"]:
        assert abs(r["relevance_score"] - diffs[r["index"]]) < 1e-3


def test_instruction_changes_reranker_scores(models_server):
    url = models_server.url + "/rerank"
    plain = httpx.post(url, json={"model": "qwen3-reranker", "query": QUERY, "docs": DOCS[:2]}).json()
    other = httpx.post(url, json={"model": "qwen3-reranker", "query": QUERY, "docs": DOCS[:2],
                                  "instruction": "Judge the documents by their length"}).json()
    assert {r["index"]: r["relevance_score"] for r in plain["results"]} != {
        r["index"]: r["relevance_score"] for r in other["results"]}


EMB_TEXTS = ["paris", "the capital of france is paris", "a much longer text about the tower and the museum " * 5]


@pytest.fixture(scope="module")
def st_qwen(tiny_models):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_models["qwen3-embedding"]), device="cpu")


def cosines(got, want) -> list[float]:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return list((got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1))


def test_embedding_queries_get_the_query_prompt_documents_none(models_server, st_qwen):
    client = openai.OpenAI(base_url=models_server.url + "/v1", api_key="unused")
    queries = client.embeddings.create(model="qwen3-embedding", input=EMB_TEXTS, extra_body={"input_type": "query"})
    docs = client.embeddings.create(model="qwen3-embedding", input=EMB_TEXTS)
    want_q = st_qwen.encode(EMB_TEXTS, prompt_name="query", batch_size=8)
    want_d = st_qwen.encode(EMB_TEXTS, batch_size=8)
    assert min(cosines([d.embedding for d in queries.data], want_q)) >= 0.9999
    assert min(cosines([d.embedding for d in docs.data], want_d)) >= 0.9999
    assert max(cosines(want_q, want_d)) < 0.999, "the prompt must change the vectors"


def test_embedding_instruction_format_is_exact(models_server, st_qwen):
    task = "Given a claim, find documents that refute it"
    res = httpx.post(models_server.url + "/embed",
                     json={"model": "qwen3-embedding", "input": EMB_TEXTS, "instruction": task}).json()
    want = st_qwen.encode(EMB_TEXTS, prompt=f"Instruct: {task}\nQuery:")
    assert min(cosines([d["embedding"] for d in res["data"]], want)) >= 0.9999


def test_left_padding_mixed_lengths_in_one_batch(models_server, st_qwen):
    # One request per text and one request with all of them: batches mix lengths either way.
    url = models_server.url + "/embed"
    together = httpx.post(url, json={"model": "qwen3-embedding", "input": EMB_TEXTS}).json()["data"]
    alone = [httpx.post(url, json={"model": "qwen3-embedding", "input": t}).json()["data"][0] for t in EMB_TEXTS]
    assert min(cosines([d["embedding"] for d in together], [d["embedding"] for d in alone])) >= 0.9999


def test_matryoshka_dimensions_renormalize(models_server):
    res = httpx.post(models_server.url + "/embed",
                     json={"model": "qwen3-embedding", "input": "paris", "dimensions": 8}).json()
    vec = np.asarray(res["data"][0]["embedding"])
    assert vec.shape == (8,) and abs(np.linalg.norm(vec) - 1) < 1e-6
