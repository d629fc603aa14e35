"""Progress display: plain lines with rate and time left for logs, a live bar on a terminal (no timing asserts).

A fake clock makes every rate and time-left figure hand-computable; the terminal is a stream whose isatty()
says yes.
"""

import io

from salt_tf import progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_format_seconds():
    assert [progress.format_seconds(s) for s in (0, 42.4, 59.6, 61, 3599, 3600, 7625)] == \
        ["0s", "42s", "1m00s", "1m01s", "59m59s", "1h00m", "2h07m"]


def test_plain_lines_every_n_steps_with_rate_and_time_left():
    clock, lines = FakeClock(), []
    bar = progress.Progress(100, label="epoch 2/3", unit="step", every=20, items_per_unit=32,
                            remaining_after=100, stream=io.StringIO(), clock=clock,
                            log=lambda fmt, text: lines.append(fmt % text))
    assert not bar.live
    bar.update(10)          # a resumed epoch: the first update fixes the origin of the rate
    for done in range(11, 101):
        clock.now += 0.5    # 2 steps/s = 64 img/s
        bar.update(done, {"loss": 0.25})
    # Lines at 20, 40, 60, 80 (none at 100: the epoch line follows), each from the hand-computed rate:
    # at step 40, 30 steps in 15 s -> 2 steps/s; 60 steps left -> 30 s; run: 60 + 100 steps -> 80 s.
    assert len(lines) == 4, lines
    assert lines[1] == "epoch 2/3 step 40/100  loss 0.2500  64.0 img/s  30s left  run 1m20s left"
    assert lines[3].startswith("epoch 2/3 step 80/100") and lines[3].endswith("10s left  run 1m00s left")


def test_plain_lines_for_images_without_a_run_estimate():
    clock, lines = FakeClock(), []
    bar = progress.Progress(1000, label="predict", unit="image", every=250, stream=io.StringIO(), clock=clock,
                            log=lambda fmt, text: lines.append(fmt % text))
    bar.update(0)
    for done in range(50, 1001, 50):
        clock.now += 1.0    # 50 images/s
        bar.update(done)
    assert lines == ["predict image 250/1000  50.0 img/s  15s left", "predict image 500/1000  50.0 img/s  10s left",
                     "predict image 750/1000  50.0 img/s  5s left"]


def test_plain_lines_when_updates_jump_over_a_multiple():
    """Predict reports parts of batches (an image counts 1/M per model of M): a line comes each time `done`
    reaches or passes a multiple of `every`, once, whatever the step."""
    clock, lines = FakeClock(), []
    bar = progress.Progress(14, label="predict", unit="image", every=4, stream=io.StringIO(), clock=clock,
                            log=lambda fmt, text: lines.append(fmt % text))
    for done in (0, 3, 7, 7, 8, 9, 12, 14):
        clock.now += 1.0
        bar.update(done)
    assert [line.split("  ")[0] for line in lines] == ["predict image 7/14", "predict image 8/14",
                                                       "predict image 12/14"]


def test_no_lines_when_off():
    lines = []
    bar = progress.Progress(10, label="x", every=0, stream=io.StringIO(), log=lambda *a: lines.append(a))
    for done in range(11):
        bar.update(done)
    assert lines == []


def test_terminal_gets_a_live_bar_and_no_log_lines(capsys):
    clock, lines = FakeClock(), []
    bar = progress.Progress(8, label="epoch 1/1", unit="step", every=2, items_per_unit=32, remaining_after=8,
                            stream=Terminal(), clock=clock, log=lambda *a: lines.append(a))
    assert bar.live
    for done in range(0, 9):
        clock.now += 1.0
        bar.update(done, {"loss": 0.5})
    out = capsys.readouterr().out
    assert lines == []                              # the bar replaces the plain lines
    assert "\r" in out                              # redrawn in place
    assert "8/8" in out and "loss: 0.5000" in out   # the count and the value as given (not re-averaged)
    assert "run_left_min" in out
