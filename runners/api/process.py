"""What a serving process does first, whichever front door it is (`service.py`, `runpod_adapter`).

Read the settings once (a bad value, or a local model whose custom code TRUST_REMOTE_CODE does not
allow, ends the process with one line), switch the Hugging Face hub offline where the models are
local, set libgomp's spin count, configure the service's loggers and choose the allocator. Nothing
heavy: torch and the model stack are imported when the models load (`runners.models.imports`), and
BentoML only by `service.py`.
"""

from __future__ import annotations

import os

from runners import allocator
from runners.api.logs import configure_logging
from runners.models.remote_code import check_local_models
from runners.settings import Settings, SettingsError, apply_offline_defaults, load_settings


def prepare_process() -> Settings:
    try:
        settings = load_settings()
        check_local_models(settings)  # custom code a model would run (TRUST_REMOTE_CODE), before it loads
    except SettingsError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    apply_offline_defaults(settings)
    # torch's OpenMP runtime (libgomp) lets an idle worker thread spin 300,000 rounds before it sleeps;
    # beside the event loop on a few cores that spinning takes CPU the requests need
    # (docs/performance.md, Threads and OpenMP). libgomp reads this when torch loads, after this.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    configure_logging(settings.log_format)
    try:
        # In `bentoml serve` this runs in the serving process before it spawns the workers, which
        # inherit the environment: they start with the allocator preloaded.
        allocator.activate(settings.allocator)
    except SettingsError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    return settings
