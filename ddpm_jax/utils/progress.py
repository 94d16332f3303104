"""Progress bars that suit where stderr goes.

On a terminal (or in a notebook) :func:`progress_bar` is a tqdm bar. With
stderr redirected to a file, as under ``nohup``, SLURM or CI, a tqdm bar
writes a carriage-return frame many times a second and the log fills with
megabytes of one endless line; there the same call returns a
:class:`LogProgress` that prints a plain line (description, done/total,
percent, rate, elapsed, time left, postfix) at most every
``DDPM_JAX_PROGRESS_SECONDS`` seconds (default 30) and once at the end.

Both kinds offer the small interface the loops here use: iteration,
``update(n)``, ``set_postfix(**values)``, ``close()`` and ``with``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

__all__ = ["LogProgress", "progress_bar", "progress_interval"]

INTERVAL_ENV = "DDPM_JAX_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0

# The clock the plain records are timed with; tests replace it.
_clock = time.monotonic
_warned_about: set[str] = set()


def progress_interval() -> float:
    """Seconds between two plain progress lines: ``$DDPM_JAX_PROGRESS_SECONDS``, default 30.

    A value that is not a finite number >= 0 is reported once on stderr and
    the default is used: a typo in a logging knob should not stop a run that
    may already be hours in.
    """
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isfinite(value) and value >= 0:
        return value
    if raw not in _warned_about:
        _warned_about.add(raw)
        print(f"warning: {INTERVAL_ENV}={raw!r} is not a number of seconds >= 0; using {DEFAULT_INTERVAL:g}. "
              f"Set it to e.g. {INTERVAL_ENV}=60, or unset it.", file=sys.stderr, flush=True)
    return DEFAULT_INTERVAL


def _is_interactive(stream) -> bool:
    # A Jupyter kernel's stderr is no tty, yet it shows tqdm.auto's widget well and
    # has no log file to flood.
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    initial: float = 0,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
    **tqdm_kwargs: Any,
):
    """A progress bar over ``iterable`` (or updated by hand) that suits the output.

    Returns a tqdm bar if the output stream (``file=``, default stderr) is a
    terminal or the code runs in a notebook; otherwise a :class:`LogProgress`
    that prints a plain line at most every :func:`progress_interval` seconds
    and once when closed, with no carriage returns. ``enabled=False`` returns
    a silent object: iterating it still yields every item. ``tqdm_kwargs``
    (``dynamic_ncols``, ``smoothing``, ...) go to tqdm only.
    """
    if not enabled:
        return _Silent(iterable)
    stream = tqdm_kwargs.get("file") or sys.stderr
    if _is_interactive(stream):
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, **tqdm_kwargs)
    return LogProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, file=tqdm_kwargs.get("file"),
                       interval=progress_interval())


def _clock_text(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class LogProgress:
    """A progress record for log files: one plain line at most every ``interval`` seconds, and one at the end.

    ``file``: where the lines go (default: ``sys.stderr`` at the time of each
    line). ``total``: defaults to ``len(iterable)`` when it has one.
    """

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, initial: float = 0,
                 desc: str | None = None, unit: str = "it", file=None, interval: float = DEFAULT_INTERVAL):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable = iterable
        self.total = total
        self.initial = self.n = initial
        self.desc = desc
        self.unit = unit
        self.file = file
        self.interval = interval
        self.postfix: dict[str, Any] = {}
        self._start = self._last = _clock()
        self._closed = False
        self._written = None  # (count, postfix) of the last line printed

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress record was made without an iterable; call update(n) instead.")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()  # as tqdm: an exhausted (or abandoned) loop ends the record

    def __len__(self) -> int:
        return int(self.total) if self.total is not None else len(self.iterable)  # type: ignore[arg-type]

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = _clock()
        if now - self._last >= self.interval:
            self._last = now
            self._write(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values: Any) -> None:
        """As tqdm's: the values shown after the counts (the last ones set); ``refresh`` is ignored."""
        self.postfix = {**(dict(ordered_dict) if ordered_dict else {}), **values}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._written != (self.n, self.postfix):  # the same line twice in a row says nothing new
                self._write(_clock())

    def format(self, now: float | None = None) -> str:
        """The line this record prints at time ``now`` (default: the clock's now)."""
        now = _clock() if now is None else now
        elapsed = max(now - self._start, 0.0)
        n = _number(self.n)
        parts = [f"{self.desc}: " if self.desc else ""]
        if self.total:
            parts.append(f"{n}/{_number(self.total)} {self.unit} ({100.0 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{n} {self.unit}")
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        if rate is not None:
            if rate >= 1:
                parts.append(f", {rate:,.0f} {self.unit}/s" if rate >= 100 else f", {rate:.2f} {self.unit}/s")
            else:  # slow steps read better as seconds each, as tqdm shows them
                parts.append(f", {1.0 / rate:.2f} s/{self.unit}")
        parts.append(f", elapsed {_clock_text(elapsed)}")
        if rate is not None and self.total and self.n < self.total:
            parts.append(f", left {_clock_text((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items()))
        # One record, one line, whatever a description or postfix value holds.
        return "".join(parts).replace("\r", " ").replace("\n", " ")

    def _write(self, now: float) -> None:
        self._written = (self.n, dict(self.postfix))
        print(self.format(now), file=self.file or sys.stderr, flush=True)


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.4g}"


class _Silent:
    """``enabled=False``: the bar's interface, doing nothing; iteration still yields the items."""

    def __init__(self, iterable: Iterable | None):
        self.iterable = iterable
        self.n = 0

    def __iter__(self) -> Iterator:
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass
