"""Out of memory: recognizing it on any device, freeing what can be freed, and the token budget
that shrinks below the batch size that failed and grows back after a run of good batches."""

from __future__ import annotations

import gc
import sys
import time

GROW_AFTER_BATCHES = 64  # good batches in a row before a shrunken token budget grows by a quarter
OOM_MEMORY_S = 600.0  # for this long after an OOM the budget stays below the size that failed
_OOM_PHRASES = ("out of memory", "failed to allocate memory", "cannot allocate memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, MemoryError, or an allocator error of CUDA, MPS, CPU or ONNX Runtime."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return any(phrase in text for phrase in _OOM_PHRASES)


def free_device_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()


class TokenBudget:
    """Padded tokens per batch: the configured limit, lowered after an out-of-memory error.

    After an OOM at T padded tokens the budget drops to T/2 and stays below T for OOM_MEMORY_S;
    every GROW_AFTER_BATCHES good batches it grows by a quarter, up to that ceiling or the limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = limit
        self.last_oom_tokens: int | None = None
        self._ceiling = limit
        self._ceiling_until = 0.0
        self._good = 0

    def shrink(self, failed_tokens: int) -> None:
        self.last_oom_tokens = failed_tokens
        self.current = max(1, min(self.current, failed_tokens // 2))
        self._ceiling = max(1, failed_tokens - 1)
        self._ceiling_until = time.monotonic() + OOM_MEMORY_S
        self._good = 0

    def succeeded(self) -> None:
        if self.current >= self.limit:
            return
        self._good += 1
        if self._good < GROW_AFTER_BATCHES:
            return
        self._good = 0
        ceiling = self._ceiling if time.monotonic() < self._ceiling_until else self.limit
        self.current = max(self.current, min(ceiling, self.limit, int(self.current * 1.25) + 1))
