"""The status line's numbers: time since the click, and the time left once a tenth is done."""

from flux.sampling import StepInfo
from pulid import stages


def test_time_left_is_estimated_from_the_pace_since_the_turn_came():
    now = [100.0]
    bar = stages.RequestProgress(clock=lambda: now[0])
    assert bar.text == "checking the request" and bar.seconds_left() is None
    now[0] = 130.0  # 30 s in line: counted since the click, not in the estimate
    bar.update(stages.waiting_in_line(2))
    assert bar.text == "waiting for the GPU: 2 ahead" and bar.seconds_left() is None
    assert bar.elapsed() == 30.0
    bar.update(stages.STARTING)  # its turn
    bar.update(StepInfo(0, 20, 1.0, 0.95, None))
    assert bar.seconds_left() is None  # under a tenth done: too early to tell
    now[0] = 150.0
    bar.update(StepInfo(9, 20, 0.5, 0.45, None))  # fill 0.05 + 0.85 * 10/20 = 0.475 after 20 s
    expected = 20.0 * (1 - 0.475) / 0.475
    assert abs(bar.seconds_left() - expected) < 1e-9 and bar.text == "denoising step 10/20"
    assert bar.elapsed() == 50.0


def test_the_status_line_marks_its_times_for_the_page_clock():
    """The fast tier's sibling of the browser's status-line test: what the server sends. The
    page's script counts on from the ``t``-classes (tenths of a second) between updates."""
    from pulid.serve.handlers import clock, status_line

    now = [10.0]
    bar = stages.RequestProgress(clock=lambda: now[0])
    bar.update(stages.STARTING)
    now[0] = 17.04
    bar.update(StepInfo(9, 20, 0.5, 0.45, None))
    line = status_line(bar)
    assert line.startswith('<progress value="0.475" max="1"></progress> **Denoising step 10/20**')
    assert '<span class="job-clock t70">7 s</span> since you clicked' in line
    left = 7.04 * (1 - 0.475) / 0.475
    assert f'<span class="job-left t{left * 10:.0f}">about {clock(left)} left</span>' in line
    assert [clock(s) for s in (0.4, 59.6, 125)] == ["0 s", "1 min 00 s", "2 min 05 s"]
