"""What the Flower path prints: a handful of lines, no colour codes off a terminal, the preset that was used
(:mod:`server.logs`, :class:`simulations.processes.EchoFilter`)."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest

from fedbayes.cli import main
from fedbayes.results import read_metrics
from fedbayes.runconfig import split_run_config
from server.logs import HeadlineFilter, colour_wanted, configure_server_logging
from simulations.processes import EchoFilter

MAX_LINES = 12
"""A 2-round run printed 7 lines (preset, run, 2 rounds, results, the command's last metrics and folder); was 93."""

STREAM = (
    "Using SuperLink: fedbayes-sim (127.0.0.1:1234)\n"
    "Successfully started run 42\n"
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `42`\n"
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n"
    "\x1b[92mINFO \x1b[0m:      Federation `@none/default` (2 simulated SuperNodes)\n"
    "/x/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, ...\n"
    "  warnings.warn(\n"
    "\x1b[92mINFO \x1b[0m:      fedbayes: bayes-admm on digits, 2 clients\n"
    "\x1b[93mWARNING \x1b[0m:   round 1: no reply from client 1 within round-timeout\n"
    "\x1b[92mINFO \x1b[0m:      fedbayes: round 1: test_accuracy=0.5\n"
    "Traceback (most recent call last):\n"
    '  File "x.py", line 1, in <module>\n'
    "ValueError: boom\n"
    "\x1b[92mINFO \x1b[0m:      [ROUND 2/2]\n"
)


def test_echo_filter_keeps_the_run_lines_warnings_and_errors_without_colour() -> None:
    out = EchoFilter(verbose=False, colour=False).lines(STREAM)
    assert out == [
        "fedbayes: bayes-admm on digits, 2 clients",
        "WARNING :   round 1: no reply from client 1 within round-timeout",
        "fedbayes: round 1: test_accuracy=0.5",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "ValueError: boom",
    ]
    verbose = EchoFilter(verbose=True, colour=False).lines(STREAM)
    assert len(verbose) == STREAM.count("\n") and not any("\x1b[" in line for line in verbose)
    assert any("\x1b[" in line for line in EchoFilter(verbose=True, colour=True).lines(STREAM))


def test_echo_filter_follows_a_growing_file_by_whole_lines(tmp_path: Path) -> None:
    log, sink = tmp_path / "run.log", io.StringIO()
    f = EchoFilter(verbose=False, colour=False, out=sink)
    log.write_bytes(b"INFO :      fedbayes: round 1: a=1\nINFO :      fedbayes: rou")
    f.follow(log)
    assert sink.getvalue() == "fedbayes: round 1: a=1\n"
    with open(log, "ab") as fh:
        fh.write(b"nd 2: a=2")
    f.follow(log)
    assert sink.getvalue() == "fedbayes: round 1: a=1\n"  # an unfinished line waits
    f.follow(log, final=True)
    assert sink.getvalue() == "fedbayes: round 1: a=1\nfedbayes: round 2: a=2\n"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert colour_wanted(_Tty()) and not colour_wanted(io.StringIO()) and not colour_wanted(None)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not colour_wanted(_Tty())


def test_server_logging_hides_flowers_info_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.common.logger import console_handler

    def shown(msg: str, level: int = logging.INFO) -> bool:
        rec = logging.LogRecord("flwr", level, __file__, 1, msg, None, None)
        return all(f.filter(rec) if isinstance(f, logging.Filter) else f(rec) for f in console_handler.filters)

    monkeypatch.setattr(console_handler, "stream", io.StringIO())
    monkeypatch.setattr(console_handler, "filters", [])
    configure_server_logging(verbose=False)
    configure_server_logging(verbose=False)  # idempotent: one filter
    assert sum(isinstance(f, HeadlineFilter) for f in console_handler.filters) == 1
    assert console_handler.colored is False  # not a terminal
    assert shown("fedbayes: round 1: x=1") and shown("node 3 left", logging.WARNING)
    assert not shown("[ROUND 1/2]") and not shown("\t└──> MetricRecord: {...}")
    configure_server_logging(verbose=True)
    assert shown("[ROUND 1/2]")
    console_handler.colored = True  # Flower's default, as it was


@pytest.mark.parametrize(("cfg", "line"), [
    ({"preset": "digits-10-het"}, "preset digits-10-het"),
    ({"preset": "", "resolved-preset": "digits-10-het"}, "preset digits-10-het (resolved by the command)"),
    ({"preset": ""}, "preset none"),
])
def test_server_app_names_the_preset_used(cfg: dict[str, str], line: str) -> None:
    assert split_run_config(cfg)[1].preset_line() == line


@pytest.mark.parametrize("bad", [{"verbose": "yes"}, {"resolved-preset": 3}])
def test_bad_flower_only_keys_are_named(bad: dict[str, object]) -> None:
    from fedbayes.config import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        split_run_config(bad)


@pytest.mark.slow
def test_flower_engine_prints_a_handful_of_plain_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = tmp_path / "run"
    rc = main(["run", "--engine", "flower", "--preset", "digits-10-het", "--clients", "2", "--rounds", "2",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    lines = text.splitlines()
    assert "\x1b[" not in text
    assert len(lines) < MAX_LINES, text
    rows = read_metrics(out)
    for r in (1, 2):  # one line per round, with its metrics, printed once
        mine = [ln for ln in lines if re.match(rf"fedbayes: round {r}: ", ln)]
        assert len(mine) == 1, text
        assert f"test_accuracy={rows[r - 1]['test_accuracy']:.4g}" in mine[0]
    assert sum("test_accuracy=" in ln for ln in lines) == 3, text  # the rounds, and the command's final line
    assert "preset digits-10-het (resolved by the command)" in text
    assert "preset none" not in text
    assert f"fedbayes: results in {out.resolve()}" in lines
