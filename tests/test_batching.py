"""The batching policy (runners.engine.batching) as plain functions, and the real scheduler on mixed
lengths: sorted, cost-model cuts keep padding small, keep the fairness rules, and give the vectors
each text gets alone; the cost model is timed while the model serves."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import deque

import numpy as np
import pytest

from runners.engine.batching import (
    BACKGROUND,
    DEFAULT_COST,
    NEAR_UNIFORM,
    CostModel,
    QueuedRequest,
    padded_tokens,
    plan,
    take_batch,
)

# all-MiniLM-L6-v2 on 2 cores, seconds: 3.4 ms a pass, 0.04 ms a padded token.
CPU = CostModel(fixed=3.4e-3, per_token=4e-5, per_pair=5e-8)
GPU = CostModel(fixed=2e-3, per_token=2e-7)


def request(seq: int, lengths: list[int], priority: int | None = None) -> QueuedRequest:
    future = asyncio.get_event_loop_policy().new_event_loop().create_future()
    r = QueuedRequest(seq=seq, priority=(0 if len(lengths) <= 8 else 1) if priority is None else priority,
                      inputs=[None] * len(lengths), loop=None, future=future, results=[None] * len(lengths),
                      remaining=len(lengths))
    r.ready = deque((i, {"id": seq * 1000 + i}, n) for i, n in sorted(enumerate(lengths), key=lambda x: x[1]))
    return r


def pool_of(lengths: list[int]) -> list:
    return [(None, (i, {}, n)) for i, n in enumerate(lengths)]


def total_cost(groups: list[list[int]], cost: CostModel) -> float:
    return sum(cost(len(g), max(g)) for g in groups)


def test_mixed_lengths_are_cut_by_length_and_padding_stays_small():
    rng = random.Random(0)
    # 16 requests as the mixed benchmark sends them: a 3-40 word text (~1.3 tokens a word) and a 2-word one.
    requests = [request(i, [rng.randint(6, 60) * 2, 4]) for i in range(16)]
    batches, paid, real, turn = [], 0, 0, False
    for tick in itertools.count(1):
        batch, turn = take_batch(requests, 32, 2048, turn, CPU, tick)
        if not batch:
            break
        batches.append(sorted(item.length for item in batch))
        paid += padded_tokens(batch)
        real += sum(item.length for item in batch)
    assert sum(len(b) for b in batches) == 32
    assert paid <= 1.25 * real, (paid, real, batches)
    # The old policy (one batch in turns, padded to the longest) paid for 32 x the longest.
    assert paid < 0.6 * 32 * max(max(b) for b in batches)
    assert [4] * 16 in batches  # the short texts ride together, not beside a long neighbour


def test_near_uniform_lengths_make_one_full_batch():
    requests = [request(i, [30 + i % 3]) for i in range(40)]
    batch, _ = take_batch(requests, 32, 4096, False, CPU, 1)
    assert len(batch) == 32


def test_on_a_gpu_mixed_lengths_still_fill_the_batch():
    """A pass's fixed cost dwarfs its tokens there: cutting would only add passes."""
    rng = random.Random(1)
    pool = pool_of([rng.randint(4, 200) for _ in range(32)])
    assert len(plan(pool, 32, 32768, GPU)) == 32


def cheapest_runs(lengths: list[int], max_items: int, budget: int, cost: CostModel) -> float:
    """By brute force: the least cost of cutting the sorted lengths into runs within the limits."""
    lengths = sorted(lengths)
    if not lengths:
        return 0.0
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(lengths) - 1):
        groups, current = [], [lengths[0]]
        for length, cut in zip(lengths[1:], cuts):
            if cut:
                groups.append(current)
                current = []
            current.append(length)
        groups.append(current)
        if all(len(g) <= max_items and (len(g) == 1 or len(g) * max(g) <= budget) for g in groups):
            best = min(best, total_cost(groups, cost))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_each_batch_belongs_to_a_cheapest_plan_of_the_pool(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 8))]
    max_items, budget = rng.choice([2, 3, 8]), rng.choice([300, 600, 4096])
    pool = pool_of(lengths)
    while pool:
        batch = plan(pool, max_items, budget, CPU)
        widths = [p[1][2] for p in batch]
        assert batch and pool[0] in batch  # the oldest item rides
        assert len(batch) <= max_items and (len(batch) == 1 or len(batch) * max(widths) <= budget)
        rest = [p for p in pool if p not in batch]
        now = [p[1][2] for p in pool]
        near_uniform = max(now) * len(now) - sum(now) <= NEAR_UNIFORM * sum(now)
        # This batch then the best of the rest costs what the best plan of the whole pool costs
        # (where the pool is near-uniform no cut is tried, at a bounded price).
        spent = CPU(len(batch), max(widths)) + cheapest_runs([p[1][2] for p in rest], max_items, budget, CPU)
        assert spent <= cheapest_runs(now, max_items, budget, CPU) * (1.25 if near_uniform else 1 + 1e-9)
        pool = rest


def test_small_requests_go_first_and_bulk_requests_take_turns():
    bulk_a = request(0, [20] * 40)
    bulk_b = request(1, [20] * 40)
    query = request(2, [5])
    turn = False
    first, turn = take_batch([bulk_a, bulk_b, query], 8, 4096, turn, CPU, 1)
    assert [i.request for i in first] == [query]  # bulk texts 4x longer than the query stay out
    for tick in range(2, 8):
        batch, turn = take_batch([bulk_a, bulk_b], 8, 4096, turn, CPU, tick)
        # Items in turns from both: neither bulk request waits for the other to finish.
        assert len(batch) == 8 and {id(i.request) for i in batch} == {id(bulk_a), id(bulk_b)}


