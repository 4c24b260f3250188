"""A job's whole configuration: the algorithm, every algorithm's section, the shared ones.

A config file mirrors it: top-level ``algorithm`` and one table per section::

    algorithm = "downpour"
    [cluster]
    replicas = 2
    shards = 2
    [downpour]
    n_fetch = 1
    [optimizer]
    rule = "adagrad"
    lr = 0.02
    [data]
    dataset = "mnist1d"
    [train]
    epochs = 4
    [augment]            # optional: random augmentation of every batch
    shift = 3

`JobConfig` has one field per shared section (`distbelief.config`) and one per
algorithm that declares a section (`distbelief.algorithms.registry`). Its flat
options (the command line's ``--name``, `distbelief.train(name=...)`) come from
the fields (`OPTIONS`). An option the chosen algorithm does not use is refused
when set to anything but its default, rather than silently ignored: which
options an algorithm uses is its `honours` and its own section.

`JobConfig.validate` checks every value and raises `UserError` with one line
naming the offending value and the fix; `JobConfig.resolved` then fills the
values whose default depends on the algorithm.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from distbelief.algorithms.registry import ALGORITHMS, DEFAULT_ALGORITHM, get_algorithm
from distbelief.config import (MICRO_BATCHES_PER_STAGE, SHARED_SECTIONS, coerce, field_docs,
                               section_from_dict, validate_shared)
from distbelief.data.options import validate_data_options
from distbelief.errors import UserError
from distbelief.model.options import validate_model_options
from distbelief.ps.layout import validate_layout_options

ALGORITHM_SECTIONS: dict[str, type] = {a.name: a.section for a in ALGORITHMS.values()
                                       if a.section is not None}
_SECTIONS = {"cluster": SHARED_SECTIONS["cluster"], **ALGORITHM_SECTIONS,
             **{k: v for k, v in SHARED_SECTIONS.items() if k != "cluster"}}


class _JobMethods:
    """The behaviour of `JobConfig` (its fields are built from the registry below)."""

    # ---- conversion -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> JobConfig:
        """Build a config from nested dicts, refusing unknown keys and wrong types."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a table of settings, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        keys = ["algorithm", *_SECTIONS]
        for key, value in data.items():
            if key == "algorithm":
                kwargs[key] = coerce(value, "str", f"{source}: algorithm")
            elif key in _SECTIONS:
                kwargs[key] = section_from_dict(_SECTIONS[key], value, f"{source}: [{key}]")
            else:
                raise UserError(f"{source}: unknown key {key!r}; valid keys are {', '.join(keys)}")
        return JobConfig(**kwargs)

    def with_overrides(self, overrides: dict[str, Any]) -> JobConfig:
        """A copy with ``{"section.field": value}`` overrides applied (None = keep)."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            if isinstance(value, _Unset):
                value = None
            if "." in dotted:
                section, name = dotted.split(".", 1)
                data[section][name] = value
            else:
                data[dotted] = value
        return JobConfig.from_dict(data, source="options")

    def to_toml(self) -> str:
        """The config as TOML (None values are left out: they mean 'default')."""
        return tomli_w.dumps(_drop_none(self.to_dict()))

    # ---- validation -------------------------------------------------------

    def validate(self) -> JobConfig:
        """Check every value; raise UserError naming the first bad one and the fix."""
        algorithm = get_algorithm(self.algorithm)  # type: ignore[attr-defined]
        _refuse_foreign_options(self, algorithm)
        validate_shared(self)
        algorithm.validate(self)
        validate_layout_options(self.cluster)  # type: ignore[attr-defined]
        validate_model_options(self.model, self.cluster.shards,  # type: ignore[attr-defined]
                               self.data.batch_size)  # type: ignore[attr-defined]
        validate_data_options(self)
        return self  # type: ignore[return-value]

    def resolved(self) -> JobConfig:
        """A copy with the algorithm-dependent defaults filled in (after `validate`)."""
        algorithm = get_algorithm(self.algorithm)  # type: ignore[attr-defined]
        data = self.to_dict()
        for dotted, value in algorithm.defaults.items():
            section, name = dotted.split(".")
            if data[section][name] is None:
                data[section][name] = value
        algorithm.resolve(data)
        model = data["model"]
        if model["micro_batches"] is None:
            pipelined = model["partitions"] > 1 and model["split"] == "layers"
            model["micro_batches"] = (min(data["data"]["batch_size"],
                                          MICRO_BATCHES_PER_STAGE * model["partitions"])
                                      if pipelined else 1)
        return JobConfig.from_dict(data, source="config")


JobConfig = dataclasses.make_dataclass(
    "JobConfig",
    [("algorithm", str, field(default=DEFAULT_ALGORITHM))]
    + [(name, cls, field(default_factory=cls)) for name, cls in _SECTIONS.items()],
    bases=(_JobMethods,), kw_only=True)
JobConfig.__module__ = __name__  # for pickling and repr
JobConfig.__doc__ = ("A whole job's configuration: `algorithm` and one field per section "
                     f"({', '.join(_SECTIONS)}).")


def load_config(path: str | Path | None) -> JobConfig:
    """Read a TOML config file (None: all defaults). Raises UserError on any problem."""
    if path is None:
        return JobConfig()
    return JobConfig.from_dict(load_raw(path), source=str(path))


def load_raw(path: str | Path) -> dict[str, Any]:
    """A TOML config file's tables as written (no defaults filled). UserError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found: give the path of a TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {str(path)!r} is not valid TOML ({exc}): fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text: give a TOML file") from None
    return data


