"""The OpenAI Batch API (runners.jobs, runners.api.batches): the official SDK against a real server,
every route a line may name, the limits, cancel, resume after SIGKILL, WORKERS=2, the lowest priority,
and the store's commits in-process (failed, expired, a full disk)."""

from __future__ import annotations

import asyncio
import errno
import http.server
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import psutil
import pytest

from load_tests.processes import ServerProcess, hermetic_env
from runners.jobs import runner as runner_module
from runners.jobs import wire
from runners.jobs.runner import BatchRunner, new_batch_state
from runners.jobs.store import JobStore, Outputs

FINAL = ("completed", "failed", "cancelled", "expired")


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def embed_lines(n: int, url: str = "/v1/embeddings", words: int = 6, prefix: str = "r") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}{i}", "method": "POST", "url": url,
             "body": {"input": " ".join(f"w{i}x{k}" for k in range(1 + (i * 7) % words))}} for i in range(n)]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def wait_final(sdk: openai.OpenAI, batch_id: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} not finished after {timeout}s: {batch}")


def read_lines(sdk: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in sdk.files.content(file_id).content.splitlines() if line.strip()]


def run_batch(sdk: openai.OpenAI, lines: list[dict[str, Any]], endpoint: str, **kwargs: Any) -> Any:
    uploaded = sdk.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **kwargs)
    return wait_final(sdk, batch.id)


