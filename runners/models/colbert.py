"""ColBERT checkpoints in their two layouts (Stanford's HF_ColBERT, PyLate): the projection and how
queries and documents are built (runners.models.multi_output serves them)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from runners.models.checkpoint import linear, load_state, model_file, read_json, st_modules


@dataclass
class ColbertSettings:
    """How a ColBERT checkpoint builds queries and documents (PyLate's names, Stanford's values)."""

    query_prefix_id: int | None
    document_prefix_id: int | None
    query_length: int
    document_length: int
    expand_queries: bool
    attend_to_expansion: bool
    skiplist: frozenset[int]


def token_id(tokenizer: Any, token: str, path: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{path}: the ColBERT marker {token!r} is not a token of its tokenizer")
    return token_id


def colbert_layout(path: str, config: dict[str, Any], tokenizer: Any) -> tuple[Any, ColbertSettings]:
    """The projection and the settings of a PyLate or a Stanford (HF_ColBERT) checkpoint."""
    modules = st_modules(path)
    dense_path = next((m.get("path", "") for m in modules[1:] if m.get("type", "").endswith("Dense")), None)
    if dense_path is not None:
        if len(modules) != 2:
            raise ValueError(f"{path}: a PyLate ColBERT folder has a Transformer and one Dense module; modules.json "
                             f"lists {[m.get('type') for m in modules]}")
        dense_config = read_json(model_file(path, f"{dense_path}/config.json")) or {}
        activation = dense_config.get("activation_function", "torch.nn.modules.linear.Identity")
        if not activation.endswith("Identity") or dense_config.get("use_residual"):
            raise ValueError(f"{path}: its Dense module has activation {activation!r}, residual "
                             f"{bool(dense_config.get('use_residual'))}: only a plain projection is served")
        state = load_state(path, (f"{dense_path}/model.safetensors", f"{dense_path}/pytorch_model.bin"))
        if state is None:
            raise ValueError(f"{path}: no weights in {dense_path}/")
        st = read_json(model_file(path, "config_sentence_transformers.json")) or {}

        def prefix_id(prefix: str | None, default: str) -> int | None:
            prefix = default if prefix is None else prefix
            return token_id(tokenizer, prefix, path) if prefix else None

        words = st.get("skiplist_words")
        expand = bool(st.get("do_query_expansion", True))
        settings = ColbertSettings(
            query_prefix_id=prefix_id(st.get("query_prefix"), "[Q] "),
            document_prefix_id=prefix_id(st.get("document_prefix"), "[D] "),
            query_length=int(st.get("query_length") or 32),
            document_length=int(st.get("document_length") or 180),
            expand_queries=expand,
            attend_to_expansion=expand and bool(st.get("attend_to_expansion_tokens", False)),
            skiplist=frozenset(tokenizer.convert_tokens_to_ids(w)
                               for w in (list(string.punctuation) if words is None else words)),
        )
        return linear(state, "linear."), settings
    if "HF_ColBERT" not in (config.get("architectures") or []):
        raise ValueError(f"{path}: not a ColBERT checkpoint (neither HF_ColBERT nor a PyLate folder with a Dense module)")
    state = load_state(path, ("model.safetensors", "pytorch_model.bin"))
    if state is None or "linear.weight" not in state:
        raise ValueError(f"{path}: an HF_ColBERT checkpoint without linear.weight in its weights")
    meta = read_json(model_file(path, "artifact.metadata")) or {}
    skip: set[int] = set()
    if meta.get("mask_punctuation", True):
        for symbol in string.punctuation:
            ids = tokenizer.encode(symbol, add_special_tokens=False)
            if ids:
                skip.add(ids[0])
    settings = ColbertSettings(
        query_prefix_id=token_id(tokenizer, meta.get("query_token_id", "[unused0]"), path),
        document_prefix_id=token_id(tokenizer, meta.get("doc_token_id", "[unused1]"), path),
        query_length=int(meta.get("query_maxlen", 32)),
        document_length=int(meta.get("doc_maxlen", 180)),
        expand_queries=True,
        attend_to_expansion=bool(meta.get("attend_to_mask_tokens", False)),
        skiplist=frozenset(skip),
    )
    return linear({"weight": state["linear.weight"]}), settings
