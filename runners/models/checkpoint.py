"""Reading a checkpoint's files: a local folder or a hub repository (from the cache when offline),
its sentence-transformers modules, their configs and weights. No model is built here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runners.settings import ModelSpec


def read_config(spec: ModelSpec) -> dict[str, Any]:
    """config.json of a local folder, or from the hub cache for an id."""
    if spec.is_local:
        path = Path(spec.name_or_path) / "config.json"
        if not path.is_file() and (Path(spec.name_or_path) / "modules.json").is_file():
            return {}  # a sentence-transformers model without a transformers body (StaticEmbedding)
        if not path.is_file():
            raise FileNotFoundError(f"{spec.name_or_path} has no config.json: it is not a transformers model folder")
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(spec.name_or_path, filename="config.json"))
    return json.loads(path.read_text())


def model_file(name_or_path: str, filename: str) -> Path | None:
    """A file of a local folder or of a hub repository (from the cache when offline); None if absent."""
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / filename
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name_or_path, filename=filename))
    except Exception:  # noqa: BLE001 - absent, offline or not a repository: the file is not there
        return None


def read_json(path: Path | None) -> Any:
    return json.loads(path.read_text()) if path is not None else None


def st_modules(name_or_path: str) -> list[dict[str, Any]]:
    return read_json(model_file(name_or_path, "modules.json")) or []



def module_path(modules: list[dict[str, Any]], suffix: str) -> str | None:
    for m in modules:
        if m.get("type", "").endswith(suffix):
            return m.get("path", "")
    return None


def load_state(name_or_path: str, filenames: tuple[str, ...]) -> dict[str, Any] | None:
    """The tensors of the first weights file found (safetensors or a torch pickle of tensors)."""
    import torch

    for filename in filenames:
        path = model_file(name_or_path, filename)
        if path is None:
            continue
        if filename.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    return None


def linear(state: dict[str, Any], prefix: str = "") -> Any:
    import torch

    weight = state[prefix + "weight"].float()
    bias = state.get(prefix + "bias")
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.float())
    return layer


def max_length(tokenizer: Any, config: Any, configured: int | None = None) -> int:
    if configured:
        return int(configured)
    limit = int(min(tokenizer.model_max_length, 1 << 20))
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            positions -= 2  # their positions start after the padding index
        limit = min(limit, int(positions))
    return limit



_POOLING_KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                 "max": "pooling_mode_max_tokens", "lasttoken": "pooling_mode_lasttoken"}


# sentence-transformers 5.4+ saves one `pooling_mode` ("cls", ["cls", "mean"], ...); older releases
# saved one boolean per mode. Both are read as the booleans (the names every reader here uses).
LEGACY_POOLING_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                       "mean": "pooling_mode_mean_tokens", "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                       "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


def legacy_pooling(config: dict[str, Any]) -> dict[str, Any]:
    """A Pooling config in the boolean form, whichever release saved it."""
    if "pooling_mode" not in config:
        return config
    modes = config["pooling_mode"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [m for m in modes if m not in LEGACY_POOLING_KEYS]
    if unknown:
        raise ValueError(f"pooling mode {unknown} is not known here (one of {tuple(LEGACY_POOLING_KEYS)})")
    out = {k: v for k, v in config.items() if k != "pooling_mode"}
    out.update({key: mode in modes for mode, key in LEGACY_POOLING_KEYS.items()})
    if "embedding_dimension" in out:
        out.setdefault("word_embedding_dimension", out["embedding_dimension"])
    return out


def pooling_config(path: str, modules: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The config of a sentence-transformers folder's Pooling module, in the boolean form; None when it has none."""
    pooling = module_path(st_modules(path) if modules is None else modules, "Pooling")
    if pooling is None:
        return None
    return legacy_pooling(read_json(model_file(path, f"{pooling}/config.json" if pooling else "config.json")) or {})


def pooling_mode(path: str, modules: list[dict[str, Any]]) -> str:
    """The pooling of a sentence-transformers folder (mean when the folder is not one, as ST does)."""
    others = [m.get("type") for m in modules if not m.get("type", "").endswith(("Transformer", "Pooling", "Normalize"))]
    if others:
        raise ValueError(f"{path}: modules {others} are not served with MODEL_KINDS=tokens")
    config = pooling_config(path, modules)
    if config is None:
        return "mean"
    on = [key for key, value in config.items() if key.startswith("pooling_mode_") and value]
    modes = [mode for mode, key in _POOLING_KEYS.items() if config.get(key)]
    if len(on) != 1 or len(modes) != 1 or config.get("include_prompt") is False:
        raise ValueError(f"{path}: pooling {config} is not served with MODEL_KINDS=tokens (one of {tuple(_POOLING_KEYS)})")
    return modes[0]

