"""The CLI explains itself: a version, a user description, help text on every option, and the
README's commands are the CLI's."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

import suite
from suite.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tntbench {suite.__version__}"


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    missing = []
    for name, p in _commands(parser).items():
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


def test_readme_command_table_lists_every_command_with_an_example_that_parses():
    """Each row of the README's command table: `name` | what | `tntbench name ...`. The table
    covers the CLI's commands, each example is accepted by the parser as that command, and the
    files it names exist (running them is the tests' and CI's job: test_demo, test_train, ...)."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z]+)` \|[^|]*\| `tntbench ([^`]*)` \|$", text, re.M)
    parser = build_parser()
    assert sorted(name for name, _ in rows) == sorted(_commands(parser)), rows
    for name, example in rows:
        argv = shlex.split(example)
        args = parser.parse_args(argv)  # an unknown option or a missing argument exits here
        assert args.command == name, example
        for word in argv:
            if word.startswith("experiments/"):
                assert (ROOT / word).is_file(), example
    # the quick start: exactly the two commands, the demo and the tests
    (quick,) = re.findall(r"## Quick start\n.*?```bash\n(.*?)```", text, re.S)
    commands = [line.split("#")[0].strip() for line in quick.splitlines()]
    assert commands == ["pip install . && tntbench demo", "pip install tox && tox"]


def test_readme_and_docs_link_only_to_files_that_exist():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to {target}"


# --set for each example that trains, so the whole table runs in about a minute: smaller data
# and fewer trials, the same commands and files
SHRINK = {
    "train": ["data.train_size=256", "data.val_size=64"],
    "search": ["search.n_trials=2", "data.train_size=128", "data.val_size=64", "train.epochs=1"],
}


@pytest.mark.slow
def test_readme_command_table_examples_run(tmp_path, monkeypatch, capsys):
    """Every example of the README's command table runs in a fresh folder and exits 0, in the
    table's order (`viz`'s RUN_IDs are two `train` runs; `ui` is served in test_ui.py). Only
    shrunk by SHRINK's --set where it trains."""
    rows = re.findall(
        r"^\| `([a-z]+)` \|[^|]*\| `tntbench ([^`]*)` \|$", (ROOT / "README.md").read_text(), re.M
    )
    monkeypatch.chdir(tmp_path)  # the default store and reports/smoke land here
    train_runs: list[str] = []
    for name, example in rows:
        if name in ("demo", "ui"):  # test_demo.py and test_ui.py run these two
            continue
        argv = [str(ROOT / w) if w.startswith("experiments/") else w for w in shlex.split(example)]
        argv += [a for s in SHRINK.get(name, []) for a in ("--set", s)]
        for seed in (0, 1) if name == "train" else (None,):
            extra = ["--set", f"train.seed={seed}"] if seed is not None else []
            if name == "viz":
                argv = ["viz", *train_runs, *argv[3:], "--out", str(tmp_path / "viz")]
            assert main(argv + extra) == 0, (example, capsys.readouterr().err[-2000:])
            out = capsys.readouterr().out
            if name == "train":
                train_runs += re.findall(r"^run ([0-9a-f]{32}) ", out, re.M)
        if name == "train":
            assert len(train_runs) == 2, "train printed no run id"
    assert (tmp_path / "reports" / "smoke").is_dir()
    assert {p.suffix for p in (tmp_path / "viz").iterdir()} == {".png"}
