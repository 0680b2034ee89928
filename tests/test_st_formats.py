"""Every sentence-transformers format, saved by the pinned library (tests/st_checkpoints.py), served
in-process by the real service (settings, loading, scheduler, capabilities) and compared with the
library's own `encode` / `predict`: dense models of the current layout and of the pre-5.4 layout
(prompts, default prompt, truncate_dim, similarity_fn_name), static embeddings, a CrossEncoder and a
SparseEncoder saved by the current release; an unknown module type fails the start with one line."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import st_checkpoints  # noqa: E402

TEXTS = ["the cat sat on the mat.", "where is the eiffel tower? in paris, the capital of france!", "a",
         " ".join(["machine learning model vector embedding"] * 6), "quick brown fox jumps over the lazy dog", "xylophone"]
PROMPTS = {"query": "query: ", "document": "passage: "}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _serve(folders: dict[str, Path], calls):
    """Start the service's inference layer on `folders`, run `calls(inference)` (a coroutine function), stop it."""
    from runners.capabilities.service import InferenceService
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": ";".join(str(f) for f in folders.values()),
                              "SERVED_MODEL_NAMES": ";".join(folders), "DEVICE": "cpu"})

    async def go():
        inference = InferenceService(settings)
        await inference.start()
        try:
            return await calls(inference)
        finally:
            await inference.stop()

    return asyncio.run(go())


