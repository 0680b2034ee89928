"""The cost model that the batching policy cuts batches by (runners.engine.batching.CostModel): how
much a forward pass costs by itself, per padded token, and per padded token x width, on this device
for this model. A few passes are timed once the model serves, one at a time whenever its batch loop
is idle (`timed_passes`, a fraction of a second in all; until then the device's default cost model
cuts the batches, so no start waits for them); while it serves, every batch's time is one more
sample (`CostSamples`), and the model is refitted from the newest of them, so a noisy start or a
change of load is corrected."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from typing import Any

from runners.engine.batching import CostModel
from runners.engine.codec import FeatureCodec
from runners.engine.memory import free_device_memory, is_out_of_memory

log = logging.getLogger("embed_rerank.scheduler")

# (items, width) of the timed passes, cheapest first: two widths for the per-token term, a wide one
# for attention's.
SHAPES = ((1, 16), (8, 16), (1, 128), (8, 128), (2, 256))
CALIBRATION_S = 0.3  # no more shapes are timed once the passes took this long (a slow device or model),
MIN_SHAPES = 3  # but at least this many (those that fit the budget)
REFIT_EVERY = 64  # batches between refits while serving
KEPT_SAMPLES = 512  # the newest batch timings a refit reads


def probe_row(replica: Any, codec: FeatureCodec, probe: Sequence[Any]) -> tuple[dict[str, Any], int]:
    """One long tokenized input (a text of the widest shape's words, a pair for a pair model), cut into
    the rows of every shape; tokenized here, before the batch loop runs (a tokenizer is not thread-safe)."""
    words = " ".join(["a"] * max(SHAPES, key=lambda s: s[1])[1])
    text: Any = (words, words) if isinstance(probe[0], tuple) else words
    ((row, length),) = codec.split(replica.encode_pre([text]))
    return row, length


def timed_passes(replica: Any, codec: FeatureCodec, row: dict[str, Any], length: int, max_tokens: int,
                 budget: int, before_pass: Callable[[int], None] | None = None,
                 ) -> Generator[None, None, list[tuple[int, int, float]]]:
    """(items, width, seconds) of forward passes of each shape cut from `row`, cheapest first: the
    first pass of all untimed (it pays for allocations), then the fastest of two per shape. A
    generator that yields after every pass, so the batch loop can run one whenever it is idle; its
    return value is the timings. `before_pass(padded_tokens)` sets up a pass as a batch's would be."""
    out: list[tuple[int, int, float]] = []
    spent = 0.0
    warm = False
    for n, width in SHAPES:
        width = min(width, length, max_tokens)
        if n * width > budget:
            continue
        features = codec.collate([{key: value[:width] for key, value in row.items()}] * n)
        timings = []
        for attempt in range(2 if warm else 3):
            if before_pass is not None:
                before_pass(n * width)
            started = time.perf_counter()
            try:
                replica.encode_post(replica.encode_core(features))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                free_device_memory()  # wider shapes would not fit either
                return out
            timings.append(time.perf_counter() - started)
            spent += timings[-1] if warm or attempt else 0.0
            yield
        out.append((n, width, min(timings if warm else timings[1:])))
        warm = True
        if spent > CALIBRATION_S and len(out) >= MIN_SHAPES:
            break
    return out


def fitted(samples: CostSamples, name: str, default: CostModel, seconds: float) -> CostModel:
    """The cost model of these timings (the fastest of each shape), or `default` when they fit none
    (logged either way)."""
    cost = samples.fit() or default
    log.info("model %s: cost model from %d timed passes in %.2fs%s: %.2f ms a pass + %.4f ms a padded token + "
             "%.6f ms a token x width", name, len(samples.samples), seconds, "" if cost is not default else
             " (the default)", cost.fixed * 1e3, cost.per_token * 1e3, cost.per_pair * 1e3)
    return cost


class CostSamples:
    """The newest batch timings of a serving model; `add` answers a refitted cost model every
    REFIT_EVERY batches (None in between, or when the fit fails). A busy neighbour only ever adds
    time, so each batch shape counts with the fastest of its timings."""

    def __init__(self, start: Sequence[tuple[int, int, float]] = ()) -> None:
        self.samples: deque[tuple[int, int, float]] = deque(start, maxlen=KEPT_SAMPLES)
        self._since = 0

    def add(self, n: int, width: int, seconds: float) -> CostModel | None:
        self.samples.append((n, width, seconds))
        self._since += 1
        if self._since < REFIT_EVERY:
            return None
        self._since = 0
        return self.fit()

    def fit(self) -> CostModel | None:
        fastest: dict[tuple[int, int], float] = {}
        for items, width, seconds in self.samples:
            key = (items, width)
            fastest[key] = min(seconds, fastest.get(key, seconds))
        return CostModel.fit([(items, width, seconds) for (items, width), seconds in fastest.items()])

