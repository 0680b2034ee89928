"""Where a model's start goes, for the start-up log: the stack's imports, weights read, moved to device.

"Moved to device" is the time spent in torch's `Module.to` while a replica is built (on a GPU the
CUDA context is created there, and the weights are copied); "weights read" is the rest of building
the replica (reading the checkpoint, and the imports of its model kind when it has its own: ONNX,
Qwen3). The imports shared by every text model are timed by `runners.models.imports`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class LoadPhases:
    imports_s: float = 0.0  # waiting for the model stack's imports (0 when another model paid them)
    weights_read_s: float = 0.0
    to_device_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"imports_s": round(self.imports_s, 3), "weights_read_s": round(self.weights_read_s, 3),
                "to_device_s": round(self.to_device_s, 3)}


_local = threading.local()
_install_lock = threading.Lock()
_installed = False


def _install() -> None:
    """Wrap torch's Module.to once: it times the outermost call in a thread that is measuring."""
    global _installed
    with _install_lock:
        if _installed:
            return
        import torch

        original = torch.nn.Module.to

        def to(self: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(_local, "seconds", None) is None or getattr(_local, "inside", False):
                return original(self, *args, **kwargs)
            _local.inside = True
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                _local.seconds += time.perf_counter() - started
                _local.inside = False

        to.__wrapped__ = original  # type: ignore[attr-defined]
        to.__doc__ = original.__doc__
        torch.nn.Module.to = to  # type: ignore[method-assign]
        _installed = True


@contextmanager
def timing_device_moves() -> Iterator[LoadPhases]:
    """Times the block: `to_device_s` is its time in Module.to, `weights_read_s` the rest."""
    _install()
    phases = LoadPhases()
    _local.seconds, _local.inside = 0.0, False
    started = time.perf_counter()
    try:
        yield phases
    finally:
        phases.to_device_s = _local.seconds
        phases.weights_read_s = max(0.0, time.perf_counter() - started - phases.to_device_s)
        _local.seconds = None
