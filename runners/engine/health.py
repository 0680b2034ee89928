"""Whether this process can still serve: one value that health routes, the watchdog and the RunPod
adapter all read. With several workers (runners.workers) a failure is also written to a file that
every worker's health routes read, so `/livez` and `/readyz` say it whichever worker answers."""

from __future__ import annotations

import contextlib
import os


class ServiceHealth:
    """Why the process cannot serve any more (None while it can): `/livez` and `/readyz` say it."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.shared_path: str | None = None  # the workers' common failure file (runners.workers.failure_path)

    def share(self, path: str | None) -> None:
        self.shared_path = path

    def fail(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            if self.shared_path:
                tmp = f"{self.shared_path}.{os.getpid()}"
                with contextlib.suppress(OSError):
                    with open(tmp, "w", encoding="utf-8") as f:
                        f.write(reason)
                    os.replace(tmp, self.shared_path)

    def current(self) -> str | None:
        """This process's reason, else one that another worker of the server wrote (health routes)."""
        if self.reason is not None or not self.shared_path:
            return self.reason
        try:
            with open(self.shared_path, encoding="utf-8") as f:
                return f.read() or "a worker of this server cannot serve"
        except OSError:
            return None


HEALTH = ServiceHealth()
