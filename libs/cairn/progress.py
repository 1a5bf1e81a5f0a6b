"""Progress for long commands: a live counter or bar on stderr, and one summary line.

The live line is drawn only when stderr is a terminal (a pipe or a log file gets no
carriage-return noise); the summary line is printed in every case, so scripts and logs
still learn what was done. The object is also a `progress(what, count)` callback, the
signature cairn.chunk.gc and cairn.chunk.fsck report through:

    with Progress("gc") as progress:
        report = await gc(meta, store, progress=progress)
        progress.done(f"{report.objects} objects, {len(report.leaked)} leaked")
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

BAR_WIDTH = 24
MIN_INTERVAL = 0.1  # seconds between redraws: drawing must not slow the work down


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # not reached


def human_count(n: float) -> str:
    return f"{n:,.0f}"


class Progress:
    """A counter (or, when `total` is known, a bar) for one piece of work.

    `label` names the work ("fsck", "write"); counts are kept per kind ("chunks",
    "objects") as the work reports them; `unit="B"` shows counts as bytes.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "",
        stream: TextIO | None = None,
        live: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.live = _is_terminal(self.stream) if live is None else live
        self.counts: dict[str, int] = {}
        self._last = ""  # the kind reported last: the rate shown is of that one
        self.started = time.monotonic()
        self._drawn = 0.0
        self._width = 0  # characters of the live line on screen

    # -- reporting --------------------------------------------------------------------

    def __call__(self, what: str, count: int) -> None:
        """The work reports that `count` of `what` are done so far."""
        self.counts[what] = count
        self._last = what
        self._draw()

    def advance(self, n: int = 1, what: str = "") -> None:
        """`n` more of `what` are done."""
        self.counts[what] = self.counts.get(what, 0) + n
        self._last = what
        self._draw()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def done(self, summary: str) -> None:
        """Clear the live line and print the summary line (always)."""
        self._clear()
        print(f"{self.label}: {summary} ({self.elapsed:.1f}s)", file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._clear()  # an error line must not land in the middle of a bar

    # -- drawing ----------------------------------------------------------------------

    def _draw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._drawn < MIN_INTERVAL:
            return
        self._drawn = now
        line = self._line()
        columns = shutil.get_terminal_size((80, 24)).columns - 1
        line = line[:columns]
        pad = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)

    def _line(self) -> str:
        parts = [f"{self._show(n)} {what}".strip() for what, n in self.counts.items()]
        text = ", ".join(parts)
        rate = self._rate()
        if self.total:
            current = sum(self.counts.values())
            share = min(1.0, current / self.total)
            filled = int(share * BAR_WIDTH)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            return (
                f"{self.label} [{bar}] {share:4.0%} {self._show(current)}/"
                f"{self._show(self.total)}{rate}"
            )
        return f"{self.label}: {text}{rate}"

    def _rate(self) -> str:
        elapsed = self.elapsed
        if elapsed < 0.5 or not self.counts:
            return ""
        per_s = self.counts.get(self._last, 0) / elapsed
        kind = f" {self._last}" if self._last else ""
        return f"  {self._show(per_s)}{kind}/s"

    def _show(self, n: float) -> str:
        return human_bytes(n) if self.unit == "B" else human_count(n)

    def _clear(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
