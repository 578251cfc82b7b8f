"""The overhead budget (``watch(overhead=...)``): how far to stretch the recording cadence so that recording costs
training at most a given share of its time.

The recorder measures its cost on the training thread — the wall time spent in its step hooks (snapshots, copies,
records measured there, and any wait for a record in flight) and in the instruments' module hooks — plus, when
torch's threads take every core, the worker process's CPU time (cycles training could have had), against the
wall time between two decisions (a window, at least `MIN_WINDOW_SECONDS` long; the first begins once a worker
process is ready). At each decision the cadence multiplier s (every group's ``every`` is its user-given value × s)
is doubled when the window's share was over the budget and halved, never below 1, when it was under a quarter of
it and the run as a whole is within the budget: a record's cost is about proportional to how many records a
window holds, so a doubling halves the share, and the quarter keeps a halving from landing over the budget again.
Every window since the last change was within the budget, so the share since the cadence settled is too; the
run's share also holds the windows it took to settle. The steps that were recorded are the step coordinate as
always. Under torch.distributed rank 0 decides for every rank. This module is the policy only; `recorder` applies
it. The default budget is `DEFAULT_OVERHEAD`; ``watch(overhead=None)`` keeps the user's cadence whatever it costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

#: the largest stretch: one record per this many of the user's intervals, however slow a record is
MAX_STRETCH = 1024
#: ``watch(overhead=...)``'s default: recording may take 2% of training time
DEFAULT_OVERHEAD = 0.02
#: a window ends at the first decision step at least this long after it began: shorter ones are timer noise,
#: and a short run (a test, a smoke run) keeps the user's cadence
MIN_WINDOW_SECONDS = 1.0


def next_stretch(stretch: int, share: float, budget: float, run_share: float = 0.0) -> int:
    """The cadence multiplier after a window whose cost was ``share`` of its time: 2s over ``budget``; s/2 (≥ 1)
    under budget/4 while the run as a whole (``run_share``) is within the budget; else s."""
    if share > budget:
        return min(MAX_STRETCH, stretch * 2)
    if share < budget / 4 and run_share <= budget and stretch > 1:
        return stretch // 2
    return stretch


@dataclass
class Budget:
    """The state of one run's budget: ``budget`` (a share of training time), the multiplier ``stretch``, the cost
    of the current window, and the cost and time of the whole run and since the stretch last changed."""

    budget: float
    stretch: int = 1
    window_cost: float = 0.0
    total_cost: float = 0.0
    total_time: float = 0.0
    settled_cost: float = 0.0
    settled_time: float = 0.0
    changes: list[tuple[int, int]] = field(default_factory=list)  # (step, new stretch)

    def spend(self, seconds: float) -> None:
        self.window_cost += seconds

    def decide(self, step: int, elapsed: float, agree: Callable[[int], int] | None = None) -> int:
        """End a window of ``elapsed`` seconds at training step ``step``: its share sets the next multiplier
        (``agree`` maps it to the one every process takes, under torch.distributed rank 0's)."""
        share = self.window_cost / elapsed if elapsed > 0 else 0.0
        self.total_cost += self.window_cost
        self.total_time += elapsed
        self.settled_cost += self.window_cost
        self.settled_time += elapsed
        self.window_cost = 0.0
        new = next_stretch(self.stretch, share, self.budget, self.share)
        if agree is not None:
            new = agree(new)
        if new != self.stretch:
            self.changes.append((step, new))
            self.stretch = new
            self.settled_cost = self.settled_time = 0.0
        return new

    @property
    def share(self) -> float:
        """The recorder's cost over the whole run, as a share of its time (NaN before a window ended)."""
        return self.total_cost / self.total_time if self.total_time > 0 else float("nan")

    @property
    def settled_share(self) -> float:
        """The cost since the stretch last changed, as a share of that time: within the budget by construction
        (a window over it changes the stretch); NaN until a window has passed at this stretch."""
        return self.settled_cost / self.settled_time if self.settled_time > 0 else float("nan")
