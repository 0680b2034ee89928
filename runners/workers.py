"""Several worker processes behind one `bentoml serve` (`WORKERS`): how many, which device and how many
CPU threads each one gets, and the run directory they share so that the server speaks for all of them.

How many (`worker_count`): `WORKERS=auto` is one worker per GPU the service is given (the entries of
`CUDA_VISIBLE_DEVICES` when it is set, else the first `GPU_COUNT` GPUs of the host, which BentoML hands
its workers), and 1 on a host without a GPU or with `DEVICE=cpu`/`mps`; a number overrides it.

Which device (`enter_worker`, in each worker before torch loads): worker *i* (0-based) keeps GPU
*i* mod *n* of the *n* GPUs it was given as its only visible device, so "cuda" means that GPU in every
thread of the worker; with more workers than GPUs several workers share a GPU (small models: the
front end, not the GPU, is the limit). CPU threads: with several workers each gets
`cores // WORKERS` torch threads (`OMP_NUM_THREADS`, unless the environment sets it) and ONNX Runtime
one fewer (at least one), so the workers together never ask for more threads than the host has cores.

The run directory (`prepare_serving`, in BentoML's serving process at the import of service.py; its
path reaches the workers through the environment they inherit; removed when that process exits):

    metrics/        every worker's PROMETHEUS_MULTIPROC_DIR: /metrics adds up all workers
                    (prometheus_client's multiprocess mode); a directory of this server alone, where
                    BentoML's default is one folder per user shared by every server it starts
    ready/<i>       worker i's models are loaded and warm (the file holds its pid): /readyz is 200 only
                    when every worker has one and its process is alive
    failed          why a worker can no longer serve: /livez and /readyz of every worker answer 503 with it

Outside `bentoml serve` (in-process tests, the RunPod adapter: one process) none of this applies:
one worker, and readiness is the process's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from runners.lifecycle import at_exit, in_bentoml_worker
from runners.settings import Settings

log = logging.getLogger("embed_rerank.workers")

RUN_DIR_ENV = "EMBED_RERANK_RUN_DIR"
WORKERS_ENV = "EMBED_RERANK_WORKERS"
RUN_DIR_PREFIX = "embed-rerank-run-"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


# ---- how many, on which device ----


def host_gpus() -> int:
    """NVIDIA GPUs of this host, by NVML (what BentoML counts; no CUDA context is created)."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU
        return 0


