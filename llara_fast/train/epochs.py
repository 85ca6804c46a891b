"""Run length in passes over the data: run.epochs -> optimizer steps, and the epoch each step
ends at (every metrics.jsonl record). A loader's epoch e holds units(e) units (micro-batches of
pretraining, query slots of fine-tuning; all ranks together), and each optimizer step takes the
next ``per_step`` of them in order, so step s ends at unit s * per_step on every rank."""
from __future__ import annotations

import bisect
import math
from typing import Callable

from llara_fast.errors import UserError


class EpochClock:
    def __init__(self, units: Callable[[int], int], per_step: int, about: str):
        """units(e): the units of epoch e; per_step: units per optimizer step; about: what a unit and
        a step are, for the start line."""
        if per_step < 1:
            raise ValueError(f"per_step must be >= 1, got {per_step}")
        self._units, self.per_step, self.about = units, per_step, about
        self._starts = [0]  # units before epoch e, for the epochs counted so far (and one more)

    def _count(self, epoch: int) -> None:
        """Count the epochs up to ``epoch`` (its end included)."""
        while len(self._starts) <= epoch + 1:
            n = self._units(len(self._starts) - 1)
            if n < 1:
                raise UserError(f"epoch {len(self._starts) - 1} of the data holds no batch")
            self._starts.append(self._starts[-1] + n)

    def units_in(self, epochs: float) -> int:
        """Units of the first ``epochs`` epochs (a fraction takes that share of the next epoch)."""
        whole = int(epochs)
        self._count(whole)
        return self._starts[whole] + round((epochs - whole) * (self._starts[whole + 1] - self._starts[whole]))

    def steps_for(self, epochs: float) -> int:
        """Steps that cover ``epochs`` epochs (rounded up: the last step may start the next epoch)."""
        return max(1, math.ceil(self.units_in(epochs) / self.per_step))

    def epoch_at(self, step: int) -> float:
        """The epoch (float: whole epochs + the share of the current one) at the end of ``step``."""
        done = step * self.per_step
        while self._starts[-1] <= done:
            self._count(len(self._starts) - 1)
        e = bisect.bisect_right(self._starts, done) - 1
        return e + (done - self._starts[e]) / (self._starts[e + 1] - self._starts[e])
