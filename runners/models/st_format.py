"""A sentence-transformers folder as this server reads it, whichever release saved it.

Releases before 5.4 saved module types as `sentence_transformers.models.Pooling`; 5.4 and later save
`sentence_transformers.sentence_transformer.modules.pooling.Pooling`,
`sentence_transformers.base.modules.transformer.Transformer`, ... (and read the old paths through an
import shim). Here a type is its class name, so both read alike. `config_sentence_transformers.json`
says which model class saved the folder (`model_type`), its prompts and default prompt,
`similarity_fn_name` and `truncate_dim`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runners.models.checkpoint import model_file, read_json, st_modules

# Module classes of sentence-transformers (every release), by class name, and of PyLate (ColBERT).
KNOWN_MODULES = frozenset({
    # dense, every model class
    "Transformer", "Pooling", "Normalize", "Dense", "Router", "Asym", "StaticEmbedding", "Dropout", "LayerNorm",
    "WeightedLayerPooling", "WordEmbeddings", "WordWeights", "BoW", "CNN", "LSTM", "CLIPModel", "Tokenizer",
    # sparse
    "MLMTransformer", "SpladePooling", "SparseStaticEmbedding", "SparseAutoEncoder", "IDF",
    # cross-encoders (5.4+: a causal LM scored by chosen tokens' logits) and multi-vector encoders
    "LogitScore", "MultiVectorMask", "TokenPooling", "HierarchicalTokenPooling",
})
MODEL_TYPES = ("SentenceTransformer", "CrossEncoder", "SparseEncoder", "MultiVectorEncoder")


def module_class(type_name: str) -> str:
    """`sentence_transformers.models.Pooling` and `...sentence_transformer.modules.pooling.Pooling` → `Pooling`."""
    return type_name.rsplit(".", 1)[-1]


def is_known_module(type_name: str) -> bool:
    return type_name.startswith("pylate.") or (
        type_name.startswith("sentence_transformers.") and module_class(type_name) in KNOWN_MODULES)


def _loadable_code(name_or_path: str, type_name: str) -> bool:
    """Custom module code sentence-transformers can import: a file of the model's own (`custom_st.py`
    beside modules.json, loaded with remote code allowed) or an installed package."""
    import importlib.util

    top = type_name.split(".", 1)[0]
    if not top:
        return False
    if model_file(name_or_path, f"{top}.py") is not None:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def check_modules(name_or_path: str, trust_remote_code: bool) -> None:
    """Fail with one line when modules.json names a module this server cannot load: not a
    sentence-transformers or PyLate module, and not code it may run (TRUST_REMOTE_CODE and the
    model's own file or an installed package)."""
    for module in st_modules(name_or_path):
        type_name = str(module.get("type", ""))
        if is_known_module(type_name) or (trust_remote_code and _loadable_code(name_or_path, type_name)):
            continue
        raise ValueError(
            f"{name_or_path}: modules.json names the module type {type_name!r} (module {module.get('name', '?')!r}), "
            "which is neither a sentence-transformers module this server knows nor code it can load "
            f"({'no such file or package' if trust_remote_code else 'TRUST_REMOTE_CODE is off'}); "
            "give a folder saved by sentence-transformers, or the model's own code with TRUST_REMOTE_CODE=true")


def module_classes(name_or_path: str) -> list[str]:
    return [module_class(str(m.get("type", ""))) for m in st_modules(name_or_path)]


@dataclass(frozen=True)
class StConfig:
    """config_sentence_transformers.json: what every release saved that serving uses."""

    model_type: str | None = None  # None: not saved (releases before 4 saved no model_type: SentenceTransformer)
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None
    truncate_dim: int | None = None


def st_config(name_or_path: str) -> StConfig:
    raw: dict[str, Any] = read_json(model_file(name_or_path, "config_sentence_transformers.json")) or {}
    truncate = raw.get("truncate_dim")
    return StConfig(
        model_type=raw.get("model_type"), prompts={k: v for k, v in (raw.get("prompts") or {}).items() if v is not None},
        default_prompt_name=raw.get("default_prompt_name"), similarity_fn_name=raw.get("similarity_fn_name"),
        truncate_dim=int(truncate) if truncate else None,
    )


def is_st_folder(name_or_path: str) -> bool:
    return model_file(name_or_path, "modules.json") is not None
