"""Both learners satisfy train/protocol.py's LearnerLike, member by member: a stage written against it runs on the
one-process Learner and on the sharded LearnerGroup unchanged. Checked on the classes (a LearnerGroup needs rank
processes to exist), with inspect: every method with a signature that accepts every call the Protocol allows,
every attribute declared or assigned by the class."""

import ast
import inspect
import textwrap
from dataclasses import dataclass

import pytest

from posttrain.train.learner import Learner
from posttrain.train.learner_group import LearnerGroup
from posttrain.train.protocol import LearnerLike

P = inspect.Parameter
POSITIONAL = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)


def protocol_members(proto: type) -> tuple[dict[str, inspect.Signature], set[str]]:
    """(methods by name with their signatures, attribute names) that `proto` itself declares."""
    methods = {name: inspect.signature(fn) for name, fn in vars(proto).items()
               if inspect.isfunction(fn) and not name.startswith("_")}
    attributes = set(vars(proto).get("__annotations__", {})) - set(methods)
    return methods, attributes


def attributes_of(cls: type) -> set[str]:
    """What an instance of `cls` has for sure: class attributes, annotated fields (a dataclass's), and every
    `self.<name> = ...` in a method of the class or of a base."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        names |= set(vars(klass)) | set(vars(klass).get("__annotations__", {}))
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign) else []
            names |= {t.attr for t in targets if isinstance(t, ast.Attribute)
                      and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return names


def incompatibilities(want: inspect.Signature, have: inspect.Signature) -> list[str]:
    """Why a method with signature `have` cannot stand in for the Protocol's `want` (empty: it can): each of
    want's positional parameters accepted at its place, each keyword one by name (or **kwargs), a default where
    want has one, and no parameter of have's own that a Protocol call would leave unfilled."""
    problems: list[str] = []
    w_params = [p for p in want.parameters.values() if p.name != "self"]
    h_params = [p for p in have.parameters.values() if p.name != "self"]
    h_by_name = {p.name: p for p in h_params if p.kind is not P.POSITIONAL_ONLY}
    h_positional = [p for p in h_params if p.kind in POSITIONAL]
    h_varargs = any(p.kind is P.VAR_POSITIONAL for p in h_params)
    h_varkw = any(p.kind is P.VAR_KEYWORD for p in h_params)
    matched: set[str] = set()
    w_positional = [p for p in w_params if p.kind in POSITIONAL]
    for i, wp in enumerate(w_positional):
        if i < len(h_positional):
            hp = h_positional[i]
            if hp.name != wp.name and wp.kind is P.POSITIONAL_OR_KEYWORD:
                problems.append(f"positional parameter {i} is {hp.name!r}, not {wp.name!r}")
            if wp.default is not P.empty and hp.default is P.empty:
                problems.append(f"{hp.name!r} has no default; the Protocol's {wp.name!r} has one")
            matched.add(hp.name)
        elif not h_varargs:
            problems.append(f"takes no positional parameter {wp.name!r}")
    for wp in (p for p in w_params if p.kind is P.KEYWORD_ONLY):
        hp = h_by_name.get(wp.name)
        if hp is None:
            if not h_varkw:
                problems.append(f"takes no keyword {wp.name!r}")
            continue
        if wp.default is not P.empty and hp.default is P.empty:
            problems.append(f"{wp.name!r} has no default; the Protocol's has one")
        matched.add(hp.name)
    for hp in h_params:
        if hp.name not in matched and hp.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD) and hp.default is P.empty:
            problems.append(f"requires {hp.name!r}, which the Protocol does not pass")
    return problems


def mismatches(proto: type, cls: type) -> list[str]:
    methods, attributes = protocol_members(proto)
    out = [f"{cls.__name__} has no attribute {name!r}" for name in sorted(attributes - attributes_of(cls))]
    for name, want in methods.items():
        fn = getattr(cls, name, None)
        if not callable(fn):
            out.append(f"{cls.__name__} has no method {name!r}")
            continue
        out += [f"{cls.__name__}.{name}: {why}" for why in incompatibilities(want, inspect.signature(fn))]
    return out


def test_the_protocol_lists_what_the_stages_use():
    methods, attributes = protocol_members(LearnerLike)
    assert set(methods) == {"train_step", "logprobs", "weights", "frozen_copy", "reset_optimizer", "state_dict",
                            "load_state_dict"}
    assert attributes == {"flop_model"}


@pytest.mark.parametrize("cls", [Learner, LearnerGroup], ids=lambda c: c.__name__)
def test_both_learners_satisfy_the_protocol(cls):
    assert mismatches(LearnerLike, cls) == []


def test_a_live_learner_is_one_at_runtime(tiny):
    model, _ = tiny
    learner = Learner(model, lr=1e-3, total_updates=1, micro_batch_size=2, pad_id=0)
    assert isinstance(learner, LearnerLike)


def test_the_check_catches_what_does_not_fit():
    # guards against a check that passes anything: each of these breaks the Protocol in one way
    @dataclass
    class NoFlops:
        def train_step(self, seqs, loss_fn, **kwargs): ...
        def logprobs(self, seqs, *, temperature=1.0): ...
        def weights(self): ...
        def frozen_copy(self): ...
        def reset_optimizer(self): ...
        def state_dict(self): ...
        def load_state_dict(self, state): ...

    assert mismatches(LearnerLike, NoFlops) == ["NoFlops has no attribute 'flop_model'"]

    class Broken(NoFlops):
        flop_model = None

        def logprobs(self, seqs, temperature): ...  # no default
        def load_state_dict(self, state, strict): ...  # a parameter the Protocol never passes
        def reset_optimizer(self, *, lr): ...
        weights = None

    assert mismatches(LearnerLike, Broken) == [
        "Broken.logprobs: 'temperature' has no default; the Protocol's has one",
        "Broken has no method 'weights'",
        "Broken.reset_optimizer: requires 'lr', which the Protocol does not pass",
        "Broken.load_state_dict: requires 'strict', which the Protocol does not pass",
    ]
