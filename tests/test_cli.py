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


def test_models_gmacs_column_beside_the_paper_figure(capsys):
    assert main(["models", "tnt_s_patch16_224"]) == 0
    out, err = capsys.readouterr()
    head, row = out.splitlines()
    assert "params (M) paper params (M) GMACs (fvcore) paper GFLOPs" in " ".join(head.split())
    cells = row.split()
    gmacs = float(cells[cells.index("23.8") + 1])  # after the paper's params, before its GFLOPs
    assert abs(gmacs - 5.217) <= 0.01 and cells[cells.index("23.8") + 2] == "5.2"
    assert err == ""
    # the whole registry is listed at once, uncounted unless asked (counting takes seconds each)
    assert main(["models"]) == 0
    out, err = capsys.readouterr()
    assert "GMACs" not in out and "--gmacs" in err


@pytest.mark.parametrize("command", ["train", "matrix", "search"])
def test_a_set_typo_is_blamed_on_set_not_the_config(command, tmp_path, capsys):
    from pathlib import Path

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    config = {"train": [], "matrix": [str(experiments / "smoke.toml")]}
    config["search"] = [str(experiments / "search_pixel_patch.toml")]
    argv = [command, *config[command], "--set", "train.epoch=1"]
    assert main([*argv, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"tntbench {command}: error: --set train.epoch: unknown key 'train.epoch'"
    )
    assert err.count("\n") == 1 and "toml" not in err
