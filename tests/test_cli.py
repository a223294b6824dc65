"""The command line: every command has --help; bad input gives a typed, explained error."""

from __future__ import annotations

import pytest

from singleframe.cli import build_parser, main

COMMANDS = ["simulate", "ingest", "ingest-refcat", "run", "evaluate", "serve"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: singleframe " + command in capsys.readouterr().out


def test_top_level_help_lists_every_command() -> None:
    text = build_parser().format_help()
    for command in COMMANDS:
        assert command in text


def test_run_with_missing_config_file_is_a_config_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from singleframe.errors import ConfigError
    from singleframe.steps.config import load_calibrate_config

    with pytest.raises(ConfigError, match="does not exist"):
        load_calibrate_config(tmp_path / "nope.yaml")


def test_evaluate_of_a_store_without_outputs_fails_and_says_what_to_run(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    # An empty table with exit status 0 would read as "evaluated, nothing wrong".
    assert main(["evaluate", "--store", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "no calibrated detectors" in err and "singleframe run --store" in err
