"""Routed models (sentence-transformers' Router: a route per task), saved by the pinned library
(tests/st_checkpoints.py), served in-process by the real service and compared with the library's
`encode_query` / `encode_document` / `encode`: a dense model (a lookup route for queries, a BERT for
documents) and an inference-free sparse one (idf weights for queries, SPLADE for documents). The route
is chosen by `input_type` or `prompt_name`, alone, batched and in mixed traffic, in-process and through a
real server in every dialect (OpenAI SDK, Cohere SDK, TEI; the RunPod job parses as /v1/embeddings)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import st_checkpoints  # noqa: E402
from test_st_formats import TEXTS, _cos, _serve, _vectors  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("routed")
    return {"dense": st_checkpoints.build_routed_dense(root / "dense"),
            "sparse": st_checkpoints.build_routed_sparse(root / "sparse")}


async def _sparse(inference, texts: list[str], **extra) -> np.ndarray:
    """Sparse vectors as dense rows of the vocabulary's width."""
    from runners.capabilities.queries import EmbedQuery

    body = await inference.embed(EmbedQuery(texts=texts, token_ids=None, model="sparse", outputs=("sparse",), **extra))
    width = next(m for m in inference.registry.models if m.name == "sparse").tokenizer.vocab_size
    rows = np.zeros((len(texts), width), dtype=np.float32)
    for row in body["data"]:
        rows[row["index"], row["embedding"]["indices"]] = row["embedding"]["values"]
    return rows


def test_routes_equal_the_library(folders):
    from sentence_transformers import SentenceTransformer, SparseEncoder

    dense = SentenceTransformer(str(folders["dense"]), device="cpu")
    sparse = SparseEncoder(str(folders["sparse"]), device="cpu")
    want = {"query": dense.encode_query(TEXTS), "document": dense.encode_document(TEXTS), None: dense.encode(TEXTS)}
    want_sparse = {"query": sparse.encode_query(TEXTS, convert_to_tensor=True).to_dense().numpy(),
                   "document": sparse.encode_document(TEXTS, convert_to_tensor=True).to_dense().numpy(),
                   None: sparse.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()}
    assert _cos(want["query"], want["document"]).max() < 0.99, "the two routes give the same vectors"

    async def calls(inference):
        out = {"kinds": {m.name: m.kind for m in inference.registry.models}}
        for task in ("query", "document", None):
            out[task] = {
                "alone": np.concatenate([await _vectors(inference, "dense", [t], input_type=task) for t in TEXTS]),
                "batched": await _vectors(inference, "dense", TEXTS, input_type=task),
                "sparse": await _sparse(inference, TEXTS, input_type=task),
            }
            if task is not None:
                out[task]["prompt_name"] = await _vectors(inference, "dense", TEXTS, prompt_name=task)
                out[task]["sparse_prompt_name"] = await _sparse(inference, TEXTS, prompt_name=task)
        # Mixed traffic: both routes of both models at once, so batches hold items of several routes.
        jobs = [(task, i) for i in range(0, 6, 2) for task in ("query", "document", None)]
        out["mixed"] = await asyncio.gather(*[_vectors(inference, "dense", TEXTS[i:i + 2], input_type=t) for t, i in jobs])
        out["mixed_sparse"] = await asyncio.gather(*[_sparse(inference, TEXTS[i:i + 2], input_type=t) for t, i in jobs])
        out["jobs"] = jobs
        return out

    got = _serve(folders, calls)
    assert got["kinds"] == {"dense": "routed", "sparse": "routed"}
    for task in ("query", "document", None):
        for key in ("alone", "batched", "prompt_name"):
            if key in got[task]:
                assert _cos(got[task][key], want[task]).min() >= 0.9999, (task, key)
        for key in ("sparse", "sparse_prompt_name"):
            if key in got[task]:
                assert np.abs(got[task][key] - want_sparse[task]).max() <= 1e-5, (task, key)
    for (task, i), vectors, sparse_rows in zip(got["jobs"], got["mixed"], got["mixed_sparse"]):
        assert _cos(vectors, want[task][i:i + 2]).min() >= 0.9999, (task, i)
        assert np.abs(sparse_rows - want_sparse[task][i:i + 2]).max() <= 1e-5, (task, i)


