"""Faults made to happen: a model that raises, runs out of memory, kills its loop or hangs.

The model is a real folder with custom code (`tests/checkpoints.py:build_faulty_embedder`, loaded
with trust_remote_code like any hub model with its own modeling file), served by a real
`bentoml serve`; the scheduler tests drive the same replica in-process to pin down batch shapes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time

import checkpoints
import httpx
import pytest

from load_tests.processes import ServerProcess, hermetic_env

OOM_LIMIT = 300  # padded tokens per batch above which the faulty model raises torch.OutOfMemoryError
LONG_TEXT = " ".join(["cat"] * 400)  # 402 tokens: cannot fit even alone


@pytest.fixture(scope="module")
def faulty_folder(tmp_path_factory) -> str:
    return str(checkpoints.build_faulty_embedder(tmp_path_factory.mktemp("faulty") / "faulty-embedder",
                                                 oom_above_tokens=OOM_LIMIT))


@pytest.fixture(scope="module")
def faulty_server(start_server, faulty_folder) -> ServerProcess:
    return start_server({"MODEL_NAMES": faulty_folder, "SERVED_MODEL_NAMES": "faulty", "BATCH_SIZES": "32"})


def _embed(url: str, text: str, timeout: float = 30) -> tuple[int, dict, float]:
    started = time.monotonic()
    res = httpx.post(url + "/v1/embeddings", json={"model": "faulty", "input": [text]}, timeout=timeout)
    return res.status_code, res.json(), time.monotonic() - started


def _stats(url: str) -> dict:
    return httpx.get(url + "/v1/models").json()["data"][0]


def test_a_raising_request_fails_alone_at_once(faulty_server):
    url = faulty_server.url
    texts = [f"the cat sat on the mat {i}" for i in range(40)]
    with cf.ThreadPoolExecutor(16) as pool:
        normal = [pool.submit(_embed, url, t) for t in texts[:20]]
        bad = pool.submit(_embed, url, "boom goes the model")
        normal += [pool.submit(_embed, url, t) for t in texts[20:]]
        status, body, seconds = bad.result()
        others = [f.result() for f in normal]
    assert status == 500 and seconds <= 2, (status, seconds)
    assert body["error"]["code"] == "model_error"
    assert "RuntimeError: faulty model: the word 'boom' was in the batch" in body["error"]["message"]
    assert [s for s, _, _ in others] == [200] * len(others)
    # The model keeps serving, and health is honest about it.
    assert all(_embed(url, t)[0] == 200 for t in texts[:5])
    assert httpx.get(url + "/readyz").status_code == 200
    assert _stats(url)["stats"]["batch_failures"] >= 1


def test_out_of_memory_fails_only_the_item_that_cannot_fit(faulty_server):
    url = faulty_server.url
    short = [f"the dog sat {i}" for i in range(31)]
    with cf.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(_embed, url, t) for t in short[:15]]
        long = pool.submit(_embed, url, LONG_TEXT)
        futures += [pool.submit(_embed, url, t) for t in short[15:]]
        answers = [f.result() for f in futures]
        status, body, _ = long.result()
    assert [s for s, _, _ in answers] == [200] * 31
    assert status == 507 and body["error"]["code"] == "out_of_memory"
    message = body["error"]["message"]
    assert "has 402 tokens" in message and "ran out of memory on it alone" in message and "padded tokens" in message
    stats = _stats(url)
    assert stats["stats"]["oom_splits"] >= 1 and stats["batch_tokens_now"] < stats["max_batch_tokens"]
    assert _embed(url, "the cat is back")[0] == 200


def test_a_loop_that_dies_is_restarted(faulty_server):
    url = faulty_server.url
    status, body, seconds = _embed(url, "vanish now")
    assert status == 500 and body["error"]["code"] == "model_error" and "SystemExit" in body["error"]["message"]
    assert seconds <= 2
    deadline = time.monotonic() + 10
    while _stats(url)["stats"]["restarts"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _stats(url)["stats"]["restarts"] == 1
    assert all(_embed(url, f"the cat is fine {i}")[0] == 200 for i in range(5))
    assert httpx.get(url + "/readyz").status_code == 200 and httpx.get(url + "/livez").status_code == 200
    metrics = httpx.get(url + "/metrics").text
    assert 'embed_rerank_loop_restarts_total{model="faulty"} 1.0' in metrics
    assert 'embed_rerank_oom_splits_total{model="faulty"}' in metrics


def test_a_stalled_model_makes_health_fail_and_the_server_exit(tmp_path, faulty_folder):
    server = ServerProcess.bentoml(tmp_path / "server.log", env=hermetic_env(
        {"MODEL_NAMES": faulty_folder, "SERVED_MODEL_NAMES": "faulty", "MODEL_STALL_TIMEOUT": "2"}))
    try:
        server.wait_ready()
        with cf.ThreadPoolExecutor(2) as pool:
            hung = pool.submit(_embed, server.url, "freeze please")
            status, body, seconds = hung.result(timeout=20)
            assert status == 503 and "out of service" in body["error"]["message"], body
            assert "no progress" in body["error"]["message"] and seconds < 8
            # Between the give-up and the exit, health says why.
            for path in ("/livez", "/readyz"):
                res = httpx.get(server.url + path, timeout=2)
                assert res.status_code == 503 and "MODEL_STALL_TIMEOUT" in res.json()["reason"]
        assert server.proc.wait(timeout=30) != 0
        assert "out of service" in server.log()
    finally:
        server.stop()


# ---- the scheduler in-process: exact batch shapes ----


@pytest.fixture(scope="module")
def faulty_model(faulty_folder):
    from runners.engine.loaded import load_model
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": faulty_folder, "SERVED_MODEL_NAMES": "faulty-local"})
    return load_model(settings.models[0], settings)


def _run_all(scheduler, requests: list[list[str]]) -> list:
    """Tokenize every request first, then let the forward loop batch them all at once."""

    async def go() -> list:
        tasks = [asyncio.ensure_future(scheduler.run(texts)) for texts in requests]
        await asyncio.sleep(0)
        scheduler._spawn("tokenizer")
        deadline = time.monotonic() + 20
        while scheduler.queued < sum(len(r) for r in requests) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        scheduler._spawn("forward")
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        return asyncio.run(go())
    finally:
        scheduler.stop()


def test_oom_in_a_batch_of_32_answers_31(faulty_model):
    from runners.engine.batching import CostModel
    from runners.engine.scheduler import ModelScheduler
    from runners.errors import OutOfMemory

    # A cost model with only a fixed cost per pass: one batch of all 32 (the packing policy would
    # keep the long text apart), so the split in halves is what this test sees.
    scheduler = ModelScheduler(faulty_model.scheduler.replica, name="oom", max_batch_size=32, max_batch_tokens=1 << 20,
                               probe=["a", "a b c d e f"], cost=CostModel(fixed=1.0, per_token=0.0))
    texts = [[f"the dog sat {i}"] for i in range(31)]
    texts.insert(7, [LONG_TEXT])
    results = _run_all(scheduler, texts)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], OutOfMemory) and results[7] is failed[0]
    assert "input 0 has 402 tokens" in failed[0].message
    # 32 x 402 padded tokens failed, then halves down to the long text alone: the budget is now
    # under the model's real limit, so the next batches do not fail.
    assert scheduler.counters["oom_splits"] >= 2
    assert scheduler.budget.current < OOM_LIMIT and scheduler.budget.last_oom_tokens == 402


def test_a_bulk_request_shares_every_batch_with_small_ones(faulty_model):
    from runners.engine.scheduler import ModelScheduler

    replica = faulty_model.scheduler.replica
    scheduler = ModelScheduler(replica, name="fair", max_batch_size=8, max_batch_tokens=1 << 20,
                               probe=["a", "a b c d e f"])
    batches: list[int] = []
    forward = replica.encode_core

    def counting(features):
        batches.append(len(features["input_ids"]))
        return forward(features)

    scheduler.replica = type("Spy", (), {"encode_pre": replica.encode_pre, "encode_core": staticmethod(counting),
                                         "encode_post": replica.encode_post})()
    bulk = [f"bulk text number {i} about the city" for i in range(64)]
    queries = [[f"query {i}"] for i in range(3)]
    order: list[str] = []
    original_run = scheduler._run

    def tracking(batch):
        order.extend("q" if len(item.request.inputs) == 1 else "b" for item in batch)
        return original_run(batch)

    scheduler._run = tracking
    results = _run_all(scheduler, [bulk, *queries])
    assert not any(isinstance(r, BaseException) for r in results)
    # The first batch holds the three queries (small requests first) and no bulk text longer than
    # twice theirs; the next batch is uncapped and full of bulk texts, so the bulk request goes on.
    assert order[:3] == ["q", "q", "q"] and batches[0] == 3
    assert batches[1] == 8 and order[3:11] == ["b"] * 8
    assert len(results[0][0]) == 64


def test_token_budget_bounds_padded_batch_size(faulty_model):
    from runners.engine.scheduler import ModelScheduler

    scheduler = ModelScheduler(faulty_model.scheduler.replica, name="budget", max_batch_size=64,
                               max_batch_tokens=256, probe=["a", "a b c d e f"])
    shapes: list[tuple[int, int]] = []
    original = scheduler._forward

    def spy(batch):
        shapes.append((len(batch), max(item.length for item in batch)))
        return original(batch)

    scheduler._forward = spy
    texts = [" ".join(["city"] * (5 + i % 40)) for i in range(100)]
    (result,) = _run_all(scheduler, [texts])
    vectors, usage = result
    assert len(vectors) == 100 and usage == sum(7 + i % 40 for i in range(100))
    assert all(n * width <= 256 for n, width in shapes if n > 1)
    assert sum(n for n, _ in shapes) == 100


def test_vectors_do_not_depend_on_batch_company(faulty_model):
    """Re-padded rows give the vectors the replica gives each text alone."""
    import numpy as np

    replica = faulty_model.scheduler.replica
    texts = ["a", "the cat sat on the mat", " ".join(["river"] * 30)]
    alone = [replica.encode_post(replica.encode_core(replica.encode_pre([t])))[0] for t in texts]
    from runners.engine.scheduler import ModelScheduler

    scheduler = ModelScheduler(replica, name="pad", max_batch_size=8, max_batch_tokens=1 << 20,
                               probe=["a", "a b c d e f"])
    ((vectors, _),) = _run_all(scheduler, [texts])
    for got, want in zip(vectors, alone):
        assert np.allclose(got, want, atol=1e-5)


# ---- the RunPod worker: the same containment, and a fresh worker once a model is out of service ----


def test_runpod_job_that_raises_fails_and_the_worker_serves_on(tmp_path, faulty_folder):
    from test_runpod_adapter import Worker

    worker = Worker(tmp_path, {"MODEL_NAMES": faulty_folder, "SERVED_MODEL_NAMES": "faulty"})
    try:
        worker.wait_up()
        answer = worker.runsync({"input": ["the cat sat", "boom"]})
        assert answer["status"] == "FAILED" and answer["error"].startswith("500 server_error: model 'faulty' failed")
        assert "RuntimeError" in answer["error"]
        answer = worker.runsync({"input": ["the cat sat", "the dog sat"]})
        assert answer["status"] == "COMPLETED" and len(answer["output"]["data"]) == 2
    finally:
        worker.stop()


def test_runpod_asks_for_a_fresh_worker_once_a_model_is_out_of_service(monkeypatch):
    from runners.engine.health import HEALTH
    from runners.errors import Unavailable
    from runpod_adapter import handler

    class DeadInference:
        ready = True

        async def embed(self, query):
            raise Unavailable("model 'faulty' is out of service (a batch made no progress for 3s)")

    class DeadService:
        inference = DeadInference()

    monkeypatch.setattr(handler, "get_service", lambda: DeadService())
    monkeypatch.setattr(HEALTH, "reason", "model 'faulty' is out of service")
    output = asyncio.run(handler.handler({"id": "j1", "input": {"input": "hello"}}))
    assert output["refresh_worker"] is True and output["error"].startswith("503 server_error: model 'faulty'")
    monkeypatch.setattr(HEALTH, "reason", None)
    output = asyncio.run(handler.handler({"id": "j2", "input": {"input": "hello"}}))
    assert "refresh_worker" not in output


def test_token_budget_shrinks_after_oom_and_grows_back(monkeypatch):
    from runners.engine import memory as scheduler

    budget = scheduler.TokenBudget(4096)
    budget.shrink(3000)
    assert budget.current == 1500 and budget.last_oom_tokens == 3000
    for _ in range(scheduler.GROW_AFTER_BATCHES * 10):
        budget.succeeded()
    assert budget.current == 2999  # grows back, but stays below the size that failed
    later = scheduler.time.monotonic() + scheduler.OOM_MEMORY_S + 1
    monkeypatch.setattr(scheduler.time, "monotonic", lambda: later)
    for _ in range(scheduler.GROW_AFTER_BATCHES * 10):
        budget.succeeded()
    assert budget.current == 4096  # the memory of the OOM has passed: back to the configured limit


def test_out_of_memory_is_recognised_by_type_and_message():
    import torch

    from runners.engine.memory import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(Exception("onnxruntime: Failed to allocate memory for requested buffer of size 123"))
    assert not is_out_of_memory(RuntimeError("faulty model: the word 'boom' was in the batch"))


def test_small_cpu_batches_run_on_one_thread_and_give_the_same_vectors(faulty_model, default_model_path):
    """engines.single_thread_tokens: small CPU batches skip OpenMP's second thread (its fork/join and
    spin-wait); the threshold scales with the model's non-embedding size, and vectors do not change."""
    import numpy as np
    import torch

    from runners.engine.devices import single_thread_tokens
    from runners.engine.loaded import load_model
    from runners.engine.scheduler import ModelScheduler
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": default_model_path, "DEVICE": "cpu"})
    minilm = load_model(settings.models[0], settings)
    assert minilm.scheduler.single_thread_tokens <= 2  # ~10.6M non-embedding parameters: every text gets 2 threads
    assert single_thread_tokens(faulty_model.scheduler.replica, settings) > 1000  # a tiny model: its batches get 1
    threshold = 20  # the mechanism, on a real model
    gpu = load_settings({"MODEL_NAMES": default_model_path, "DEVICE": "cuda"})
    assert single_thread_tokens(minilm.scheduler.replica, gpu) == 0

    seen: list[tuple[int, int]] = []
    scheduler = ModelScheduler(minilm.scheduler.replica, name="threads", max_batch_size=8, max_batch_tokens=4096,
                               probe=["a", "a b c d e f"], single_thread_tokens=threshold)
    original = scheduler._forward

    def spy(batch):
        result = original(batch)
        seen.append((len(batch) * max(item.length for item in batch), torch.get_num_threads()))
        return result

    scheduler._forward = spy
    short, long = ["paris"], [" ".join(["the tower of paris"] * 12)] * 12  # a bulk request: queries go alone
    results = _run_all(scheduler, [short, long, short])
    assert any(n == 1 for padded, n in seen if padded <= threshold), (seen, threshold)
    assert all(n == torch.get_num_threads() for padded, n in seen if padded > threshold)
    alone = minilm.scheduler.replica.encode_post(minilm.scheduler.replica.encode_core(
        minilm.scheduler.replica.encode_pre(short)))
    assert np.allclose(results[0][0][0], alone[0], atol=1e-5) and np.allclose(results[2][0][0], alone[0], atol=1e-5)
    minilm.scheduler.stop()


