"""Where a lone query's time goes (issue 31): the real model's path through the engine, stage by stage.

    python -m bench.lone_query                               # each GOMP_SPINCOUNT below, one process each
    python -m bench.lone_query --spincounts 10000 --runs 300 --out /tmp/lone.json

At one connection every request finds the server idle. This builds the model as the service does
(`runners.engine.loaded.load_model`, the settings of this environment: all-MiniLM-L6-v2 by default) and
times, in interleaved rounds, one short sentence a time:
- forward_back_to_back: `encode_core` + `encode_post` of the tokenized text on this thread, in a loop;
- forward_after_pause:  the same after the caller slept `--pause-ms` (the gap wrk leaves between the
                        answer and its next request): OpenMP's workers and the core went idle;
- forward_thread:       the same handed to the pass thread after the pause (runners.engine.passes: as two
                        models' schedulers hand it), timed from the hand-off to the result back on the caller;
- engine:               `scheduler.run([text])` on an asyncio loop after the pause: inline tokenization, the
                        hand-off to the forward thread, the pass, the answer back on the loop. Its stages
                        (encode_pre called, tokenized, split and queued, forward thread awake, pass done,
                        post-processing done, loop awake) are
                        timed by wrapping the scheduler's own methods in this process (no change to them).
Every pass of this process runs on that one thread (bench.systems.COMPUTE), the engine's too: a second
OpenMP team would throttle both (runners.engine.passes), as it did in this tool before.
Each GOMP_SPINCOUNT runs in a process of its own (libgomp reads it once, at start); the service sets
10000 (runners.api.process), libgomp's default is 300000. The HTTP part of the gap is the service's
one-connection p50 by wrk minus `engine` (bench.run's forward part measures that p50).

    python -m bench.lone_query --service '{}' '{"OMP_NUM_THREADS": "1"}' --rounds 2 --seconds 8

--service: the service itself (`bentoml serve`, CACHE_MB=0), once per environment given (JSON objects,
added to its environment), under `wrk -c --connections` (1) for `--seconds`, rounds interleaved: req/s,
p50, and the CPU each thread of its worker process spent per request (/proc/PID/task/TID/stat), so the
event loop, the forward thread and OpenMP's worker threads show apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEXTS = ["A man is eating food on a bright sunny day.", "The new movie is awesome and everyone loved it.",
         "A compass needle points north because it lines up with the field."]
STAGES = ("pre_started", "pre_done", "tokenized", "forward_started", "core_done", "post_done", "loop_awake")


def median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


def stage_deltas(marks: dict[str, float], t0: float) -> dict[str, float]:
    """Seconds each stage took after the one before it (from `t0`, the call), for the stages marked."""
    out, last = {}, t0
    for stage in STAGES:
        if stage in marks:
            out[stage] = marks[stage] - last
            last = marks[stage]
    return out


def measure(rounds: int, runs: int, pause_s: float) -> dict[str, Any]:
    import torch

    from bench.systems import COMPUTE
    from runners.engine.loaded import load_model
    from runners.settings import apply_offline_defaults, load_settings

    settings = load_settings()
    apply_offline_defaults(settings)
    loaded = COMPUTE.run(lambda: load_model(settings.models[0], settings))
    scheduler = loaded.scheduler
    # Every pass of this process on one thread, the scheduler's too: a second thread's OpenMP team
    # would throttle both (runners.engine.passes). So `engine` has one hand-off more than the service's
    # lone model (what `forward_thread` costs over `forward_after_pause`).
    scheduler.passes = COMPUTE
    replica = scheduler.replica
    feats = [replica.encode_pre([t]) for t in TEXTS]

    def forward(i: int) -> Any:
        with torch.inference_mode():
            return replica.encode_post(replica.encode_core(feats[i % len(feats)]))

    def timed(i: int, pause: float) -> float:
        if pause:
            time.sleep(pause)
        t0 = time.perf_counter()
        forward(i)
        return time.perf_counter() - t0

    marks: dict[str, float] = {}
    original_tokenize, original_forward = scheduler._tokenize, scheduler._forward
    core, post, pre = replica.encode_core, replica.encode_post, replica.encode_pre

    def timed_pre(texts: Any) -> Any:
        marks.setdefault("pre_started", time.perf_counter())
        out = pre(texts)
        marks.setdefault("pre_done", time.perf_counter())
        return out

    def tokenize(*a: Any, **k: Any) -> Any:
        out = original_tokenize(*a, **k)
        marks.setdefault("tokenized", time.perf_counter())
        return out

    def timed_forward(batch: Any) -> Any:
        marks["forward_started"] = time.perf_counter()
        return original_forward(batch)

    def timed_core(features: Any) -> Any:
        out = core(features)
        marks["core_done"] = time.perf_counter()
        return out

    def timed_post(out: Any) -> Any:
        result = post(out)
        marks["post_done"] = time.perf_counter()
        return result

    scheduler._tokenize, scheduler._forward = tokenize, timed_forward
    replica.encode_core, replica.encode_post, replica.encode_pre = timed_core, timed_post, timed_pre
    scheduler.start()
    loop = asyncio.new_event_loop()

    async def engine_once(text: str) -> float:
        marks.clear()
        t0 = time.perf_counter()
        future = asyncio.ensure_future(scheduler.run([text]))
        future.add_done_callback(lambda _: marks.setdefault("loop_awake", time.perf_counter()))
        await future
        took = time.perf_counter() - t0
        for stage, seconds in stage_deltas(marks, t0).items():
            stages[stage].append(seconds)
        return took

    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    loop.run_until_complete(engine_once("warm up"))
    COMPUTE.run(lambda: [forward(i) for i in range(30)])
    for values in stages.values():
        values.clear()
    cases: dict[str, list[float]] = {k: [] for k in ("forward_back_to_back", "forward_after_pause", "forward_thread",
                                                      "engine")}
    per_round: dict[str, list[float]] = {k: [] for k in cases}
    engine_all: list[float] = []
    for _ in range(rounds):
        times: dict[str, list[float]] = {k: [] for k in cases}
        times["forward_back_to_back"] = COMPUTE.run(lambda: [timed(i, 0.0) for i in range(runs)])
        times["forward_after_pause"] = COMPUTE.run(lambda: [timed(i, pause_s) for i in range(runs)])
        for i in range(runs):
            time.sleep(pause_s)
            t0 = time.perf_counter()
            COMPUTE.run(lambda i=i: forward(i))
            times["forward_thread"].append(time.perf_counter() - t0)
        for i in range(runs):
            time.sleep(pause_s)
            times["engine"].append(loop.run_until_complete(engine_once(TEXTS[i % len(TEXTS)])))
        for key, values in times.items():
            per_round[key].append(median_ms(values))
        engine_all.extend(times["engine"])
    scheduler.stop()
    loop.close()
    return {
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "libgomp default (300000)"),
        "torch_threads": torch.get_num_threads(),
        "single_thread_tokens": scheduler.single_thread_tokens,
        "tokens": [int(f["input_ids"].shape[1]) for f in feats if hasattr(f, "keys") and "input_ids" in f.keys()],
        "ms": {k: round(statistics.median(v), 3) for k, v in per_round.items()},
        "ms_rounds": per_round,
        "engine_stages_ms": {k: median_ms(v) for k, v in stages.items() if v},
        # means add up (medians do not): the stages' means against the mean of `engine` itself
        "engine_stages_mean_ms": {k: round(1000 * statistics.fmean(v), 3) for k, v in stages.items() if v},
        "engine_mean_ms": round(1000 * statistics.fmean(engine_all), 3),
    }


def thread_cpu_s(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of process `pid`, by thread id."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / hz
    return out


def per_request_ms(before: dict[int, float], after: dict[int, float], requests: int, main: int) -> dict[str, float]:
    """CPU ms per request of each thread that spent any: the main thread (the event loop) by name, the others
    by rank ("thread 1" the busiest: the forward thread; then OpenMP's workers, the tokenizer thread)."""
    spent = {tid: 1000 * (after[tid] - before.get(tid, 0.0)) / max(1, requests) for tid in after}
    out = {"event loop (main thread)": round(spent.pop(main, 0.0), 2)}
    for rank, (_, ms) in enumerate(sorted(spent.items(), key=lambda kv: -kv[1]), 1):
        if ms >= 0.05:
            out[f"thread {rank}"] = round(ms, 2)
    out["total"] = round(sum(v for v in out.values()), 2)
    return out


def service_part(envs: list[dict[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    from bench import wrk as wrk_tool
    from bench.baselines import load_corpus, served_model
    from load_tests.processes import ServerProcess, process_env

    wrk, why = wrk_tool.find_wrk(None, install=False)
    if wrk is None:
        raise SystemExit(f"--service needs wrk: {why}")
    _, sentences = load_corpus()
    _, name = served_model()
    logs = ROOT / "reports"
    folder = Path(args.scratch)
    script, bodies = wrk_tool.write_inputs(folder, "lone", [{"model": name, "input": [t]} for t in sentences])
    rows: dict[str, list[dict[str, Any]]] = {json.dumps(e): [] for e in envs}
    for _ in range(args.rounds):
        for env in envs:
            server = ServerProcess.bentoml(logs / "bench_lone_query.log", env=process_env({"CACHE_MB": "0", **env}))
            try:
                server.wait_ready()
                url = server.url + "/v1/embeddings"
                wrk_tool.run(wrk, url, script, bodies, args.connections, 3)  # warm
                workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                           if "worker" in " ".join(p.cmdline())] or [psutil.Process(server.proc.pid)]
                pid = workers[0].pid
                before = thread_cpu_s(pid)
                point = wrk_tool.run(wrk, url, script, bodies, args.connections, args.seconds)
                row = {"requests_per_s": round(point["requests_per_s"], 2), "p50_ms": point["p50_ms"],
                       "cpu_ms_per_request": per_request_ms(before, thread_cpu_s(pid), point["requests"], pid),
                       "load_average": round(os.getloadavg()[0], 2)}
            finally:
                server.stop()
            rows[json.dumps(env)].append(row)
            print(json.dumps({"env": env, **row}), flush=True)
    return {"connections": args.connections, "seconds": args.seconds, "rounds": rows,
            "median": {env: {"requests_per_s": statistics.median(r["requests_per_s"] for r in found),
                             "p50_ms": statistics.median(r["p50_ms"] for r in found if r["p50_ms"] is not None)}
                       for env, found in rows.items()}}


def run_variant(spincount: str | None, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("GOMP_SPINCOUNT", None)
    if spincount is not None:
        env["GOMP_SPINCOUNT"] = spincount
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-m", "bench.lone_query", "--child", "--rounds", str(args.rounds), "--runs", str(args.runs),
            "--pause-ms", str(args.pause_ms)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"GOMP_SPINCOUNT={spincount}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--pause-ms", type=float, default=2.0)
    parser.add_argument("--spincounts", default="default,10000",
                        help="GOMP_SPINCOUNT values, one process each ('default': unset; default: default,10000)")
    parser.add_argument("--service", nargs="+", default=None, metavar="JSON",
                        help="measure the service over HTTP, once per environment given (see above)")
    parser.add_argument("--connections", type=int, default=1, help="--service: wrk connections (default 1)")
    parser.add_argument("--seconds", type=int, default=8, help="--service: seconds per point (default 8)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CACHE_MB", "0")
    if args.child:
        print(json.dumps(measure(args.rounds, args.runs, args.pause_ms / 1000)))
        return 0
    if args.service is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="lone-query-") as scratch:
            args.scratch = scratch
            result = service_part([json.loads(e) for e in args.service], args)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    result = {"pause_ms": args.pause_ms, "runs": args.runs, "rounds": args.rounds,
              "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "variants": []}
    for value in [v.strip() for v in args.spincounts.split(",") if v.strip()]:
        result["variants"].append(run_variant(None if value == "default" else value, args))
        print(json.dumps(result["variants"][-1]), flush=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
