"""Settings, start-up failures and shutdown: fail loudly at start, stop cleanly on SIGTERM."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass

import httpx
import psutil
import pytest
from conftest import BENTOML

from load_tests.processes import ROOT, ServerProcess, free_port, hermetic_env
from runners.lifecycle import ARBITER_PID_ENV, EXIT_CANNOT_SERVE, install_in_arbiter, stop_server
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


def test_stop_server_outside_a_bentoml_worker_only_logs():
    # Here (as in in-process ASGI tests and the RunPod adapter) no serving process is ours to stop.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("embed_rerank.lifecycle")
    logger.addHandler(handler)
    try:
        assert install_in_arbiter() is False and ARBITER_PID_ENV not in os.environ
        stop_server("the test's reason")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [f"stopping the server, exit code {EXIT_CANNOT_SERVE}: the test's reason"]
    with pytest.raises(ValueError, match="exit_code must be 1-255"):
        stop_server("a clean stop is not a failure", exit_code=0)


# Every process of one test run carries this variable, so the test finds what the run left behind.
RUN_MARKER = "EMBED_RERANK_TEST_RUN"
MODES = {"plain": (False, {}), "pid-1": (True, {}),
         # What `bentoml containerize`'s image sets: BentoML then never restarts a worker.
         "pid-1-containerized": (True, {"BENTOML_CONTAINERIZED": "true"})}


@functools.cache
def unshare_problem() -> str | None:
    """Why `unshare` cannot run a command as PID 1 of a new PID namespace here, or None if it can."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare cannot create a PID namespace (run as root): {probe.stderr.strip()}"
    return None


@dataclass
class Exited:
    code: int
    output: str
    seconds: float  # from the start to the exit
    stop_seconds: float | None  # from the worker's "stopping the server" line to the exit
    leftovers: list[str]  # processes of the run still running after it exited


def processes_of(run_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(RUN_MARKER) == run_id:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def serve_to_exit(extra: dict[str, str], as_pid_1: bool = False, timeout: float = 120) -> Exited:
    """`bentoml serve` until it exits by itself; as PID 1 of a new PID namespace, as in a container."""
    run_id = uuid.uuid4().hex
    cmd = [BENTOML, "serve", "service:EmbeddingService", "--port", str(free_port())]
    if as_pid_1:
        # --fork makes unshare's child PID 1 of the namespace, and unshare exits with its status;
        # --kill-child takes the namespace down if the test has to kill unshare.
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *cmd]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=hermetic_env({**extra, RUN_MARKER: run_id}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    stop_line_at: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            if not stop_line_at and "stopping the server" in line:
                stop_line_at.append(time.monotonic())
            lines.append(line)

    # A worker left running would hold the pipe open: read in a thread, wait on the process.
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    exited = time.monotonic()
    described = []
    for leftover in processes_of(run_id):
        try:
            described.append(f"{leftover.pid}: {' '.join(leftover.cmdline())[:120]}")
            leftover.kill()
        except psutil.Error:
            pass
    reader.join(10)
    output = "".join(lines)
    if code is None:
        pytest.fail(f"bentoml serve did not exit within {timeout:.0f} s:\n{output[-3000:]}")
    return Exited(code, output, exited - started, exited - stop_line_at[0] if stop_line_at else None, described)


def broken_model(folder, tiny_models) -> str:
    """A model folder whose config is fine and whose weights are not: it fails to load."""
    folder.mkdir()
    (folder / "config.json").write_text((tiny_models["cross-encoder"] / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"not weights")
    return str(folder)


@pytest.mark.parametrize("as_pid_1", [False, True], ids=["plain", "pid-1"])
def test_bad_setting_stops_the_start_with_one_line(as_pid_1):
    if as_pid_1 and unshare_problem():
        pytest.skip(unshare_problem())
    run = serve_to_exit({"DTYPES": "float64"}, as_pid_1=as_pid_1)
    assert run.code == 1
    assert run.output.strip().splitlines()[-1].startswith("configuration error: DTYPES has 'float64'")
    assert run.seconds < 30
    assert run.leftovers == []


@pytest.mark.parametrize("mode", list(MODES))
def test_model_that_fails_to_load_stops_the_server(tmp_path, tiny_models, mode):
    as_pid_1, extra = MODES[mode]
    if as_pid_1 and unshare_problem():
        pytest.skip(unshare_problem())
    run = serve_to_exit({"MODEL_NAMES": broken_model(tmp_path / "broken", tiny_models), **extra}, as_pid_1=as_pid_1)
    # Before the stop signal had a handler, the SIGKILL to PID 1 was dropped and the worker was
    # restarted for as long as the test waited.
    assert run.code == EXIT_CANNOT_SERVE, run.output[-3000:]
    assert f"stopping the server, exit code {EXIT_CANNOT_SERVE}: startup failed: model" in run.output
    assert "failed to load" in run.output
    assert run.output.count("stopping the server, exit code") == 1  # logged once, and no restarted worker
    assert run.stop_seconds is not None and run.stop_seconds < 10
    # The whole run is mostly importing torch and the failed load; generous for a loaded machine.
    assert run.seconds < 60
    assert run.leftovers == []


def test_sigterm_under_load_drains_and_exits(tmp_path):
    server = ServerProcess.bentoml(tmp_path / "server.log", env=hermetic_env())
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


@pytest.mark.parametrize("given,expected", [(None, "10000"), ("500", "500")])
def test_the_service_sets_libgomps_spin_count_unless_the_environment_does(given, expected):
    """README, Performance (Threads and OpenMP): set before torch loads, in every process that imports service."""
    import sys

    env = hermetic_env({})
    env.pop("GOMP_SPINCOUNT", None)
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    code = "import os, sys, service; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, "False"]