def test_a_lone_small_request_is_tokenized_on_the_callers_thread_and_never_beside_the_tokenizer(faulty_model):
    """An idle scheduler tokenizes a small request where it arrives (one thread hand-off less);
    a big request, or any request while work is queued or running, goes to the tokenizer thread;
    the two never run the (not thread-safe) tokenizer at the same time."""
    import random
    import threading

    import numpy as np

    from runners.engine.batching import SMALL_REQUEST_ITEMS
    from runners.engine.scheduler import ModelScheduler
    from runners.engine.tokenizing import INLINE_TOKENIZE_CHARS

    replica = faulty_model.scheduler.replica
    where: list[str] = []
    active = [0, 0]  # now, most at once
    guard = threading.Lock()

    def encode_pre(inputs):
        with guard:
            active[0] += 1
            active[1] = max(active)
        where.append(threading.current_thread().name)
        time.sleep(0.002)  # long enough for the other thread to try
        try:
            return replica.encode_pre(inputs)
        finally:
            with guard:
                active[0] -= 1

    spy = type("Spy", (), {"encode_pre": staticmethod(encode_pre), "encode_core": replica.encode_core,
                           "encode_post": replica.encode_post})()
    scheduler = ModelScheduler(spy, name="inline", max_batch_size=8, max_batch_tokens=4096, probe=["a", "a b c d e f"])
    scheduler.start()

    async def go() -> None:
        where.clear()
        (vector,), _ = await scheduler.run(["the cat sat"])
        assert where == [threading.main_thread().name]
        alone = replica.encode_post(replica.encode_core(replica.encode_pre(["the cat sat"])))[0]
        assert np.allclose(vector, alone, atol=1e-6)
        for big in (["word"] * (SMALL_REQUEST_ITEMS + 1), ["w" * (INLINE_TOKENIZE_CHARS + 1)]):
            where.clear()
            await scheduler.run(big)
            assert where and threading.main_thread().name not in where
        where.clear()
        rng = random.Random(0)

        async def client(i: int) -> None:
            for j in range(15):
                await asyncio.sleep(rng.random() * 0.004)
                await scheduler.run([f"client {i} text {j}"] if j % 4 else [f"bulk {i} {j} {k}" for k in range(20)])

        await asyncio.gather(*(client(i) for i in range(6)))

    try:
        asyncio.run(go())
    finally:
        scheduler.stop()
    assert active[1] == 1
    assert threading.main_thread().name in where and any(name.startswith("tokenizer:") for name in where)


