"""The cache of repeated inputs (`CACHE_MB`): a model's result for one input, in memory, least recently
used first out, bounded in bytes; the registry (runners.engine.registry) asks it before the scheduler.

What is cached is the replica's raw output for one input, exactly what the scheduler would hand back:
an embedding model's vector before `dimensions`, normalization and quantization (those are applied
per request afterwards, so requests that differ only in them share an entry), a cross-encoder's logit
for one (query, document) pair, a classifier's logits; with the number of tokens the model read for
it, so `usage` counts a hit's tokens as if it had run.

The key is (model load, capability, input), the input being the text as the model reads it: after
the prompt or instruction was put before it, after a left truncation cut it (`truncate_left`, TEI and
Cohere `START`), token ids decoded. The model's own right truncation is a function of that text, and
`truncate: false` only refuses texts, so neither needs its own entry; `dimensions`, `normalize`,
`encoding_format` and `embedding_types` change what is done with the result, not the result. "Model
load" is a number given to each loaded model: a model loaded again never sees the entries of the
one before (and stopping the registry empties the cache). Inputs that are not a string or a pair of
strings (multi-output requests with their output kinds, images) are not cached.

Sizes: an entry counts its key's string bytes (`sys.getsizeof`), its result's bytes and
ENTRY_OVERHEAD for the objects around them (measured: tests/test_cache.py holds the count within a few
percent of tracemalloc's), so the bound holds for RSS, not only for the vectors.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

import numpy as np

# Bytes per entry besides its text and its result: the dict slot and linked-list node of the
# OrderedDict, the key and value tuples, the array's header (tests/test_cache.py measures it).
ENTRY_OVERHEAD = 380

Key = tuple[int, str, Any]


def cacheable(inputs: Any) -> bool:
    """Inputs the cache keys: strings, or (query, document) pairs of strings (an LLM reranker's also carry
    the instruction: (query, document, instruction))."""
    for x in inputs:
        if type(x) is str:
            continue
        if type(x) is tuple and len(x) in (2, 3) and all(type(part) is str for part in x):
            continue
        return False
    return True


def owned(result: Any) -> Any:
    """A copy of `result` that holds only its own bytes (a row of a batch's array would keep the whole
    batch alive), read-only (it is shared by every request that hits it); None if it cannot be cached."""
    if isinstance(result, np.ndarray):
        if result.dtype == object:
            return None
        copy = np.array(result, copy=True)
        copy.flags.writeable = False
        return copy
    if isinstance(result, (float, int, np.floating, np.integer)) and not isinstance(result, bool):
        return result
    return None


def _size(key: Key, result: Any) -> int:
    item = key[2]
    text = sys.getsizeof(item) if type(item) is str else sum(sys.getsizeof(part) for part in item)
    data = result.nbytes if isinstance(result, np.ndarray) else 32
    return text + data + ENTRY_OVERHEAD


class ResultCache:
    """Results by key, least recently used evicted first, at most `max_bytes` (0: off). Used from the
    event loop's thread only (the registry's `run`), so it takes no lock."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self._entries: OrderedDict[Key, tuple[Any, int, int]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> tuple[Any, int] | None:
        """(result, tokens) of a key, marked as just used; None when absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0], entry[1]

    def put(self, key: Key, result: Any, tokens: int) -> bool:
        """Keep a result (copied, read-only); evict the least recently used until it fits. False when it
        cannot be cached (its type, or larger than the whole cache)."""
        kept = owned(result)
        if kept is None:
            return False
        size = _size(key, kept)
        if size > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        self._entries[key] = (kept, int(tokens), size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
