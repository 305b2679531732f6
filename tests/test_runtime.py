"""suite.runtime: one compile rule for train, matrix and profile; failures fall back to eager."""

import pytest
import torch

from suite.config import load_config
from suite.errors import UserError
from suite.models import create_model
from suite.runtime import compile_model, resolve_compile

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("setting", "cpu", "cuda"),
    [
        ("auto", "eager", "whole"),  # the default: whole-model compile on CUDA only
        (True, "whole", "whole"),
        ("true", "whole", "whole"),
        (False, "eager", "eager"),
        ("false", "eager", "eager"),
        ("regional", "regional", "regional"),
    ],
)
def test_resolve_compile(setting, cpu, cuda):
    assert resolve_compile(setting, CPU) == cpu
    assert resolve_compile(setting, CUDA) == cuda  # a rule only: no GPU needed


@pytest.mark.parametrize("value", ["3", "'fast'", "1.0", "[true]"])
def test_bad_compile_setting_names_the_key(value):
    with pytest.raises(UserError, match=r"train\.compile = .* must be true, false"):
        load_config(None, [f"train.compile={value}"])


def test_default_compile_setting_is_auto():
    assert load_config().train.compile == "auto"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["whole", "regional"])
def test_compile_model_times_the_first_call_and_matches_eager(mode):
    eager = create_model("vit_nano", depth=1).eval()
    model = create_model("vit_nano", depth=1).eval()
    model.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 32, 32)
    calls = []
    c = compile_model(model, mode, lambda fn: calls.append(fn(x)), CPU)
    assert c.mode == mode and c.compile_s > 0 and not c.fallback and len(calls) == 1
    torch.testing.assert_close(c.fn(x), eager(x), atol=1e-5, rtol=1e-4)
    assert list(model.state_dict()) == list(eager.state_dict())


def test_regional_fallback_leaves_the_blocks_eager(monkeypatch, capsys):
    model = create_model("vit_nano", depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    want = model(x)
    seen = []

    def first_call(fn):
        seen.append(fn)
        raise RuntimeError("BackendCompilerFailed: triton not found")

    c = compile_model(model, "regional", first_call, CPU)
    assert c.mode == "eager" and c.fn is model and "triton not found" in c.fallback
    assert capsys.readouterr().err.count("\n") == 1
    assert all(blk._compiled_call_impl is None for blk in model.blocks)
    torch.testing.assert_close(model(x), want)


def test_out_of_memory_is_not_a_compile_failure():
    model = create_model("vit_nano", depth=1)

    def first_call(fn):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        compile_model(model, "whole", first_call, CPU)