def test_an_unknown_route_is_a_400_naming_the_routes(folders):
    from runners.capabilities.queries import EmbedQuery
    from runners.errors import BadRequest

    async def calls(inference):
        with pytest.raises(BadRequest) as failure:
            await inference.embed(EmbedQuery(texts=["x"], token_ids=None, model="dense", input_type="summary"))
        return str(failure.value)

    message = _serve({"dense": folders["dense"]}, calls)
    assert "'summary'" in message and "query, document" in message


def test_every_dialect_carries_the_route():
    """OpenAI's extra field and the RunPod job (EmbeddingRequest), Cohere's input_type, TEI's prompt_name:
    each reaches the service's query as the task that picks the route (route names included)."""
    from runners.api.schemas import CohereEmbedRequest, EmbeddingRequest
    from runners.api.tei_schemas import TeiEmbedRequest

    assert EmbeddingRequest(input=["x"], input_type="query").to_query().input_type == "query"
    assert EmbeddingRequest(input=["x"], input_type="document").to_query().input_type == "document"
    assert EmbeddingRequest(input=["x"], input_type="summary").to_query().input_type == "summary"
    assert CohereEmbedRequest(texts=["x"], input_type="search_query").to_query().input_type == "query"
    assert CohereEmbedRequest(texts=["x"], input_type="search_document").to_query().input_type == "document"
    assert TeiEmbedRequest(inputs=["x"], prompt_name="query").to_query().prompt_name == "query"


def test_the_route_over_http_in_every_dialect(start_server, folders, tmp_path_factory):
    """A real server: the OpenAI SDK's extra_body input_type, the Cohere SDK's input_type, TEI's prompt_name
    and a route name pick the route; an LLM reranker saved by the library answers /v1/rerank as predict."""
    import cohere
    import httpx
    import openai
    from sentence_transformers import CrossEncoder, SentenceTransformer

    reranker = st_checkpoints.build_llm_reranker(tmp_path_factory.mktemp("llm") / "mxbai", "mxbai", seed=1)
    server = start_server({"MODEL_NAMES": f"{folders['dense']};{reranker}", "SERVED_MODEL_NAMES": "dense;llm"})
    st = SentenceTransformer(str(folders["dense"]), device="cpu")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    for task, want in (("query", st.encode_query(TEXTS)), ("document", st.encode_document(TEXTS))):
        got = client.embeddings.create(model="dense", input=TEXTS, extra_body={"input_type": task}).data
        assert _cos([d.embedding for d in got], want).min() >= 0.9999, task
        tei = httpx.post(server.url + "/tei/embed", json={"inputs": TEXTS, "prompt_name": task}, timeout=60).json()
        assert _cos(tei, want).min() >= 0.9999, task
    co = cohere.ClientV2(api_key="unused", base_url=server.url)
    cohere_query = co.embed(model="dense", texts=TEXTS, input_type="search_query", embedding_types=["float"])
    assert _cos(cohere_query.embeddings.float_, st.encode_query(TEXTS)).min() >= 0.9999
    unknown = httpx.post(server.url + "/v1/embeddings", json={"model": "dense", "input": "x", "input_type": "summary"})
    assert unknown.status_code == 400 and "query, document" in unknown.json()["error"]["message"]
    docs = TEXTS[:4]
    body = httpx.post(server.url + "/v1/rerank", json={"model": "llm", "query": "where is paris?", "documents": docs},
                      timeout=60).json()
    scores = [r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])]
    want = CrossEncoder(str(reranker), device="cpu").predict([("where is paris?", d) for d in docs])
    assert np.allclose(scores, want, atol=1e-4)
