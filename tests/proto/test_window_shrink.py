"""Receive-window auto-tuning halves a window far beyond the reader's pace (proto.flow.next_window): the bytes a
steady bulk stream may have in flight stay near what its pace needs, not the largest burst it ever saw."""

from __future__ import annotations

from trio_tunnel.proto.flow import SHRINK_FACTOR, next_window

KiB = 1024
MiB = 1024 * KiB


def tune(window: int, consumed: int, seconds: float, srtt: float | None = 0.001, floor: int = 256 * KiB) -> int:
    return next_window(
        window=window,
        max_window=8 * MiB,
        budget_left=32 * MiB,
        consumed_in_epoch=consumed,
        epoch_seconds=seconds,
        srtt=srtt,
        min_window=floor,
    )


def test_a_window_several_times_the_pace_halves() -> None:
    # 1.1 MiB of a 2 MiB window in 20 ms with a 1 ms RTT: the reader needs a tenth of it.
    assert tune(2 * MiB, 1100 * KiB, 0.020) == 1 * MiB


def test_between_growth_and_shrink_thresholds_the_window_holds() -> None:
    window, consumed, srtt = 2 * MiB, 1100 * KiB, 0.001
    grow_below = 4 * srtt * consumed / window
    shrink_from = SHRINK_FACTOR * srtt * consumed / window
    assert tune(window, consumed, grow_below * 0.9) == 4 * MiB
    assert tune(window, consumed, (grow_below + shrink_from) / 2) == window
    assert tune(window, consumed, shrink_from) == window // 2


def test_never_below_the_floor() -> None:
    assert tune(512 * KiB, 300 * KiB, 10.0) == 256 * KiB
    assert tune(256 * KiB, 200 * KiB, 10.0) == 256 * KiB


def test_a_window_limited_stream_keeps_its_window() -> None:
    # Window-limited: half the window arrives in about half an RTT (50 ms RTT, 2 MiB window, 1.1 MiB in 28 ms).
    assert tune(2 * MiB, 1100 * KiB, 0.028, srtt=0.050) == 4 * MiB
    # A slower epoch on the same long link, still well under the shrink threshold: unchanged.
    assert tune(2 * MiB, 1100 * KiB, 0.150, srtt=0.050) == 2 * MiB


def test_no_change_without_an_rtt_sample_or_a_finished_epoch() -> None:
    assert tune(2 * MiB, 1100 * KiB, 10.0, srtt=None) == 2 * MiB
    assert tune(2 * MiB, 512 * KiB, 10.0) == 2 * MiB  # not more than half consumed: the epoch is not over