async def _vectors(inference, model: str, texts: list[str], **extra) -> np.ndarray:
    from runners.capabilities.queries import EmbedQuery

    body = await inference.embed(EmbedQuery(texts=texts, token_ids=None, model=model, **extra))
    return np.array([row["embedding"] for row in body["data"]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st-formats")
    dense = st_checkpoints.build_dense(root / "dense", prompts=PROMPTS, default_prompt_name="query", truncate_dim=16,
                                       similarity_fn_name="dot")
    return {
        "dense": dense,
        "legacy": st_checkpoints.to_legacy(dense, root / "legacy"),
        "static": st_checkpoints.build_static(root / "static"),
        "static-mrl": st_checkpoints.build_static(root / "static-mrl", seed=1, truncate_dim=8),
        "cross-encoder": st_checkpoints.build_cross_encoder(root / "cross-encoder"),
        "sparse": st_checkpoints.build_sparse_encoder(root / "sparse"),
    }


def test_every_format_equals_the_library(folders):
    from sentence_transformers import CrossEncoder, SentenceTransformer

    async def calls(inference):
        out = {}
        for name in ("dense", "legacy", "static", "static-mrl"):
            out[name] = {
                "alone": np.concatenate([await _vectors(inference, name, [t]) for t in TEXTS]),
                "batched": await _vectors(inference, name, TEXTS),
                "query": await _vectors(inference, name, TEXTS, input_type="query"),
                "document": await _vectors(inference, name, TEXTS, input_type="document"),
            }
        # Mixed traffic: every model and prompt at once.
        mixed = await asyncio.gather(*[_vectors(inference, name, TEXTS[i:i + 2], input_type=kind)
                                       for name in ("dense", "static") for i in range(0, 6, 2)
                                       for kind in ("query", "document")])
        out["mixed"] = mixed
        docs = TEXTS[:5]
        body = await inference.rerank(_rerank_query("cross-encoder", "where is paris?", docs, raw_scores=False))
        out["rerank"] = {r["index"]: r["relevance_score"] for r in body["results"]}
        out["dims"] = {m.name: m.dimensions for m in inference.registry.models}
        return out

    got = _serve(folders, calls)
    for name in ("dense", "legacy"):
        st = SentenceTransformer(str(folders[name]), device="cpu")
        assert st.truncate_dim == 16 and st.default_prompt_name == "query"
        unit = st.encode(TEXTS, normalize_embeddings=True)
        assert (unit @ unit.T - 2 * np.eye(len(TEXTS))).max() < 0.99, "the tiny model maps texts alike"
        assert got["dims"][name] == 16
        for key, kwargs in (("alone", {}), ("batched", {}), ("query", {"prompt_name": "query"}),
                            ("document", {"prompt_name": "document"})):
            want = st.encode(TEXTS, **kwargs)
            assert got[name][key].shape == want.shape, (name, key)
            assert _cos(got[name][key], want).min() >= 0.9999, (name, key)
    for name in ("static", "static-mrl"):
        st = SentenceTransformer(str(folders[name]), device="cpu")
        want = st.encode(TEXTS)
        for key in ("alone", "batched", "query", "document"):  # no prompts: every route gives the same vectors
            nonzero = np.linalg.norm(want, axis=1) > 0
            assert got[name][key].shape == want.shape
            assert _cos(got[name][key][nonzero], want[nonzero]).min() >= 0.9999, (name, key)
            assert np.allclose(got[name][key][~nonzero], 0.0)
    assert got["dims"]["static-mrl"] == 8
    i = 0
    for name in ("dense", "static"):
        st = SentenceTransformer(str(folders[name]), device="cpu")
        for start in range(0, 6, 2):
            for kind in ("query", "document"):
                want = st.encode(TEXTS[start:start + 2], prompt_name=kind if name == "dense" else None)
                nonzero = np.linalg.norm(want, axis=1) > 0
                assert _cos(got["mixed"][i][nonzero], want[nonzero]).min() >= 0.9999
                i += 1
    ce = CrossEncoder(str(folders["cross-encoder"]), device="cpu")
    want = ce.predict([("where is paris?", d) for d in TEXTS[:5]])
    assert np.allclose([got["rerank"][j] for j in range(5)], want, atol=1e-4)


def _rerank_query(model: str, query: str, docs: list[str], raw_scores: bool):
    from runners.capabilities.queries import RerankQuery

    return RerankQuery(query=query, documents=docs, model=model, raw_scores=raw_scores)


def test_kinds_come_from_the_folder(folders):
    from runners.models.checkpoint import read_config
    from runners.models.detect import resolve_kind
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": ";".join(str(f) for f in folders.values()), "DEVICE": "cpu"})
    kinds = {name: resolve_kind(spec, read_config(spec)) for name, spec in zip(folders, settings.models)}
    assert kinds == {"dense": "embed", "legacy": "embed", "static": "static", "static-mrl": "static",
                     "cross-encoder": "rerank", "sparse": "sparse"}


def test_sparse_encoder_saved_now_equals_its_encode(folders):
    from sentence_transformers import SparseEncoder

    from runners.engine.loaded import load_model
    from runners.models.multi_output import MultiInput
    from runners.settings import load_settings
    from runners.vocabulary import SPARSE

    settings = load_settings({"MODEL_NAMES": str(folders["sparse"]), "DEVICE": "cpu"})
    model = load_model(settings.models[0], settings)
    try:
        replica = model.scheduler.replica
        items = [MultiInput(text=t, outputs=(SPARSE,)) for t in TEXTS[:5]]
        got = replica.encode_post(replica.encode_core(replica.encode_pre(items)))
        want = SparseEncoder(str(folders["sparse"]), device="cpu").encode(TEXTS[:5], convert_to_tensor=True).to_dense()
        for row, (result, expected) in enumerate(zip(got, want)):
            ids, weights = result[SPARSE]
            dense = np.zeros(expected.shape[0], dtype=np.float32)
            dense[ids] = weights
            assert np.abs(dense - expected.numpy()).max() <= 1e-5, row
    finally:
        model.scheduler.stop()


def test_an_unknown_module_type_fails_the_start_with_one_line(tmp_path):
    from runners.models.load import load_card
    from runners.settings import load_settings

    folder = st_checkpoints.build_unknown_module(tmp_path / "mystery")
    settings = load_settings({"MODEL_NAMES": str(folder), "DEVICE": "cpu"})
    with pytest.raises(ValueError) as failure:
        load_card(settings.models[0], settings)
    message = str(failure.value)
    assert "\n" not in message
    assert str(folder) in message and "my_package.layers.MysteryLayer" in message and "TRUST_REMOTE_CODE" in message
