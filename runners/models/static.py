"""Static embedding models (sentence-transformers' `StaticEmbedding`: model2vec, static-retrieval-mrl):
tokenize, look each token's row up, average. No forward pass, so nothing to batch: the scheduler runs
such a replica inline (`inline = True`, runners.engine.scheduler), in the request's own call.

The folder is `modules.json` + the module's `model.safetensors` (`embedding.weight`) and
`tokenizer.json`, with no `config.json`; sentence-transformers tokenizes without special tokens and
without truncation, and averages (`nn.EmbeddingBag`, mode mean: an empty text is the zero vector).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from runners.models.checkpoint import model_file, st_modules
from runners.models.st_format import module_class

if TYPE_CHECKING:
    from infinity_emb.args import EngineArgs

STATIC_MAX_TOKENS = 1 << 20  # sentence-transformers does not truncate: the window is the request limit


def is_static(name_or_path: str) -> bool:
    modules = st_modules(name_or_path)
    return bool(modules) and module_class(str(modules[0].get("type", ""))) == "StaticEmbedding"


class StaticEmbedder:
    """An embedding replica (Infinity's protocol) over a lookup table; `embed` is the inline path."""

    inline = True

    def __init__(self, *, engine_args: EngineArgs, truncate_dim: int | None = None) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        path = engine_args.model_name_or_path
        modules = st_modules(path)
        after = [module_class(str(m.get("type", ""))) for m in modules[1:]]
        if any(name != "Normalize" for name in after):
            raise ValueError(f"{path}: a StaticEmbedding followed by {after} is not served (only Normalize may follow it)")
        sub = modules[0].get("path", "")
        prefix = f"{sub}/" if sub else ""
        weights_file = model_file(path, f"{prefix}model.safetensors")
        tokenizer_file = model_file(path, f"{prefix}tokenizer.json")
        if weights_file is None or tokenizer_file is None:
            raise FileNotFoundError(f"{path}: a StaticEmbedding module needs {prefix}model.safetensors and "
                                    f"{prefix}tokenizer.json; the folder lacks one")
        state = load_file(str(weights_file))
        if "embedding.weight" not in state:
            raise ValueError(f"{path}: {weights_file.name} has no 'embedding.weight' (tensors: {sorted(state)[:5]})")
        # truncate_dim (Matryoshka): the mean of truncated rows is the truncated mean, so the table is cut once.
        self.weights = np.ascontiguousarray(state["embedding.weight"][:, :truncate_dim], dtype=np.float32)
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # The service's own copy (counting, decoding, TEI's /tokenize), transformers' interface.
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tokenizer_file)))
        self.max_seq_length = STATIC_MAX_TOKENS
        self.prompts: dict[str, str] = {}
        self.engine_args = engine_args

    def get_embedding_dimension(self) -> int:
        return int(self.weights.shape[1])

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def _mean(self, rows: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(rows), self.weights.shape[1]), dtype=np.float32)
        filled = [i for i, r in enumerate(rows) if r]
        if filled:
            ids = np.fromiter((t for i in filled for t in rows[i]), dtype=np.int64)
            counts = np.array([len(rows[i]) for i in filled])
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            out[filled] = np.add.reduceat(self.weights[ids], starts, axis=0) / counts[:, None]
        return out

    def embed(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Vectors and token counts, all at once: the scheduler's inline path."""
        rows = self._ids(texts)
        return self._mean(rows), [len(r) for r in rows]

    # Infinity's protocol, for the scheduler's probe, calibration and queued path.
    def encode_pre(self, texts: list[str]) -> dict[str, np.ndarray]:
        rows = self._ids(texts)
        width = max(1, max(len(r) for r in rows))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def encode_core(self, features: dict[str, Any]) -> np.ndarray:
        mask = features["attention_mask"].astype(bool)
        return self._mean([list(row[m]) for row, m in zip(features["input_ids"], mask)])

    def encode_post(self, out: np.ndarray) -> np.ndarray:
        return out
