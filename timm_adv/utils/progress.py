"""Progress lines with the time left, for evaluations that run for minutes or hours.

A log line (not a terminal bar) so that the progress of a job writing to a file, a cluster log or a
notebook is visible too; at most one line per ``interval`` seconds, and one at the end of a run that
lasted longer than that (runs shorter than ``interval`` stay quiet).

Example:
    >>> progress = ProgressLog(75, 'Corruptions', unit='settings')
    >>> for c, s in settings:
    ...     evaluate(c, s)
    ...     progress.update(detail=f'{c} severity {s}')
    Corruptions: 12/75 settings (16%), 3m10s elapsed, ~16m36s left (fog severity 2)
"""
import logging
import time
from typing import Optional

__all__ = ['DEFAULT_INTERVAL_S', 'ProgressLog', 'format_duration']

#: Seconds between two progress lines of a long evaluation.
DEFAULT_INTERVAL_S = 30.0

_logger = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``75`` -> ``'1m15s'``; ``3700`` -> ``'1h01m'``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
    if seconds >= 60:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds}s'


class ProgressLog:
    """Counts finished work and logs how far it is and how long the rest should take (linear estimate).

    Args:
        total: Units of work in all.
        desc: What runs, starting each line.
        unit: Name of the units.
        interval: Least seconds between two lines (0: a line at every update; default:
            :data:`DEFAULT_INTERVAL_S`).
        logger: Where lines go (default: this module's logger).
        left: Words after the estimate (e.g. ``'left at most'`` for a budget that work may stop short of).
    """

    def __init__(self, total: int, desc: str, unit: str = 'batches', interval: Optional[float] = None,
                 logger: Optional[logging.Logger] = None, left: str = 'left'):
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.interval = DEFAULT_INTERVAL_S if interval is None else interval
        self.logger = logger or _logger
        self.left = left
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start

    def update(self, n: int = 1, detail: str = '') -> None:
        """Adds ``n`` finished units; logs when ``interval`` has passed since the last line, or at the end."""
        self.done += n
        now = time.monotonic()
        if now - self._last < self.interval and self.done < self.total:
            return
        if self.done >= self.total and now - self.start < self.interval:  # a short run: no line at all
            return
        self._last = now
        self.logger.info(self.line(detail))

    def line(self, detail: str = '') -> str:
        """The progress line: done/total, elapsed time and the estimate of the time left."""
        elapsed = time.monotonic() - self.start
        text = f'{self.desc}: {self.done}/{self.total} {self.unit}'
        if self.total:
            text += f' ({100 * self.done / self.total:.0f}%)'
        text += f', {format_duration(elapsed)} elapsed'
        if 0 < self.done < self.total:
            text += f', ~{format_duration(elapsed / self.done * (self.total - self.done))} {self.left}'
        return text + (f' ({detail})' if detail else '')
