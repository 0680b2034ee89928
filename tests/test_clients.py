"""Popular client libraries against a real `bentoml serve`, each changed only in its base URL (and the
served model name where the client has a model field): TEI clients at `<server>/tei`, OpenAI- and
Infinity-style clients at `<server>/v1`, Cohere's SDK at `<server>`. Every vector is checked against
`/v1/embeddings` (or `/embed`) for the same text, and every ranking against `/rerank`."""

from __future__ import annotations

import cohere
import httpx
import numpy as np
import pytest

TEXTS = ["hello world", "the eiffel tower is in paris", "embedding servers answer quickly"]
QUERY = "where is the eiffel tower"
DOCS = ["the eiffel tower is in paris france", "cats sat on the mat", "berlin is in germany",
        "a tower of books on the desk"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def server(start_server, tiny_models, default_model_path):
    names = f"{default_model_path};{tiny_models['cross-encoder']}"
    return start_server({"MODEL_NAMES": names, "SERVED_MODEL_NAMES": "minilm;cross-encoder"})


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


def ref_embed(url: str, texts: list[str], **extra) -> np.ndarray:
    res = httpx.post(url + "/v1/embeddings", json={"model": "minilm", "input": texts, **extra}, timeout=30)
    res.raise_for_status()
    return np.array([d["embedding"] for d in res.json()["data"]], dtype=np.float32)


def ref_scores(url: str, query: str, docs: list[str]) -> dict[int, float]:
    """Cross-encoder score of each document, by its position in `docs`."""
    res = httpx.post(url + "/rerank", json={"model": "cross-encoder", "query": query, "docs": docs}, timeout=30)
    res.raise_for_status()
    return {r["index"]: r["relevance_score"] for r in res.json()["results"]}


def assert_ranking(url: str, got: list[tuple[int, float]], query: str = QUERY, docs: list[str] = DOCS,
                   top_n: int | None = None) -> None:
    """`got` = (document position, score) in the client's order: the same scores as `/rerank`, best first."""
    ref = ref_scores(url, query, docs)
    order = sorted(ref, key=lambda i: -ref[i])
    assert [i for i, _ in got] == (order[:top_n] if top_n else order)
    assert np.allclose([s for _, s in got], [ref[i] for i, _ in got], atol=ATOL)


# --- Hugging Face TEI clients, base URL <server>/tei ---------------------------------------------------


def test_hf_inference_client_feature_extraction(url):
    from huggingface_hub import InferenceClient

    vec = InferenceClient(base_url=url + "/tei").feature_extraction("hello world")
    assert vec.dtype == np.float32
    assert np.allclose(vec.reshape(-1), ref_embed(url, ["hello world"])[0], atol=ATOL)


def test_llama_index_text_embeddings_inference(url):
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    emb = TextEmbeddingsInference(model_name="minilm", base_url=url + "/tei")
    assert np.allclose(emb.get_text_embedding_batch(TEXTS), ref_embed(url, TEXTS), atol=ATOL)
    assert np.allclose(emb.get_query_embedding(QUERY), ref_embed(url, [QUERY])[0], atol=ATOL)


def test_langchain_huggingface_endpoint_embeddings(url):
    from langchain_huggingface import HuggingFaceEndpointEmbeddings

    emb = HuggingFaceEndpointEmbeddings(model=url + "/tei")
    assert np.allclose(emb.embed_documents(TEXTS), ref_embed(url, TEXTS), atol=ATOL)
    assert np.allclose(emb.embed_query(QUERY), ref_embed(url, [QUERY])[0], atol=ATOL)


def test_haystack_tei_text_embedder(url):
    from haystack_integrations.components.embedders.huggingface_api import HuggingFaceAPITextEmbedder

    embedder = HuggingFaceAPITextEmbedder(api_type="text_embeddings_inference", api_params={"url": url + "/tei"})
    got = np.array(embedder.run(text="hello world")["embedding"])
    # Haystack sends TEI's `normalize: false` by default: the raw pooled vector, as `/embed` gives it.
    raw = httpx.post(url + "/embed", json={"model": "minilm", "input": "hello world", "normalize": False}).json()
    assert np.allclose(got, raw["data"][0]["embedding"], atol=ATOL)
    assert np.allclose(got / np.linalg.norm(got), ref_embed(url, ["hello world"])[0], atol=ATOL)


def test_haystack_tei_ranker(url):
    # HuggingFaceTEIRanker joins its URL with the absolute path "/rerank" (urljoin), so whatever path the
    # base URL has is dropped: it posts TEI's rerank body to `<server>/rerank`.
    from haystack import Document
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    ranker = HuggingFaceTEIRanker(url=url + "/tei")
    docs = ranker.run(query=QUERY, documents=[Document(content=d) for d in DOCS])["documents"]
    assert_ranking(url, [(DOCS.index(d.content), d.score) for d in docs])


def test_llama_index_tei_rerank(url):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    rerank = TextEmbeddingInference(base_url=url + "/tei", top_n=3)
    nodes = rerank.postprocess_nodes([NodeWithScore(node=TextNode(text=d)) for d in DOCS],
                                     query_bundle=QueryBundle(QUERY))
    assert_ranking(url, [(DOCS.index(n.node.text), n.score) for n in nodes], top_n=3)


# --- Cohere SDK, base URL <server> ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def co(url) -> cohere.ClientV2:
    return cohere.ClientV2(api_key="unused", base_url=url)


def test_cohere_v2_embed_types(url, co):
    res = co.embed(model="minilm", texts=TEXTS, input_type="search_document",
                   embedding_types=["float", "int8", "ubinary", "binary"])
    ref = ref_embed(url, TEXTS, input_type="search_document")
    assert isinstance(res.id, str)
    assert np.allclose(res.embeddings.float_, ref, atol=ATOL)
    ubinary = np.array(res.embeddings.ubinary)
    assert ubinary.shape == (len(TEXTS), ref.shape[1] // 8)
    assert (ubinary == np.packbits(ref > 0, axis=-1)).all()
    assert (np.array(res.embeddings.binary) == ubinary.astype(np.int16) - 128).all()
    int8 = np.array(res.embeddings.int8)
    assert int8.shape == ref.shape and int8.min() >= -128 and int8.max() <= 127
    same = httpx.post(url + "/embed", json={"model": "minilm", "input": TEXTS, "embedding_type": "int8"}).json()
    assert (int8 == np.array([d["embedding"] for d in same["data"]])).all()
    assert res.embeddings.uint8 is None  # only the types asked for


def test_cohere_v2_embed_output_dimension(url, co):
    res = co.embed(model="minilm", texts=TEXTS, input_type="search_query", output_dimension=128,
                   embedding_types=["float"])
    assert np.allclose(res.embeddings.float_, ref_embed(url, TEXTS, dimensions=128, input_type="search_query"),
                       atol=ATOL)


def test_cohere_v2_rerank(url, co):
    res = co.rerank(model="cross-encoder", query=QUERY, documents=DOCS, top_n=3)
    assert_ranking(url, [(r.index, r.relevance_score) for r in res.results], top_n=3)


def test_langchain_cohere_rerank(url):
    # langchain-cohere cannot be installed beside cohere 7 (it wants cohere<6): LangChain's own
    # CohereRerank (langchain-classic) with a cohere.Client at our base URL posts Cohere's /v1/rerank.
    from langchain_classic.retrievers.document_compressors import CohereRerank
    from langchain_core.documents import Document

    rerank = CohereRerank(client=cohere.Client(api_key="unused", base_url=url), model="cross-encoder", top_n=3)
    docs = rerank.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    assert_ranking(url, [(DOCS.index(d.page_content), d.metadata["relevance_score"]) for d in docs], top_n=3)


# --- OpenAI- and Infinity-style clients, base URL <server>/v1 ---------------------------------------------


def test_infinity_client(url):
    # infinity_client pins httpx<0.28; it is installed without its dependencies (see the Makefile).
    from infinity_client import Client
    from infinity_client.api.default import embeddings, models
    from infinity_client.models import OpenAIEmbeddingInputText

    client = Client(base_url=url + "/v1")
    listed = models.sync(client=client)
    assert [m.id for m in listed.data] == ["minilm", "cross-encoder"]
    res = embeddings.sync(client=client, body=OpenAIEmbeddingInputText(input_=TEXTS, model="minilm"))
    assert np.allclose([d.embedding for d in res.data], ref_embed(url, TEXTS), atol=ATOL)


def test_langchain_infinity_embeddings(url):
    from langchain_community.embeddings import InfinityEmbeddings

    emb = InfinityEmbeddings(model="minilm", infinity_api_url=url + "/v1")
    assert np.allclose(emb.embed_documents(TEXTS), ref_embed(url, TEXTS), atol=ATOL)
    assert np.allclose(emb.embed_query(QUERY), ref_embed(url, [QUERY])[0], atol=ATOL)


def test_langchain_openai_embeddings(url):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: the default tokenizes with tiktoken's OpenAI encodings, which it
    # downloads, and sends token ids; here the texts go as they are.
    emb = OpenAIEmbeddings(model="minilm", base_url=url + "/v1", api_key="unused", check_embedding_ctx_length=False)
    assert np.allclose(emb.embed_documents(TEXTS), ref_embed(url, TEXTS), atol=ATOL)


def test_llama_index_openai_like_embedding(url):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    emb = OpenAILikeEmbedding(model_name="minilm", api_base=url + "/v1", api_key="unused")
    assert np.allclose(emb.get_text_embedding_batch(TEXTS), ref_embed(url, TEXTS), atol=ATOL)


def test_llama_index_jina_rerank(url):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    rerank = JinaRerank(base_url=url + "/v1", model="cross-encoder", api_key="unused", top_n=3)
    nodes = rerank.postprocess_nodes([NodeWithScore(node=TextNode(text=d)) for d in DOCS],
                                     query_bundle=QueryBundle(QUERY))
    assert_ranking(url, [(DOCS.index(n.node.text), n.score) for n in nodes], top_n=3)


def test_haystack_openai_text_embedder(url):
    from haystack.components.embedders import OpenAITextEmbedder
    from haystack.utils import Secret

    embedder = OpenAITextEmbedder(model="minilm", api_base_url=url + "/v1", api_key=Secret.from_token("unused"))
    got = embedder.run(text="hello world")["embedding"]
    assert np.allclose(got, ref_embed(url, ["hello world"])[0], atol=ATOL)
