"""The raw forward pass of one short text, in this process: what a one-client request cannot go below.

Each run tokenizes one sentence of the pool (a different one each time, as the HTTP load sends them) and
runs the sentence-transformers modules on it (transformer, mean pooling, normalization) down to the
vector on the CPU; the medians are compared with the service's one-client p50 over HTTP.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

GOAL_GAP_MS = 2.0
GOAL_RATIO = 1.2  # issue 31: a lone query's p50 within 1.2 x the forward pass of the same text


def raw_forward(st_model: Any, texts: list[str], device: str, runs: int = 200, warmup: int = 20) -> dict[str, Any]:
    """Medians over `runs` one-text forward passes (after `warmup`), tokenization timed apart."""
    import torch

    cuda = device.startswith("cuda")
    tokenize_ms: list[float] = []
    forward_ms: list[float] = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            features = st_model.tokenize([texts[i % len(texts)]])
            features = {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}
            t1 = time.perf_counter()
            vector = st_model(features)["sentence_embedding"].float().cpu()  # .cpu() waits for the GPU
            t2 = time.perf_counter()
            if vector.shape[0] != 1:
                raise RuntimeError(f"one text gave {vector.shape[0]} vectors")
            if i >= warmup:
                tokenize_ms.append((t1 - t0) * 1000)
                forward_ms.append((t2 - t1) * 1000)
    if cuda:
        torch.cuda.synchronize()
    ordered = sorted(forward_ms)
    return {
        "forward_ms": statistics.median(forward_ms),
        "forward_p10_ms": ordered[len(ordered) // 10],
        "forward_p90_ms": ordered[(9 * len(ordered)) // 10],
        "tokenize_ms": statistics.median(tokenize_ms),
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(next(st_model.parameters()).dtype).removeprefix("torch."),
        "what": "SentenceTransformer modules (transformer, pooling, normalize) on one tokenized text, "
                "in this process, until the vector is on the CPU; tokenization timed apart",
    }


def gap_report(forward: dict[str, Any], p50_ms: dict[str, float | None],
               round_gaps: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """The service's one-client p50 (by load client) minus the raw forward pass; the goal on the lightest client.

    `round_gaps`: per client, the gaps of rounds that measured the forward pass and the service back
    to back; their median is the gap (a shared machine's speed drifts between the parts of a run)."""
    gaps = {client: round(p50 - forward["forward_ms"], 3) for client, p50 in p50_ms.items() if p50 is not None}
    for client, values in (round_gaps or {}).items():
        if values:
            gaps[client] = round(statistics.median(values), 3)
    source = "wrk" if "wrk" in gaps else next(iter(gaps), None)
    gap = gaps.get(source) if source else None
    over = None if gap is None or not forward["forward_ms"] else round(1 + gap / forward["forward_ms"], 3)
    label = f"1 client, {source or 'no service'}"
    return {
        "service_p50_ms": {k: v for k, v in p50_ms.items() if v is not None},
        "gap_ms": gaps,
        "goal_source": source,
        "p50_over_forward": over,
        "goals": {f"service p50 - raw forward <= {GOAL_GAP_MS:g} ms ({label})":
                  None if gap is None else gap <= GOAL_GAP_MS,
                  f"service p50 <= {GOAL_RATIO:g} x raw forward ({label})": None if over is None else over <= GOAL_RATIO},
    }
