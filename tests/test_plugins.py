"""Tests for distbelief.plugins: loading user callables by spec string."""

import json
import sys

import pytest

from distbelief.errors import UserError
from distbelief.plugins import callable_spec, load_callable


def top_level(a: int = 1) -> int:
    return a + 1


def test_module_spec_loads_function():
    fn = load_callable("json:dumps", "encoder")
    assert fn is json.dumps


def test_dotted_attribute():
    fn = load_callable("json:JSONDecoder.decode", "decoder")
    assert fn is json.JSONDecoder.decode


def test_file_spec_loads_and_is_stable(tmp_path):
    path = tmp_path / "my_factory.py"
    path.write_text("def make():\n    return 42\n\nVALUE = 3\n")
    first = load_callable(f"{path}:make", "dataset factory")
    second = load_callable(f"{path}:make", "dataset factory")
    assert first() == 42
    assert first is second  # same module object: loaded once per process
    assert first.__module__ in sys.modules


def test_callable_spec_round_trips_for_module_and_file(tmp_path):
    assert callable_spec(json.dumps) == "json:dumps"
    assert load_callable(callable_spec(top_level), "f") is top_level
    path = tmp_path / "file_mod.py"
    path.write_text("def f():\n    return 'ok'\n")
    fn = load_callable(f"{path}:f", "f")
    spec = callable_spec(fn)
    assert spec == f"{path.resolve()}:f"
    assert load_callable(spec, "f")() == "ok"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_colon_here", "module:function"),
        ("surely_not_a_module_xyz:f", "surely_not_a_module_xyz"),
        ("json:not_there", "not_there"),
        ("json:__doc__", "not a function"),
    ],
)
def test_bad_specs_raise_user_error(spec, fragment):
    with pytest.raises(UserError, match="model factory") as info:
        load_callable(spec, "model factory")
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_callable(f"{tmp_path / 'nope.py'}:f", "model factory")


def test_file_with_failing_import_names_the_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import surely_not_a_module_abc\n")
    with pytest.raises(UserError, match="surely_not_a_module_abc"):
        load_callable(f"{path}:f", "model factory")


def test_callable_spec_rejects_lambda_and_nested():
    def nested():
        return None

    with pytest.raises(UserError, match="lambda or nested"):
        callable_spec(lambda: None)
    with pytest.raises(UserError, match="lambda or nested"):
        callable_spec(nested)
