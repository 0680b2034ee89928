"""The processes that tests, load tests and benchmarks start: one harness for all of them.

    server = ServerProcess.bentoml(log_path)                       # bentoml serve service:EmbeddingService
    server = ServerProcess.bentoml(log_path, target="bench.bare_service:BareService", env=process_env({...}))
    worker = ServerProcess.runpod_worker(log_path)                 # python -m runpod_adapter --rp_serve_api
    infinity = ServerProcess.infinity(model_path, "cpu", log_path)  # infinity_emb v2, as bench.run starts it
    seconds = server.wait_ready()      # polls its ready URL, fails with the log's tail if the process exits
    ...
    server.stop()                      # SIGTERM to its process group, SIGKILL after a grace period

Each process runs in a process group of its own on a free port of 127.0.0.1, its output in a log file.
`process_env` is the environment of a load test's or a benchmark's process (this one's, with the
checkout on PYTHONPATH); `hermetic_env` is a test's (no model or key settings from the shell, the hub
offline).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVICE = "service:EmbeddingService"
# Settings that choose what a server serves or who may call it: a test sets its own, none from the shell.
SERVING_SETTINGS = ("MODEL_NAMES", "SERVED_MODEL_NAMES", "API_KEY")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    """A console script of this interpreter's environment (bentoml, locust, infinity_emb), else on PATH."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{path} is missing: install the project's packages (`make install-test`)")
    return found


def process_env(extra: dict[str, str] | None = None, drop: Iterable[str] = (),
                drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment less `drop` (and names starting with `drop_prefixes`), the checkout first
    on PYTHONPATH, telemetry off unless set, then `extra`."""
    dropped = set(drop)
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith(drop_prefixes)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.update(extra or {})
    return env


def hermetic_env(extra: dict[str, str] | None = None, drop: Iterable[str] = (),
                 drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """A test's process: no SERVING_SETTINGS (nor `drop`) from the shell, the checkout alone on PYTHONPATH,
    the hub offline, then `extra`."""
    env = process_env(drop=(*SERVING_SETTINGS, *drop), drop_prefixes=drop_prefixes)
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", BENTOML_DO_NOT_TRACK="true")
    env.update(extra or {})
    return env


class ServerProcess:
    """A server started as its own process group, polled until ready, stopped with the whole group.

    `argv` is run in `cwd` with `env` (default: `process_env()`), its output in `log_path`; it listens on
    `port` (default: a free one). Ready means `ready_path` answers 200.
    """

    def __init__(self, argv: list[str], log_path: Path, port: int, env: dict[str, str] | None = None,
                 ready_path: str = "/readyz", cwd: Path = ROOT) -> None:
        self.argv, self.log_path, self.port, self.ready_path = argv, log_path, port, ready_path
        self.url = f"http://127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=process_env() if env is None else env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @classmethod
    def bentoml(cls, log_path: Path, target: str = SERVICE, port: int | None = None, env: dict[str, str] | None = None,
                cwd: Path = ROOT) -> ServerProcess:
        """`bentoml serve TARGET`: the project's service by default, or another service or a built Bento's tag."""
        port = port or free_port()
        return cls([executable("bentoml"), "serve", target, "--port", str(port)], log_path, port, env, cwd=cwd)

    @classmethod
    def runpod_worker(cls, log_path: Path, port: int | None = None, env: dict[str, str] | None = None,
                      python: str = sys.executable) -> ServerProcess:
        """The RunPod worker's local API server (`python -m runpod_adapter --rp_serve_api`); ready when it
        answers, its engines load on the first job."""
        if not (ROOT / "runpod_adapter").is_dir():
            raise SystemExit("runpod_adapter/ is not in this checkout: the RunPod worker cannot be started")
        port = port or free_port()
        argv = [python, "-m", "runpod_adapter", "--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"]
        return cls(argv, log_path, port, env, ready_path="/")

    @classmethod
    def infinity(cls, model_path: str, device: str, log_path: Path, port: int | None = None) -> ServerProcess:
        """`infinity_emb v2` serving `model_path` as "bench-model" (POST /embeddings), torch, batches of 32."""
        port = port or free_port()
        argv = [
            executable("infinity_emb"), "v2", "--model-id", model_path, "--served-model-name", "bench-model",
            "--port", str(port), "--host", "127.0.0.1", "--engine", "torch", "--device", device.split(":")[0],
            "--batch-size", "32",
        ]
        # Boolean options go by environment: `--bettertransformer false` is a value to this environment's
        # typer/click but an extra argument to newer ones (the GPU image's), which then refuse to start.
        env = {"INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "INFINITY_BETTERTRANSFORMER": "false", "INFINITY_LENGTHS_VIA_TOKENIZE": "true"}
        return cls(argv, log_path, port, process_env(env), ready_path="/health")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def wait_ready(self, timeout: float = 180.0, interval: float = 0.05) -> float:
        """Seconds from the start of the process until `ready_path` answers 200."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(self.url + self.ready_path).status_code == 200:
                        return time.perf_counter() - self.started
                except httpx.HTTPError:
                    pass
                time.sleep(interval)
        raise TimeoutError(f"{self.url}{self.ready_path} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        # SIGTERM first: BentoML's workers run in process groups of their own, so only the arbiter
        # can stop them; a SIGKILL to it would leave them running.
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()
