"""LLM rerankers in sentence-transformers' own form (a causal LM and LogitScore, saved by the pinned
library: tests/st_checkpoints.py), served in-process by the real service and compared with the library's
`CrossEncoder(folder).predict`: the folder's own template and tokens, its default prompt, an instruction
per request, its activation, truncation to its window, alone, batched and in mixed traffic."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import st_checkpoints  # noqa: E402
from test_st_formats import _serve  # noqa: E402

QUERY = "where is the eiffel tower?"
DOCS = ["the eiffel tower is in paris, the capital of france.", "a", "quick brown fox jumps over the lazy dog",
        " ".join(["machine learning model vector embedding"] * 8), "berlin is the capital of germany"]
TASK = "find the city of the landmark"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm-rerankers")
    return {"qwen3": st_checkpoints.build_llm_reranker(root / "qwen3", "qwen3"),
            "mxbai": st_checkpoints.build_llm_reranker(root / "mxbai", "mxbai", seed=1),
            "plain": st_checkpoints.build_llm_reranker(root / "plain", "plain", seed=2),
            "short": st_checkpoints.build_llm_reranker(root / "short", "qwen3", seed=3, max_seq_length=96)}


async def _scores(inference, model: str, docs: list[str], **extra) -> list[float]:
    from runners.capabilities.queries import RerankQuery

    body = await inference.rerank(RerankQuery(query=QUERY, documents=docs, model=model, **extra))
    return [r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])]


def test_served_scores_equal_the_library(folders):
    from sentence_transformers import CrossEncoder

    async def calls(inference):
        out = {"kinds": {m.name: (m.kind, m.rerank_via) for m in inference.registry.models}}
        for name in folders:
            out[name] = {
                "alone": [(await _scores(inference, name, [d]))[0] for d in DOCS],
                "batched": await _scores(inference, name, DOCS),
                "instruction": await _scores(inference, name, DOCS, instruction=TASK),
                "raw": await _scores(inference, name, DOCS, raw_scores=True),
            }
        # Mixed traffic: every model, with and without an instruction, at once.
        jobs = [(name, i, task) for name in folders for i in range(0, 5, 2) for task in (None, TASK)]
        answers = await asyncio.gather(*[_scores(inference, name, DOCS[i:i + 2], instruction=task)
                                         for name, i, task in jobs])
        out["mixed"] = list(zip(jobs, answers))
        return out

    got = _serve(folders, calls)
    assert set(got["kinds"].values()) == {("llm-reranker", "logit-score")}
    pairs = [(QUERY, d) for d in DOCS]
    for name, folder in folders.items():
        ce = CrossEncoder(str(folder), device="cpu")
        want = ce.predict(pairs)
        assert np.ptp(want) > 0.01, f"{name}: the tiny model scores every pair alike"
        for key in ("alone", "batched"):
            assert np.allclose(got[name][key], want, atol=1e-4), (name, key, got[name][key], want)
        with_task = ce.predict(pairs, prompt=TASK)
        assert np.allclose(got[name]["instruction"], with_task, atol=1e-4), name
        assert not np.allclose(with_task, want, atol=1e-3), f"{name}: the instruction does not reach the prompt"
        raw = ce.predict(pairs, activation_fn=None) if name == "plain" else ce.predict(pairs, activation_fn=lambda x: x)
        assert np.allclose(got[name]["raw"], raw, atol=1e-4), name
    for (name, i, task), scores in got["mixed"]:
        ce = CrossEncoder(str(folders[name]), device="cpu")
        assert np.allclose(scores, ce.predict(pairs[i:i + 2], prompt=task), atol=1e-4), (name, i, task)


def test_the_qwen3_style_template_scores_as_the_built_in_qwen3_prompt(folders):
    """The same folder served by its own template and by MODEL_KINDS=qwen3-reranker (the model card's
    prompt, runners.models.qwen3) gives the same scores: the template is the card's prompt."""
    from runners.capabilities.service import InferenceService
    from runners.settings import load_settings

    folder = str(folders["qwen3"])
    settings = load_settings({"MODEL_NAMES": f"{folder};{folder}", "SERVED_MODEL_NAMES": "own;builtin",
                              "MODEL_KINDS": "auto;qwen3-reranker", "DEVICE": "cpu"})

    async def go():
        inference = InferenceService(settings)
        await inference.start()
        try:
            # two CPU torch models in one process: one pass thread for both (runners.engine.passes)
            first, second = (m.scheduler for m in inference.registry.models)
            assert first.passes is not None and first.passes is second.passes
            return [await _scores(inference, name, DOCS, instruction=task) for name in ("own", "builtin")
                    for task in (None, TASK)]
        finally:
            await inference.stop()

    own, own_task, builtin, builtin_task = asyncio.run(go())
    assert np.allclose(own, builtin, atol=1e-5) and np.allclose(own_task, builtin_task, atol=1e-5)


def test_truncation_keeps_the_template_tail(folders):
    """A document past the window: the prompt is cut to it and the template's tail written back, as the library does."""
    from runners.engine.loaded import load_model
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": str(folders["short"]), "DEVICE": "cpu"})
    model = load_model(settings.models[0], settings)
    try:
        replica = model.scheduler.replica
        rows = replica.prompt_ids([(QUERY, DOCS[3])])
        assert len(rows[0]) == 96 and rows[0][-len(replica._tail("")):] == replica._tail("")
    finally:
        model.scheduler.stop()
