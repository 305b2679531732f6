"""Benchmark matrix: expansion, resumability, failures, summary equal to MLflow (the demo:
tests/test_demo.py)."""

from pathlib import Path

import pytest
from conftest import tiny_sets

from suite.cli import main
from suite.config import from_dict, load_config
from suite.models import check_model_config
from suite.studies.matrix import expand, run_matrix
from suite.tracking import make_tracker

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.toml"))
TINY = tiny_sets()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_config_loads_and_states_its_question(path):
    head = path.read_text().splitlines()[:8]
    assert head[0].startswith("# Question"), "first line states the question"
    assert any("Run:" in line for line in head), "the command that runs it"
    text = path.read_text()
    if "[matrix]" in text:
        name, _, cells, _ = expand(path)
        assert cells
        for c in cells:  # every cell is a valid config
            cfg = from_dict(c.raw, f"{path.name} cell {c.index}", check_paths=False)
            check_model_config(cfg.model.name, cfg.model.overrides)
    else:
        cfg = load_config(path)
        check_model_config(cfg.model.name, cfg.model.overrides)


def test_expand_product_and_tied_keys(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text(
        '[matrix]\nname = "t"\nmodels = ["tnt_nano", {name = "vit_nano", depth = 2}]\n'
        "seeds = [0, 1, 2]\n"
        'pix = [{"model.pixel_size" = 2, "model.inner_dim" = 12}, '
        '{"model.pixel_size" = 4, "model.inner_dim" = 48}]\n'
    )
    name, _, cells, _ = expand(p)
    assert name == "t" and len(cells) == 2 * 3 * 2
    pairs = {(c.overrides["model.pixel_size"], c.overrides["model.inner_dim"]) for c in cells}
    assert pairs == {(2, 12), (4, 48)}  # tied, not crossed
    assert len({c.digest for c in cells}) == len(cells)
    assert cells[0].run_name.startswith("tnt_nano s0")


def test_dry_run_prints_cells(capsys):
    assert (
        main(["matrix", str(EXPERIMENTS[0].parent / "ablation_pixel_size.toml"), "--dry-run"]) == 0
    )
    out = capsys.readouterr().out
    assert "6 cells" in out and "model.inner_dim" in out


def test_bad_matrix_is_one_line(tmp_path, capsys):
    p = tmp_path / "m.toml"
    p.write_text('[matrix]\nmodels = "tnt_nano"\n')
    assert main(["matrix", str(p), "--dry-run"]) == 2
    assert "matrix.models must be a non-empty list" in capsys.readouterr().err


@pytest.mark.slow
def test_matrix_runs_resumes_and_records_failures(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    p = tmp_path / "m.toml"
    p.write_text(
        '[matrix]\nname = "mini"\nmodels = ["tnt_nano"]\nseeds = [0, 1]\n'
        '"model.inner_heads" = [2, 5]\n'  # inner_dim 12 is not divisible by 5: those cells fail
        f"[train]\nout_dir = '{tmp_path / 'runs'}'\n[tracking]\nexperiment = 'mini'\n"
    )
    tracker = make_tracker(uri)
    r = run_matrix(p, tracker, TINY, progress=False)
    assert (r.ran, r.skipped, r.failed) == (4, 0, 2)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("mini")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'cell'")
    by_status = {}
    for run in runs:
        by_status.setdefault(run.info.status, []).append(run)
        assert run.data.tags["mlflow.parentRunId"] == r.parent_run_id
    assert len(by_status["FINISHED"]) == 2 and len(by_status["FAILED"]) == 2
    for run in by_status["FAILED"]:
        assert "inner_heads=5" in run.data.tags["error"]
    # the summary's numbers are the MLflow metrics
    (row,) = r.summary.to_dict("records")
    top1 = [run.data.metrics["val_top1"] for run in by_status["FINISHED"]]
    assert row["n"] == 2
    assert row["top-1 mean"] == pytest.approx(sum(top1) / 2)
    assert row["top-1 std"] == pytest.approx(abs(top1[0] - top1[1]) / 2**0.5)
    assert row["GMACs"] == pytest.approx(by_status["FINISHED"][0].data.metrics["gmacs"])
    for run in by_status["FINISHED"]:
        assert run.data.metrics["infer_img_per_s"] > 0
        assert run.data.params["model.inner_heads"] == "2"
        assert set(run.data.tags["varied"].split(",")) == {"model.inner_heads", "train.seed"}
    # the parent's collapsed row says it already: per group mean (and std) top-1 and img/s
    parent = client.get_run(r.parent_run_id)
    means = parent.data.metrics
    assert means["val_top1_mean/tnt_nano inner_heads 2"] == round(row["top-1 mean"], 2)
    assert means["val_top1_std/tnt_nano inner_heads 2"] == round(row["top-1 std"], 2)
    assert means["train_img_per_s_mean/tnt_nano inner_heads 2"] == round(row["train img/s"])
    assert "tnt_nano" in parent.data.tags["mlflow.note.content"]
    assert parent.data.params["matrix.n_seeds"] == "2"
    # rerun: finished cells are skipped, the impossible ones fail again
    again = run_matrix(p, tracker, TINY, progress=False)
    assert (again.ran, again.skipped, again.failed) == (2, 2, 2)
    assert again.parent_run_id == r.parent_run_id


def test_matrix_cli_exit_code_counts_failures(tmp_path, capsys):
    p = tmp_path / "m.toml"
    p.write_text('[matrix]\nmodels = ["tnt_nano"]\n"model.inner_heads" = [5]\n')
    argv = ["matrix", str(p), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--no-progress"]
    assert main(argv + [f"--set={s}" for s in TINY]) == 1
    assert "1 failed" in capsys.readouterr().out