# ---- flat options ------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One flat option: ``--name`` on the command line, `name=` in `distbelief.train`."""

    name: str
    dotted: str
    """The config field it sets: "section.field", or "algorithm"."""
    type: type
    help: str
    choices: tuple[str, ...] | None
    default: Any
    unset: str | None
    """What a None default means (for ``--help``)."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _options() -> dict[str, Option]:
    names = tuple(ALGORITHMS)
    options = {"algorithm": Option(
        "algorithm", "algorithm", str,
        "training algorithm: " + "; ".join(f"{a.name}: {a.title}" for a in ALGORITHMS.values()),
        names, DEFAULT_ALGORITHM, None)}
    for section, cls in _SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta.get("toml_only"):
                continue
            name = meta.get("option") or f.name
            dotted = f"{section}.{f.name}"
            text = docs.get(f.name, "")
            if section in ALGORITHM_SECTIONS:
                text = f"{section}: {text}"
            options[name] = Option(name, dotted, _flag_type(f.type), text, meta.get("choices"),
                                   f.default, _unset_text(dotted, meta.get("unset")))
    return options


def _flag_type(annotation: Any) -> type:
    text = annotation if isinstance(annotation, str) else annotation.__name__
    return {"int": int, "float": float, "bool": bool}.get(text.split(" ")[0], str)


def _unset_text(dotted: str, text: str | None) -> str | None:
    """What an unset field means, with the algorithms' own defaults for it."""
    by_value: dict[Any, list[str]] = {}
    for algorithm in ALGORITHMS.values():
        if dotted in algorithm.defaults:
            by_value.setdefault(algorithm.defaults[dotted], []).append(algorithm.name)
        elif dotted in algorithm.computed_defaults:
            by_value.setdefault(algorithm.computed_defaults[dotted], []).append(algorithm.name)
    parts = [text] if text else []
    for value, users in by_value.items():
        parts.append(f"{value:g}" if isinstance(value, float) else str(value))
        parts[-1] += f" for {', '.join(users)}" if text or len(by_value) > 1 else ""
    users = set().union(*by_value.values()) if by_value else set()
    unused = [a.name for a in ALGORITHMS.values() if a.name not in users
              and dotted not in a.honours and by_value]
    if unused:
        parts.append(f"none for {', '.join(unused)}")
    return "; ".join(parts) or None


OPTIONS: dict[str, Option] = _options()
OPTION_FIELDS: dict[str, str] = {name: o.dotted for name, o in OPTIONS.items()}
"""Flat option names -> the config fields they set."""
TOML_ONLY: tuple[str, ...] = tuple(
    f"{section}.{f.name}" for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
    if f.metadata.get("toml_only"))
"""Fields set in the config file only (no command-line option)."""


def default_of(option: str) -> Any:
    """The real default value of a flat option (for help texts)."""
    value: Any = JobConfig()
    for part in OPTION_FIELDS[option].split("."):
        value = getattr(value, part)
    return value


def apply_options(cfg: JobConfig, options: dict[str, Any]) -> JobConfig:
    """Apply flat options (None = not given); unknown names raise UserError."""
    unknown = sorted(set(options) - set(OPTION_FIELDS))
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r}: valid options are "
                        f"{', '.join(OPTION_FIELDS)}")
    if options.get("steps") is not None and options.get("epochs") is not None:
        raise UserError(f"--steps {options['steps']} and --epochs {options['epochs']} were both "
                        "given: give only one (steps per replica, or passes over the data)")
    overrides = {OPTION_FIELDS[k]: v for k, v in options.items()}
    # --steps and --epochs replace each other when the other one came from the config file
    if options.get("steps") is not None:
        overrides["train.epochs"] = _UNSET
    if options.get("epochs") is not None:
        overrides["train.steps"] = _UNSET
    return cfg.with_overrides(overrides)


# ---- options an algorithm does not use -----------------------------------------

def users_of(dotted: str) -> list[str]:
    """The algorithms that use a field: its section's owner, or those that honour it."""
    section = dotted.split(".")[0]
    if section in ALGORITHM_SECTIONS:
        return [section]
    return [a.name for a in ALGORITHMS.values() if dotted in a.honours]


def _refuse_foreign_options(cfg: JobConfig, algorithm) -> None:
    """An option set for another algorithm is a mistake worth one clear line."""
    # a value equal to what `resolved` fills in was not given by the user (a resumed run's
    # config.toml holds the resolved values)
    defaults = (JobConfig(), JobConfig(algorithm=algorithm.name).resolved())
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            dotted = f"{section}.{f.name}"
            used = (section == algorithm.name if section in ALGORITHM_SECTIONS
                    else dotted in algorithm.honours)
            value = getattr(getattr(cfg, section), f.name)
            if used or any(value == getattr(getattr(d, section), f.name) for d in defaults):
                continue
            users = users_of(dotted)
            option = next((o.flag for o in OPTIONS.values() if o.dotted == dotted), dotted)
            template = f.metadata.get("refusal")
            if template:
                raise UserError(template.format(option=option, value=value,
                                                algorithm=algorithm.name,
                                                users=" or ".join(users), first=users[0]))
            fix = algorithm.refusal_fixes.get(dotted, "leave it out")
            raise UserError(f"{option} {value!r} means nothing for --algorithm {algorithm.name} "
                            f"(it is used by {' and '.join(users)}): {fix}")


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    return data


class _Unset:
    """Marks an override that clears a field back to None."""


_UNSET = _Unset()
