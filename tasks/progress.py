"""Progress of long stages where the user looks, also without a terminal.

In a terminal a tqdm bar shows progress. Without one — a Prefect worker running a
deployment, ``make run > run.log``, CI — a stage logs one line every
``SAE_ENSEMBLES_PROGRESS_SECONDS`` (default 30) seconds through the Prefect run logger
(the flow run's log in the UI and on the console), or the ``sae_ensembles`` logger outside
a Prefect run::

    train: 41% (1,230/3,000 member-steps), 12,480 tokens/s, loss 0.0812, EV 0.702, ETA 2m14s; boosting/run=1
"""

from __future__ import annotations

import logging
import os
import time

DEFAULT_SECONDS = 30.0


def progress_seconds() -> float:
    """Seconds between two progress lines (``SAE_ENSEMBLES_PROGRESS_SECONDS``; default 30)."""
    value = os.environ.get("SAE_ENSEMBLES_PROGRESS_SECONDS")
    if value is None:
        return DEFAULT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"SAE_ENSEMBLES_PROGRESS_SECONDS={value!r} is not a number of seconds") from None
    if seconds < 0:
        raise ValueError(f"SAE_ENSEMBLES_PROGRESS_SECONDS={value!r} must be >= 0")
    return seconds


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run, else the ``sae_ensembles`` logger."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:  # pragma: no cover - prefect is a dependency
        pass
    return logging.getLogger("sae_ensembles")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressLog:
    """Logs ``stage``'s progress at a steady interval (and once at the end).

    total: units of work (member-steps, models, documents); unit: their name.
    tokens_per_unit: tokens one unit processes, for the tokens/s figure (0: none shown).
    """

    def __init__(self, stage: str, total: float, unit: str, *, tokens_per_unit: float = 0.0,
                 interval_s: float | None = None, enabled: bool = True) -> None:
        self.stage, self.total, self.unit = stage, max(float(total), 1e-9), unit
        self.tokens_per_unit = tokens_per_unit
        self.interval = progress_seconds() if interval_s is None else interval_s
        self.enabled = enabled
        self.start = self.last = time.monotonic()
        self.done = 0.0
        self.lines: list[str] = []  # what was logged (tests, the stage's notes)

    def line(self, detail: str = "", **values: float | None) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        fraction = min(self.done / self.total, 1.0)
        parts = [f"{self.stage}: {100 * fraction:.0f}% ({self.done:,.0f}/{self.total:,.0f} {self.unit})"]
        if self.tokens_per_unit and self.done:
            parts.append(f"{self.done * self.tokens_per_unit / elapsed:,.0f} tokens/s")
        parts += [f"{name} {value:.4g}" for name, value in values.items() if value is not None]
        if 0 < fraction < 1:
            parts.append(f"ETA {_duration(elapsed * (1 - fraction) / fraction)}")
        elif fraction >= 1:
            parts.append(f"took {_duration(elapsed)}")
        return ", ".join(parts) + (f"; {detail}" if detail else "")

    def advance(self, amount: float, detail: str = "", **values: float | None) -> None:
        """Count ``amount`` more units; log a line when the interval has passed."""
        self.done += amount
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._log(self.line(detail, **values))

    def finish(self, detail: str = "") -> None:
        if self.enabled:
            self._log(self.line(detail))

    def _log(self, text: str) -> None:
        self.lines.append(text)
        run_logger().info(text)