def test_background_work_runs_only_when_nothing_else_is_ready():
    job = request(0, [5] * 40, priority=BACKGROUND)  # a batch line: short texts, waiting longest
    bulk = request(1, [20] * 40)
    query = request(2, [30])
    turn, tick = False, 0
    while query.ready or bulk.ready:
        tick += 1
        batch, turn = take_batch([job, bulk, query], 8, 4096, turn, CPU, tick)
        assert batch and all(i.request is not job for i in batch)
    batch, _ = take_batch([job, bulk, query], 8, 4096, turn, CPU, tick + 1)
    assert len(batch) == 8 and {i.request for i in batch} == {job}  # alone, it gets full batches


def test_the_request_served_longest_ago_leads_the_next_batch():
    long_ago = request(0, [200] * 20)
    recent = request(1, [10] * 20)
    long_ago.served, recent.served = 1, 2
    batch, _ = take_batch([recent, long_ago], 8, 4096, False, CPU, 3)
    # Lengths alone would have run the short texts first; the request that waited rides now.
    assert long_ago in {i.request for i in batch}


def test_the_budget_bounds_every_batch_of_more_than_one():
    rng = random.Random(3)
    requests = [request(i, [rng.randint(1, 400) for _ in range(rng.randint(1, 12))]) for i in range(30)]
    turn = False
    for tick in itertools.count(1):
        batch, turn = take_batch(requests, 16, 512, turn, CPU, tick)
        if not batch:
            break
        assert len(batch) == 1 or padded_tokens(batch) <= 512
    assert all(not r.ready for r in requests)


def test_the_cost_model_is_fitted_from_timings():
    truth = CostModel(fixed=3e-3, per_token=4e-5, per_pair=6e-8)
    shapes = [(1, 16), (8, 16), (1, 128), (8, 128), (2, 256), (16, 64)]
    rng = np.random.default_rng(0)
    samples = [(n, w, truth(n, w) * (1 + 0.02 * rng.standard_normal())) for n, w in shapes]
    fitted = CostModel.fit(samples)
    assert fitted is not None and min(fitted.fixed, fitted.per_token, fitted.per_pair) >= 0
    for n, w in [(4, 40), (32, 200), (1, 8)]:
        assert fitted(n, w) == pytest.approx(truth(n, w), rel=0.1)
    assert CostModel.fit([(1, 16, 0.01)]) is None  # one shape says nothing about the terms
    assert DEFAULT_COST(1, 64) == DEFAULT_COST(2, 32) + DEFAULT_COST.fixed - DEFAULT_COST.fixed


def test_mixed_requests_through_the_scheduler_get_the_vectors_each_text_gets_alone(default_model_path):
    """The real MiniLM replica, requests of mixed lengths batched by the policy (sorted, cut, re-padded)."""
    from runners.engine.loaded import load_model
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": default_model_path})
    model = load_model(settings.models[0], settings)
    replica = model.scheduler.replica
    rng = random.Random(5)
    words = ["river", "stone", "light", "market", "quiet", "engine", "winter", "paper"]
    requests = [[" ".join(rng.choices(words, k=rng.randint(3, 120))), " ".join(rng.choices(words, k=2))]
                for _ in range(12)]
    model.scheduler.start()

    async def go() -> list:
        return await asyncio.gather(*(model.scheduler.run(texts) for texts in requests))

    try:
        results = asyncio.run(go())
    finally:
        model.scheduler.stop()
    assert model.scheduler.counters["batches"] > 1  # the lengths were cut into several batches
    for texts, (vectors, _) in zip(requests, results):
        for text, got in zip(texts, vectors):
            alone = replica.encode_post(replica.encode_core(replica.encode_pre([text])))[0]
            cos = float(np.dot(got, alone) / (np.linalg.norm(got) * np.linalg.norm(alone)))
            assert cos >= 0.9999


def test_the_cost_model_is_timed_while_the_model_serves_not_before(default_model_path):
    """No start waits for the calibration passes: the model answers with the default cost model, and
    the passes run one at a time while its batch loop is idle, then fit the model's own."""
    from runners.engine.loaded import load_model
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": default_model_path})
    model = load_model(settings.models[0], settings)
    scheduler = model.scheduler
    assert scheduler.calibrating and scheduler.cost is DEFAULT_COST and not scheduler.timings.samples
    scheduler.start()
    try:
        vectors, _ = asyncio.run(scheduler.run(["answered while the passes are still to run"]))
        assert len(vectors[0]) == 384
        deadline = time.monotonic() + 60
        while scheduler.calibrating and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not scheduler.calibrating
        shapes = {(n, w) for n, w, _ in scheduler.timings.samples}
        assert len(shapes) >= 3 and scheduler.cost is not DEFAULT_COST
        assert scheduler.cost(8, 128) > scheduler.cost(1, 16) > 0
    finally:
        scheduler.stop()


def test_failed_calibration_passes_leave_the_default_and_the_model_serving(default_model_path):
    from runners.engine.loaded import load_model
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": default_model_path})
    scheduler = load_model(settings.models[0], settings).scheduler

    def failing():
        yield
        raise RuntimeError("a replica that refuses the synthetic input")

    scheduler._calibration = failing()
    scheduler.start()
    try:
        deadline = time.monotonic() + 60
        while scheduler.calibrating and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not scheduler.calibrating and scheduler.cost is DEFAULT_COST
        vectors, _ = asyncio.run(scheduler.run(["still served"]))
        assert len(vectors[0]) == 384 and scheduler.dead_loops() == []
    finally:
        scheduler.stop()
