"""The classic sentence-transformers layouts (tests/st_layouts.py: BERT CLS, CLS + Dense(tanh), MPNet mean,
XLM-R mean with e5 prompts, ModernBERT CLS, T5 encoder + Dense, Gemma3 with two Dense layers as
EmbeddingGemma, Qwen2 last token with left padding, Mistral last token with right padding, a BERT folder
without sentence-transformers files), each served in-process through the real loading code and compared
with `SentenceTransformer(folder).encode`: alone, batched, with each of the model's prompts (`prompt_name`),
and `input_type` query / document against `encode_query` / `encode_document`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import st_layouts  # noqa: E402
from test_st_formats import TEXTS, _cos, _serve, _vectors  # noqa: E402


@pytest.mark.parametrize("layout", list(st_layouts.LAYOUTS))
def test_layout_equals_the_library(tmp_path, layout):
    from sentence_transformers import SentenceTransformer

    folder = st_layouts.LAYOUTS[layout](tmp_path / layout)
    st = SentenceTransformer(str(folder), device="cpu")
    prompts = sorted(st.prompts)
    want = {None: st.encode(TEXTS), "input_type query": st.encode_query(TEXTS),
            "input_type document": st.encode_document(TEXTS),
            **{name: st.encode(TEXTS, prompt_name=name) for name in prompts}}
    unit = want[None] / np.linalg.norm(want[None], axis=1, keepdims=True)
    assert (unit @ unit.T - 2 * np.eye(len(TEXTS))).max() < 0.99, f"{layout}: the tiny model maps texts alike"

    async def calls(inference):
        (model,) = inference.registry.models
        out = {"kind": model.kind, "dimensions": model.dimensions,
               "alone": np.concatenate([await _vectors(inference, layout, [t], normalize=False) for t in TEXTS]),
               "batched": await _vectors(inference, layout, TEXTS, normalize=False)}
        for name in prompts:
            out[name] = await _vectors(inference, layout, TEXTS, prompt_name=name, normalize=False)
        for task in ("query", "document"):
            out[f"input_type {task}"] = await _vectors(inference, layout, TEXTS, input_type=task, normalize=False)
        return out

    got = _serve({layout: folder}, calls)
    assert got["kind"] == "embed" and got["dimensions"] == want[None].shape[1]
    for key in ("alone", "batched"):
        assert _cos(got[key], want[None]).min() >= 0.9999, key
    # prompt_name: each prompt; input_type: what encode_query / encode_document apply.
    for key in [*prompts, "input_type query", "input_type document"]:
        assert _cos(got[key], want[key]).min() >= 0.9999, key
