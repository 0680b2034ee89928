"""Cold start: start the service as a fresh process N times; time to ready and to the first correct answer.

    python -m load_tests.cold_start                 # 5 runs of `bentoml serve`, writes bench/cold_start.json
    python -m load_tests.cold_start --runs 10 --runpod   # and the RunPod worker's local API server

For each run, from the moment the process is spawned:
- ready_s:        GET /readyz answers 200 (polled every 50 ms); for the RunPod worker, its API answers;
- first_answer_s: the first embedding of a fixed sentence that is correct (cosine >= 0.999, --min-cosine, with the
                  vector sentence-transformers computes for it here, before the runs), asked right after
                  ready (the service warms its model before ready; the worker loads its engines lazily,
                  on the first job, so its first answer includes the model load).
The process is stopped (SIGTERM to its group) before the next run. The OS file cache is warm after the
first run; the first run is reported too. From the start-up log line of the process that loads the
models (`all N model(s) ready in ... (imports, weights read, moved to device, warm-up); ... after the
process started`) each run also records those phases, and `framework_s`: the part of the first
answer that is none of them (interpreter and framework start, BentoML's serving process, the request
itself), i.e. what the framework adds that the imports did not hide.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from load_tests.processes import ServerProcess  # noqa: E402

SENTENCE = "A compass needle points north because it lines up with the Earth's magnetic field."
PHASES = re.compile(
    r"all \d+ model\(s\) ready in (?P<ready_s>[0-9.]+)s \(imports (?P<imports_s>[0-9.]+)s, weights read "
    r"(?P<weights_read_s>[0-9.]+)s, moved to device (?P<to_device_s>[0-9.]+)s, warm-up (?P<warmup_s>[0-9.]+)s"
    r"[^)]*\)(?:; (?P<process_age_s>[0-9.]+)s after the process started)?")
PHASE_NAMES = ("imports_s", "weights_read_s", "to_device_s", "warmup_s")


def phases(log: str, first_answer_s: float) -> dict[str, float | None]:
    """The start-up log's phases (seconds) and framework_s, the rest of the first answer; {} without the line."""
    match = PHASES.search(log)
    if not match:
        return {}
    found = {k: float(v) if v is not None else None for k, v in match.groupdict().items()}
    found["framework_s"] = round(first_answer_s - sum(found[k] for k in PHASE_NAMES), 3)
    return found


def reference_vector() -> list[float]:
    """The embedding of SENTENCE, computed here with sentence-transformers (normalized)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from runners.settings import load_settings

    model = SentenceTransformer(load_settings().models[0].name_or_path, device="cpu")
    return model.encode([SENTENCE], normalize_embeddings=True)[0].tolist()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    return dot / (na * nb) if na and nb else 0.0


MIN_COSINE = 0.999


def first_answer(
    post: Any, reference: list[float], started: float, timeout: float, min_cosine: float = MIN_COSINE
) -> tuple[float, float]:
    """(seconds from `started` to the first correct vector, its cosine); retries until correct or timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            vector = post()
            if vector is not None:
                sim = cosine(vector, reference)
                if sim >= min_cosine:
                    return time.perf_counter() - started, sim
                last = f"cosine {sim:.4f}"
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"no correct answer within {timeout:.0f}s (last: {last})")


def first_correct(process: ServerProcess, vector: Callable[[httpx.Client], list[float] | None], client_timeout: float,
                  reference: list[float], timeout: float, min_cosine: float) -> dict[str, Any]:
    """ready_s, first_answer_s and cosine of a process just started: `vector(client)` asks it for SENTENCE's."""
    ready = process.wait_ready(timeout)
    with httpx.Client(base_url=process.url, timeout=client_timeout) as client:
        answer, sim = first_answer(lambda: vector(client), reference, process.started, timeout, min_cosine)
    return {"ready_s": round(ready, 3), "first_answer_s": round(answer, 3), "cosine": round(sim, 6)}


def service_vector(client: httpx.Client) -> list[float] | None:
    response = client.post("/v1/embeddings", json={"input": [SENTENCE]})
    return response.json()["data"][0]["embedding"] if response.status_code == 200 else None


def runpod_vector(client: httpx.Client) -> list[float] | None:
    response = client.post("/runsync", json={"input": {"input": [SENTENCE]}})
    body = response.json()
    if response.status_code != 200 or body.get("status") != "COMPLETED":
        return None
    return body["output"]["data"][0]["embedding"]


