"""Starting a job from trained weights (``--init-from RUN_DIR|model.pt``, fine-tuning).

Unlike ``--resume``, which continues a run (its steps, update-rule state, run
directory), ``--init-from`` starts a new job whose model begins from a saved
state dict instead of the seeded initialisation. The coordinator loads it into
its model before the parameters' home (`distbelief.parameters.home_for`) takes
the initial parameters from that model, so the shards, Hogwild's shared tensor,
and through them every replica and worker of every algorithm start from it (each
pulls its first parameters from there).

Example::

    model = build_model("mlp", (64,), 10)
    load_initial(model, "runs/downpour-20260101-120000")   # or ".../model.pt"

Every refusal is one line naming the file, the first parameter that differs and
the fix (`UserError`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distbelief.errors import UserError
from distbelief.rundir import CHECKPOINT


def initial_path(given: str | Path) -> Path:
    """The state-dict file ``--init-from`` names: a run directory's model.pt, or the file."""
    path = Path(given)
    if path.is_dir():
        path = path / CHECKPOINT
        if not path.is_file():
            raise UserError(f"--init-from {str(given)!r}: the directory holds no {CHECKPOINT} "
                            "(a run writes it when it finishes): give a finished run's "
                            f"directory or a {CHECKPOINT} file")
    elif not path.is_file():
        raise UserError(f"--init-from {str(given)!r}: no such file or directory: give a run "
                        f"directory or its {CHECKPOINT}")
    return path


def read_state(given: str | Path) -> dict[str, torch.Tensor]:
    """The saved state dict (tensors on the CPU); UserError when it is not one."""
    path = initial_path(given)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn, foreign or non-torch file: say which, in one line
        raise UserError(f"--init-from {str(path)!r} is not a saved state dict "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}):"
                        f" give the {CHECKPOINT} a run wrote") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"--init-from {str(path)!r} holds no state dict (names -> tensors): "
                        f"give the {CHECKPOINT} a run wrote")
    return state


def first_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """How `state` differs from `model`'s own state dict first, in words; None: it fits."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            return f"the model's {name!r} {_shape(tensor)} is missing from it"
        if state[name].shape != tensor.shape:
            return (f"{name!r} is {_shape(state[name])} there but {_shape(tensor)} in this "
                    "model")
    for name, tensor in state.items():
        if name not in own:
            return f"it holds {name!r} {_shape(tensor)}, which this model has not"
    return None


def load_initial(model: torch.nn.Module, given: str | Path, *, model_name: str = "") -> None:
    """Load the state dict ``--init-from`` names into `model`: parameters and buffers.

    Blocks on the file read. UserError (one line) for a missing file, a file that
    is no state dict, or a state dict of another model.
    """
    path = initial_path(given)
    state = read_state(path)
    mismatch = first_mismatch(model, state)
    if mismatch is not None:
        built = f"--model {model_name}" if model_name else "the model"
        raise UserError(f"--init-from {str(path)!r} does not fit {built}: {mismatch}; give "
                        "the model.pt of a run with the same --model and data shapes")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def _shape(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.shape))
