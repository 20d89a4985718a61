"""Exponential backoff with full jitter: how long every retry loop of the worker waits (Personalize calls,
the schema registry, the dead-letter topic). Shared by the layers, so it knows none of them.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Exponential backoff with full jitter (AWS's recommendation): no herd of replicas retrying in step."""

    def __init__(
        self, base: float = 0.05, cap: float = 10.0, rng: Callable[[float, float], float] = random.uniform
    ) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        ceiling = min(self.cap, self.base * (2 ** min(attempt - 1, 32)))
        return self._rng(0.0, ceiling)
