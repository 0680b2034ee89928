"""WORKERS: several worker processes behind one `bentoml serve` speak as one server.

How many workers and which device each gets (runners/workers.py), then real servers with WORKERS=2:
/metrics adds up both workers (checked against each worker's own files), /readyz is 503 while one
worker is not ready (one killed and restarted by BentoML), SIGTERM drains both, a worker whose model
hangs takes the whole server down with health saying why on every worker, and a start-up failure
as PID 1 still exits with code 3.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time
from pathlib import Path

import checkpoints
import httpx
import psutil
import pytest
from test_lifecycle import MODES, broken_model, serve_to_exit, unshare_problem

from load_tests.processes import ServerProcess, hermetic_env
from runners import workers
from runners.lifecycle import EXIT_CANNOT_SERVE
from runners.settings import SettingsError, load_settings

MODEL = "all-MiniLM-L6-v2"

# ---- how many, which device ----


@pytest.mark.parametrize(("env", "host", "expected"), [
    ({}, 0, 1),  # a CPU host
    ({"CUDA_VISIBLE_DEVICES": ""}, 4, 1),
    ({}, 4, 1),  # GPU_COUNT=1 (the default): BentoML gives the service one GPU
    ({"GPU_COUNT": "4"}, 4, 4),
    ({"GPU_COUNT": "8"}, 4, 4),
    ({"CUDA_VISIBLE_DEVICES": "2,3,5"}, 8, 3),
    ({"CUDA_VISIBLE_DEVICES": "2,3,5", "DEVICE": "cpu"}, 8, 1),
    ({"CUDA_VISIBLE_DEVICES": "2,3,5", "WORKERS": "2"}, 8, 2),
    ({"WORKERS": "6"}, 0, 6),
])
def test_auto_is_one_worker_per_gpu_the_service_is_given(monkeypatch, env, host, expected):
    monkeypatch.setattr(workers, "host_gpus", lambda: host)
    assert workers.worker_count(load_settings(env), env) == expected


def test_workers_setting_is_a_number_or_auto():
    assert load_settings({}).workers == load_settings({"WORKERS": "auto"}).workers == 0
    assert load_settings({"WORKERS": " 3 "}).workers == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(SettingsError, match=r"^WORKERS='.*' is not valid: use auto or a whole number >= 1"):
            load_settings({"WORKERS": bad})


def test_each_worker_takes_its_gpu_and_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(workers, "host_cores", lambda: 16)
    settings = load_settings({})
    chosen = []
    for index in range(3):
        env = {workers.WORKERS_ENV: "3", "CUDA_VISIBLE_DEVICES": "4,6"}
        assert workers.enter_worker(settings, env, index).startswith(f"worker {index + 1}/3")
        chosen.append((env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"]))
    assert chosen == [("4", "5"), ("6", "5"), ("4", "5")]  # i mod the GPUs; 16 cores // 3 workers
    env = {workers.WORKERS_ENV: "2", "CUDA_VISIBLE_DEVICES": "4,6", "OMP_NUM_THREADS": "3"}
    workers.enter_worker(load_settings({"DEVICE": "cpu"}), env, 1)
    assert env == {workers.WORKERS_ENV: "2", "CUDA_VISIBLE_DEVICES": "4,6", "OMP_NUM_THREADS": "3"}  # yours stay
    one = {workers.WORKERS_ENV: "1", "CUDA_VISIBLE_DEVICES": "4,6"}
    assert workers.enter_worker(settings, one, 0) is None and one == {workers.WORKERS_ENV: "1", "CUDA_VISIBLE_DEVICES": "4,6"}


def test_run_directories_of_dead_servers_are_removed_at_the_next_start(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"{workers.RUN_DIR_PREFIX}{2**22 + 7}-abc"  # above Linux's pid_max: never a live pid
    alive = tmp_path / f"{workers.RUN_DIR_PREFIX}{os.getpid()}-abc"
    for folder in (dead, alive):
        (folder / "metrics").mkdir(parents=True)
    workers.remove_stale_run_dirs()
    assert not dead.exists() and alive.exists()


# ---- a real server with two workers ----


def _worker_pids(server: ServerProcess) -> list[int]:
    return sorted(p.pid for p in psutil.Process(server.proc.pid).children(recursive=True))


def _run_dir(server: ServerProcess) -> Path:
    (found,) = Path("/tmp").glob(f"{workers.RUN_DIR_PREFIX}{server.proc.pid}-*")
    return found


def _per_worker(server: ServerProcess, kind: str, name: str, labels: dict[str, str]) -> dict[int, float]:
    """One sample's value in each worker's own multiprocess file (what /metrics adds up)."""
    from prometheus_client.mmap_dict import MmapedDict

    values = {}
    for path in (_run_dir(server) / "metrics").glob(f"{kind}_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, sample_labels, _ = json.loads(key)
            if sample == name and sample_labels == labels:
                values[pid] = value
    return values


def _metric(server: ServerProcess, line_start: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} is not in /metrics")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    server = ServerProcess.bentoml(tmp_path_factory.mktemp("workers") / "server.log", env=hermetic_env({"WORKERS": "2"}))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
    assert not list(Path("/tmp").glob(f"{workers.RUN_DIR_PREFIX}{server.proc.pid}-*")), "the run directory is left"


REQUESTS = f'embed_rerank_requests_total{{capability="embed",model="{MODEL}"}}'


def test_metrics_add_up_every_worker(two_workers):
    pids = _worker_pids(two_workers)
    assert len(pids) == 2
    assert "worker 1/2" in two_workers.log() and "worker 2/2" in two_workers.log()
    labels = {"capability": "embed", "model": MODEL}
    before = _metric(two_workers, REQUESTS)
    sent = 0
    # A new connection per request: the kernel hands them to either worker; send until both served some.
    while sent < 400:
        for _ in range(20):
            assert httpx.post(two_workers.url + "/embed", json={"input": f"counted request {sent}"}).status_code == 200
            sent += 1
        per_worker = _per_worker(two_workers, "counter", "embed_rerank_requests_total", labels)
        if len(per_worker) == 2 and all(v > 1 for v in per_worker.values()):  # each had more than its warm-up
            break
    assert sorted(per_worker) == pids, per_worker
    total = _metric(two_workers, REQUESTS)
    assert total - before == sent and total == sum(per_worker.values())
    assert _metric(two_workers, f'embed_rerank_queue_depth{{model="{MODEL}"}}') == 0
    # One family each: BentoML's collector reads ours from the workers' files; nothing is appended twice.
    text = httpx.get(two_workers.url + "/metrics").text
    assert text.count("# TYPE embed_rerank_requests_total counter") == 1
    assert httpx.get(two_workers.url + "/tei/metrics").text.count(REQUESTS + " ") == 1


def test_readyz_waits_for_every_worker(two_workers):
    """A worker that dies is restarted by BentoML; until its models are loaded again /readyz is 503,
    whichever worker answers, and the other worker keeps serving requests."""
    victim = _worker_pids(two_workers)[1]
    before = _metric(two_workers, REQUESTS)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and psutil.pid_exists(victim) and psutil.Process(victim).status() != "zombie":
        time.sleep(0.05)
    answers = [httpx.get(two_workers.url + "/readyz", timeout=5).status_code for _ in range(6)]
    assert answers == [503] * 6
    assert httpx.post(two_workers.url + "/embed", json={"input": "served meanwhile"}, timeout=30).status_code == 200
    started = time.monotonic()
    while httpx.get(two_workers.url + "/readyz", timeout=5).status_code != 200:
        assert time.monotonic() - started < 120, two_workers.log_tail()
        time.sleep(0.2)
    pids = _worker_pids(two_workers)
    assert len(pids) == 2 and victim not in pids
    assert all(httpx.get(two_workers.url + "/readyz").status_code == 200 for _ in range(4))
    # The dead worker's counts stay in the sum (a counter never goes back); its queue gauge is gone.
    assert _metric(two_workers, REQUESTS) >= before + 1
    assert _metric(two_workers, f'embed_rerank_queue_depth{{model="{MODEL}"}}') == 0


def test_sigterm_drains_every_worker(two_workers):
    """Last in this module: it stops the server. Requests in flight on both workers are all answered."""
    # Texts of their own per request: a worker's cache of repeated inputs would answer a repeat at once,
    # and a request answered before it is seen queued proves nothing about the drain.
    texts = [f"sentence number {i} about load and shutdown, long enough to take a while" for i in range(48)]
    labels = {"model": MODEL}

    def call(j: int) -> str:
        try:
            body = {"input": [f"request {j}: {t}" for t in texts]}
            return str(httpx.post(two_workers.url + "/embed", json=body, timeout=60).status_code)
        except httpx.HTTPError as exc:
            return type(exc).__name__

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, j) for j in range(8)]
        deadline = time.monotonic() + 20
        busy: dict[int, float] = {}
        while time.monotonic() < deadline:  # until every request is in a worker and both workers have some
            depth = _per_worker(two_workers, "gauge_livesum", "embed_rerank_queue_depth", labels)
            busy = {pid: v for pid, v in depth.items() if v > 0}
            answered = sum(f.done() for f in futures)
            # A connection the kernel still holds unaccepted when the listener closes is reset, as with
            # any server: the drain is for requests a worker has taken.
            if len(busy) == 2 and sum(depth.values()) + len(texts) * answered >= len(texts) * len(futures):
                break
            time.sleep(0.02)
        assert len(busy) == 2, f"the requests did not reach both workers: {busy}"
        os.killpg(two_workers.proc.pid, signal.SIGTERM)
        started = time.monotonic()
        code = two_workers.proc.wait(timeout=30)
        exit_seconds = time.monotonic() - started
        outcomes = [f.result(timeout=60) for f in futures]
    assert outcomes == ["200"] * 8
    assert code == 0 and exit_seconds < 10


# ---- a worker's model hangs; start-up failure as PID 1 ----


def test_a_worker_whose_model_hangs_takes_the_server_down(tmp_path):
    folder = checkpoints.build_faulty_embedder(tmp_path / "faulty-embedder", oom_above_tokens=300)
    server = ServerProcess.bentoml(tmp_path / "server.log", env=hermetic_env(
        {"MODEL_NAMES": str(folder), "SERVED_MODEL_NAMES": "faulty", "MODEL_STALL_TIMEOUT": "2", "WORKERS": "2"}))
    try:
        server.wait_ready()
        res = httpx.post(server.url + "/v1/embeddings", json={"model": "faulty", "input": ["freeze please"]}, timeout=20)
        assert res.status_code == 503 and "out of service" in res.json()["error"]["message"]
        # Until the exit, health says why on every worker (a new connection each: either worker answers).
        for path in ("/livez", "/readyz") * 3:
            health = httpx.get(server.url + path, timeout=2)
            assert health.status_code == 503 and "MODEL_STALL_TIMEOUT" in health.json()["reason"], (path, health.text)
        assert server.proc.wait(timeout=30) == EXIT_CANNOT_SERVE
        assert f"stopping the server, exit code {EXIT_CANNOT_SERVE}" in server.log()
    finally:
        server.stop()


def test_a_start_up_failure_with_two_workers_exits_3_as_pid_1(tmp_path, tiny_models):
    as_pid_1, extra = MODES["pid-1"]
    if unshare_problem():
        pytest.skip(unshare_problem())
    run = serve_to_exit({"MODEL_NAMES": broken_model(tmp_path / "broken", tiny_models), "WORKERS": "2", **extra},
                        as_pid_1=as_pid_1)
    assert run.code == EXIT_CANNOT_SERVE, run.output[-3000:]
    assert "startup failed: model" in run.output and "failed to load" in run.output
    assert run.stop_seconds is not None and run.stop_seconds < 10
    assert run.leftovers == []