def test_a_forward_thread_keeps_the_process_thread_count_after_another_thread_set_one(default_model_path):
    """torch.set_num_threads(1) in one thread (a tiny model's forward thread) becomes the count every
    thread started later begins with; a MiniLM scheduler started after it still runs on the process's
    own count (engines passes it as cpu_threads)."""
    import threading

    import torch

    from runners.engine.devices import process_torch_threads
    from runners.engine.loaded import load_model
    from runners.engine.scheduler import ModelScheduler
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": default_model_path, "DEVICE": "cpu"})
    minilm = load_model(settings.models[0], settings)
    assert minilm.scheduler.cpu_threads == process_torch_threads() == torch.get_num_threads()
    if process_torch_threads() < 2:
        pytest.skip("one CPU thread: nothing to lose")
    other = threading.Thread(target=torch.set_num_threads, args=(1,))
    other.start()
    other.join()
    seen: list[int] = []
    scheduler = ModelScheduler(minilm.scheduler.replica, name="pinned", max_batch_size=8, max_batch_tokens=4096,
                               probe=["a", "a b c d e f"], cpu_threads=minilm.scheduler.cpu_threads)
    collate = scheduler.codec.collate

    def spy(features):  # inside the pass, on the thread that runs it
        seen.append(torch.get_num_threads())
        return collate(features)

    scheduler.codec.collate = spy
    try:
        _run_all(scheduler, [["the tower of paris at night"]])
    finally:
        torch.set_num_threads(process_torch_threads())  # the next threads of this test process
    assert seen == [process_torch_threads()]


