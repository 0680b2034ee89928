"""The batching policy, as plain data and functions (no threads, no model): what a queued request
and a tokenized item are, and which ready items the next forward pass takes.

Fairness first (`take_batch`): the ready items of the active requests form a pool, taken in turns
(one item of each request per round, small requests first). While small and bulk requests both
wait, batches alternate: a small requests' batch takes no bulk item longer than twice their longest
first item (a query does not pay for a batch of long texts), then a bulk batch takes bulk items
only (a stream of queries never starves a bulk request, and a query waits for at most that one
batch). The first item of the pool (the oldest request of the turn) always rides in the batch.
Background requests (the lines of a bulk job, runners.jobs) are the lowest priority: they are taken
only when no other request has a ready item, so a query waits at most for the background batch
already in the forward pass, and an otherwise idle device runs background batches back to back.

Then length (`plan`): the pool is sorted by token length and cut into the batches that finish it
soonest by the device's cost model (`CostModel`: a fixed cost per forward pass plus a cost per
padded token and per padded token x width, fitted from passes timed while the model serves), within
the batch size and the token budget. The batch that holds the oldest item runs now; the others wait
for their turn. Mixed lengths no longer pad a two-word query to its 180-token neighbour, and
uniform lengths still make one full batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

SMALL_REQUEST_ITEMS = 8  # requests with at most this many items go first in every round
BACKGROUND = 2  # the priority of background requests: below small (0) and bulk (1)

# Set (with `background_work`) by the code that runs bulk jobs: every model request made in that context,
# the tasks it starts included, enters the scheduler at the BACKGROUND priority.
_BACKGROUND_WORK: contextvars.ContextVar[bool] = contextvars.ContextVar("background_work", default=False)


@contextlib.contextmanager
def background_work() -> Iterator[None]:
    """Within it (and in the tasks started within it), model requests are background work."""
    token = _BACKGROUND_WORK.set(True)
    try:
        yield
    finally:
        _BACKGROUND_WORK.reset(token)


def is_background() -> bool:
    return _BACKGROUND_WORK.get()


@dataclass(eq=False)
class QueuedRequest:
    seq: int
    priority: int  # 0: small (at most SMALL_REQUEST_ITEMS items), 1: bulk, 2: background (BACKGROUND)
    inputs: Sequence[Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list[Any]
    remaining: int
    usage: int = 0
    tokenized: int = 0  # inputs handed to encode_pre so far
    ready: deque = field(default_factory=deque)  # (index, features, length), tokenized and not yet batched
    active: bool = False  # listed in the scheduler's active requests
    done: bool = False  # answered, failed or given up by its caller
    served: int = -1  # the tick of the last batch that took one of its items
    lengths: list[int] | None = None  # when given: each input's token count, filled in as it is tokenized


@dataclass(eq=False)
class Item:
    request: QueuedRequest
    index: int
    features: dict[str, Any]
    length: int


def priority_of(inputs: Sequence[Any]) -> int:
    if _BACKGROUND_WORK.get():
        return BACKGROUND
    return 0 if len(inputs) <= SMALL_REQUEST_ITEMS else 1


def chars(inputs: Sequence[Any]) -> int | None:
    """Characters in texts or text pairs; None for any other kind of input."""
    total = 0
    for x in inputs:
        if isinstance(x, str):
            total += len(x)
        elif type(x) is tuple and all(isinstance(part, str) for part in x):
            total += sum(len(part) for part in x)
        else:
            return None
    return total


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds of one forward pass over `n` items padded to `width` tokens:
    fixed + n·width·(per_token + width·per_pair). `fit` learns the three from timed passes."""

    fixed: float
    per_token: float
    per_pair: float = 0.0

    def __call__(self, n: int, width: int) -> float:
        return self.fixed + n * width * (self.per_token + width * self.per_pair)

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> CostModel | None:
        """Least squares of the relative error over (n, width, seconds) samples (a one-text pass counts
        as much as a full batch: the fixed cost comes from the small ones), every coefficient kept
        >= 0 (a term that would come out negative is dropped and the rest refitted); None without
        enough samples."""
        import numpy as np

        if len({(n, w) for n, w, _ in samples}) < 2:
            return None
        seconds = np.array([t for _, _, t in samples])
        if (seconds <= 0).any():
            return None
        rows = np.array([[1.0, n * w, n * w * w] for n, w, _ in samples]) / seconds[:, None]
        seconds = np.ones_like(seconds)
        best = None
        for keep in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,)):
            coef, *_ = np.linalg.lstsq(rows[:, keep], seconds, rcond=None)
            if (coef < 0).any():
                continue
            full = [0.0, 0.0, 0.0]
            for k, c in zip(keep, coef):
                full[k] = float(c)
            error = float(((rows @ np.array(full) - seconds) ** 2).sum())
            if best is None or error < best[0]:
                best = (error, full)
        # Tokens are never free: a fit that says so read a busy neighbour's noise, not the model.
        if best is None or best[1][1] + best[1][2] <= 0:
            return None
        return cls(*best[1])


