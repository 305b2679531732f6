"""The CLI explains itself: a version, a user description, help text on every option."""

import argparse

import pytest

import suite
from suite.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tntbench {suite.__version__}"


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if not isinstance(a, argparse._HelpAction) and not a.help:
                missing.append(f"{name} {a.option_strings or a.dest}")
    assert not missing, missing
    assert parser.description.startswith("TNT Bench") and "examples:" in parser.description


def test_report_says_what_it_reads_before_an_error(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/m.db"
    assert (
        main(["report", "--experiment", "e1", "--out", str(tmp_path / "r"), "--tracking-uri", uri])
        == 2
    )
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"report: reading runs of e1 from {uri} ..."
    assert len(err) == 2 and err[1].startswith("tntbench report: error: ")
