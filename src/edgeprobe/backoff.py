"""Capped exponential backoff with jitter: the one retry delay of the agent, collector and fleet.

Attempt ``n`` (0-based) waits a delay drawn uniformly from ``[c/2, c]`` where
``c = min(max_s, min_s * 2**n)``: the ceiling doubles from ``min_s`` to ``max_s`` and stays there,
and the jitter in its upper half spreads a fleet that lost its broker at the same moment without
ever retrying sooner than half the ceiling. Pure given the random generator (no clock, no I/O).
"""

from __future__ import annotations

import random

MAX_DOUBLINGS = 30  # 2**30 * any sane min_s is past any max_s; keeps the float finite


def backoff_s(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """The delay before retry number ``attempt`` (0 for the first), drawn from [c/2, c] (pure given ``rng``)."""
    cap = min(max_s, min_s * 2.0 ** min(max(attempt, 0), MAX_DOUBLINGS))
    return cap / 2 + rng.random() * cap / 2


class Backoff:
    """Successive :func:`backoff_s` delays; :meth:`reset` starts over after a success."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not min_s > 0:
            raise ValueError(f"min_s: expected > 0, got {min_s}")
        if max_s < min_s:
            raise ValueError(f"max_s: expected >= min_s ({min_s}), got {max_s}")
        self.min_s = min_s
        self.max_s = max_s
        self.attempts = 0  # delays handed out since the last reset
        self._rng = rng if rng is not None else random.Random()

    def next_delay_s(self) -> float:
        """The delay before the next retry; each call doubles the ceiling up to ``max_s``."""
        delay = backoff_s(self.attempts, self.min_s, self.max_s, self._rng)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Start over from ``min_s`` (the thing being retried worked)."""
        self.attempts = 0