# Before a model is timed, in padded-token units: on a CPU a pass costs about as much as 64 padded
# tokens (all-MiniLM-L6-v2 on 2 cores: ~3 ms a pass, ~0.04 ms a token); on a GPU a pass's fixed
# cost dwarfs its tokens. Attention's width term is left to the fit.
DEFAULT_COST = CostModel(fixed=64.0, per_token=1.0)
DEFAULT_GPU_COST = CostModel(fixed=16384.0, per_token=1.0)
POOL_BATCHES = 2  # the pool holds up to this many batches' worth of items (the look-ahead of the sort)
NEAR_UNIFORM = 0.1  # a pool whose padding in one sorted batch is under this share of its tokens is not cut


def take_batch(requests: Sequence[QueuedRequest], max_items: int, budget: int, bulk_turn: bool,
               cost: CostModel = DEFAULT_COST, tick: int = 0) -> tuple[list[Item], bool]:
    """The next batch from the requests with ready items (the items it takes leave their request's
    `ready` queue), and whose turn the batch after it is. `tick` numbers the batch: within a
    priority, the request served longest ago leads the pool (and rides in the batch)."""
    live = sorted((r for r in requests if r.ready), key=lambda r: (r.priority, r.served, r.seq))
    if not live:
        return [], bulk_turn
    if live[0].priority < BACKGROUND:
        live = [r for r in live if r.priority < BACKGROUND]  # background waits for everything else
    cap = None
    candidates = live
    if live[0].priority == 0 and live[-1].priority > 0:
        if bulk_turn:
            candidates = [r for r in live if r.priority > 0]
        else:
            cap = 2 * max(r.ready[0][2] for r in live if r.priority == 0)
        bulk_turn = not bulk_turn
    else:
        bulk_turn = False
    pool = _pool(candidates, POOL_BATCHES * max_items, cap)
    chosen = plan(pool, max_items, budget, cost)
    taken = {id(entry) for _, entry in chosen}
    for request in {id(r): r for r, _ in chosen}.values():
        request.ready = deque(entry for entry in request.ready if id(entry) not in taken)
        request.served = tick
    return [Item(request, entry[0], entry[1], entry[2]) for request, entry in chosen], bulk_turn


def _pool(candidates: Sequence[QueuedRequest], size: int,
          cap: int | None) -> list[tuple[QueuedRequest, tuple[int, Any, int]]]:
    """Up to `size` ready items, one of each request per round (the order `take_batch` is fair in);
    bulk items longer than `cap` stay out."""
    pool: list[tuple[QueuedRequest, tuple[int, Any, int]]] = []
    depth = 0
    while len(pool) < size:
        added = False
        for request in candidates:
            if depth >= len(request.ready) or len(pool) >= size:
                continue
            entry = request.ready[depth]
            added = True
            if cap is not None and request.priority > 0 and entry[2] > cap:
                continue
            pool.append((request, entry))
        if not added:
            break
        depth += 1
    return pool


def plan(pool: Sequence[tuple[Any, tuple[int, Any, int]]], max_items: int, budget: int,
         cost: CostModel) -> list[tuple[Any, tuple[int, Any, int]]]:
    """The batch to run now: the pool sorted by length and cut into the batches that finish it
    soonest by `cost` (each within `max_items` and `budget` padded tokens, but one item always
    fits); the one that holds the pool's first item."""
    if not pool:
        return []
    anchor = pool[0]
    ordered = sorted(pool, key=lambda p: p[1][2])
    position = next(k for k, p in enumerate(ordered) if p is anchor)
    lengths = [p[1][2] for p in ordered]
    m = len(ordered)
    if max(lengths) * m - sum(lengths) <= NEAR_UNIFORM * sum(lengths):
        # Near-uniform: no cut pays for itself; fill one batch around the anchor, shortest first.
        i, j = _fill(lengths, position, max_items, budget)
        return ordered[i:j]
    # best[j]: the least predicted time for ordered[:j]; start[j]: where its last batch starts. A batch
    # ordered[i:j] costs fixed + (j - i) * per_item(width of ordered[j - 1]), so for each j the best i
    # minimizes best[i] - i * per_item: one pass over the allowed starts.
    best = [0.0] * (m + 1)
    start = [0] * (m + 1)
    for j in range(1, m + 1):
        width = lengths[j - 1]
        per_item = width * (cost.per_token + width * cost.per_pair)
        lo = max(j - min(max_items, max(1, budget // width)), 0)
        scores = [b - i * per_item for i, b in enumerate(best[lo:j], lo)]
        least = min(scores)
        best[j] = cost.fixed + least + j * per_item
        start[j] = lo + scores.index(least)
    j = m
    while start[j] > position:
        j = start[j]
    return ordered[start[j]:j]


def _fill(lengths: Sequence[int], position: int, max_items: int, budget: int) -> tuple[int, int]:
    """[i, j) around `position` in length order, as many as the limits allow, shortest first."""
    i, j = position, position + 1
    while j - i < max_items:
        if i > 0 and (j - i + 1) * lengths[j - 1] <= budget:
            i -= 1
        elif j < len(lengths) and (j - i + 1) * lengths[j] <= budget:
            j += 1
        else:
            break
    return i, j


def padded_tokens(batch: Sequence[Item]) -> int:
    """What a forward pass over the batch pays for: every item padded to the longest."""
    return len(batch) * max(item.length for item in batch)
