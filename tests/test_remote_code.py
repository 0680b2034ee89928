"""TRUST_REMOTE_CODE (runners.models.remote_code): custom code runs only from a model's own folder or
repository; code another repository would supply, or any custom code with TRUST_REMOTE_CODE=false, is
refused before the model loads, with one line naming the model and the setting. Reads small folders
of JSON only; the real worker's refusal at start is in tests/test_runpod_adapter.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runners.models.remote_code import check_local_models, check_model, code_references, refusal
from runners.settings import ModelSpec, SettingsError, load_settings


def folder_with(tmp: Path, files: dict[str, object]) -> Path:
    folder = tmp / "model"
    for rel, content in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def spec(name: str) -> ModelSpec:
    return ModelSpec(name_or_path=name, served_name=Path(name).name)


def test_a_plain_checkpoint_names_no_code(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {"config.json": {"model_type": "bert"}, "tokenizer_config.json": {},
                                    "modules.json": [{"type": "sentence_transformers.models.Transformer"}]})
    assert code_references(str(folder)) == []
    assert refusal(spec(str(folder)), False, []) is None


def test_own_folder_code_runs_only_with_trust_remote_code(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {"config.json": {"auto_map": {"AutoModel": "modeling_x.Model"}},
                                    "modeling_x.py": "class Model: pass\n"})
    refs = code_references(str(folder))
    assert [(r.file, r.entry, r.repository) for r in refs] == [("config.json", "modeling_x.Model", None)]
    assert refusal(spec(str(folder)), True, refs) is None
    line = refusal(spec(str(folder)), False, refs)
    assert "model model" in line and "TRUST_REMOTE_CODE=false" in line and "modeling_x.Model" in line
    assert "\n" not in line


def test_code_from_another_repository_is_refused_whatever_the_setting(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {
        "config.json": {"auto_map": {"AutoConfig": "configuration_x.Config",
                                     "AutoModel": "other-org/other-repo--modeling_x.Model"}},
        "tokenizer_config.json": {"auto_map": {"AutoTokenizer": ["tok.Slow", None]}},
    })
    refs = code_references(str(folder))
    assert {r.entry for r in refs} == {"configuration_x.Config", "other-org/other-repo--modeling_x.Model", "tok.Slow"}
    for trust in (True, False):
        line = refusal(spec(str(folder)), trust, refs)
        assert "other-org/other-repo" in line and "config.json" in line and "TRUST_REMOTE_CODE" in line
        assert str(folder) in line


def test_a_hub_model_may_name_its_own_or_its_authors_code_repository(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from runners.models import remote_code

    files = {"config.json": folder_with(tmp_path, {"config.json": {
        "auto_map": {"AutoModel": "org/model--modeling_x.Model"}}}) / "config.json"}
    monkeypatch.setattr(remote_code, "model_file", lambda name, filename: files.get(filename))
    refs = code_references("org/model")
    assert refusal(spec("org/model"), True, refs) is None
    assert refusal(spec("org/other"), True, refs) is None  # as nomic-embed names nomic-bert-2048's code
    assert "TRUST_REMOTE_CODE=false" in refusal(spec("org/other"), False, refs)
    # a local folder's `repo--` entry is fetched at load time even when it names the folder's source
    assert refusal(spec(str(tmp_path / "model")), True, refs) is not None


def test_sentence_transformers_custom_modules(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {
        "config.json": {},
        "modules.json": [{"type": "custom_st.Transformer"}, {"type": "pylate.models.Dense"},
                         {"type": "sentence_transformers.models.Pooling"}],
        "custom_st.py": "class Transformer: pass\n",
    })
    assert [r.entry for r in code_references(str(folder))] == ["custom_st.Transformer"]  # pylate is a package
    (folder / "modules.json").write_text(json.dumps([{"type": "someone/else--custom_st.Transformer"}]))
    assert "someone/else" in refusal(spec(str(folder)), True, code_references(str(folder)))


def test_a_module_folder_config_is_read_too(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {"0_Transformer/config.json": {"auto_map": {"AutoModel": "x/y--m.M"}},
                                    ".cache/config.json": {"auto_map": {"AutoModel": "ignored--m.M"}}})
    assert [r.entry for r in code_references(str(folder))] == ["x/y--m.M"]


def test_settings_are_refused_at_start(tmp_path: Path) -> None:
    from tests.checkpoints import build_foreign_code_embedder

    folder = build_foreign_code_embedder(tmp_path / "foreign")
    settings = load_settings({"MODEL_NAMES": str(folder)})
    with pytest.raises(SettingsError, match=r"model foreign .*other-org/other-repo.*TRUST_REMOTE_CODE"):
        check_local_models(settings)
    with pytest.raises(SettingsError):
        check_model(settings.models[0], settings)  # the same rule where a model loads (load_card)
