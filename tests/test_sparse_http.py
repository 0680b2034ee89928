"""Sparse and multi-vector outputs over every front door (issue: SPLADE, token embeddings, BGE-M3):
native `/embed`, `/v1/embeddings`, TEI's `/tei/embed_sparse` and `/tei/embed_all`, RunPod jobs, and the
README's Qdrant example, against a real server with tiny checkpoints of the real layouts. The formulas
themselves are checked in-process in tests/test_sparse.py."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import checkpoints
import httpx
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the cat sat on the mat.", "where is the eiffel tower? in paris, the capital of france!", "rome italy"]
WORDS = ("cat", "mat", "paris", "france", "rome", "italy", "tower")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sparse-http")
    return {
        "splade": checkpoints.build_splade(base / "tiny-splade", allowed_words=WORDS),
        "bge-m3": checkpoints.build_bge_m3(base / "tiny-bge-m3"),
        "colbert": checkpoints.build_colbert_stanford(base / "tiny-colbert"),
    }


@pytest.fixture(scope="module")
def url(start_server, folders) -> str:
    names = ";".join(str(folders[k]) for k in ("splade", "bge-m3", "colbert"))
    return start_server({"MODEL_NAMES": names, "SERVED_MODEL_NAMES": "splade;bge-m3;colbert",
                         "MAX_TOKEN_VECTORS_MB": "8"}).url


def splade_reference(folder: Path, text: str) -> dict[int, float]:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    feats = tok([text], return_tensors="pt", truncation=True)
    with torch.no_grad():
        logits = model(**feats).logits[0]
    weights = torch.log1p(torch.relu(logits)).max(dim=0).values
    nz = weights.nonzero().flatten()
    return dict(zip(nz.tolist(), weights[nz].tolist()))


def test_splade_sparse_on_native_openai_and_tei(url, folders):
    native = httpx.post(url + "/embed", json={"model": "splade", "input": TEXTS, "output": "sparse"}).json()
    openai_style = httpx.post(url + "/v1/embeddings", json={"input": TEXTS, "output": ["sparse"]}).json()
    tei = httpx.post(url + "/tei/embed_sparse", json={"inputs": TEXTS, "model": "splade"}).json()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["splade"])
    for i, text in enumerate(TEXTS):
        got = native["data"][i]["embedding"]
        assert got["indices"] == sorted(got["indices"])
        want = splade_reference(folders["splade"], text)
        assert got["indices"] == sorted(want)
        np.testing.assert_allclose(got["values"], [want[k] for k in sorted(want)], atol=1e-4)
        assert set(tok.convert_ids_to_tokens(got["indices"])) <= set(WORDS)
        assert openai_style["data"][i]["embedding"] == got
        assert [(e["index"], e["value"]) for e in tei[i]] == list(zip(got["indices"], got["values"]))
    assert native["usage"]["prompt_tokens"] == sum(len(tok(t)["input_ids"]) for t in TEXTS)


def test_bge_m3_all_outputs_from_one_request(url):
    body = httpx.post(url + "/v1/embeddings", json={"model": "bge-m3", "input": TEXTS,
                                                     "output": ["dense", "sparse", "tokens"]}).json()
    plain = httpx.post(url + "/v1/embeddings", json={"model": "bge-m3", "input": TEXTS}).json()
    sparse_only = httpx.post(url + "/embed", json={"model": "bge-m3", "input": TEXTS, "output": "sparse"}).json()
    tokens = httpx.post(url + "/tei/embed_all", json={"model": "bge-m3", "inputs": TEXTS}).json()
    for i, item in enumerate(body["data"]):
        np.testing.assert_allclose(item["embedding"], plain["data"][i]["embedding"], atol=1e-5)
        assert item["sparse_embedding"] == sparse_only["data"][i]["embedding"]
        np.testing.assert_allclose(item["token_embeddings"], tokens[i], atol=1e-5)
        vectors = np.asarray(item["token_embeddings"])
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)  # ColBERT vectors are unit length
    assert body["usage"] == plain["usage"]
    packed = httpx.post(url + "/embed", json={"model": "bge-m3", "input": TEXTS, "output": "tokens",
                                              "encoding_format": "base64"}).json()
    for i, item in enumerate(packed["data"]):
        matrix = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4").reshape(-1, 32)
        np.testing.assert_allclose(matrix, body["data"][i]["token_embeddings"], atol=1e-6)


def test_sparse_top_k_keeps_the_largest(url):
    full = httpx.post(url + "/embed", json={"model": "bge-m3", "input": TEXTS[1], "output": "sparse"}).json()
    top = httpx.post(url + "/embed", json={"model": "bge-m3", "input": TEXTS[1], "output": "sparse",
                                           "sparse_top_k": 3}).json()
    full_vec, top_vec = full["data"][0]["embedding"], top["data"][0]["embedding"]
    assert len(full_vec["indices"]) > 3 and len(top_vec["indices"]) == 3
    assert sorted(top_vec["values"]) == sorted(full_vec["values"])[-3:]
    assert top_vec["indices"] == sorted(top_vec["indices"])


def test_colbert_queries_are_expanded_documents_are_not(url):
    def vectors(input_type):
        body = {"model": "colbert", "input": "paris", "output": "tokens", "input_type": input_type}
        return np.asarray(httpx.post(url + "/embed", json=body).json()["data"][0]["embedding"])

    query, document = vectors("query"), vectors("document")
    assert query.shape[0] == 12 > document.shape[0]  # the checkpoint's query_maxlen
    assert query.shape[1] == document.shape[1] == 16


def test_models_list_outputs_and_wrong_outputs_are_400(url):
    models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
    assert models["splade"]["outputs"] == ["sparse"] and models["colbert"]["outputs"] == ["tokens"]
    assert set(models["bge-m3"]["outputs"]) == {"dense", "sparse", "tokens"}
    res = httpx.post(url + "/embed", json={"model": "colbert", "input": "x", "output": "sparse"})
    assert res.status_code == 400 and res.json()["error"]["code"] == "unsupported_capability"
    big = httpx.post(url + "/embed", json={"model": "bge-m3", "input": ["word " * 120] * 2048, "output": "tokens"},
                     timeout=60)
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_many_tokens"


def test_readme_qdrant_example_runs(url):
    readme = (ROOT / "docs" / "api.md").read_text()
    block = re.search(r"```python\n(import os\n\nimport httpx\nfrom qdrant_client.*?)```", readme, re.S).group(1)
    env = dict(os.environ, EMBED_URL=url, EMBED_MODEL="bge-m3")
    out = subprocess.run([sys.executable, "-c", block], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    hits = eval(out.stdout.strip())  # noqa: S307 - our own README's printed list
    assert len(hits) == 3 and all(isinstance(text, str) for text, _ in hits)


def test_runpod_sparse_job(tmp_path, folders):
    from test_runpod_adapter import Worker

    worker = Worker(tmp_path, {"MODEL_NAMES": str(folders["splade"]), "SERVED_MODEL_NAMES": "splade"})
    try:
        worker.wait_up(120)
        answer = worker.runsync({"input": TEXTS[:1], "output": "sparse"})
        assert answer["status"] == "COMPLETED", answer
        want = splade_reference(folders["splade"], TEXTS[0])
        got = answer["output"]["data"][0]["embedding"]
        assert got["indices"] == sorted(want)
        np.testing.assert_allclose(got["values"], [want[k] for k in sorted(want)], atol=1e-4)
    finally:
        worker.stop()


def test_colbert_reranks_by_maxsim(url):
    docs = ["paris is the capital of france", "the cat sat on the mat", "rome is in italy", "eiffel tower paris"]
    ranked = httpx.post(url + "/rerank", json={"model": "colbert", "query": "where is paris", "docs": docs}).json()

    def tokens(text, input_type):
        body = {"model": "colbert", "input": text, "output": "tokens", "input_type": input_type}
        return np.asarray(httpx.post(url + "/embed", json=body).json()["data"][0]["embedding"])

    query = tokens("where is paris", "query")
    want = [float((query @ tokens(d, "document").T).max(axis=1).mean()) for d in docs]
    got = {r["index"]: r["relevance_score"] for r in ranked["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], want, atol=1e-5)
    assert [r["index"] for r in ranked["results"]] == sorted(range(len(docs)), key=lambda i: -want[i])
    models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
    assert models["colbert"]["rerank_via"] == "colbert-maxsim" and "rerank" in models["colbert"]["capabilities"]
    assert ranked["usage"]["total_tokens"] > 0
