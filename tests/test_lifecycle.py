"""Settings, start-up failures and shutdown: fail loudly at start, stop cleanly on SIGTERM."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import time

import httpx
import pytest
from conftest import BENTOML, ROOT, Server, free_port, server_env

from runners.settings import SettingsError, load_settings


def test_defaults_serve_the_embedded_model():
    settings = load_settings({})
    (model,) = settings.models
    assert model.served_name == "all-MiniLM-L6-v2" and model.is_local
    assert (settings.queue_size, settings.runpod_max_concurrency) == (48000, 300)
    assert settings.max_concurrency == 512


def test_max_concurrency_follows_a_small_queue():
    assert load_settings({"INFINITY_QUEUE_SIZE": "16"}).max_concurrency == 16
    assert load_settings({"INFINITY_QUEUE_SIZE": "16", "MAX_CONCURRENCY": "64"}).max_concurrency == 64


def test_per_model_lists_and_seed_spellings(tiny_models):
    a, b = str(tiny_models["cross-encoder"]), str(tiny_models["classifier"])
    settings = load_settings({"MODEL_NAMES": f"{a};{b}", "BATCH_SIZES": "8;16", "DTYPES": "fp16", "BACKEND": "torch",
                              "SERVED_MODEL_NAMES": "ce;cls"})
    assert [(m.served_name, m.batch_size, m.dtype) for m in settings.models] == [("ce", 8, "float16"),
                                                                                 ("cls", 16, "float16")]


@pytest.mark.parametrize(("env", "needle"), [
    ({"BATCH_SIZES": "abc"}, "BATCH_SIZES"),
    ({"BATCH_SIZES": "0"}, "BATCH_SIZES"),
    ({"DTYPES": "float64"}, "DTYPES"),
    ({"BACKEND": "tensorrt"}, "BACKEND"),
    ({"INFINITY_QUEUE_SIZE": "-5"}, "INFINITY_QUEUE_SIZE"),
    ({"MODEL_NAMES": "/no/such/folder"}, "not a model folder"),
    ({"MODEL_NAMES": "a/b;c/d", "BATCH_SIZES": "1;2;3"}, "has 3 values but MODEL_NAMES has 2"),
    ({"MODEL_NAMES": "a/b;a/b"}, "SERVED_MODEL_NAMES"),
    ({"REQUEST_TIMEOUT": "soon"}, "REQUEST_TIMEOUT"),
])
def test_bad_settings_name_the_variable(env, needle):
    with pytest.raises(SettingsError, match=needle) as err:
        load_settings(env)
    assert "\n" not in str(err.value)


def _run_to_exit(extra: dict[str, str], timeout: float = 90) -> tuple[int, str]:
    proc = subprocess.run([BENTOML, "serve", "service:EmbeddingService", "--port", str(free_port())], cwd=ROOT,
                          env=server_env(extra), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_bad_setting_stops_the_start_with_one_line():
    code, out = _run_to_exit({"DTYPES": "float64"})
    assert code != 0
    assert out.strip().splitlines()[-1].startswith("configuration error: DTYPES has 'float64'")


def test_model_that_fails_to_load_stops_the_server(tmp_path, tiny_models):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_models["cross-encoder"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not weights")
    code, out = _run_to_exit({"MODEL_NAMES": str(broken)})
    assert code != 0
    assert "startup failed, stopping the server" in out and "failed to load" in out


def test_sigterm_under_load_drains_and_exits(tmp_path):
    server = Server({}, tmp_path / "server.log")
    try:
        server.wait_ready()
        texts = [f"sentence number {i} about load and shutdown" for i in range(64)]

        def call() -> str:
            try:
                return str(httpx.post(server.url + "/embed", json={"input": texts}, timeout=30).status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(call) for _ in range(16)]
            time.sleep(0.5)
            os.killpg(server.proc.pid, signal.SIGTERM)
            started = time.monotonic()
            server.proc.wait(timeout=15)
            exit_seconds = time.monotonic() - started
            outcomes = [f.result(timeout=30) for f in futures]
        assert exit_seconds < 10
        # Every request ended: answered, or refused/cut by the shutdown; none hung.
        assert "200" in outcomes
        assert set(outcomes) <= {"200", "503", "ConnectError", "RemoteProtocolError", "ReadError"}
    finally:
        server.stop()
