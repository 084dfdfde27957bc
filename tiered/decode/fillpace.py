"""--device-fill auto: how many experts a decode step's background fill copies, from the step's measured time.

Owns: `FillPace` (the measure -> set -> check cycle, pure host arithmetic over step times the device step hands it),
`FILL_SHARE`, `FILL_AUTO_MAX`.
Does not own: the fill itself (decode/devstep.py and kernels/slot_table.py fill_pick / fill_install), nor the timing
(the device step records its events and reads them back without waiting).

The fill copies N blocks on a side stream beside the whole step and the step joins them at its end, so N blocks
must cross the link within a step: more stalls the step (measured on the H200 box, q4 at --vram-gb 4, session 10:
16 a step at 2.6 MiB each took 1,646 tok/s against 1,938 for 8), fewer leaves misses that a free slot could have
saved (4: 1,747; 6: 1,911). The best, 8, moved its blocks in about 0.75 of the step timed without the fill. So:
  1. measure: `first` steps with nothing filled (the fill graph runs, its pick takes 0), timed: step_s; the
     decode's first `skip` steps are not timed (the first carries the table's hand-over: 1.1-1.5 ms on the H200
     against 0.4 after, session 20's timeline). Steps 4-6 by default: session 20 timed steps 2-3 instead (call E,
     the fill from about the 4th step): N 6 at once where steps 4-6 gave 7 (then 6 after a retune), and 0.826 /
     0.788 of the PCIe bound (tuned / untuned layout) against 0.842 / 0.803 at steps 4-6 (call D), a fixed 7
     0.860 / 0.859 in both: kept at 4-6;
  2. set N = floor(FILL_SHARE x step_s x link GB/s / block bytes), at most `cap` (0: the link cannot move one block
     in FILL_SHARE of a step; the fill stays off);
  3. follow: each later `window` of steps is timed again (with the fill), and N drops to what FILL_SHARE of that step
     fits (`blocks_for`) when that is fewer; it never rises. A window after the prefill, when misses lengthen the
     step, may set too many; a step that the copies themselves lengthen fits more, not fewer, so N holds.
A slower step is not a reason to fill less: the fill takes only free slots (it never evicts, so it cannot lower the
hit rate) and it stops when they are full, so its copies are paid once and buy hits for the rest of the decode.
The share: session 10's best N, 8, moved its blocks in about 0.75 of its 593 us step, but with the step at 420 us
0.75 gives 5, below the plateau. Session 20 (H200, q4 at --vram-gb 4, replayed routing, 127 tokens, popularity order
from the first step, one call): N 4 / 5 / 6 / 7 took 2,187 / 2,234 / 2,291 / 2,326 tok/s (copies at 0.50-0.88 of the
step), and 6 and 8 (0.99 of it) measured within 1% of each other in five calls; session 10's 16 (1.4 of its step)
stalled it (1,646 against 1,938). So the copies may take 0.9 of the step: N 7 at 420 us and 50 GB/s, 10 at 593 us.
Session 19 measured the opposite rule (back off when a window is 10% slower than the first) on the H200, q4 at
--vram-gb 4 with replayed routing: the filling steps took 669 us against 423 measured without it, N backed off from
5 to 0 in 4 windows, and auto decoded 2,108 tok/s against 2,316-2,326 for a fixed 6 or 8 (hit rates 0.983 / 0.998).
"""
from __future__ import annotations

import math
import os

FILL_SHARE = 0.9  # the share of a step the fill's copies may take (sessions 10 and 20, above)
FILL_AUTO_MAX = 32  # the most blocks a step fills under auto (its pick buffers' length)
SHARE_ENV = "TIERED_FILL_SHARE"  # benchmarks: another share, to time it against the default


def fill_share() -> float:
    """FILL_SHARE, or TIERED_FILL_SHARE when set (a benchmark's knob: a share in (0, 4])."""
    v = os.environ.get(SHARE_ENV, "").strip()
    if not v:
        return FILL_SHARE
    try:
        share = float(v)
    except ValueError:
        share = float("nan")
    if not (0 < share <= 4):
        raise ValueError(f"{SHARE_ENV}={v!r}: the share of a step the fill's copies may take must be in (0, 4]")
    return share


class FillPace:
    """The fill's experts per step under --device-fill auto.

    gbps: the host->device rate of block copies (GB/s, 10^9 B/s; the paced rate under --h2d-gbps); block_bytes: one
    expert block; window: steps per timing after the first; cap: the largest N (the pick buffers' length); share:
    the share of a step the copies may take (None: `fill_share()`); skip: a decode phase's steps before the first
    mark; first: the steps of the first (unfilled) window. The fill starts about skip + first + 1 steps into a phase
    (the later mark must have completed: the host runs a step ahead)."""

    def __init__(self, gbps: float, block_bytes: int, *, window: int = 3, cap: int = FILL_AUTO_MAX,
                 share: float | None = None, skip: int = 3, first: int = 3) -> None:
        if not (gbps > 0 and math.isfinite(gbps)):
            raise ValueError(f"--device-fill auto needs a measured link rate > 0 GB/s, got {gbps!r}")
        if block_bytes <= 0 or window < 1 or cap < 1 or first < 1 or skip < 1:
            raise ValueError(f"FillPace: block_bytes {block_bytes}, window {window}, first {first} and cap {cap} must "
                             f"be >= 1, skip {skip} >= 1")
        self.gbps = float(gbps)
        self.block_bytes = int(block_bytes)
        self.window = int(window)
        self.cap = int(cap)
        self.skip, self.first = int(skip), int(first)
        self.share = fill_share() if share is None else float(share)
        self.n: int | None = None  # None while measuring; then the experts a step fills
        self.step_s: float | None = None  # the step timed without the fill
        self.checked_s: float | None = None  # the last window's step with the fill
        self.retunes = 0  # windows whose step fit fewer blocks than N (N lowered to that)

    def marks_at(self, count: int) -> bool:
        """Whether the step timing takes a mark after a phase's count-th step (1-based): after `skip`, after
        skip + first (the first window), then every `window` steps."""
        k = count - self.skip - self.first
        return count == self.skip or (k >= 0 and k % self.window == 0)

    @property
    def settled(self) -> bool:
        """N is chosen (the first window was timed)."""
        return self.n is not None

    def blocks_for(self, step_s: float) -> int:
        """N for a step of step_s seconds: the blocks the link moves in `share` of it, capped."""
        return max(0, min(self.cap, int(self.share * step_s * self.gbps * 1e9 // self.block_bytes)))

    def observe(self, step_s: float) -> int:
        """One window's mean step time (seconds). Returns the experts a step fills from now on."""
        if not (step_s > 0 and math.isfinite(step_s)):
            return self.n or 0
        if self.n is None:
            self.step_s = step_s
            self.n = self.blocks_for(step_s)
        else:
            self.checked_s = step_s
            fit = self.blocks_for(step_s)
            if fit < self.n:
                self.n = fit
                self.retunes += 1
        return self.n

    def stats(self) -> dict:
        return {"n": self.n, "step_s": self.step_s, "checked_step_s": self.checked_s, "gbps": self.gbps,
                "retunes": self.retunes, "share": self.share}