def run_service(i: int, reference: list[float], logs: Path, timeout: float, min_cosine: float) -> dict[str, Any]:
    with ServerProcess.bentoml(logs / f"cold_start_service_{i}.log") as server:
        row = first_correct(server, service_vector, 60, reference, timeout, min_cosine)
        log = server.log_tail(200_000)
    return row | {"phases": phases(log, row["first_answer_s"])}


def run_runpod(i: int, reference: list[float], logs: Path, timeout: float, min_cosine: float) -> dict[str, Any]:
    with ServerProcess.runpod_worker(logs / f"cold_start_runpod_{i}.log") as worker:
        row = first_correct(worker, runpod_vector, 120, reference, timeout, min_cosine)
        log = worker.log_tail(200_000)
    return row | {"phases": phases(log, row["first_answer_s"])}


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "stdev": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
    }


def measure(
    kind: str, runs: int, reference: list[float], logs: Path, timeout: float, min_cosine: float = MIN_COSINE
) -> dict[str, Any]:
    run = run_service if kind == "service" else run_runpod
    results = []
    for i in range(runs):
        row = run(i, reference, logs, timeout, min_cosine)
        results.append(row)
        print(f"  {kind} run {i + 1}/{runs}: ready {row['ready_s']:.2f}s, first correct answer "
              f"{row['first_answer_s']:.2f}s", flush=True)
        time.sleep(1.0)  # let the stopped process release its memory and port
    by_phase = {k: [r["phases"][k] for r in results if r["phases"].get(k) is not None]
                for k in (*PHASE_NAMES, "framework_s", "process_age_s")}
    return {
        "runs": results,
        "ready_s": spread([r["ready_s"] for r in results]),
        "first_answer_s": spread([r["first_answer_s"] for r in results]),
        "phases_median_s": {k: round(statistics.median(v), 3) for k, v in by_phase.items() if v},
    }


def phase_table(result: dict[str, Any]) -> str:
    """Markdown: per front door, the median first answer and the median of each phase."""
    rows = ["| front door | first answer s | imports s | weights read s | moved to device s | warm-up s "
            "| framework s (the rest) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, label in (("service", "`bentoml serve`"), ("runpod", "RunPod worker (`/runsync`)")):
        if kind not in result:
            continue
        p = result[kind].get("phases_median_s", {})
        cells = [f"{p[k]:.2f}" if k in p else "–" for k in (*PHASE_NAMES, "framework_s")]
        rows.append(f"| {label} | {result[kind]['first_answer_s']['median']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runpod", action="store_true", help="also measure the RunPod worker (runpod_adapter)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per start")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "cold_start.json")
    parser.add_argument("--logs", type=Path, default=ROOT / "reports")
    parser.add_argument("--goal", type=float, default=5.0,
                        help="median first answer at most this many seconds, each front door (issue 24: 5.0)")
    parser.add_argument("--min-cosine", type=float, default=MIN_COSINE,
                        help="a correct answer's cosine with the reference (default 0.999; lower for fp16 on a GPU)")
    args = parser.parse_args(argv)
    if args.runpod and not (ROOT / "runpod_adapter").is_dir():
        parser.error("--runpod: runpod_adapter/ is not in this checkout")

    reference = reference_vector()
    result: dict[str, Any] = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "load_tests.cold_start", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "sentence": SENTENCE,
        "goal_first_answer_median_s": args.goal,
    }
    print(f"service: {args.runs} fresh starts of `bentoml serve service:EmbeddingService`", flush=True)
    result["service"] = measure("service", args.runs, reference, args.logs, args.timeout, args.min_cosine)
    if args.runpod:
        print(f"runpod worker: {args.runs} fresh starts of `python -m runpod_adapter --rp_serve_api`", flush=True)
        result["runpod"] = measure("runpod", args.runs, reference, args.logs, args.timeout, args.min_cosine)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["goal_met_by"] = {kind: result[kind]["first_answer_s"]["median"] <= args.goal
                             for kind in ("service", "runpod") if kind in result}
    met = all(result["goal_met_by"].values())
    result["goal_met"] = met
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for kind in ("service", "runpod"):
        if kind in result:
            r, a = result[kind]["ready_s"], result[kind]["first_answer_s"]
            print(f"{kind}: ready median {r['median']:.2f}s ({r['min']:.2f}..{r['max']:.2f}), first correct answer "
                  f"median {a['median']:.2f}s ({a['min']:.2f}..{a['max']:.2f}, stdev {a['stdev']:.2f})")
    print(phase_table(result))
    print(f"goal (median first answer <= {args.goal:.1f}s): {'met' if met else 'NOT met'} "
          f"({', '.join(f'{k}: {v}' for k, v in result['goal_met_by'].items())}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