def visible_gpus(settings: Settings, env: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs the workers get: CUDA_VISIBLE_DEVICES's entries when set, else the first GPU_COUNT of the host."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    return [str(i) for i in range(min(settings.gpu_count, host_gpus()))]


def worker_count(settings: Settings, env: Mapping[str, str] | None = None) -> int:
    """`WORKERS`: the number given, else one per GPU the service is given, else 1."""
    if settings.workers:
        return settings.workers
    if settings.device in ("cpu", "mps"):
        return 1
    return max(1, len(visible_gpus(settings, env)))


def workers_now() -> int:
    """The worker processes of the server this process belongs to (1 outside `bentoml serve`)."""
    try:
        return max(1, int(os.environ.get(WORKERS_ENV, "1")))
    except ValueError:
        return 1


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cores_per_worker() -> int:
    """This worker's share of the host's cores (all of them with one worker)."""
    return max(1, host_cores() // workers_now())


def worker_index() -> int | None:
    """This worker's index, 0-based (BentoML numbers workers from 1), or None outside a BentoML worker."""
    if not in_bentoml_worker():
        return None
    import bentoml

    index = bentoml.server_context.worker_index
    return None if index is None else int(index) - 1


def enter_worker(settings: Settings, env: MutableMapping[str, str] | None = None,
                 index: int | None = None) -> str | None:
    """In a worker, before torch loads: its own GPU and its share of the CPU threads. Returns what it
    chose (for the start-up log), or None outside a worker of several."""
    env = os.environ if env is None else env
    index = worker_index() if index is None else index
    count = int(env.get(WORKERS_ENV, "1") or 1)
    if index is None or count <= 1:
        return None
    chosen = [f"worker {index + 1}/{count}"]
    if settings.device not in ("cpu", "mps"):
        gpus = [g.strip() for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        if gpus:
            gpu = gpus[index % len(gpus)]
            env["CUDA_VISIBLE_DEVICES"] = gpu
            chosen.append(f"CUDA_VISIBLE_DEVICES={gpu} (of {','.join(gpus)})")
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, host_cores() // count))
    chosen.append(f"{env['OMP_NUM_THREADS']} torch CPU thread(s)")
    return ", ".join(chosen)


# ---- the run directory ----


def run_dir() -> Path | None:
    path = os.environ.get(RUN_DIR_ENV)
    return Path(path) if path else None


def prepare_serving(count: int) -> Path:
    """In BentoML's serving process, before it spawns its workers: a fresh run directory for this
    server, named (with the worker count) in the environment the workers inherit; removed at exit."""
    remove_stale_run_dirs()
    path = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
    for sub in ("metrics", "ready"):
        (path / sub).mkdir()
    os.environ[RUN_DIR_ENV] = str(path)
    os.environ[WORKERS_ENV] = str(count)
    at_exit(remove_run_dir)
    return path


def remove_run_dir() -> None:
    """The serving process's run directory, gone (at exit; also before an os._exit)."""
    path = run_dir()
    if path is not None and path.name.startswith(f"{RUN_DIR_PREFIX}{os.getpid()}-"):
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_run_dirs() -> None:
    """Run directories of serving processes that are gone (killed before they could remove theirs)."""
    with contextlib.suppress(OSError):
        for entry in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*-*"):
            pid = entry.name[len(RUN_DIR_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)) and entry.is_dir() and entry.stat().st_uid == os.getuid():
                shutil.rmtree(entry, ignore_errors=True)


def use_shared_metrics(env: MutableMapping[str, str] | None = None) -> str | None:
    """In a worker: Prometheus's multiprocess directory is the run directory's `metrics/`. Must run
    before prometheus_client is imported (it chooses its mode then); runners.metrics calls it first."""
    env = os.environ if env is None else env
    path = env.get(RUN_DIR_ENV)
    if not path or not in_bentoml_worker():
        return None
    env[METRICS_ENV] = os.path.join(path, "metrics")
    return env[METRICS_ENV]


def forget_dead_workers() -> None:
    """Drop the gauges of workers that died without saying so (a restarted worker's predecessor): the
    queue depth and cache size add up the live workers only."""
    path = os.environ.get(METRICS_ENV)
    if not path or run_dir() is None:
        return
    with contextlib.suppress(OSError):
        for entry in Path(path).glob("gauge_live*_*.db"):
            pid = entry.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    entry.unlink()


def _alive(pid: int) -> bool:
    """A running process (a worker that died stays a zombie until the serving process reaps it)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _marker(index: int) -> Path | None:
    path = run_dir()
    return None if path is None else path / "ready" / str(index)


def mark_ready(ready: bool = True) -> None:
    """Say (or unsay) in the run directory that this worker's models are loaded and warm."""
    index = worker_index()
    marker = _marker(index) if index is not None else None
    if marker is None:
        return
    try:
        if ready:
            tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, marker)
        elif marker.is_file() and marker.read_text().strip() == str(os.getpid()):
            marker.unlink()
    except OSError as exc:
        log.warning("could not %s the ready marker %s: %s", "write" if ready else "remove", marker, exc)


def all_ready() -> bool:
    """Every worker of this server has its models loaded and warm (True outside `bentoml serve`)."""
    path = run_dir()
    if path is None or worker_index() is None:
        return True
    count = workers_now()
    ready = 0
    for index in range(count):
        try:
            pid = int((path / "ready" / str(index)).read_text())
        except (OSError, ValueError):
            return False
        ready += _alive(pid)
    return ready == count


def failure_path() -> str | None:
    """Where a worker that can no longer serve writes why, for every worker's health to read."""
    path = run_dir()
    return None if path is None or worker_index() is None else str(path / "failed")
