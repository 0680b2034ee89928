"""The cost model that the batching policy cuts batches by (runners.engine.batching.CostModel): how
much a forward pass costs by itself, per padded token, and per padded token x width, on this device
for this model. A few passes are timed when the model loads (`calibrate`, a fraction of a second);
while it serves, every batch's time is one more sample (`CostSamples`), and the model is refitted
from the newest of them, so a noisy start or a change of load is corrected."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from runners.engine.batching import DEFAULT_COST, CostModel
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


def samples(replica: Any, codec: FeatureCodec, probe: Sequence[Any], max_tokens: int,
            budget: int) -> list[tuple[int, int, float]]:
    """(items, width, seconds) of forward passes over rows cut from one long tokenized input: one
    untimed pass (the first pass of a model pays for allocations), then the fastest of two per shape."""
    words = " ".join(["a"] * max(SHAPES, key=lambda s: s[1])[1])
    text: Any = (words, words) if isinstance(probe[0], tuple) else words
    ((row, length),) = codec.split(replica.encode_pre([text]))
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
            started = time.perf_counter()
            try:
                replica.encode_post(replica.encode_core(features))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                free_device_memory()  # wider shapes would not fit either
                return out
            timings.append(time.perf_counter() - started)
            spent += timings[-1] if warm or attempt else 0.0  # the first pass of all pays for allocations
        out.append((n, width, min(timings if warm else timings[1:])))
        warm = True
        if spent > CALIBRATION_S and len(out) >= MIN_SHAPES:
            break
    return out


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
        fastest: dict[tuple[int, int], float] = {}
        for items, width, seconds in self.samples:
            key = (items, width)
            fastest[key] = min(seconds, fastest.get(key, seconds))
        return CostModel.fit([(items, width, seconds) for (items, width), seconds in fastest.items()])


def calibrate(replica: Any, codec: FeatureCodec, probe: Sequence[Any], max_tokens: int, budget: int,
              name: str, default: CostModel = DEFAULT_COST) -> tuple[CostModel, list[tuple[int, int, float]]]:
    """The model's cost model and the timings it came from, or `default` when it cannot be timed
    (a replica that refuses the synthetic input or runs out of memory, or a device too slow or too
    busy to time two shapes within CALIBRATION_S: the batches' own timings refit it soon)."""
    started = time.perf_counter()
    try:
        timed = samples(replica, codec, probe, max_tokens, budget)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the default, the model still serves
        free_device_memory()
        log.warning("model %s: forward passes could not be timed (%s: %s); batches cut by the default cost model",
                    name, type(exc).__name__, exc)
        return default, []
    cost = CostModel.fit(timed) or default
    log.info("model %s: cost model from %d timed passes in %.2fs: %.2f ms a pass + %.4f ms a padded token + "
             "%.6f ms a token x width", name, len(timed), time.perf_counter() - started, cost.fixed * 1e3,
             cost.per_token * 1e3, cost.per_pair * 1e3)
    return cost, timed