@pytest.fixture(scope="module")
def batch_server(start_server, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    data = tmp_path_factory.mktemp("data")
    server = start_server({"DATA_DIR": str(data)})
    server.data_dir = data  # type: ignore[attr-defined]
    return server


# ---- the SDK round trip ----


def test_sdk_round_trip_gives_the_vectors_of_v1_embeddings(batch_server: ServerProcess) -> None:
    sdk = client(batch_server)
    lines = embed_lines(300)
    lines[7]["body"]["input"] = [f"first of seven {k}" for k in range(5)]
    lines[9]["body"].update(dimensions=64, encoding_format="base64")
    uploaded = sdk.files.create(file=("corpus.jsonl", jsonl(lines)), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": 7200})
    assert uploaded.status == "processed" and uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    assert uploaded.expires_at == uploaded.created_at + 7200
    assert sdk.files.retrieve(uploaded.id).id == uploaded.id
    created = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                 metadata={"corpus": "test"})
    assert created.status == "validating" and created.metadata == {"corpus": "test"}
    assert isinstance(created.created_at, int)
    done = wait_final(sdk, created.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 300 and done.request_counts.completed == 300 and done.request_counts.failed == 0
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.error_file_id is None
    out = read_lines(sdk, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(line["custom_id"] for line in lines)
    by_id = {o["custom_id"]: o for o in out}
    with httpx.Client(base_url=batch_server.url, timeout=60) as http:
        for line in lines[:40]:
            direct = http.post("/v1/embeddings", json=line["body"]).json()
            got = by_id[line["custom_id"]]
            assert got["error"] is None and got["response"]["status_code"] == 200
            assert got["response"]["request_id"] and got["id"].startswith("batch_req_")
            body = got["response"]["body"]
            assert body["usage"] == direct["usage"] and body["model"] == direct["model"]
            for a, b in zip(body["data"], direct["data"], strict=True):
                if isinstance(a["embedding"], str):
                    a, b = (np.frombuffer(__import__("base64").b64decode(x["embedding"]), "<f4") for x in (a, b))
                else:
                    a, b = np.array(a["embedding"]), np.array(b["embedding"])
                assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.9999
    assert len(by_id["r7"]["response"]["body"]["data"]) == 5
    # lists page with after / has_more; the output file is listed; a deleted file is gone
    assert sdk.batches.list(limit=1).data[0].id == created.id
    page = sdk.files.list(purpose="batch_output")
    assert done.output_file_id in [f.id for f in page.data]
    raw = httpx.get(batch_server.url + "/v1/files", params={"limit": 1}).json()
    assert raw["object"] == "list" and raw["has_more"] is True and raw["first_id"] == raw["last_id"]
    after = httpx.get(batch_server.url + "/v1/files", params={"limit": 1, "after": raw["last_id"]}).json()
    assert after["data"][0]["id"] != raw["last_id"]
    assert sdk.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)


ROUTE_LINES = {
    "/embed": [{"input": ["a text", "another"]}, {"input": "one", "normalize": False}, {"input": 3}],
    "/v2/embed": [{"texts": ["hello"], "input_type": "search_document", "embedding_types": ["float", "int8"]},
                  {"texts": ["x"], "input_type": "nope"}],
    "/rerank": [{"query": "q", "docs": ["a doc", "q q"], "return_docs": True}, {"query": "q"}],
    "/v1/rerank": [{"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1}, {"documents": ["a"]}],
    "/v2/rerank": [{"model": "all-MiniLM-L6-v2", "query": "q", "documents": ["a", "b"]}, {"query": "q"}],
    "/classify": [{"input": ["a"]}, {"input": []}],
    "/v1/embeddings": [{"input": "x", "model": "no-such-model"}, {"input": "x", "dimensions": 100000}],
}


def _same(a: Any, b: Any) -> bool:
    """Equal JSON, floats to 1e-4 (a batch line shares its forward pass with other lines); ids and times aside."""
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-4
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a if k not in ("id", "created"))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("url", list(ROUTE_LINES))
def test_a_line_answers_what_its_route_answers(batch_server: ServerProcess, url: str) -> None:
    sdk = client(batch_server)
    lines = [{"custom_id": f"{url}-{i}", "method": "POST", "url": url, "body": body}
             for i, body in enumerate(ROUTE_LINES[url])]
    done = run_batch(sdk, lines, url)
    assert done.status == "completed"
    answered = {o["custom_id"]: o for o in read_lines(sdk, done.output_file_id) + read_lines(sdk, done.error_file_id)}
    assert done.request_counts.completed + done.request_counts.failed == len(lines)
    with httpx.Client(base_url=batch_server.url, timeout=60) as http:
        for line in lines:
            direct = http.post(url, json=line["body"])
            got = answered[line["custom_id"]]["response"]
            assert got["status_code"] == direct.status_code, (line, got, direct.text)
            assert _same(got["body"], direct.json()), json.dumps([got["body"], direct.json()])


# ---- limits and hostile input ----


def _upload(server: ServerProcess, content: bytes, purpose: str = "batch") -> httpx.Response:
    return httpx.post(server.url + "/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": purpose},
                      timeout=60)


@pytest.mark.parametrize(("content", "needle", "code"), [
    (b'{"custom_id": "a", "method": "POST", "url": "/embed", "body": {"input": "x"}}\n{"custom_id": "a", "method"'
     b': "POST", "url": "/embed", "body": {"input": "y"}}\n', "line 2 repeats custom_id 'a'", "duplicate_custom_id"),
    (b'{"custom_id": "a", "method": "POST", "url": "/embed", "body": {"input": "x"}}\n{"custom_id": "b", "met',
     "line 2 is not valid JSON", "invalid_json_line"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n',
     "line 1 has url '/v1/chat/completions'", "invalid_url"),
    (b'{"method": "POST", "url": "/embed", "body": {}}\n', "line 1 has no custom_id", "missing_required_parameter"),
    (b"\n\n", "the file has no requests", "empty_file"),
])
def test_a_bad_file_is_a_400_naming_its_line(batch_server: ServerProcess, content: bytes, needle: str,
                                               code: str) -> None:
    answer = _upload(batch_server, content)
    assert answer.status_code == 400, answer.text
    assert needle in answer.json()["error"]["message"] and answer.json()["error"]["code"] == code


def test_file_limits(batch_server: ServerProcess) -> None:
    too_many = b"".join(b'{"custom_id":"%d","method":"POST","url":"/embed","body":{"input":"x"}}\n' % i
                        for i in range(wire.MAX_REQUESTS + 1))
    answer = _upload(batch_server, too_many)
    assert answer.status_code == 400 and "more than 50000 requests" in answer.json()["error"]["message"]
    # a body announced over 200 MB is refused before it is read
    with socket.create_connection(("127.0.0.1", batch_server.port)) as conn:
        conn.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (210 * 2**20))
        answer_bytes = b""
        while chunk := conn.recv(65536):
            answer_bytes += chunk
    assert answer_bytes.startswith(b"HTTP/1.1 413") and b"200 MB" in answer_bytes
    # an upload cut off mid-way: nothing is kept, and the server goes on
    head = (b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\n"
            b"Content-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", batch_server.port)) as conn:
        conn.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n" + head + jsonl(embed_lines(20))[:900])
    time.sleep(1)
    assert list((batch_server.data_dir / "uploads").iterdir()) == []
    cut = head + jsonl(embed_lines(3))[:-40] + b"\r\n--b--\r\n"  # a whole form, its file cut short
    answer = httpx.post(batch_server.url + "/v1/files", content=cut,
                        headers={"content-type": "multipart/form-data; boundary=b"})
    assert answer.status_code == 400 and "line 3 is not valid JSON" in answer.json()["error"]["message"]
    assert httpx.post(batch_server.url + "/v1/embeddings", json={"input": "still here"}).status_code == 200
    assert _upload(batch_server, jsonl(embed_lines(1)), purpose="fine-tune").status_code == 400