def test_cpu_models_of_one_process_run_every_pass_on_one_thread(faulty_model, default_model_path):
    """Two CPU torch models in one process share one pass thread (runners.engine.passes: libgomp
    throttles every OpenMP worker once two teams outnumber the CPUs): every pass of both, calibration
    included, runs on it, each with its own intra-op thread count; a pass that raises fails its request
    alone and the thread serves on; a lone CPU model keeps its own forward thread."""
    import threading

    import numpy as np
    import torch

    from runners.engine.calibration import probe_row
    from runners.engine.devices import process_torch_threads
    from runners.engine.loaded import load_model
    from runners.engine.passes import share_cpu_passes
    from runners.engine.scheduler import ModelScheduler
    from runners.errors import ModelError
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": default_model_path, "DEVICE": "cpu"})
    minilm = load_model(settings.models[0], settings)
    assert share_cpu_passes([minilm.scheduler]) is None and minilm.scheduler.passes is None
    seen: dict[str, list[tuple[int, int]]] = {"tiny": [], "minilm": []}

    def spied(name: str, replica):
        def encode_core(features):
            seen[name].append((threading.get_ident(), torch.get_num_threads()))
            return replica.encode_core(features)

        return type("Spy", (), {"encode_pre": staticmethod(replica.encode_pre), "encode_core": staticmethod(encode_core),
                                "encode_post": staticmethod(replica.encode_post)})()

    tiny = ModelScheduler(spied("tiny", faulty_model.scheduler.replica), name="tiny", max_batch_size=8,
                          max_batch_tokens=4096, probe=["a", "a b c d e f"], single_thread_tokens=10_000,
                          cpu_threads=process_torch_threads())
    big = ModelScheduler(spied("minilm", minilm.scheduler.replica), name="minilm", max_batch_size=8,
                         max_batch_tokens=4096, probe=["a", "a b c d e f"], cpu_threads=process_torch_threads())
    gpu_like = ModelScheduler(faulty_model.scheduler.replica, name="gpu", max_batch_size=8, max_batch_tokens=4096,
                              probe=["a", "a b c d e f"])
    shared = share_cpu_passes([tiny, big, gpu_like])
    assert shared is not None and tiny.passes is big.passes is shared and gpu_like.passes is None
    row, length = probe_row(big.replica, big.codec, big.probe)
    big.calibrate_when_idle(row, length, 256)
    for scheduler in (tiny, big):
        scheduler.start()

    async def go() -> list:
        calls = [tiny.run(["the cat sat"]), big.run(["the tower of paris at night"]), tiny.run(["boom goes the model"])]
        calls += [big.run([f"text number {i} of a mixed stream"]) for i in range(6)]
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        results = asyncio.run(go())
        deadline = time.monotonic() + 60
        while big.calibrating and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not big.calibrating and {(n, w) for n, w, _ in big.timings.samples}
        after = asyncio.run(tiny.run(["still served"]))
    finally:
        for scheduler in (tiny, big):
            scheduler.stop()
        torch.set_num_threads(process_torch_threads())
    assert isinstance(results[2], ModelError) and "boom" in str(results[2])
    assert not any(isinstance(r, BaseException) for i, r in enumerate(results) if i != 2), results
    assert len(after[0][0]) == len(results[0][0][0])
    alone = minilm.scheduler.replica
    expected = alone.encode_post(alone.encode_core(alone.encode_pre(["the tower of paris at night"])))[0]
    assert np.allclose(results[1][0][0], expected, atol=1e-5)
    threads = {ident for calls in seen.values() for ident, _ in calls}
    assert threads == {shared.ident}
    assert all(n == 1 for _, n in seen["tiny"]) and all(n == process_torch_threads() for _, n in seen["minilm"])
    assert len(seen["minilm"]) > 7  # the calibration passes ran there too


