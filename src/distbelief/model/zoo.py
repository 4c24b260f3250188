"""The model zoo: built-in networks by name, or the user's own factory.

``build_model(spec, input_shape, num_classes)`` understands:

- ``"linear"``: multinomial logistic regression, one Linear layer over the flattened
  input (convex: with ``--weight-decay`` > 0 the training objective has one minimum).
- ``"mlp"``: two hidden layers of 128 ReLU units over the flattened input.
- ``"cnn"``: a small convolutional net; 1-D for (C, L) inputs, 2-D for (C, H, W).
  On MNIST-1D (40,000 training samples) it reaches about 97% test accuracy.
- ``"lcnn"``: two locally connected layers (convolution-shaped, weights not shared
  across positions, as in DistBelief's image models), then a 128-unit hidden layer;
  1-D for (C, L) inputs, 2-D for (C, H, W).
- ``"speech"``: DistBelief's speech model shape: four hidden layers of 2560 sigmoid
  units over the flattened input (about 42M parameters for 440 inputs, 8192 classes).
- ``"transformer"`` / ``"transformer:LAYERS:WIDTH:HEADS"`` (default 2:128:4): a small
  decoder-only transformer for ``--task sequence`` over inputs of shape (T,) holding
  token ids below ``num_classes``; logits (B, T, num_classes)
  (`distbelief.model.transformer`).
- ``"module:function"`` / ``"file.py:function"``: a factory called as
  ``factory(input_shape=..., num_classes=...)`` when it takes those keywords,
  else ``factory()``; it must return an ``nn.Module``.

Weights are drawn from torch's global generator: seed it (``torch.manual_seed``)
before building so every replica starts from the same model. Example::

    torch.manual_seed(0)
    model = build_model("cnn", (1, 40), 10)
    check_model(model, (1, 40), 10)
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from distbelief.errors import UserError
from distbelief.model.locally_connected import LocallyConnected1d, LocallyConnected2d
from distbelief.model.transformer import parse_spec as transformer_spec
from distbelief.model.transformer import transformer
from distbelief.plugins import load_callable
from distbelief.task import Targets, Task, make_task

BUILTIN = ("linear", "mlp", "cnn", "lcnn", "speech", "transformer")


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model named by ``spec`` for inputs of ``input_shape`` and ``num_classes`` outputs.

    Raises:
        UserError: unknown spec; a shape the chosen model cannot take; a factory
            that cannot be loaded, has an unusable signature, or does not return
            an ``nn.Module``.
    """
    if spec == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
    if spec == "mlp":
        return _mlp(input_shape, num_classes)
    if spec == "cnn":
        return _cnn(input_shape, num_classes)
    if spec == "lcnn":
        return _lcnn(input_shape, num_classes)
    if spec == "speech":
        return _speech(input_shape, num_classes)
    sizes = transformer_spec(spec)
    if sizes is not None:
        if len(input_shape) != 1:
            raise UserError(f"model {spec!r} takes token ids of shape (T,), but the inputs have "
                            f"shape {tuple(input_shape)}: use it with --task sequence data such "
                            "as --dataset text:PATH")
        return transformer(input_shape[0], num_classes, *sizes)
    if ":" in spec:
        return _from_factory(spec, input_shape, num_classes)
    raise UserError(
        f"unknown model {spec!r}: use one of {', '.join(BUILTIN)}, or 'module:function' / 'file.py:function'"
    )


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Flatten -> 128 -> 128 -> num_classes with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Three conv layers, two 2x poolings, then a 128-unit hidden layer.

    Raises:
        UserError: the input is flat, or too small to pool twice.
    """
    if len(input_shape) == 2:
        conv, pool, spatial = nn.Conv1d, nn.MaxPool1d, input_shape[1:]
    elif len(input_shape) == 3:
        conv, pool, spatial = nn.Conv2d, nn.MaxPool2d, input_shape[1:]
    else:
        raise UserError(
            f"cnn needs (C, L) or (C, H, W) inputs, but the dataset's samples have shape {tuple(input_shape)}: "
            "use --model mlp"
        )
    if min(spatial) < 4:
        raise UserError(
            f"cnn pools twice by 2, so inputs of shape {tuple(input_shape)} are too small: "
            "give each spatial size >= 4 or use --model mlp"
        )
    channels = input_shape[0]
    flat = 64 * math.prod(s // 4 for s in spatial)
    return nn.Sequential(
        conv(channels, 32, 5, padding=2),
        nn.ReLU(),
        conv(32, 32, 3, padding=1),
        nn.ReLU(),
        pool(2),
        conv(32, 64, 3, padding=1),
        nn.ReLU(),
        pool(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _lcnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two locally connected layers (16 then 32 channels), then a 128-unit hidden layer.

    One flat ``nn.Sequential`` so it can be split layer-wise. 1-D: kernel 5
    stride 2, then kernel 3 stride 2 ((1, 40) -> 16x20 -> 32x10). 2-D: kernel 3
    stride 1, then kernel 3 stride 2 ((1, 8, 8) -> 16x8x8 -> 32x4x4). Every
    position has its own weights, so parameters grow with the input's area.

    Raises:
        UserError: the input is flat.
    """
    channels, spatial = input_shape[0], tuple(input_shape[1:])
    if len(input_shape) == 2:
        first = LocallyConnected1d(channels, 16, spatial[0], 5, stride=2, padding=2)
        second = LocallyConnected1d(16, 32, first.output_length, 3, stride=2, padding=1)
        flat = 32 * second.output_length
    elif len(input_shape) == 3:
        first = LocallyConnected2d(channels, 16, spatial, 3, stride=1, padding=1)
        second = LocallyConnected2d(16, 32, first.output_size, 3, stride=2, padding=1)
        flat = 32 * math.prod(second.output_size)
    else:
        raise UserError(
            f"lcnn needs (C, L) or (C, H, W) inputs, but the dataset's samples have shape {tuple(input_shape)}: "
            "use --model mlp"
        )
    return nn.Sequential(
        first,
        nn.ReLU(),
        second,
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _speech(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Flatten -> 4 x (2560 sigmoid units) -> num_classes, one flat ``nn.Sequential``.

    The shape of DistBelief's speech model (softmax is in the loss); flat so
    model parallelism can split it between layers.
    """
    hidden, layers, width = 2560, [nn.Flatten()], math.prod(input_shape)
    for _ in range(4):
        layers += [nn.Linear(width, hidden), nn.Sigmoid()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def _from_factory(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Load and call a user model factory (see ``build_model``).

    Raises:
        UserError: the factory cannot be loaded, needs arguments other than
            ``input_shape``/``num_classes``, or returns something not an ``nn.Module``.
    """
    factory = load_callable(spec, "model factory")
    offered = {"input_shape": tuple(input_shape), "num_classes": num_classes}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature; call them plainly
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {
        k: v
        for k, v in offered.items()
        if takes_any
        or (k in params and params[k].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    }
    if params:
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as exc:
            raise UserError(
                f"model factory {spec!r} cannot be called with {sorted(kwargs) or 'no arguments'} ({exc}): "
                "make it take no arguments, or input_shape= and num_classes="
            ) from exc
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module: return the model"
        )
    return model


def check_model(model: nn.Module, input_shape: tuple[int, ...], targets: Targets | int,
                task: Task | None = None, name: str = "") -> None:
    """Run one forward pass on a zero batch of 2 and check the output fits `task` (default:
    classify) and `targets` (an int: that many classes), trying a user's loss and metrics on
    it once.

    Gradients are off and the model's train/eval mode is restored afterwards.

    Raises:
        UserError: the forward pass fails, or the output does not fit the task.
    """
    task = task or make_task()
    if isinstance(targets, int):
        targets = Targets((), targets)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros((2, *input_shape), device=device)
    target = torch.zeros((2, *targets.shape), dtype=task.target_dtype, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # any failure here means the model does not fit the data
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(
            f"model fails on inputs of shape {tuple(input_shape)} ({type(exc).__name__}: {first}): "
            "make its first layer accept this shape"
        ) from exc
    finally:
        model.train(was_training)
    with torch.no_grad():
        task.check_output(out, 2, targets, target, repr(name) if name else "")
