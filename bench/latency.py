"""One client's latency: the service's one-client p50 against the raw forward pass (bench/forward.py), and
one-text queries during a bulk request (head-of-line, bench/hol.py), for each of --hol-targets."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Callable
from typing import Any

from bench import hol
from bench.load import LoadClient, LoadTarget, fmt


async def one_client_p50(args: argparse.Namespace, client: LoadClient | None, target: LoadTarget,
                         sentences: list[str], ran_sweep_at_1: bool,
                         raw_round: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The service's one-client p50 by the lightest client here: wrk if it runs (else the sweep's httpx figure).
    With `raw_round`, each round first measures the raw forward pass again (the server idle), so that each
    round's gap compares two measurements taken seconds apart."""
    clients: list[LoadClient] = [client] if client is not None and client.kind == "wrk" else []
    if not ran_sweep_at_1:  # no httpx figure from the sweep: measure one
        clients.append(LoadClient(None, args.scratch / "wrk", 1, "httpx.AsyncClient in the benchmark process"))
    out: dict[str, Any] = {"p50_ms": {}, "seconds_per_point": args.forward_seconds, "rounds": args.rounds,
                           "gap_ms_rounds": {}}
    for c in clients:
        await c.point(target, sentences, 1, 1)
        points, raws = [], []
        for _ in range(args.rounds):
            if raw_round is not None:
                raws.append(raw_round()["forward_ms"])
            points.append(await c.point(target, sentences, 1, args.forward_seconds))
        if raws:
            out[f"{c.kind}_raw_forward_ms_rounds"] = [round(r, 3) for r in raws]
            out["gap_ms_rounds"][c.kind] = [round(p["p50_ms"] - r, 3) for p, r in zip(points, raws)
                                            if p["p50_ms"] is not None]
        p50s = [p["p50_ms"] for p in points if p["p50_ms"] is not None]  # None: no answer within the point
        out["p50_ms"][c.kind] = round(statistics.median(p50s), 3) if p50s else None
        out[f"{c.kind}_p50_ms_rounds"] = [None if p is None else round(p, 3) for p in (q["p50_ms"] for q in points)]
        out[f"{c.kind}_errors"] = sum(p["errors"] for p in points)
        print(f"  service one client ({c.kind}): p50 {fmt(out['p50_ms'][c.kind], 2)} ms", flush=True)
    return out


async def hol_part(args: argparse.Namespace, urls: dict[str, str | None], served_name: str, corpus: list[str],
                   sentences: list[str]) -> dict[str, Any]:
    """Head-of-line report for each of --hol-targets that is running."""
    bulk = hol.bulk_texts(corpus, args.hol_texts, args.hol_words)
    routes = {"service": ("/v1/embeddings", served_name), "infinity_server": ("/embeddings", "bench-model")}
    out: dict[str, Any] = {
        "bulk": {"texts": len(bulk), "words_per_text": args.hol_words,
                 "chars_per_text_mean": round(sum(map(len, bulk)) / len(bulk), 1)},
        "queries": "one sentence per request, one client in a closed loop (httpx), while the bulk request runs",
        "rounds": args.hol_rounds,
        "targets": {},
        "goals": {},
    }
    for name in args.hol_targets:
        url = urls.get(name)
        if not url:
            out.setdefault("skipped", {})[name] = "not running in this run"
            continue
        path, model = routes[name]
        print(f"head-of-line: {name}, {len(bulk)} texts of {args.hol_words} words …", flush=True)
        try:
            # a GPU picks kernels per new shape: warm with the whole bulk request there (a CPU does not need to)
            warm = len(bulk) if args.device.startswith("cuda") else min(64, len(bulk))
            summary = await hol.measure(url, path, model, sentences, bulk, rounds=args.hol_rounds, warm_texts=warm)
        except asyncio.CancelledError:
            print(f"  head-of-line {name} interrupted", flush=True)
            out["interrupted"] = True
            break
        except Exception as exc:  # noqa: BLE001 - recorded, counted as an error, the other parts go on
            print(f"  head-of-line {name} failed: {exc}", file=sys.stderr, flush=True)
            out["targets"][name] = {"error": str(exc)[:2000]}
            continue
        out["targets"][name] = summary
        out["goals"][name] = hol.goals(summary)
        print(f"  idle p50 {summary['idle_p50_ms']:.1f} ms; during bulk: worst {summary['query_worst_ms'] or 0:.0f} ms, "
              f"p50 {summary['query_p50_ms'] or 0:.1f} ms ({summary['queries_during_bulk']} queries); bulk alone "
              f"{summary['bulk_alone_s']:.2f} s, with queries {summary['bulk_with_queries_s']:.2f} s", flush=True)
    return out
