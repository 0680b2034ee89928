"""`python -m runpod_adapter`: the RunPod serverless worker.

runpod's own command-line flags choose the mode:

- on RunPod (`RUNPOD_WEBHOOK_GET_JOB` set): take jobs until the worker is stopped;
- `--rp_serve_api --rp_api_port N [--rp_api_host H]`: serve the SDK's local API
  (`POST /runsync`, `/run`, `/status/{id}`) for development and tests;
- otherwise: run the job of `--test_input JSON`, or of `test_input.json` in the working
  directory, and exit 0 when it succeeded, 1 when it failed.

Start order: the allocator first (the process re-executes itself once with it preloaded, see
`preload_allocator`), then the network volume (`volume.prepare_environment` rewrites
`MODEL_NAMES` and checks each copy's content hashes), then, when started as root with `RUN_AS_USER`
set, the switch to that user (the cache a model downloads into on the volume handed to it first; a
switch that fails ends the process with one line, it never serves as root in its place), then
the settings are read (once; a bad value ends the process with one line), the model stack is
imported and the models' weights start loading in threads, then runpod is imported and starts; the
first job waits for the models (their schedulers and warm-up start inside the handler's event loop).

Infinity's engine threads are not daemons, so a process that leaves runpod with engines running
would never exit: whatever way runpod returns (test job done, API server stopped, SIGTERM), the
process ends here with `os._exit` and the exit code runpod chose.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("embed_rerank.runpod")


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _hand_over(folder: Path, uid: int, gid: int) -> None:
    """Make `folder` (created if absent) and everything in it belong to the serving user.

    Runs as root on a volume others may write: a symbolic link is never followed (a link planted as
    the folder would hand over whatever it points to), links inside are changed themselves (lchown).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink() or any(parent.is_symlink() for parent in folder.parents):
        raise OSError(f"{folder} is or lies under a symbolic link: remove the link, or set HF_HOME to a real folder")
    for root, dirs, files in os.walk(folder):
        for name in [".", *dirs, *files]:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if st.st_uid != uid or st.st_gid != gid:
                os.lchown(path, uid, gid)


def serving_user(user: str) -> Any:
    """The `pwd` entry of the user to switch to, or None when there is nothing to drop (RUN_AS_USER
    empty or root, or not started as root); a user that does not exist ends the process with one line."""
    import pwd

    if not user or user == "root" or os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise SystemExit(
            f"configuration error: RUN_AS_USER={user!r} is not a user of this image, and the worker does not "
            "serve as root in its place: create the user in the image (useradd), or set RUN_AS_USER to an "
            "existing user (an empty RUN_AS_USER serves as root)"
        ) from None


def drop_privileges(user: str, writable: Sequence[str | Path] = ()) -> None:
    """Serve as `user` once the volume is prepared (RunPod mounts the volume owned by root).

    Fails closed: when started as root with a user to switch to, the process either ends up as that
    user, unable to become root again, or exits with one line; it never serves as root by accident.
    `writable` (the model cache on the volume, when a model downloads there) is handed to the user first.
    An empty RUN_AS_USER, or `root`, stays root on purpose.
    """
    entry = serving_user(user)
    if entry is None:
        return
    for folder in writable:
        try:
            _hand_over(Path(folder), entry.pw_uid, entry.pw_gid)
        except OSError as exc:
            raise SystemExit(
                f"configuration error: RUN_AS_USER={user!r}: cannot hand the model cache {folder} to that user "
                f"({exc}), and the worker does not serve as root in its place: fix the folder on the volume, or "
                "bake the model into the image so that nothing downloads"
            ) from None
    try:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise SystemExit(
            f"configuration error: RUN_AS_USER={user!r}: cannot switch to that user ({exc}), and the worker does "
            "not serve as root in its place: give the container the capabilities to change user (SETUID, "
            "SETGID, CHOWN) or start it as that user; an empty RUN_AS_USER serves as root"
        ) from None
    try:
        os.setuid(0)
        regained = True
    except OSError:
        regained = False
    if regained or os.geteuid() != entry.pw_uid or os.getegid() != entry.pw_gid:
        raise SystemExit(f"configuration error: RUN_AS_USER={user!r}: the switch to that user did not hold "
                         "(the process could still act as root): start the container as that user instead")
    os.environ["HOME"] = entry.pw_dir
    os.environ["USER"] = entry.pw_name
    log.info("serving as user %s (uid %d)", entry.pw_name, entry.pw_uid)


# Set on the re-executed process: it never re-executes again, whether or not the preload took.
REEXEC_ENV = "EMBED_RERANK_ALLOCATOR_REEXEC"


def preload_allocator() -> None:
    """Re-execute this process once with the allocator of `ALLOCATOR` preloaded.

    The models run in this process, and a preload only acts when a process starts; the same
    pid and arguments keep RunPod's (and Docker's) view of the worker unchanged.
    """
    from runners import allocator
    from runners.settings import SettingsError

    try:
        chosen = allocator.choose(allocator.requested())
    except SettingsError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    if chosen.path is None or allocator.is_mapped(chosen.path) or os.environ.get(REEXEC_ENV):
        return  # importing `service` logs the allocator this process runs on (or why not)
    allocator.preload(chosen)
    os.environ[REEXEC_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def processor_name() -> str:
    """The CPU's name as py-cpuinfo's `brand_raw` gives it on Linux (/proc/cpuinfo), without its subprocess."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "Unable to get processor info."


def import_runpod() -> Any:
    """`import runpod`, less the 1.1 s its debugger module spends at import on py-cpuinfo (which starts
    a Python subprocess to learn the CPU's name for `--rp_debugger` output): the name comes from
    `processor_name()` instead; py-cpuinfo itself is left as it was."""
    if "runpod" in sys.modules:
        return sys.modules["runpod"]
    import cpuinfo

    original = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = lambda: {"brand_raw": processor_name()}
    try:
        import runpod
    finally:
        cpuinfo.get_cpu_info = original
    return runpod


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(levelname)s %(name)s: %(message)s")
    preload_allocator()
    from runpod_adapter import handler
    from runpod_adapter.volume import prepare_environment

    try:
        openai_output = handler.openai_output_mode()
    except handler.ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    run_as = os.environ.get("RUN_AS_USER", "").strip()
    serving_user(run_as)  # an unknown user ends the process before anything is written to the volume
    plan = prepare_environment(os.environ)
    # A model that downloads at run time writes the cache on the volume, which RunPod mounts owned
    # by root: that cache is handed to the user, which then downloads into it.
    writable = [plan.hf_home] if plan.writes_volume_later and plan.hf_home else []
    drop_privileges(run_as, writable)
    handler.configure(aliases=plan.aliases, openai_output=openai_output)
    handler.get_service()  # reads the settings: a bad value ends the process here, with one line
    handler.begin_loading()  # imports the model stack; the weights load while runpod starts its API

    runpod = import_runpod()

    code = 0
    try:
        runpod.serverless.start(
            {
                "handler": handler.handler,
                "concurrency_modifier": handler.concurrency_modifier,
                "return_aggregate_stream": False,
            }
        )
    except SystemExit as exc:  # runpod's local test mode and its SIGINT handler end with sys.exit
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        log.exception("the worker stopped on an error")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
