"""The batching policy, as plain data and functions (no threads, no model): what a queued request
and a tokenized item are, and which ready items the next forward pass takes.

`take_batch` takes the active requests' items in turns (one item of each request per round, small
requests first) up to the batch size and the token budget (padded tokens, as the forward pass pays
them). While small and bulk requests both wait, batches alternate: a small requests' batch takes no
bulk item longer than twice their longest first item (a query does not pay for a batch of long
texts), then a bulk batch takes bulk items only (a stream of queries never starves a bulk request,
and a query waits for at most that one batch).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SMALL_REQUEST_ITEMS = 8  # requests with at most this many items go first in every round


@dataclass(eq=False)
class QueuedRequest:
    seq: int
    priority: int  # 0: small (at most SMALL_REQUEST_ITEMS items), 1: bulk
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


@dataclass(eq=False)
class Item:
    request: QueuedRequest
    index: int
    features: dict[str, Any]
    length: int


def priority_of(inputs: Sequence[Any]) -> int:
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


def take_batch(requests: Sequence[QueuedRequest], max_items: int, budget: int,
               bulk_turn: bool) -> tuple[list[Item], bool]:
    """The next batch from the requests with ready items (each request's items are taken from the
    front of its `ready` queue, which the batch consumes), and whose turn the batch after it is."""
    live = sorted((r for r in requests if r.ready), key=lambda r: (r.priority, r.seq))
    batch: list[Item] = []
    if not live:
        return batch, bulk_turn
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
    width = 0
    taking = True
    while taking and len(batch) < max_items:
        taking = False
        for request in candidates:
            if not request.ready or len(batch) >= max_items:
                continue
            index, features, length = request.ready[0]
            if cap is not None and request.priority > 0 and length > cap:
                continue
            if batch and max(width, length) * (len(batch) + 1) > budget:
                continue
            request.ready.popleft()
            batch.append(Item(request, index, features, length))
            width = max(width, length)
            taking = True
    return batch, bulk_turn


def padded_tokens(batch: Sequence[Item]) -> int:
    """What a forward pass over the batch pays for: every item padded to the longest."""
    return len(batch) * max(item.length for item in batch)
