"""Which custom code a checkpoint would run, and whether it may (`TRUST_REMOTE_CODE`).

transformers and sentence-transformers run a checkpoint's own Python code when `trust_remote_code`
is on: an `auto_map` entry of its config.json (tokenizer_config.json, preprocessor_config.json, …)
names a class in a module file, and a modules.json `type` outside sentence_transformers names a
module class. An entry `module.Class` is a file of the model's own folder or repository; an entry
`org/repo--module.Class` is fetched from *another* repository at load time, whatever the folder.

The rule (checked before any model is built, `check_model`):
- TRUST_REMOTE_CODE=true runs code from the model's own folder only: a folder or hub id that
  MODEL_NAMES names, or a folder baked into the image (on RunPod, a volume copy of it that matched the
  image's hashes; a copy that does not is never loaded).
- A hub id that MODEL_NAMES names comes with the code its author points to, from the hub, at the same
  trust as its weights (nomic-embed's code lives in nomic-bert-2048, jina's in jina-bert-implementation).
- A local folder never runs code from another repository: `org/repo--module.Class` would be fetched
  from the hub, or read from a modules cache that may sit on a shared volume, at load time. The model
  is refused at start, with one line naming the model, the file and the entry.
- TRUST_REMOTE_CODE=false runs no custom code: a model that needs some is refused at start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runners.models.checkpoint import model_file
from runners.settings import ModelSpec, Settings, SettingsError

# The files of a hub model that may carry an `auto_map` (the ones its loading fetches anyway); a
# local folder's top-level and module folders' JSON files are all read, up to `_MAX_JSON_BYTES`
# (tokenizer.json is large and never has one).
HUB_CONFIG_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")
_MAX_JSON_BYTES = 1 << 20


@dataclass(frozen=True)
class CodeReference:
    """One class a checkpoint asks to be loaded from custom code."""

    file: str  # the file that names it (config.json, modules.json, …)
    entry: str  # e.g. "modeling_x.Model" or "other-org/other-repo--modeling_x.Model"

    @property
    def repository(self) -> str | None:
        """The repository the code comes from when it is named (`org/repo--module.Class`), else None."""
        return self.entry.split("--", 1)[0] if "--" in self.entry else None


def _auto_map_entries(data: Any) -> list[str]:
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if not isinstance(auto_map, dict):
        return []
    out = []
    for value in auto_map.values():
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, str) and item:
                out.append(item)
    return out


def _module_types(data: Any) -> list[str]:
    """modules.json types that are not sentence-transformers' own (those import custom code)."""
    if not isinstance(data, list):
        return []
    types = [m.get("type", "") for m in data if isinstance(m, dict)]
    return [t for t in types if isinstance(t, str) and t and not t.startswith("sentence_transformers.")]


def _read_json(path: Path | None) -> Any:
    if path is None or not path.is_file() or path.stat().st_size > _MAX_JSON_BYTES:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _local_json_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.json")) + sorted(folder.glob("*/*.json"))
    return [f for f in files if not any(part.startswith(".") for part in f.relative_to(folder).parts)]


def code_references(name_or_path: str) -> list[CodeReference]:
    """Every custom-code class the checkpoint names (local folder, or hub id from its cache/hub)."""
    folder = Path(name_or_path)
    refs: list[CodeReference] = []
    if folder.is_dir():
        paths = {f.relative_to(folder).as_posix(): f for f in _local_json_files(folder)}
    else:
        paths = {name: model_file(name_or_path, name) for name in (*HUB_CONFIG_FILES, "modules.json")}
    for rel, path in paths.items():
        data = _read_json(path)
        refs += [CodeReference(rel, entry) for entry in _auto_map_entries(data)]
        if rel == "modules.json":
            for entry in _module_types(data):
                # `module.Class` runs the checkpoint's module.py when it has one; otherwise it names an
                # installed package (pylate, read by runners.models.multi_output), which is not its code
                module = entry.split("--", 1)[-1].split(".", 1)[0]
                if "--" in entry or model_file(name_or_path, f"{module}.py") is not None:
                    refs.append(CodeReference(rel, entry))
    return refs


def refusal(spec: ModelSpec, trust_remote_code: bool, refs: list[CodeReference]) -> str | None:
    """Why the model may not load under the rule above, as one line; None when it may."""
    for ref in refs:
        repo = ref.repository
        if repo is not None and spec.is_local:
            return (f"model {spec.served_name} ({spec.name_or_path}) asks for custom code from another repository, "
                    f"{repo} ({ref.file}: {ref.entry!r}), and TRUST_REMOTE_CODE only runs code from a model's own "
                    "folder: put that code into the model's folder (and its auto_map entry without 'repo--'), "
                    "bake it into the image, or choose another model")
    if refs and not trust_remote_code:
        ref = refs[0]
        return (f"model {spec.served_name} ({spec.name_or_path}) needs custom code ({ref.file}: {ref.entry!r}) "
                "and TRUST_REMOTE_CODE=false: set TRUST_REMOTE_CODE=true to run the code in the model's own "
                "folder, or choose another model")
    return None


def check_model(spec: ModelSpec, settings: Settings) -> None:
    """Raise SettingsError (one line) when the model would run code the rule does not allow."""
    why = refusal(spec, settings.trust_remote_code, code_references(spec.name_or_path))
    if why is not None:
        raise SettingsError(why)


def check_local_models(settings: Settings) -> None:
    """The rule for every local folder of MODEL_NAMES, at start, before anything loads (no network:
    hub ids are checked when they load, `runners.models.load.load_card`)."""
    for spec in settings.models:
        if spec.is_local:
            check_model(spec, settings)
