"""Tests for distbelief.model.zoo: built-in models, user factories, check_model."""

import pytest
import torch
from torch import nn

from distbelief.errors import UserError
from distbelief.model.zoo import build_model, check_model


SHAPES = [(64,), (1, 40), (1, 8, 8), (3, 12, 16)]


@pytest.mark.parametrize(
    "spec, shape", [("mlp", s) for s in SHAPES] + [("cnn", s) for s in SHAPES if len(s) > 1]
)
def test_output_shapes(spec, shape):
    model = build_model(spec, shape, 7)
    assert model(torch.randn(5, *shape)).shape == (5, 7)
    check_model(model, shape, 7)


def test_mlp_layers():
    model = build_model("mlp", (1, 40), 10)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 128), (128, 128), (128, 10)]


def test_cnn_is_1d_or_2d():
    assert any(isinstance(m, nn.Conv1d) for m in build_model("cnn", (1, 40), 10))
    model2d = build_model("cnn", (1, 8, 8), 10)
    assert any(isinstance(m, nn.Conv2d) for m in model2d)
    assert [m for m in model2d if isinstance(m, nn.Linear)][0].in_features == 64 * 2 * 2


def test_same_seed_same_weights():
    torch.manual_seed(1)
    a = build_model("cnn", (1, 40), 10)
    torch.manual_seed(1)
    b = build_model("cnn", (1, 40), 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_cnn_on_flat_input_raises():
    with pytest.raises(UserError, match="use --model mlp") as info:
        build_model("cnn", (64,), 10)
    assert "(C, L) or (C, H, W)" in str(info.value)


def test_cnn_on_tiny_input_raises():
    with pytest.raises(UserError, match="too small"):
        build_model("cnn", (1, 3), 10)


def test_unknown_model():
    with pytest.raises(UserError, match="mlp, cnn"):
        build_model("resnet", (1, 40), 10)


FACTORIES = """
import torch.nn as nn

def with_kwargs(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], num_classes))

def only_classes(*, num_classes, hidden=4):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

def no_args():
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 10))

def needs_other(depth):
    return nn.Linear(1, 1)

def not_a_model():
    return "model"
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


def test_factory_with_keyword_args(factory_file):
    model = build_model(f"{factory_file}:with_kwargs", (1, 40), 6)
    assert model(torch.zeros(2, 1, 40)).shape == (2, 6)


def test_factory_with_some_keyword_args(factory_file):
    model = build_model(f"{factory_file}:only_classes", (1, 40), 6)
    assert model(torch.zeros(2, 1, 40)).shape == (2, 6)


def test_factory_without_args(factory_file):
    model = build_model(f"{factory_file}:no_args", (1, 40), 10)
    check_model(model, (1, 40), 10)


def test_factory_errors(factory_file):
    with pytest.raises(UserError, match="input_shape= and num_classes="):
        build_model(f"{factory_file}:needs_other", (1, 40), 10)
    with pytest.raises(UserError, match="returned a str"):
        build_model(f"{factory_file}:not_a_model", (1, 40), 10)
    with pytest.raises(UserError, match="model factory"):
        build_model(f"{factory_file}:missing", (1, 40), 10)


def test_check_model_width_mismatch_names_both_numbers():
    model = build_model("mlp", (1, 40), 7)
    with pytest.raises(UserError) as info:
        check_model(model, (1, 40), 10)
    message = str(info.value)
    assert "width 7" in message and "10 classes" in message and "output 10 units" in message


def test_check_model_forward_failure_is_one_line():
    model = build_model("mlp", (1, 40), 10)
    with pytest.raises(UserError, match="fails on inputs of shape") as info:
        check_model(model, (1, 8, 8), 10)
    assert "\n" not in str(info.value)


def test_check_model_restores_training_mode():
    model = build_model("mlp", (4,), 3)
    model.train()
    check_model(model, (4,), 3)
    assert model.training


def test_speech_is_flat_and_about_42m_parameters():
    model = build_model("speech", (440,), 8192)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten] + [nn.Linear, nn.Sigmoid] * 4 + [nn.Linear]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (440, 2560), (2560, 2560), (2560, 2560), (2560, 2560), (2560, 8192)
    ]
    assert 41_000_000 < sum(p.numel() for p in model.parameters()) < 43_000_000
    assert model(torch.randn(3, 440)).shape == (3, 8192)


def test_speech_flattens_any_shape():
    model = build_model("speech", (1, 8, 8), 10)
    check_model(model, (1, 8, 8), 10)


@pytest.mark.parametrize("shape", [(1, 40), (3, 17), (1, 8, 8), (3, 12, 16), (2, 1, 1)])
def test_lcnn_output_shapes(shape):
    model = build_model("lcnn", shape, 7)
    assert model(torch.randn(5, *shape)).shape == (5, 7)
    check_model(model, shape, 7)


def test_lcnn_layers_and_parameter_counts():
    from distbelief.model.locally_connected import LocallyConnected1d, LocallyConnected2d

    model1d = build_model("lcnn", (1, 40), 10)
    first, second = model1d[0], model1d[2]
    assert isinstance(first, LocallyConnected1d) and isinstance(second, LocallyConnected1d)
    assert (first.output_length, second.output_length) == (20, 10)
    assert [type(m) for m in model1d][4:] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    assert model1d[5].in_features == 32 * 10
    # position-specific weights: 20*16*(1*5) + 16*20, 10*32*(16*3) + 32*10, then the dense head
    expected = (1600 + 320) + (15360 + 320) + (320 * 128 + 128) + (128 * 10 + 10)
    assert sum(p.numel() for p in model1d.parameters()) == expected

    model2d = build_model("lcnn", (1, 8, 8), 10)
    assert isinstance(model2d[0], LocallyConnected2d) and isinstance(model2d[2], LocallyConnected2d)
    assert (model2d[0].output_size, model2d[2].output_size) == ((8, 8), (4, 4))
    assert model2d[5].in_features == 32 * 4 * 4
    expected = (64 * 16 * 9 + 16 * 64) + (16 * 32 * 144 + 32 * 16) + (512 * 128 + 128) + (128 * 10 + 10)
    assert sum(p.numel() for p in model2d.parameters()) == expected


def test_lcnn_on_flat_input_raises():
    with pytest.raises(UserError, match="use --model mlp") as info:
        build_model("lcnn", (64,), 10)
    assert "lcnn needs (C, L) or (C, H, W)" in str(info.value)