def test_batch_create_refusals(batch_server: ServerProcess) -> None:
    sdk = client(batch_server)
    uploaded = sdk.files.create(file=("in.jsonl", jsonl(embed_lines(3, url="/embed"))), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="not only for the batch's endpoint"):
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/embed", completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="cannot run as a batch"):
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="metadata"):
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/embed", completion_window="24h",
                           metadata={f"k{i}": "v" for i in range(17)})
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id="file-0123456789ab", endpoint="/embed", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        sdk.files.content("../../etc/passwd")


# ---- cancel, priority, metrics ----


def test_cancel_keeps_partial_results_and_a_lone_query_stays_fast(batch_server: ServerProcess) -> None:
    sdk = client(batch_server)
    lines = embed_lines(1500, words=30)
    uploaded = sdk.files.create(file=("big.jsonl", jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    worst = 0.0
    with httpx.Client(base_url=batch_server.url, timeout=30) as http:
        while sdk.batches.retrieve(batch.id).request_counts.completed < 256:
            started = time.perf_counter()
            assert http.post("/v1/embeddings", json={"input": "a lone query"}).status_code == 200
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.05)
        metrics = http.get("/metrics").text
    assert worst <= 1.5, f"a lone query took {worst:.2f}s during a batch"
    assert "embed_rerank_batch_lines_total" in metrics and "embed_rerank_batch_lines_left" in metrics
    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done = wait_final(sdk, batch.id)
    assert done.status == "cancelled" and done.cancelled_at >= done.cancelling_at
    out = read_lines(sdk, done.output_file_id)
    assert 256 <= len(out) == done.request_counts.completed < 1500
    assert max(Counter(o["custom_id"] for o in out).values()) == 1
    with pytest.raises(openai.BadRequestError, match="only a batch that has not finished"):
        sdk.batches.cancel(batch.id)


# ---- resume after SIGKILL ----


def _kill_server(server: ServerProcess) -> None:
    """kill -9 of the server and its workers (BentoML's workers run in process groups of their own)."""
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    for proc in procs:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.wait(10)
    psutil.wait_procs(procs, timeout=10)


def _lines_metric(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("embed_rerank_batch_lines_total{"))


def test_resume_after_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = hermetic_env({"DATA_DIR": str(data)})
    first = ServerProcess.bentoml(tmp_path / "first.log", env=env)
    try:
        first.wait_ready()
        sdk = client(first)
        lines = embed_lines(1200, words=10)
        uploaded = sdk.files.create(file=("big.jsonl", jsonl(lines)), purpose="batch")
        batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        state_path = data / "batches" / batch.id / "state.json"
        deadline = time.monotonic() + 120
        while json.loads(state_path.read_bytes()).get("next_line", 0) < 512:
            assert time.monotonic() < deadline, first.log_tail()
            time.sleep(0.1)
        _kill_server(first)
    finally:
        first.stop()
    committed = json.loads(state_path.read_bytes())
    assert committed["status"] == "in_progress" and 512 <= committed["next_line"] < 1200
    # lines written after the last commit (if any) are cut at the resume
    second = ServerProcess.bentoml(tmp_path / "second.log", env=env)
    try:
        second.wait_ready()
        sdk = client(second)
        done = wait_final(sdk, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 1200
        out = read_lines(sdk, done.output_file_id)
        assert Counter(o["custom_id"] for o in out) == Counter(line["custom_id"] for line in lines)
        final = json.loads(state_path.read_bytes())
        assert final["runs"][-1]["from_line"] == committed["next_line"]
        # the new server ran only the lines that were not committed
        assert _lines_metric(second) == 1200 - committed["next_line"]
    finally:
        second.stop()


# ---- WORKERS=2: one runner, any worker answers ----


def test_two_workers_run_a_batch_once(start_server, tmp_path_factory: pytest.TempPathFactory) -> None:
    data = tmp_path_factory.mktemp("data2")
    server = start_server({"DATA_DIR": str(data), "WORKERS": "2"})
    sdk = client(server)
    lines = embed_lines(400)
    uploaded = sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    seen = set()
    with httpx.Client(base_url=server.url, timeout=30) as http:  # new connections reach both workers
        for _ in range(10):
            seen.add(http.get(f"/v1/batches/{batch.id}").json()["id"])
    assert seen == {batch.id}
    done = wait_final(sdk, batch.id)
    assert done.status == "completed"
    out = read_lines(sdk, done.output_file_id)
    assert Counter(o["custom_id"] for o in out) == Counter(line["custom_id"] for line in lines)
    holder = json.loads((data / "runner.lock").read_bytes())
    workers = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
    assert holder["pid"] in workers
    state = json.loads((data / "batches" / batch.id / "state.json").read_bytes())
    assert {run["pid"] for run in state["runs"]} == {holder["pid"]}


# ---- the store and runner in-process: every final status, a full disk, a crash between commits ----


async def _echo(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    if body.get("fail"):
        return 400, b'{"error":{"message":"refused","type":"invalid_request_error","param":null,"code":null}}'
    await asyncio.sleep(0)
    return 200, json.dumps({"echo": body["input"]}).encode()


def _stored_batch(store: JobStore, lines: list[dict[str, Any]], endpoint: str = "/embed") -> dict[str, Any]:
    import io

    meta = store.save_upload(io.BytesIO(jsonl(lines)), "in.jsonl", "batch", 3600)
    state = new_batch_state(meta["id"], endpoint, "24h", None)
    store.create_batch(state)
    return state


def test_runner_statuses_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = JobStore(tmp_path)
    runner = BatchRunner(store, _echo)
    lines = embed_lines(10, url="/embed")
    lines[3]["body"]["fail"] = True
    ok = _stored_batch(store, lines)
    final = asyncio.run(runner.run_batch(ok["id"]))
    assert final["status"] == "completed" and final["request_counts"] == {"total": 10, "completed": 9, "failed": 1}
    errors = [json.loads(x) for x in (tmp_path / "batches" / ok["id"] / "errors.jsonl").read_bytes().splitlines()]
    assert [e["custom_id"] for e in errors] == ["r3"] and errors[0]["response"]["status_code"] == 400
    # failed: the input file went away before the batch was validated
    gone = _stored_batch(store, lines)
    store.delete_file(gone["input_file_id"])
    failed = asyncio.run(runner.run_batch(gone["id"]))
    assert failed["status"] == "failed" and failed["failed_at"] and failed["errors"]["data"][0]["code"] == "not_found"
    # expired: past its window, the lines not run are in the error file as batch_expired
    late = _stored_batch(store, lines)
    late["expires_at"] = wire.now() - 1
    store.save_state(late)
    expired = asyncio.run(runner.run_batch(late["id"]))
    assert expired["status"] == "expired" and expired["expired_at"]
    rest = [json.loads(x) for x in (tmp_path / "batches" / late["id"] / "errors.jsonl").read_bytes().splitlines()]
    assert {e["custom_id"] for e in rest} >= {f"r{i}" for i in range(4, 10)}
    assert any(e["error"] and e["error"]["code"] == "batch_expired" for e in rest)
    # failed: its lines name another route than its endpoint (errors.data[].line names each)
    other = _stored_batch(store, lines, endpoint="/v1/embeddings")
    mismatched = asyncio.run(runner.run_batch(other["id"]))
    assert mismatched["status"] == "failed" and len(mismatched["errors"]["data"]) == 10
    assert mismatched["errors"]["data"][0] == {"code": "mismatched_endpoint", "line": 1, "param": "url", "message": (
        "line 1 is for /embed, not the batch's endpoint /v1/embeddings: a batch runs one endpoint; split the file")}
    # cancelled before it started
    early = _stored_batch(store, lines)
    store.request_cancel(early["id"])
    assert asyncio.run(runner.run_batch(early["id"]))["status"] == "cancelled"


def test_full_disk_fails_the_batch_and_keeps_committed_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = JobStore(tmp_path)
    monkeypatch.setattr(runner_module, "CHUNK_LINES", 4)
    state = _stored_batch(store, embed_lines(20, url="/embed"))
    real_commit, commits = Outputs.commit, []

    def commit(self: Outputs, *args: Any) -> None:
        commits.append(1)
        if len(commits) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_commit(self, *args)

    monkeypatch.setattr(Outputs, "commit", commit)
    final = asyncio.run(BatchRunner(store, _echo).run_batch(state["id"]))
    assert final["status"] == "failed" and final["errors"]["data"][0]["code"] == "data_dir_full"
    assert "DATA_DIR is full" in final["errors"]["data"][0]["message"]
    out = (tmp_path / "batches" / state["id"] / "output.jsonl").read_bytes().splitlines()
    assert [json.loads(x)["custom_id"] for x in out] == [f"r{i}" for i in range(8)]
    assert final["output_file_id"] and final["request_counts"]["completed"] == 8


def test_resume_cuts_lines_written_after_the_last_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = JobStore(tmp_path)
    monkeypatch.setattr(runner_module, "CHUNK_LINES", 3)
    state = _stored_batch(store, embed_lines(10, url="/embed"))
    runner = BatchRunner(store, _echo)

    async def crash_after_two_chunks() -> None:
        real = Outputs.commit
        count = 0

        def commit(self: Outputs, *args: Any) -> None:
            nonlocal count
            count += 1
            if count == 3:  # the chunk's lines reach the file, the process dies before the state says so
                self.files["output_bytes"].write(b'{"custom_id":"half-written"}\n')
                self.files["output_bytes"].flush()
                raise asyncio.CancelledError
            real(self, *args)

        monkeypatch.setattr(Outputs, "commit", commit)
        with pytest.raises(asyncio.CancelledError):
            await runner.run_batch(state["id"])
        monkeypatch.setattr(Outputs, "commit", real)

    asyncio.run(crash_after_two_chunks())
    assert store.batch(state["id"])["next_line"] == 6
    final = asyncio.run(runner.run_batch(state["id"]))
    assert final["status"] == "completed" and final["runs"][-1]["from_line"] == 6
    out = [json.loads(x)["custom_id"] for x in (tmp_path / "batches" / state["id"] / "output.jsonl").read_bytes()
           .splitlines()]
    assert out == [f"r{i}" for i in range(10)]


# ---- RunPod: the batch job against a local HTTP server ----


class _Files(http.server.BaseHTTPRequestHandler):
    """GET serves `files[path]`; PUT stores the body there (a stand-in for presigned S3 URLs)."""

    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def do_PUT(self) -> None:  # noqa: N802
        self.files[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def file_server() -> Any:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    _Files.files = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_runpod_batch_job(file_server: Any, tmp_path: Path) -> None:
    from test_runpod_adapter import Worker

    port = file_server.server_address[1]
    base = f"http://127.0.0.1:{port}"
    lines = embed_lines(50)
    lines[4]["body"]["model"] = "no-such-model"
    _Files.files["/in.jsonl"] = jsonl(lines)
    spec = {"input_url": base + "/in.jsonl", "output_url": base + "/out.jsonl?X-Amz-Signature=s",
            "error_url": base + "/err.jsonl", "endpoint": "/v1/embeddings"}
    off = Worker(tmp_path / "off", {"DATA_DIR": str(tmp_path / "data-off")})
    try:
        off.wait_up()
        answer = off.runsync({"batch": spec})
        assert answer["status"] == "FAILED" and "BATCH_URLS=allow" in answer["error"]
    finally:
        off.stop()
    worker = Worker(tmp_path / "on", {"DATA_DIR": str(tmp_path / "data"), "BATCH_URLS": "allow",
                                      "BATCH_URL_HOSTS": f"127.0.0.1:{port}"})
    try:
        worker.wait_up()
        answer = worker.runsync({"batch": spec})
        assert answer["status"] == "COMPLETED", answer
        output = answer["output"]
        assert output["status"] == "completed" and output["request_counts"] == {"total": 50, "completed": 49,
                                                                                 "failed": 1}
        assert output["output_url"] == base + "/out.jsonl"  # the signature is not echoed
        out = [json.loads(x) for x in _Files.files["/out.jsonl?X-Amz-Signature=s"].splitlines()]  # query kept
        err = [json.loads(x) for x in _Files.files["/err.jsonl"].splitlines()]
        assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(50) if i != 4)
        assert [e["custom_id"] for e in err] == ["r4"] and err[0]["response"]["status_code"] == 404
        # a private address not listed exactly: refused before anything is read
        other = worker.runsync({"batch": {**spec, "input_url": "http://10.0.0.1/in.jsonl"}})
        assert other["status"] == "FAILED" and "BATCH_URL_HOSTS" in other["error"]
    finally:
        worker.stop()


def test_runpod_retry_resumes_from_the_last_commit(file_server: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from runners.api import batches
    from runpod_adapter import batch_job

    port = file_server.server_address[1]
    base = f"http://127.0.0.1:{port}"
    _Files.files["/in.jsonl"] = jsonl(embed_lines(20, url="/embed"))
    spec = {"input_url": base + "/in.jsonl", "output_url": base + "/out.jsonl", "endpoint": "/embed"}
    settings = SimpleNamespace(batch_urls=True, batch_url_hosts=(f"127.0.0.1:{port}",), data_dir=tmp_path)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setattr(runner_module, "CHUNK_LINES", 4)
    calls = []

    async def dies_after_eight(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
        calls.append(body["input"])
        if len(calls) > 8:
            raise asyncio.CancelledError  # the worker is gone
        return await _echo(url, body)

    monkeypatch.setattr(batches, "call_line", dies_after_eight)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(batch_job.run_batch_job({"id": "job-1"}, spec, settings))
    committed = JobStore(tmp_path).batch("batch_rpjob1")["next_line"]
    assert 4 <= committed <= 8
    calls.clear()
    monkeypatch.setattr(batches, "call_line", _echo)
    output = asyncio.run(batch_job.run_batch_job({"id": "job-1"}, spec, settings))  # RunPod's retry: same id
    assert output["status"] == "completed" and output["request_counts"]["completed"] == 20
    assert JobStore(tmp_path).batch("batch_rpjob1")["runs"][-1]["from_line"] == committed
    assert [json.loads(x)["custom_id"] for x in _Files.files["/out.jsonl"].splitlines()] == [f"r{i}" for i in range(20)]


def test_expired_files_are_gone(tmp_path: Path) -> None:
    import io

    store = JobStore(tmp_path)
    meta = store.save_upload(io.BytesIO(jsonl(embed_lines(2))), "in.jsonl", "batch", 3600)
    assert store.file(meta["id"])["requests"] == 2 and store.remove_expired() == 0
    meta["expires_at"] = wire.now() - 1
    (tmp_path / "files" / f"{meta['id']}.json").write_text(json.dumps(meta))
    assert store.files() == []
    with pytest.raises(Exception, match="may have expired"):
        store.file(meta["id"])
    assert store.remove_expired() == 1 and not (tmp_path / "files" / f"{meta['id']}.jsonl").exists()
