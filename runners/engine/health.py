"""Whether this process can still serve: one value that health routes, the watchdog and the RunPod
adapter all read."""

from __future__ import annotations


class ServiceHealth:
    """Why the process cannot serve any more (None while it can): `/livez` and `/readyz` say it."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def fail(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


HEALTH = ServiceHealth()
