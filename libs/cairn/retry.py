"""The one retry helper: exponential backoff with full jitter, bounded by a deadline.

Only temporary errors (cairn.errors.TemporaryError, or whatever `retry_on` names) are
retried; anything else propagates at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from cairn.errors import DeadlineExceeded, TemporaryError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays grow from `initial` by `factor` up to `maximum`; each is jittered in [0, d]."""

    initial: float = 0.05
    maximum: float = 5.0
    factor: float = 2.0
    jitter: bool = True

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor**attempt)
        return random.uniform(base / 2, base) if self.jitter else base


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    deadline: float | None = 30.0,
    attempts: int | None = None,
    backoff: Backoff = Backoff(),
    retry_on: tuple[type[BaseException], ...] = (TemporaryError,),
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Run `operation` until it succeeds, a non-retryable error escapes, or time runs out.

    `deadline` is in seconds from now (None: no time limit); `attempts` caps the tries.
    When the deadline passes, the last error is raised as DeadlineExceeded (chained).
    """
    end = None if deadline is None else time.monotonic() + deadline
    attempt = 0
    while True:
        try:
            return await operation()
        except retry_on as error:
            attempt += 1
            if attempts is not None and attempt >= attempts:
                raise
            pause = backoff.delay(attempt - 1)
            if end is not None and time.monotonic() + pause > end:
                raise DeadlineExceeded(f"gave up after {attempt} attempts: {error}") from error
            if on_retry is not None:
                on_retry(attempt, error)
            await asyncio.sleep(pause)
