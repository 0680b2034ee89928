"""Stopping the whole `bentoml serve` from a worker that cannot serve, with an exit code that says why.

Exit codes of `bentoml serve service:EmbeddingService` (also the container's, where it is PID 1):

- 0: stopped by SIGTERM or SIGINT, after the requests in flight finished;
- 1: a bad setting (the last line of the output names the variable), or BentoML itself failed;
- 3 (`EXIT_CANNOT_SERVE`): a model could not be loaded at start, or could no longer be served.

`bentoml serve` is one serving process (circus's arbiter) that starts the worker processes which
load the models; both import service.py. At that import `install_in_arbiter()`, in the serving
process only, installs a handler for `STOP_SIGNAL` and puts the serving process's pid into the
environment that the workers inherit. `stop_server()`, in a worker, leaves its exit code in a
file named by that environment and sends `STOP_SIGNAL` to the serving process, whose handler kills
the asking worker, gives any other worker a few seconds to finish its requests (SIGTERM), kills
what is left and exits with the code.

Why not simply SIGKILL the serving process: in a container it is PID 1, and the kernel drops every
signal sent to PID 1 from inside its namespace unless PID 1 handles it, SIGKILL included; BentoML
then restarts the failed worker forever (with BENTOML_CONTAINERIZED, as in the image, circus exits
1 once its last worker is gone, without saying why). A handled signal is delivered. When nobody
answers (a serving process that did not import service.py), the worker still falls back to SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

log = logging.getLogger("embed_rerank.lifecycle")

EXIT_CANNOT_SERVE = 3
# Neither circus (HUP, QUIT, INT, TERM, WINCH), BentoML nor uvicorn handle SIGUSR2.
STOP_SIGNAL = signal.SIGUSR2
# Set in the serving process's environment by install_in_arbiter; its workers inherit them.
ARBITER_PID_ENV = "EMBED_RERANK_ARBITER_PID"
STOP_REQUEST_ENV = "EMBED_RERANK_STOP_REQUEST"

_ANSWER_TIMEOUT_S = 5.0  # a worker's wait for the serving process before the SIGKILL fallback
_DRAIN_S = 5.0  # the other workers' time to finish their requests before they are killed
_WORKER_MODULE = "_bentoml_impl.worker.service"  # what BentoML runs a worker as: `python -m ...`
_SERVE_COMMANDS = frozenset({"serve", "start-http-server"})  # bentoml CLI commands that run circus

# The serving process that spawned this worker: if the parent changes later, it has died.
_PARENT_AT_IMPORT = os.getppid()
_stop_lock = threading.Lock()
_answering = False  # the serving process is already stopping its workers (a second request waits on it)
_exit_hooks: list[Callable[[], None]] = []


def at_exit(hook: Callable[[], None]) -> None:
    """Run `hook` when this process exits, by a normal exit or by this module's os._exit."""
    atexit.register(hook)
    _exit_hooks.append(hook)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), for the start-up log; None where unknown."""
    try:
        with open("/proc/self/stat", "rb") as f:
            started_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - started_ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return None


def in_bentoml_worker() -> bool:
    """Whether this process is a BentoML worker (`python -m _bentoml_impl.worker.service ...`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == _WORKER_MODULE


def _in_serve_command() -> bool:
    """Whether this thread is running `bentoml serve` (or `start-http-server`), i.e. is the arbiter.

    The CLI imports the service inside its click command, before it creates circus's arbiter in
    the same process and thread; a worker runs a click command of its own (`main`), `bentoml build`
    and the rest have other names, and in-process users (tests, `bentoml.serve()`, the RunPod
    adapter) run no bentoml_cli command at all.
    """
    click = sys.modules.get("click")
    if click is None or in_bentoml_worker():
        return False
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.command.name not in _SERVE_COMMANDS:
        return False
    return getattr(ctx.command.callback, "__module__", "").startswith("bentoml_cli")


def install_in_arbiter() -> bool:
    """In `bentoml serve`'s serving process, answer the workers' `stop_server`; elsewhere do nothing.

    Call it at the import of the service module, which the serving process imports before it
    spawns its workers. Returns whether this process is the serving process (handler installed).
    """
    if not _in_serve_command() or threading.current_thread() is not threading.main_thread():
        return False
    if os.environ.get(ARBITER_PID_ENV) == str(os.getpid()):
        return True
    signal.signal(STOP_SIGNAL, _answer_stop_request)
    os.environ[ARBITER_PID_ENV] = str(os.getpid())
    try:
        name = f"embed-rerank-stop-{os.getpid()}-{secrets.token_hex(6)}.json"
        os.environ[STOP_REQUEST_ENV] = os.path.join(tempfile.gettempdir(), name)
    except OSError:  # no writable temporary folder: the stop still works, with EXIT_CANNOT_SERVE
        os.environ.pop(STOP_REQUEST_ENV, None)
    return True


def stop_server(reason: str, exit_code: int = EXIT_CANNOT_SERVE) -> None:
    """Make the whole `bentoml serve` exit with `exit_code` (1-255) within seconds; log `reason` once.

    Call it in a worker that cannot serve. There it does not return: the serving process kills
    this worker, stops the others and exits, also as PID 1; if it does not answer within
    5 s, this worker SIGKILLs it (and, once it is gone, its other workers) and exits itself.
    Outside a BentoML worker (in-process ASGI tests, the RunPod adapter) there is no server to
    stop: it logs and returns, and the caller's exception ends what it runs.
    """
    if not 1 <= exit_code <= 255:
        raise ValueError(f"exit_code must be 1-255 (0 would report a clean stop), got {exit_code}")
    with _stop_lock:
        log.error("stopping the server, exit code %d: %s", exit_code, reason)
        if not in_bentoml_worker():
            return
        arbiter = _PARENT_AT_IMPORT
        if os.getppid() != arbiter:  # the serving process is already gone
            _exit(exit_code)
        if os.environ.get(ARBITER_PID_ENV) == str(arbiter):
            _leave_stop_request(exit_code)
            with contextlib.suppress(ProcessLookupError):
                os.kill(arbiter, STOP_SIGNAL)
            if _parent_gone(arbiter, _ANSWER_TIMEOUT_S):
                _exit(exit_code)
            log.error("the serving process (pid %d) did not stop within %.0f s; killing it",
                      arbiter, _ANSWER_TIMEOUT_S)
        _kill_arbiter_and_exit(arbiter, exit_code)


def _leave_stop_request(exit_code: int) -> None:
    path = os.environ.get(STOP_REQUEST_ENV)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "exit_code": exit_code}, f)
        os.replace(tmp, path)  # the serving process never reads a half-written request
    except OSError as exc:
        log.warning("could not pass exit code %d to the serving process (%s): it exits with %d",
                    exit_code, exc, EXIT_CANNOT_SERVE)


