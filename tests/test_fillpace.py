"""--device-fill auto's pace (decode/fillpace.py): N from a timed step and the link's rate, the back-off on a stall,
the option's parsing; and the eager device step on CPU under auto (tests/test_devtable.py covers a fixed N)."""
from __future__ import annotations

import click
import pytest

from tiered.cli.options import AutoOrInt
from tiered.decode.fillpace import FILL_SHARE, FillPace
from tiered.store.options import BudgetError, TierConfig


def test_pace_sets_n_from_the_step_and_the_link():
    """N = the blocks the link moves in FILL_SHARE of the step timed without the fill, capped; session 20's H200
    figures (a 420 us step, 50 GB/s, 2.65 MB q4 blocks) give 7, in the plateau 6-8 of its sweep."""
    p = FillPace(50.0, 2_650_000)
    assert not p.settled and p.n is None
    assert p.observe(420e-6) == 7 and p.settled and p.step_s == 420e-6
    assert FillPace(50.0, 2_650_000).blocks_for(1.0) == 32  # capped by the pick buffers
    assert FillPace(12.0, 2_650_000).blocks_for(400e-6) == 1  # a paced link: one block a step
    assert FillPace(5.0, 2_650_000).blocks_for(400e-6) == 0  # the link cannot move one: off
    n = FillPace(50.0, 1_000_000, cap=100).blocks_for(1e-3)
    assert n == int(FILL_SHARE * 1e-3 * 50e9 // 1_000_000) == 45


def test_pace_holds_n_when_the_fill_lengthens_the_step():
    """The fill's copies may lengthen a step (they buy hits later, and stop when the free slots are full): a slower
    window keeps N, a faster one that fits fewer blocks lowers it (never to more than before); a timing that is not
    a positive number is ignored."""
    p = FillPace(50.0, 2_650_000)
    p.observe(500e-6)
    n0 = p.n
    assert p.observe(800e-6) == n0 and p.observe(2e-3) == n0 and p.retunes == 0
    assert p.observe(300e-6) == p.blocks_for(300e-6) < n0 and p.retunes == 1
    assert p.observe(1.0) == p.blocks_for(300e-6)  # never rises
    assert p.observe(20e-6) == 0 and p.retunes == 2  # a step too short for one block: off
    assert p.observe(float("nan")) == 0 and p.observe(-1.0) == 0
    assert p.stats()["checked_step_s"] == 20e-6 and p.stats()["retunes"] == 2


def test_pace_follows_the_step_down_to_what_it_fits():
    """A first window timed right after the prefill (misses lengthen it) sets too many blocks; the later windows,
    timed with the fill, lower N to what FILL_SHARE of their step fits (no stall counted), so a copy-bound step
    settles where the copies take FILL_SHARE of it; N never rises again."""
    block, rate = 2_650_000, 50.0
    p = FillPace(rate, block)
    assert p.observe(1e-3) == 16  # cold: 1 ms steps
    compute = 430e-6  # the warm step without copies

    def step(n: int) -> float:  # the step with n blocks copied beside it: compute-bound or copy-bound
        return max(compute, n * block / (rate * 1e9))

    seen = [p.n]
    for _ in range(8):
        seen.append(p.observe(step(p.n)))
    assert seen == sorted(seen, reverse=True) and seen[-1] == p.blocks_for(compute) == 7
    assert p.retunes == len(set(seen)) - 1
    assert p.observe(2e-3) == 7  # a longer step (a longer context, or the copies) does not raise N


def test_pace_share_from_the_argument_or_the_benchmark_knob(monkeypatch):
    """share= overrides FILL_SHARE; TIERED_FILL_SHARE (a benchmark's knob) sets the default; a share outside
    (0, 4] is refused with the variable's name."""
    monkeypatch.delenv("TIERED_FILL_SHARE", raising=False)
    assert FillPace(50.0, 2_650_000).share == FILL_SHARE
    assert FillPace(50.0, 1_000_000, cap=100, share=0.9).blocks_for(1e-3) == 45
    monkeypatch.setenv("TIERED_FILL_SHARE", "0.5")
    p = FillPace(50.0, 1_000_000, cap=100)
    assert p.share == 0.5 and p.blocks_for(1e-3) == 25 and p.stats()["share"] == 0.5
    for bad in ("0", "-1", "5", "x"):
        monkeypatch.setenv("TIERED_FILL_SHARE", bad)
        with pytest.raises(ValueError, match="TIERED_FILL_SHARE"):
            FillPace(50.0, 1_000_000)


def test_pace_marks_after_skip_then_the_first_window_then_every_window():
    """Marks after `skip` steps, after the first window, then every `window`: by default steps 3, 6, 9, ... (the
    first window is steps 4-6); a window after the hand-over's step alone was timed and not kept (fillpace's
    docstring)."""
    p = FillPace(50.0, 2_650_000)
    assert [c for c in range(1, 16) if p.marks_at(c)] == [3, 6, 9, 12, 15]
    assert [c for c in range(1, 16) if FillPace(50.0, 2_650_000, skip=1, first=2).marks_at(c)] == [1, 3, 6, 9, 12, 15]
    q = FillPace(50.0, 2_650_000, skip=2, first=3, window=4)
    assert [c for c in range(1, 16) if q.marks_at(c)] == [2, 5, 9, 13]
    with pytest.raises(ValueError, match="skip"):
        FillPace(50.0, 2_650_000, skip=0)


def test_pace_refuses_a_rate_it_cannot_use():
    for bad in (0.0, -3.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="measured link rate"):
            FillPace(bad, 4096)
    with pytest.raises(ValueError, match="block_bytes"):
        FillPace(10.0, 0)


def test_device_fill_option_parses_auto_or_a_count():
    """--device-fill takes copy (the default), auto or N >= 0; anything else is an error that
    names the flag."""
    assert TierConfig().device_fill == "copy" and TierConfig(device_fill="auto").device_fill == "auto"
    assert TierConfig(device_fill=0).device_fill == 0
    assert TierConfig(device_fill=8).device_fill == 8 and TierConfig(device_fill=0).device_fill == 0
    for bad in (-1, "8", "fast", True, 1.5):
        with pytest.raises(BudgetError, match="--device-fill"):
            TierConfig(device_fill=bad)
    t = AutoOrInt(0)
    assert t.convert("auto", None, None) == "auto" and t.convert("12", None, None) == 12
    for bad in ("-2", "x", "1.5"):
        with pytest.raises(click.BadParameter, match="neither auto nor an integer"):
            t.convert(bad, None, None)


class _FakeMark:
    """A StepMark whose completion and time the test sets."""

    def __init__(self, t: float, ready: list[bool]) -> None:
        self.t, self.ready = t, ready

    def done(self) -> bool:
        return self.ready[0]

    def seconds_to(self, later: "_FakeMark") -> float:
        return later.t - self.t


def test_pace_tick_waits_for_marks_without_blocking(reference_layout, monkeypatch):
    """The device step's timing of auto: a mark every window steps; while the later mark has not completed, nothing
    is decided (and the dry watch does not count); once it has, the window's mean step sets N, which the captured
    pick reads from fill_n; a later window too short for N blocks lowers N; a pace that reaches 0 turns the fill
    off."""
    from tiered import load
    from tiered.decode.devstep import DeviceStep
    from tiered.kernels import slot_table as st
    from tiered.store.devtable import DeviceSlotTable

    B = 49152
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 512, "ram_gb": 600 * B / 2**30})
    cache = eng.model.provider
    cache.ram.preload(list(range(512)), 0)
    cache.devtable = DeviceSlotTable(cache, w=0, kernels=st)
    step = DeviceStep(eng.model, graphs=False, fill="auto")
    step.pace.gbps = B * 4.1 / FILL_SHARE / 1e9 / 1e-3  # a link that moves 4.1 blocks in FILL_SHARE of a 1 ms step
    clock, ready = [0.0], [False]

    def mark():
        return _FakeMark(clock[0], ready)

    monkeypatch.setattr(step, "_pace_mark", mark)
    for i in range(1, 9):  # steps of 1 ms; marks at 3 and 6 (not done yet)
        clock[0] = i * 1e-3
        assert step._pace_tick() is False
    assert not step.pace.settled and len(step._pace_marks) == 2 and int(step.fill_n[0]) == 0
    clock[0] = 9e-3
    step._fill_watch()  # (the 9th step, marked) unsettled: the watch returns before its dry count
    assert step._fill_dry == 0 and not step._fill_pending and len(step._pace_marks) == 3
    ready[0] = True
    clock[0] = 10e-3
    assert step._pace_tick() is False  # the 10th step: the 3 -> 6 window read: 1 ms a step
    assert step.pace.n == 4 and int(step.fill_n[0]) == 4 and step.pace.step_s == pytest.approx(1e-3)
    for i in range(11, 13):  # the window 6 -> 9 (marked at 9 ms) read at the 12th: still 1 ms a step
        clock[0] = i * 1e-3
        step._pace_tick()
    assert step.pace.n == 4 and step.pace.retunes == 0
    t = 12e-3
    for i in range(13, 40):  # 0.1 ms a step from here: too short for a block; N drops to 0 and the fill goes off
        t += 0.1e-3
        clock[0] = t
        if step._pace_tick():
            break
    assert step.pace.n == 0 and int(step.fill_n[0]) == 0 and not step.fill_active and step.pace.retunes == 1
    step._fill_restart()  # a new decode phase: auto chose 0, the fill stays off
    assert not step.fill_active
