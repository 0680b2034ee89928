"""Smoke tests of the load-test, cold-start and benchmark tools, end to end against real processes.

Locust patches the standard library with gevent when it is imported, so the locustfile is imported
in a subprocess of its own, never in the pytest process.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runners.api.schemas import EmbeddingRequest, RerankRequest, V2RerankRequest

ROOT = Path(__file__).resolve().parents[1]

PAYLOADS_SCRIPT = r"""
import json, random
import load_tests.locustfile as lf

rng = random.Random(7)
out = {name: [getattr(lf, name)(rng) for _ in range(50)] for name in (
    "openai_embeddings_payload", "embed_payload", "rerank_payload", "v2_rerank_payload",
    "runpod_embed_job", "runpod_rerank_job")}
users = sorted(c.__name__ for c in (lf.OpenAIEmbeddingsUser, lf.NativeEmbedUser, lf.NativeRerankUser,
                                    lf.CohereV2RerankUser, lf.RunPodUser))
plans = {}
for shape in lf.SHAPES:
    plan = lf.shape_plan(shape, 16, 20.0)
    plans[shape] = [plan(t) for t in (0.0, 5.0, 9.0, 11.0, 15.0, 19.9, 20.0)]
good = {"data": [{"embedding": [0.1]}]}
checks = {
    "good_embed": lf.check_body(good, {"input": "one text"}),
    "short_embed": lf.check_body(good, {"input": ["a", "b"]}),
    "good_rerank": lf.check_body({"results": [{"relevance_score": 0.9}, {"relevance_score": 0.1}]},
                                 {"query": "q", "documents": ["a", "b"]}),
    "unsorted_rerank": lf.check_body({"results": [{"relevance_score": 0.1}, {"relevance_score": 0.9}]},
                                     {"query": "q", "documents": ["a", "b"]}),
    "top_n": lf.check_body({"results": [{"relevance_score": 0.9}]}, {"query": "q", "documents": ["a", "b"], "top_n": 1}),
}
print(json.dumps({"payloads": out, "users": users, "plans": plans, "checks": checks,
                  "corpus": len(lf.CORPUS), "sentences": len(lf.SENTENCES),
                  "longest": max(map(len, lf.CORPUS)), "shortest": min(map(len, lf.CORPUS))}))
"""


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_locustfile_builds_valid_payloads_and_shapes() -> None:
    done = run([sys.executable, "-c", PAYLOADS_SCRIPT], timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    payloads = result["payloads"]

    for body in payloads["openai_embeddings_payload"] + payloads["embed_payload"]:
        EmbeddingRequest.model_validate(body)
    for body in payloads["rerank_payload"]:
        assert 4 <= len(RerankRequest.model_validate(body).documents) <= 16
    for body in payloads["v2_rerank_payload"]:
        request = V2RerankRequest.model_validate(body)
        assert 1 <= request.top_n <= len(request.documents)
    for job in payloads["runpod_embed_job"]:
        EmbeddingRequest.model_validate(job["input"])
    for job in payloads["runpod_rerank_job"]:
        RerankRequest.model_validate(job["input"])
    assert any(isinstance(b["input"], str) for b in payloads["embed_payload"])

    # Mixed lengths: one-line sentences up to paragraphs of a hundred words and more.
    assert result["corpus"] >= 200 and result["sentences"] >= 100
    assert result["shortest"] < 80 and result["longest"] > 600

    plans = result["plans"]
    assert plans["steady"] == [[16, 16.0]] * 6 + [None]
    assert [p[0] for p in plans["step"][:-1]] == [4, 8, 8, 12, 16, 16] and plans["step"][-1] is None
    assert [p[0] for p in plans["spike"][:-1]] == [4, 4, 16, 16, 4, 4] and plans["spike"][-1] is None

    checks = result["checks"]
    assert checks["good_embed"] is None and checks["good_rerank"] is None and checks["top_n"] is None
    assert checks["short_embed"] and checks["unsorted_rerank"]


def test_run_load_test_finishes_without_failures(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    done = run([sys.executable, "-m", "load_tests.run_load_test", "--duration", "5", "--users", "4",
                "--reports", str(reports)], timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((reports / "load_test_summary.json").read_text())
    assert summary["failures"] == 0 and summary["requests"] > 0
    assert {"/v1/embeddings", "/embed", "/rerank", "/v2/rerank"} & set(summary["by_name"])
    assert (reports / "load_test_stats.csv").read_text().startswith("Type,Name")
    assert "<html" in (reports / "load_test.html").read_text()[:2000].lower()


def test_bench_quick_writes_results(tmp_path: Path, default_server) -> None:
    """`bench.run --quick`: engine and service at concurrency 1, baseline, limit; no infinity server."""
    done = run([sys.executable, "-m", "bench.run", "--quick", "--service-url", default_server.url,
                "--out", str(tmp_path), "--logs", str(tmp_path)], timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["systems"]) == {"engine", "service"}
    for system in result["systems"].values():
        point = system["1"]
        assert point["texts_per_s"] > 0 and point["errors"] == 0
        assert 0 < point["p50_ms"] <= point["p95_ms"] <= point["p99_ms"]
    assert result["ratios"]["service/engine"]["1"] > 0
    assert result["st_baseline"]["sentences"]["texts_per_s"]["median"] > 0
    assert result["model"]["n_layers"] == 6 and result["model"]["d_model"] == 384
    assert 0 < result["limit"]["engine@1"]["fraction"] < 1
    assert result["matmul"]["gflops_best"] > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("values", [[3.0, 1.0, 2.0], [5.0]])
def test_cold_start_spread(values: list[float]) -> None:
    from load_tests.cold_start import spread

    s = spread(values)
    assert s["min"] <= s["median"] <= s["max"]