def _read_stop_request() -> tuple[int, int | None]:
    """(exit code, pid of the asking worker) that a worker left; the defaults without one."""
    path = os.environ.get(STOP_REQUEST_ENV)
    if not path:
        return EXIT_CANNOT_SERVE, None
    try:
        with open(path, encoding="utf-8") as f:
            request = json.load(f)
        os.unlink(path)
        code, pid = int(request["exit_code"]), int(request["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return EXIT_CANNOT_SERVE, None
    return (code if 1 <= code <= 255 else EXIT_CANNOT_SERVE), pid


def _answer_stop_request(signum: int, frame: FrameType | None) -> None:
    """The serving process's handler of STOP_SIGNAL: stop every worker, then exit with the code."""
    global _answering
    if _answering:  # another worker asked too (several workers fail at start): the first answer stops all
        return
    _answering = True
    code, requester = EXIT_CANNOT_SERVE, None
    try:
        code, requester = _read_stop_request()
        log.error("worker %s cannot serve: stopping its workers and exiting with code %d",
                  requester if requester is not None else "(unknown)", code)
        import psutil

        workers = psutil.Process().children(recursive=True)
        for proc in workers:
            with contextlib.suppress(psutil.Error):
                # The asking worker has nothing left to finish; the others drain their requests.
                if proc.pid == requester:
                    proc.kill()
                else:
                    proc.terminate()
        _, alive = psutil.wait_procs(workers, timeout=_DRAIN_S)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=1)
    finally:
        # os._exit, not sys.exit: an exception raised here would unwind through circus's loop.
        _exit(code)


def _parent_gone(parent: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while os.getppid() == parent:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_arbiter_and_exit(arbiter: int, exit_code: int) -> NoReturn:
    """The fallback: SIGKILL the serving process; when it died, SIGKILL the workers it left."""
    import psutil

    try:
        others = [p for p in psutil.Process(arbiter).children(recursive=True) if p.pid != os.getpid()]
    except psutil.Error:
        others = []
    if path := os.environ.get(STOP_REQUEST_ENV):
        with contextlib.suppress(OSError):
            os.unlink(path)
    with contextlib.suppress(ProcessLookupError):
        os.kill(arbiter, signal.SIGKILL)
    # Workers run in sessions of their own: nothing else stops them once the serving process died.
    if _parent_gone(arbiter, 1.0):
        for proc in others:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    _exit(exit_code)


def _exit(code: int) -> NoReturn:
    # Infinity's threads are not daemons and the engines were not stopped: a normal exit would hang.
    for hook in _exit_hooks:
        with contextlib.suppress(Exception):
            hook()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
