"""User code named by a string: ``"package.module:attr"`` or ``"path/to/file.py:attr"``.

Datasets and models can come from the user's own Python code. A spec string
(rather than a pickled function) is what travels to other processes and
machines, so every process loads the same callable the same way::

    factory = load_callable("my_models.py:make_net", "model factory")
    spec = callable_spec(make_net)   # "my_models:make_net" or "/abs/my_models.py:make_net"

Loading a file registers it in ``sys.modules`` under a stable name derived from
its absolute path, so loading it twice gives the same module object (and
classes defined in it compare equal across calls).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from distbelief.errors import UserError

# Modules loaded from a file path get names with this prefix; callable_spec
# maps them back to their file, because the name is not importable elsewhere.
_FILE_MODULE_PREFIX = "distbelief_plugin_"


def _is_file_ref(ref: str) -> bool:
    """True when the part before the colon names a file rather than a module."""
    return ref.endswith(".py") or "/" in ref or "\\" in ref


def _file_module_name(path: Path) -> str:
    """A module name that is the same for the same absolute path in every process."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    return f"{_FILE_MODULE_PREFIX}{stem}_{digest}"


def _short(exc: BaseException) -> str:
    """The first line of an exception's message, prefixed by its type."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_file(ref: str, spec: str, what: str) -> ModuleType:
    """Execute the Python file ``ref`` as a module (once per process) and return it.

    Raises:
        UserError: the file is missing, or importing it raises ImportError/SyntaxError.
    """
    path = Path(ref).expanduser().resolve()
    if not path.is_file():
        raise UserError(
            f"{what} {spec!r}: file {str(path)!r} does not exist: check the path before the ':'"
        )
    name = _file_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"{what} {spec!r}: cannot load {str(path)!r} as Python: give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before executing so dataclasses and pickling inside it work.
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except (ImportError, SyntaxError) as exc:
        del sys.modules[name]
        raise UserError(
            f"{what} {spec!r}: importing {str(path)!r} failed ({_short(exc)}): fix the file or install what it needs"
        ) from exc
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load_module(ref: str, spec: str, what: str) -> ModuleType:
    """Import module ``ref`` by name.

    Raises:
        UserError: the module (or something it imports) cannot be imported.
    """
    try:
        return importlib.import_module(ref)
    except (ImportError, SyntaxError) as exc:
        raise UserError(
            f"{what} {spec!r}: cannot import module {ref!r} ({_short(exc)}): "
            "check the name, that it is on PYTHONPATH, or give a path to a .py file"
        ) from exc


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """Return the callable named by ``spec`` ("package.module:attr" or "file.py:attr").

    ``attr`` may be dotted (``"mod:Class.build"``). ``what`` names the role in
    error messages, e.g. ``"model factory"``.

    Raises:
        UserError: no colon in ``spec``; the module cannot be imported; the file
            does not exist; the attribute is missing; or it is not callable.
    """
    ref, colon, attr = spec.rpartition(":")
    if not colon or not ref or not attr:
        raise UserError(
            f"{what} {spec!r} is not of the form 'module:function' or 'file.py:function': add ':name'"
        )
    # "C:\\x.py" alone would split at the drive colon; rpartition keeps the last one.
    module = _load_file(ref, spec, what) if _is_file_ref(ref) else _load_module(ref, spec, what)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))[:10]
            raise UserError(
                f"{what} {spec!r}: {ref!r} has no attribute {attr!r} "
                f"(it has: {', '.join(public) or 'nothing public'}): check the name after the ':'"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(
            f"{what} {spec!r}: {attr!r} is a {type(obj).__name__}, not a function: name a function or class"
        )
    return obj


def callable_spec(fn: Callable[..., Any]) -> str:
    """Return a spec string that ``load_callable`` turns back into ``fn``.

    Functions in importable modules give ``"module:qualname"``; functions in the
    script being run (``__main__``) or in a file loaded by ``load_callable`` give
    ``"/abs/path/file.py:qualname"``.

    Raises:
        UserError: ``fn`` is a lambda or defined inside another function, or it
            lives in a ``__main__`` that has no file (an interactive session).
    """
    qualname = getattr(fn, "__qualname__", None)
    module_name = getattr(fn, "__module__", None)
    if not qualname or not module_name:
        raise UserError(f"{fn!r} has no module or name: pass a function defined at the top of a module")
    if "<" in qualname:
        raise UserError(
            f"{qualname!r} is a lambda or nested function, which other processes cannot load: "
            "define it at the top level of a module"
        )
    if module_name == "__main__" or module_name.startswith(_FILE_MODULE_PREFIX):
        module = sys.modules.get(module_name)
        file = getattr(module, "__file__", None)
        if not file:
            raise UserError(
                f"{qualname!r} is defined in an interactive session: put it in a .py file and import it"
            )
        return f"{Path(file).resolve()}:{qualname}"
    return f"{module_name}:{qualname}"
