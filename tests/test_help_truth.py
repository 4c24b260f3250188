"""``distbelief train --help`` tells the truth for every algorithm.

The help of a shared option is its field's docstring plus what an unset value
means (`job._unset_text`, read from each algorithm's `defaults` and
`computed_defaults`). These tests hold that text against what the algorithms
really do: the defaults a resolved config gets, the fields each one honours,
and where each one applies its update rule. Written for the issue that found
``--weight-decay`` claiming "inside the shards" for every algorithm, ``--rule``
leaving EASGD out, and ``--lr`` giving no default for ADMM.
"""

from __future__ import annotations

import re

import pytest

from distbelief.algorithms.registry import ALGORITHMS
from distbelief.cli import build_parser
from distbelief.job import ALGORITHM_SECTIONS, OPTIONS, JobConfig, users_of

SHARED = [o for o in OPTIONS.values()
          if o.name != "algorithm" and o.dotted.split(".")[0] not in ALGORITHM_SECTIONS]


def _value(cfg: JobConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def real_default(algorithm: str, dotted: str):
    """What a job of `algorithm` runs with when the field is left unset."""
    return _value(JobConfig(algorithm=algorithm).resolved(), dotted)


def algorithm_dependent() -> list:
    """The options whose unset value depends on the algorithm: declared in an algorithm's
    `defaults`/`computed_defaults`, or resolved to different values by different ones."""
    out = []
    for o in SHARED:
        declared = any(o.dotted in a.defaults or o.dotted in a.computed_defaults
                       for a in ALGORITHMS.values())
        values = {repr(real_default(a, o.dotted)) for a in ALGORITHMS}
        if declared or len(values) > 1:
            out.append(o)
    return out


def named_defaults(unset: str) -> tuple[dict[str, str], list[str]]:
    """The help's "VALUE for a, b; ..." parts: ({algorithm: value text}, [parts naming none])."""
    named, other = {}, []
    for part in unset.split("; "):
        value, sep, users = part.rpartition(" for ")
        names = users.split(", ") if sep else []
        if sep and all(n in ALGORITHMS for n in names):
            named.update({n: value for n in names})
        else:
            other.append(part)
    return named, other


def test_some_options_depend_on_the_algorithm():
    names = {o.name for o in algorithm_dependent()}
    assert {"rule", "lr", "on_nonfinite", "steps"} <= names


@pytest.mark.parametrize("option", algorithm_dependent(), ids=lambda o: o.name)
def test_help_names_each_algorithms_real_default(option):
    """Every algorithm using the option whose unset value is its own is named with that
    value; an algorithm named as "none" does not use the option; no other is named."""
    assert option.unset, f"{option.flag}: the help says nothing of the algorithms' defaults"
    named, other = named_defaults(option.unset)
    plain = _value(JobConfig(), option.dotted)
    users = users_of(option.dotted)
    for algorithm in ALGORITHMS:
        real = real_default(algorithm, option.dotted)
        said = named.get(algorithm)
        if algorithm not in users:
            assert said in (None, "none"), (option.flag, algorithm, said)
            continue
        assert said != "none", f"{option.flag}: help says none for {algorithm}, which uses it"
        if said is not None:
            assert said.split(" ")[0] == _text(real), (option.flag, algorithm, said, real)
        elif real != plain:  # unnamed: only the generic words may cover it
            assert _text(real) in other, (f"{option.flag}: help gives no default for "
                                          f"{algorithm}, which runs with {real!r}: {option.unset}")


def _listed(help_text: str) -> set[str]:
    """Algorithms the help lists in parentheses as where the option applies: "(easgd, admm)"."""
    listed = set()
    for group in re.findall(r"\(([a-z, ]+)\)", help_text):
        words = [w for w in re.split(r",\s*|\s+or\s+|\s+and\s+", group) if w]
        if words and all(w in ALGORITHMS for w in words):
            listed.update(words)
    return listed


@pytest.mark.parametrize("option", [o for o in SHARED if _listed(o.help)], ids=lambda o: o.name)
def test_listed_algorithms_are_the_users(option):
    """A help that lists where the option applies lists exactly the algorithms that use it."""
    assert _listed(option.help) == set(users_of(option.dotted)), (option.flag, option.help)


def test_rule_help_names_every_algorithm_with_an_update_rule():
    listed = _listed(OPTIONS["rule"].help)
    for algorithm in users_of("optimizer.rule"):
        assert algorithm in listed, f"--rule help leaves {algorithm} out: {OPTIONS['rule'].help}"


def test_inside_the_shards_only_where_the_shards_apply_the_rule():
    """A help that says "inside the shards" without naming algorithms claims it for every
    algorithm that uses the option: each must apply its update rule in the shards."""
    for option in SHARED:
        if "inside the shards" not in option.help or _listed(option.help):
            continue
        for algorithm in users_of(option.dotted):
            cfg = JobConfig(algorithm=algorithm).resolved()
            assert ALGORITHMS[algorithm].exchange(cfg).shard_rule, (
                f"{option.flag} says 'inside the shards', untrue for {algorithm}: {option.help}")


def test_train_help_prints_these_texts():
    """The command line shows the texts these tests read."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    text = " ".join(sub.choices["train"].format_help().split())
    for name in ("rule", "lr", "weight_decay"):
        option = OPTIONS[name]
        assert " ".join(option.help.split()) in text
        if option.unset:
            assert " ".join(option.unset.split()) in text
