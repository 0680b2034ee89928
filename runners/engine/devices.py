"""Where a model runs and how many CPU threads its forward passes use."""

from __future__ import annotations

from typing import Any

from runners.settings import Settings

# Padded tokens per forward pass when MAX_BATCH_TOKENS=auto (docs/performance.md: the measurement).
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "gpu": 32768}
# MiB of the cache of repeated inputs per worker when CACHE_MB=auto (runners.engine.cache).
DEFAULT_CACHE_MB = {"cpu": 64, "gpu": 256}
# Tokens x non-embedding parameters below which a CPU forward pass runs on one thread (single_thread_tokens).
SINGLE_THREAD_WORK = 2.0e7

_process_threads: int | None = None


def process_torch_threads() -> int:
    """torch's intra-op thread count as this process started with it, read once. It has to be kept:
    `torch.set_num_threads(n)` in any thread becomes the count that every thread started later
    begins with, so after one scheduler ran a small batch on one thread, a forward thread started
    afterwards (another model's, a restarted loop) would start on one thread too."""
    global _process_threads
    if _process_threads is None:
        import torch

        _process_threads = torch.get_num_threads()
    return _process_threads


def on_gpu(settings: Settings) -> bool:
    if settings.device in ("cuda", "mps"):
        return True
    if settings.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def torch_module(replica: Any) -> Any | None:
    """The torch module a replica runs: itself, one of its attributes (a causal scorer's body, a
    classifier's model) or one of theirs (a CLIP tower's encoder's model); None for ONNX Runtime,
    CTranslate2's own engine or a static table."""
    import torch

    if isinstance(replica, torch.nn.Module):
        return replica
    for value in vars(replica).values() if hasattr(replica, "__dict__") else ():
        if isinstance(value, torch.nn.Module):
            return value
        for inner in vars(value).values() if hasattr(value, "__dict__") and not isinstance(value, type) else ():
            if isinstance(inner, torch.nn.Module):
                return inner
    return None


def torch_on_cpu(replica: Any, settings: Settings) -> bool:
    return not on_gpu(settings) and torch_module(replica) is not None


def default_batch_tokens(settings: Settings) -> int:
    return DEFAULT_BATCH_TOKENS["gpu" if on_gpu(settings) else "cpu"]


def cache_bytes(settings: Settings) -> int:
    """The cache's bound in bytes: CACHE_MB, or its device default."""
    mb = settings.cache_mb if settings.cache_mb >= 0 else DEFAULT_CACHE_MB["gpu" if on_gpu(settings) else "cpu"]
    return mb << 20


def single_thread_tokens(replica: Any, settings: Settings) -> int:
    """Padded tokens up to which a CPU torch forward pass runs on one intra-op thread.

    On a CPU, a batch too small to split gains nothing from OpenMP's second thread and pays for it
    twice: the fork/join, and the worker's spin-wait afterwards, which takes the core the event loop
    and the tokenizer need (the zero-cost model at one connection burned 13-14 ms of CPU per request
    on 2 cores, 5.7 ms on one thread). The threshold scales with the model's size: below about
    SINGLE_THREAD_WORK token x non-embedding-parameter products. For all-MiniLM-L6-v2 that is 1
    token, i.e. never: one-text requests measured in-process against the raw forward pass on the
    same machine (4 interleaved rounds) took +2.1 ms with 2 threads always, +3.1 ms with one thread
    up to 18 tokens (the previous threshold) and +4.7 ms with one thread always.
    """
    # Replicas that run no torch module (ONNX Runtime with its own threads, a static table) keep theirs.
    module = torch_module(replica) if not on_gpu(settings) else None
    if module is None:
        return 0
    import torch

    embedding = sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    total = sum(p.numel() for p in module.parameters())
    return int(SINGLE_THREAD_WORK / max(total - embedding, 1))
