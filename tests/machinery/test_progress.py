"""progress_bar: tqdm on a terminal; plain, rare, carriage-return-free lines when stderr is a log file."""

from __future__ import annotations

import io

import pytest

from ddpm_jax.utils import progress
from ddpm_jax.utils.progress import LogProgress, progress_bar


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress, "_clock", fake)
    return fake


@pytest.fixture(autouse=True)
def default_interval(monkeypatch):
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_with_stderr_redirected_many_fast_updates_print_one_plain_line_with_the_total(capsys):
    bar = progress_bar(total=10_000, unit="step", desc="training")
    assert isinstance(bar, LogProgress)
    for i in range(10_000):
        bar.update(1)
        if i % 100 == 0:
            bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
    bar.close()
    bar.close()  # a second close prints nothing more
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[-1].startswith("training: 10,000/10,000 step (100%)") and "loss=" in lines[-1]


def test_a_plain_line_at_most_every_interval_and_the_final_one(clock, capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "10")
    bar = progress_bar(range(100), desc="sampling", unit="batch")
    seen = []
    for item in bar:
        seen.append(item)
        clock.now += 1.0  # one second a batch: a line after every ten
    assert seen == list(range(100))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10  # one every ten seconds; the last of them already shows the end
    assert lines[0].startswith("sampling: 10/100 batch (10%), 1.00 batch/s, elapsed 0:00:10, left 0:01:30")
    assert lines[-1].startswith("sampling: 100/100 batch (100%)")


def test_the_line_has_rate_elapsed_postfix_and_starts_from_initial(clock):
    bar = LogProgress(total=200, initial=100, desc="noisy classifier", unit="step", file=io.StringIO())
    clock.now += 50.0
    bar.update(25)
    bar.set_postfix(loss="0.123", acc="0.98")
    line = bar.format()
    # The rate counts this session's steps only (25 in 50 s), not the 100 done before a resume.
    assert line == ("noisy classifier: 125/200 step (62%), 2.00 s/step, elapsed 0:00:50, left 0:02:30, "
                    "loss=0.123, acc=0.98")


def test_an_unknown_total_prints_the_count_alone(clock):
    bar = LogProgress(iter("abc"), file=io.StringIO())
    assert list(bar) == ["a", "b", "c"]
    assert bar.format().startswith("3 it, elapsed")


def test_disabled_gives_a_silent_object_that_still_yields_every_item(capsys):
    bar = progress_bar(range(5), enabled=False, desc="quiet")
    assert list(bar) == [0, 1, 2, 3, 4]
    with progress_bar(total=5, enabled=False) as manual:
        manual.update(3)
        manual.set_postfix(loss=1.0)
    bar.close()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_on_a_terminal_it_is_a_tqdm_bar():
    from tqdm.auto import tqdm

    stream = TTY()
    bar = progress_bar(total=3, file=stream, dynamic_ncols=True, smoothing=0)
    try:
        assert isinstance(bar, tqdm)
    finally:
        bar.close()


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_a_bad_interval_warns_once_naming_the_value_and_keeps_the_default(value, capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, value)
    monkeypatch.setattr(progress, "_warned_about", set())
    assert progress.progress_interval() == progress.DEFAULT_INTERVAL
    assert progress.progress_interval() == progress.DEFAULT_INTERVAL
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and repr(value) in lines[0]


def test_zero_interval_prints_every_update(clock, capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    with progress_bar(total=3, desc="d") as bar:
        for _ in range(3):
            bar.update(1)
    assert len(capsys.readouterr().err.splitlines()) == 3  # the closing line would repeat the last one


def test_the_closing_line_comes_after_a_stop_between_two_records(clock, capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "10")
    bar = progress_bar(total=100, desc="training")
    clock.now += 10.0
    bar.update(40)
    bar.update(2)  # stopped here, e.g. by SIGTERM
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["training: 40/100 it", "training: 42/100 it"]
