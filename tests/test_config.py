"""Config: TOML + dotted overrides, strict keys and types, one-line errors."""

import tomllib

import pytest

from suite.cli import main
from suite.config import Config, load_config, to_toml
from suite.errors import UserError
from suite.models import check_model_config


def load_checked(path, sets=None):
    """What every command does with a config: its values (config.py), then its model's knobs
    (where models live)."""
    cfg = load_config(path, sets)
    check_model_config(cfg.model.name, cfg.model.overrides)
    return cfg


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, '[model]\nname = "tnt_nano"\ninner_heads = 4\n[train]\nepochs = 5\n')
    cfg = load_config(p, ["train.epochs=2", "model.pixel_size=4", "train.lr=1e-3"])
    assert isinstance(cfg, Config)
    assert cfg.train.epochs == 2 and cfg.train.lr == 1e-3
    assert cfg.model.overrides == {"inner_heads": 4, "pixel_size": 4}
    assert cfg.data.name == "synthetic"


def test_int_is_accepted_for_float_and_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["train.lr=1", "data.mixup=0"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    again = load_config(write(tmp_path, to_toml(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    "text, sets, words",
    [
        ("[train]\nepoch = 3\n", [], ["unknown key 'train.epoch'"]),
        ("[train]\nepochs = -1\n", [], ["train.epochs = -1"]),
        ("[train]\nepochs = 'three'\n", [], ["train.epochs", "int"]),
        ("", ["train.epochs=1.5"], ["train.epochs = 1.5", "int"]),
        ("[bogus]\nx = 1\n", [], ["unknown section [bogus]"]),
        ("", ["nodot=1"], ["SECTION.KEY"]),
        ("", ["model.inner_heads=5"], ["inner_dim=12", "inner_heads=5"]),
        ("", ["model.foo=1"], ["unknown knob 'foo'"]),
        ("", ["model.name='nope'"], ["unknown model 'nope'"]),
        ("", ["model.inner_kernel='cuda'"], ["model.inner_kernel = 'cuda'", "auto, triton"]),
        ("", ["model.inner_kernel='triton'", "model.inner_dim=96"], ["inner_dim 96", "<= 64"]),
        ("", ["model.inner_kernel=1"], ["inner_kernel=1", "must be str"]),
        ('[data]\nname = "cifar10"\n', [], ["data.root", "required"]),
        ('[data]\nname = "mnist"\n', [], ["data.name = 'mnist'"]),
        ('[train]\namp = "fp8"\n', [], ["train.amp = 'fp8'"]),
        ('[distill]\nkind = "hard"\n', [], ["distill.teacher"]),
        ("[train\n", [], ["not valid TOML"]),
    ],
)
def test_bad_config_is_one_named_error(tmp_path, text, sets, words):
    with pytest.raises(UserError) as e:
        load_checked(write(tmp_path, text), sets)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("[train]\nepochs = -1\n", ["train.epochs = -1"]),
        ("[train]\nfoo = 1\n", ["unknown key 'train.foo'"]),
        ('[data]\nname = "imagefolder"\nroot = "/no/such/dir"\n', ["data.root", "/no/such/dir"]),
    ],
)
def test_train_cli_bad_config_exits_2_with_one_line(tmp_path, capsys, text, words):
    p = write(tmp_path, text)
    assert main(["train", str(p), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err


def test_missing_config_file(capsys, tmp_path):
    assert main(["train", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_to_toml_round_trips_what_needs_escaping():
    d = {
        "model": {"name": "tnt_nano", "inner_heads": 2, "drop_path_rate": 0.1},
        "data": {
            "root": 'C:\\data\\"cifar"\nsecond line\ttab',
            "label": "Schrödinger's 猫 \u2014 \U0001f408",
            "nested": {"a": [1, 2.5, "x\\y"], "deeper": {"quote": '"', "empty": ""}},
            "weird key.with dots": True,
        },
        "train": {"lr": 1e-05, "pairs": [{"model.pixel_size": 2, "model.inner_dim": 6}]},
    }
    text = to_toml(d)
    assert tomllib.loads(text) == d
    assert text.startswith('[model]\nname = "tnt_nano"\n')  # one section per table, readable


def test_config_checks_values_and_the_model_its_knobs():
    """config.py checks keys, types and values; a model knob is the model's to refuse (config
    imports no torch), with one ``model: ...`` line."""
    cfg = load_config(None, ["model.foo=1"])
    assert cfg.model.overrides == {"foo": 1}
    with pytest.raises(UserError, match=r"^model: unknown knob 'foo'"):
        check_model_config(cfg.model.name, cfg.model.overrides)
    check_model_config("tnt_nano", {"inner_heads": 2})  # a buildable one passes


def test_matrix_max_retry_is_a_setting_not_an_axis(tmp_path):
    """[matrix] max_retry sets the workers' retry limit (default config.MAX_RETRY, as the
    search's); it makes no axis, and a bad value is one line naming it."""
    from suite.config import MAX_RETRY, parse_matrix

    base = {"models": ["tnt_nano"], "seeds": [0, 1]}
    m = parse_matrix({"matrix": base}, "m.toml")
    assert m.max_retry == MAX_RETRY and len(m.axes) == 3
    m = parse_matrix({"matrix": {**base, "max_retry": 0}}, "m.toml")
    assert m.max_retry == 0 and len(m.axes) == 3
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(UserError, match="matrix.max_retry"):
            parse_matrix({"matrix": {**base, "max_retry": bad}}, "m.toml")
