"""Training engine: learning on synthetic data, MLflow records, exact resume, DDP, distillation."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import free_port

from suite.config import DistillConfig, load_config
from suite.tracking import Tracker, make_tracker
from suite.training.engine import Criterion, build_optimizer, build_scheduler
from suite.training.fit import fit

SMALL = [
    "data.train_size=512",
    "data.val_size=256",
    "data.random_resized_crop=false",
    "data.hflip=false",
    "train.batch_size=64",
    "train.lr=1e-3",
    "train.amp='fp32'",
    "tracking.system_metrics=false",
    # these tests check CPU behaviour (bit-exact resume, gloo DDP); tests/test_cuda.py has CUDA's
    "train.device='cpu'",
]


def cfg_for(tmp_path, *sets):
    return load_config(None, SMALL + [f"train.out_dir='{tmp_path / 'runs'}'", *sets])


def test_scheduler_warmup_then_cosine_to_min_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4, lr=1.0, min_lr=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_no_weight_decay_on_norms_biases_tokens():
    from suite.models import create_model

    model = create_model("tnt_nano")
    decay, no_decay = build_optimizer(model, 1e-3, 0.05).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "patch_pos", "pixel_pos", "norm.weight", "head.bias"} <= no
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.05


def test_distillation_losses():
    cls_out, dist_out = torch.randn(4, 10), torch.randn(4, 10)
    y, teacher = torch.randint(0, 10, (4,)), torch.randn(4, 10)
    hard = Criterion(0.0, DistillConfig(kind="hard", teacher="x", alpha=0.5))
    ce = torch.nn.functional.cross_entropy
    expected = 0.5 * ce(cls_out, y) + 0.5 * ce(dist_out, teacher.argmax(-1))
    torch.testing.assert_close(hard((cls_out, dist_out), y, teacher), expected)
    soft = Criterion(0.0, DistillConfig(kind="soft", teacher="x", alpha=0.1, tau=3.0))
    kl = torch.nn.functional.kl_div(
        (dist_out / 3).log_softmax(-1),
        (teacher / 3).log_softmax(-1),
        reduction="batchmean",
        log_target=True,
    )
    torch.testing.assert_close(
        soft((cls_out, dist_out), y, teacher), 0.9 * ce(cls_out, y) + 0.1 * 9 * kl
    )
    # soft targets (MixUp/CutMix) with label smoothing
    target = torch.softmax(torch.randn(4, 10), -1)
    out = Criterion(0.1)(cls_out, target)
    smoothed = target * 0.9 + 0.1 / 10
    torch.testing.assert_close(out, -(smoothed * cls_out.log_softmax(-1)).sum(-1).mean())


@pytest.mark.slow
def test_tnt_nano_learns_and_run_is_fully_tracked(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = cfg_for(
        tmp_path,
        "train.epochs=3",
        "data.train_size=2000",
        "data.val_size=500",
        "tracking.experiment='t'",
        "tracking.system_metrics=true",
    )
    result = fit(cfg, make_tracker(uri), progress=False)
    top1 = result.metrics["val_top1"]
    assert top1 > 30.0, top1  # chance is 10%: far above it after 3 epochs
    client = mlflow.MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tnt_nano s0"
    p, tags = run.data.params, run.data.tags
    assert p["model.name"] == "tnt_nano" and p["train.epochs"] == "3"
    assert p["data.name"] == "synthetic" and float(p["lr_effective"]) == 1e-3
    for tag in ("family", "git_commit", "torch_version", "device_name", "host", "suite_version"):
        assert tag in tags, tag
    assert tags["family"] == "tnt"
    hist = client.get_metric_history(result.run_id, "val_top1")
    assert [m.step for m in hist] == [1, 2, 3]
    assert hist[-1].value == pytest.approx(top1)
    for key in (
        "train_loss",
        "val_loss",
        "val_top5",
        "epoch_s",
        "train_img_per_s",
        "gmacs",
        "params_m",
        "lr",
        "train_loss_step",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["gmacs"] == pytest.approx(0.0174, rel=0.05)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "synthetic" and len(inp.dataset.digest) >= 8
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.toml", "learning_curves.png", "checkpoints"} <= arts
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoints")] == [
        "checkpoints/best.pt"
    ]


@pytest.mark.slow
def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path):
    sets = [
        "train.epochs=3",
        "data.train_size=256",
        "data.val_size=128",
        "train.warmup_epochs=1",
        "model.drop_path_rate=0.1",
        "data.hflip=true",
    ]
    full = fit(cfg_for(tmp_path / "a", *sets), Tracker(), progress=False)

    def stop_after_first(epoch, metrics):
        if epoch == 0:
            raise KeyboardInterrupt

    cfg = cfg_for(tmp_path / "b", *sets)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, Tracker(), on_epoch=stop_after_first, progress=False)
    ckpt = tmp_path / "b" / "runs" / "tnt_nano_s0"
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == 1
    resumed = fit(cfg, Tracker(), resume=str(ckpt), progress=False)
    assert len(resumed.history) == 3
    for key in ("train_loss", "val_loss", "val_top1", "val_top5"):
        assert resumed.history[-1][key] == pytest.approx(full.history[-1][key], abs=1e-6), key


@pytest.mark.slow
def test_failed_run_is_marked_failed_with_error(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def boom(epoch, metrics):
        raise RuntimeError("boom at epoch end")

    with pytest.raises(RuntimeError):
        fit(
            cfg_for(tmp_path, "train.epochs=1", "data.train_size=128"),
            make_tracker(uri),
            on_epoch=boom,
            progress=False,
        )
    (run,) = mlflow.MlflowClient(uri).search_runs(["1"])
    assert run.info.status == "FAILED"
    assert "boom at epoch end" in run.data.tags["error"]


def test_distilled_student_with_checkpoint_teacher(tmp_path):
    teacher = fit(cfg_for(tmp_path / "t", "train.epochs=1"), Tracker(), progress=False)
    cfg = cfg_for(
        tmp_path / "s",
        "train.epochs=1",
        "model.name='deit_nano_distilled'",
        "distill.kind='hard'",
        f"distill.teacher='{teacher.checkpoint_dir}/best.pt'",
        "distill.teacher_model='tnt_nano'",
        "train.ema=true",
    )
    result = fit(cfg, Tracker(), progress=False)
    assert math.isfinite(result.metrics["train_loss"])
    assert "ema_val_top1" in result.metrics


@pytest.mark.slow
def test_torchrun_two_cpu_processes_log_one_run(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),  # the OS picks it: parallel runs never share a rendezvous
        "-m",
        "suite",
        "train",
        "--tracking-uri",
        uri,
        *[f"--set={s}" for s in SMALL],
        "--set",
        "train.epochs=1",
        "--set",
        f"train.out_dir='{tmp_path}/runs'",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.MlflowClient(uri).search_runs(["1"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["world_size"] == "2"
    assert runs[0].data.params["global_batch"] == "128"


@pytest.mark.slow
def test_compiled_training_keeps_plain_checkpoint_names(tmp_path):
    """train.compile = true compiles the whole model: it trains, compile time is logged apart
    (compile_s) and the checkpoint loads into an uncompiled model (no ``_orig_mod.``)."""
    mlflow = pytest.importorskip("mlflow")
    from suite.models import create_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = cfg_for(
        tmp_path,
        "train.compile=true",
        "train.epochs=1",
        "model.depth=1",
        "data.train_size=128",
        "data.val_size=64",
    )
    r = fit(cfg, make_tracker(uri), progress=False)
    assert math.isfinite(r.metrics["train_loss"])
    ckpt = torch.load(os.path.join(r.checkpoint_dir, "best.pt"), weights_only=True)
    create_model(ckpt["model_name"], **ckpt["model_kwargs"]).load_state_dict(ckpt["model"])
    run = mlflow.MlflowClient(uri).get_run(r.run_id)
    assert run.data.tags["compile"] == "whole" and "compile_fallback" not in run.data.tags
    # the first (compiling) step ran before the epoch: far slower than a whole timed epoch
    assert run.data.metrics["compile_s"] > run.data.metrics["epoch_s"]


@pytest.mark.slow
def test_compile_auto_is_eager_on_cpu(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = cfg_for(
        tmp_path,
        "train.epochs=1",
        "model.depth=1",
        "data.train_size=64",
        "data.val_size=32",
        "train.device='cpu'",
    )
    assert cfg.train.compile == "auto"  # the default
    r = fit(cfg, make_tracker(uri), progress=False)
    run = mlflow.MlflowClient(uri).get_run(r.run_id)
    assert run.data.tags["compile"] == "eager" and "compile_s" not in run.data.metrics


def test_failed_compile_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch, capsys):
    """A compiler that fails: one warning line, the same run trains eagerly to the same
    result as an eager run, and is tagged compile_fallback."""
    mlflow = pytest.importorskip("mlflow")

    def broken_compile(model, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("inductor: no C++ compiler found\nlong details")

        return call

    sets = ["train.epochs=1", "model.depth=1", "data.train_size=64", "data.val_size=32"]
    eager = fit(cfg_for(tmp_path / "a", *sets, "train.compile=false"), Tracker(), progress=False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = fit(cfg_for(tmp_path / "b", *sets, "train.compile=true"), make_tracker(uri), progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in err if "torch.compile" in line]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0]
    assert "long details" not in warnings[0]
    run = mlflow.MlflowClient(uri).get_run(r.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["compile"] == "eager"
    assert "no C++ compiler found" in run.data.tags["compile_fallback"]
    for key in ("train_loss", "val_loss", "val_top1"):
        assert r.metrics[key] == pytest.approx(eager.metrics[key], abs=1e-6), key


def test_cuda_out_of_memory_is_one_line_and_run_failed(tmp_path, monkeypatch, capsys):
    """An OOM (simulated: CPU has none) ends with one line naming train.batch_size, and the
    run is FAILED with the error as a tag."""
    mlflow = pytest.importorskip("mlflow")
    from suite.cli import main
    from suite.training import fit as train

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_one_epoch", oom)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [
        "train",
        "--tracking-uri",
        uri,
        "--set",
        "train.epochs=1",
        "--set",
        "data.train_size=64",
        "--set",
        "train.batch_size=32",
        "--set",
        f"train.out_dir='{tmp_path / 'runs'}'",
        "--set",
        "tracking.system_metrics=false",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "train.batch_size = 32" in err and "out of memory" in err and "MB" in err
    (run,) = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("tntbench").experiment_id]
    )
    assert run.info.status == "FAILED" and "OutOfMemoryError" in run.data.tags["error"]


def test_checkpoint_folders_stay_inside_out_dir_and_are_never_shared(tmp_path):
    from suite.training.fit import new_checkpoint_dir

    out = tmp_path / "out"
    for name in ("..", "../../etc", "/abs/path", "a/../b", ".hidden"):
        d = new_checkpoint_dir(out, name)
        assert d.parent == out and d.is_dir() and not d.name.startswith(".")
    first, second = new_checkpoint_dir(out, "tnt/s0"), new_checkpoint_dir(out, "tnt/s0")
    assert first != second and {first.name, second.name} == {"tnt_s0", "tnt_s0-2"}
    assert sorted(p.parent for p in out.iterdir()) == [out] * len(list(out.iterdir()))
