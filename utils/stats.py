"""Differences between paired runs, stated with their uncertainty.

Two objectives trained from the same weights with the same seed differ by a paired difference;
its mean over the seeds estimates the effect, and the paired t interval says how well.  A
t interval (not a bootstrap) because the number of seeds is small (3-10): a bootstrap of 5 values
has only a handful of distinct resamples and understates the width.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from scipy import stats


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Mean of ``n`` paired differences, their sample standard deviation ``sd`` and the two-sided
    ``level`` t interval (``low``, ``high`` and ``sd`` None for n < 2)."""
    mean: float
    low: Optional[float]
    high: Optional[float]
    n: int
    level: float = 0.95
    sd: Optional[float] = None

    @property
    def half_width(self) -> Optional[float]:
        return None if self.low is None else (self.high - self.low) / 2

    @property
    def detected(self) -> bool:
        """Whether the interval excludes 0 (an effect at this precision)."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def seeds_to_detect(self, max_seeds: int = 20) -> Optional[int]:
        """The fewest seeds whose interval would exclude 0 if the mean and the spread stayed as
        they are: a guide to how many more runs a comparison needs, not a promise. None when
        the interval already excludes 0, when there is no spread or no mean to go by, or
        beyond ``max_seeds``."""
        if self.detected or self.sd is None or self.mean == 0:
            return None
        for n in range(self.n + 1, max_seeds + 1):
            if float(stats.t.ppf(0.5 + self.level / 2, n - 1)) * self.sd / math.sqrt(n) < abs(self.mean):
                return n
        return None

    def describe(self, scale: float = 100.0, unit: str = "points") -> str:
        """``+1.23 points, 95 % CI [+0.40, +2.06] (paired t, 5 seeds)`` and, when the interval
        holds 0, that this precision detects no effect (with how many seeds might)."""
        text = f"{scale * self.mean:+.2f} {unit}"
        if self.low is None:
            return text + f" ({self.n} seed: no interval)"
        text += (f", {100 * self.level:g} % CI [{scale * self.low:+.2f}, {scale * self.high:+.2f}] "
                 f"(paired t, {self.n} seeds)")
        if self.detected:
            return text
        more = self.seeds_to_detect()
        return text + ": no detectable effect at this precision" + (
            f"; about {more} seeds would exclude 0 if the mean and spread held" if more else "")

    def as_dict(self, scale: float = 1.0) -> dict:
        """The fields for a JSON file, the mean, bounds and deviation multiplied by ``scale``
        (100: fractions as points)."""
        def scaled(v):
            return None if v is None else scale * v

        return {"mean": scale * self.mean, "ci_low": scaled(self.low), "ci_high": scaled(self.high), "n": self.n,
                "level": self.level, "sd": scaled(self.sd), "interval": "paired t"}


def paired_difference(differences: Sequence[float], level: float = 0.95) -> PairedDifference:
    """The mean of ``differences`` (a - b per seed) with its paired t interval."""
    values = [float(d) for d in differences]
    if not values:
        raise ValueError("paired_difference needs at least one difference")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return PairedDifference(mean, None, None, n, level)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n, level, sd)