def test_a_model_passes_a_quarter_of_its_budget_while_another_on_its_pass_thread_is_in_use(faulty_model):
    """Passes cannot be interrupted: while the other model sharing the pass thread is in use, each pass
    of this one stays within a quarter of its token budget (its lone query waits for less); alone, full."""
    from runners.engine.passes import share_cpu_passes
    from runners.engine.scheduler import INTERACTIVE_RECENT_S, SHARED_SHARE, ModelScheduler

    def make(name: str) -> ModelScheduler:
        return ModelScheduler(faulty_model.scheduler.replica, name=name, max_batch_size=64, max_batch_tokens=256,
                              probe=["a", "a b c d e f"], cpu_threads=1)

    texts = [" ".join(["city"] * 8)] * 40
    for recent, limit in ((True, 256 // SHARED_SHARE), (False, 256)):
        this, other = make("this"), make("other")
        assert share_cpu_passes([this, other]) is not None
        other._last_interactive = time.monotonic() if recent else -INTERACTIVE_RECENT_S
        shapes: list[int] = []
        original = this._forward

        def spy(batch, original=original, shapes=shapes):
            shapes.append(len(batch) * max(item.length for item in batch))
            return original(batch)

        this._forward = spy
        (result,) = _run_all(this, [texts])
        assert len(result[0]) == 40 and all(s <= limit for s in shapes), (recent, shapes)
        assert recent or max(shapes) > 256 // SHARED_SHARE
