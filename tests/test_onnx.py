"""BACKEND=optimum: offline ONNX export of a local folder, cached; fp32 and int8 against torch. BACKEND=ctranslate2:
the same vectors as torch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from runners.capabilities.queries import EmbedQuery
from runners.capabilities.service import InferenceService
from runners.settings import load_settings

CORPUS = [line.strip() for line in (Path(__file__).parents[1] / "load_tests/corpus.txt").read_text().splitlines()
          if line.strip()][:120]
QUERIES = ["Where is the Eiffel Tower?", "How do vaccines train the immune system?", "What do bees make?"]
DOCS = ["The Eiffel Tower stands in Paris, on the Champ de Mars.", "Vaccines expose the immune system to a harmless "
        "piece of a pathogen so it learns to recognise it.", "Honey bees collect nectar and turn it into honey.",
        "The stock market fell sharply on Tuesday.", "Mount Everest is the highest mountain above sea level."]


def embed_all(env: dict[str, str], texts: list[str]) -> np.ndarray:
    async def run() -> np.ndarray:
        service = InferenceService(load_settings(env))
        await service.start()
        try:
            out = await asyncio.gather(*[service.embed(EmbedQuery(texts=texts[i:i + 16], token_ids=None))
                                         for i in range(0, len(texts), 16)])
        finally:
            await service.stop()
        return np.array([d["embedding"] for body in out for d in body["data"]])

    return asyncio.run(run())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def torch_vectors() -> np.ndarray:
    return embed_all({}, CORPUS + QUERIES + DOCS)


def test_fp32_onnx_equals_torch_and_the_export_is_reused(cache, torch_vectors):
    env = {"BACKEND": "optimum", "ONNX_QUANTIZATION": "fp32", "ONNX_CACHE_DIR": str(cache)}
    vectors = embed_all(env, CORPUS + QUERIES + DOCS)
    assert (vectors * torch_vectors).sum(1).min() >= 0.9999
    (exported,) = list(cache.glob("*/model.onnx"))
    stamp = exported.stat().st_mtime_ns
    embed_all(env, ["second start"])
    assert exported.stat().st_mtime_ns == stamp, "the second start must reuse the export"


@pytest.mark.parametrize("signed", [True, False], ids=["signed weights (VNNI)", "unsigned weights"])
def test_int8_close_to_torch_and_keeps_the_top_result(cache, torch_vectors, signed, monkeypatch):
    from runners.models import onnx

    monkeypatch.setattr(onnx, "signed_int8_weights", lambda: signed)
    env = {"BACKEND": "optimum", "ONNX_QUANTIZATION": "int8", "ONNX_CACHE_DIR": str(cache)}
    vectors = embed_all(env, CORPUS + QUERIES + DOCS)
    assert next(cache.glob(f"*/{'model_int8s8.onnx' if signed else 'model_int8.onnx'}"), None) is not None
    cos = (vectors * torch_vectors).sum(1)
    assert cos.mean() >= 0.995 and cos.min() >= 0.99
    n = len(CORPUS)
    q8, d8 = vectors[n:n + 3], vectors[n + 3:]
    qt, dt = torch_vectors[n:n + 3], torch_vectors[n + 3:]
    assert list((q8 @ d8.T).argmax(1)) == list((qt @ dt.T).argmax(1)) == [0, 1, 2]


def test_onnx_replica_takes_chunking_late_chunking_and_gives_token_vectors(cache):
    """runners.models.token_inputs on the ONNX replica: windows as token ids, token vectors from its hidden states."""
    from runners.capabilities.queries import Chunking
    from runners.vocabulary import TOKENS

    long = " ".join(DOCS * 12)

    async def run() -> None:
        service = InferenceService(load_settings({"BACKEND": "optimum", "ONNX_QUANTIZATION": "fp32",
                                                  "ONNX_CACHE_DIR": str(cache), "MODEL_WARMUP": "false"}))
        await service.start()
        try:
            plain = (await service.embed(EmbedQuery(texts=DOCS[:2], token_ids=None)))["data"]
            chunked = (await service.embed(EmbedQuery(texts=DOCS[:2] + [long], token_ids=None,
                                                      chunking=Chunking(pooling="none"))))["data"]
            for p, c in zip(plain, chunked):  # a text within the window is one chunk: the text's own vector
                assert np.dot(p["embedding"], c["chunks"][0]["embedding"]) >= 0.99999
            assert len(chunked[2]["chunks"]) >= 2
            tokens = (await service.embed(EmbedQuery(texts=DOCS[:1], token_ids=None, outputs=(TOKENS,))))["data"]
            mean = np.asarray(tokens[0]["embedding"]).mean(0)
            assert np.dot(mean / np.linalg.norm(mean), plain[0]["embedding"]) >= 0.99999  # mean pooling
            late = (await service.embed(EmbedQuery(texts=DOCS, token_ids=None, late_chunking=True)))["data"]
            assert len(late) == len(DOCS)
        finally:
            await service.stop()

    asyncio.run(run())


def test_optimum_backend_serves_over_http(start_server, cache):
    server = start_server({"BACKEND": "optimum", "ONNX_CACHE_DIR": str(cache)})
    res = httpx.post(server.url + "/v1/embeddings", json={"input": ["hello world"]}).json()
    assert len(res["data"][0]["embedding"]) == 384
    (model,) = httpx.get(server.url + "/v1/models").json()["data"]
    assert model["backend"] == "optimum"
    assert next(cache.glob("*/model_int8*.onnx"), None) is not None  # auto picks int8 on a CPU


def test_ctranslate2_backend_gives_the_torch_vectors(torch_vectors):
    """Installed by `make install` (the seed names it); Infinity's CTranslate2 replica under our scheduler."""
    vectors = embed_all({"BACKEND": "ctranslate2"}, CORPUS + QUERIES + DOCS)
    assert (vectors * torch_vectors).sum(1).min() >= 0.9999
