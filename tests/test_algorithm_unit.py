"""The algorithm unit: both learners implement the learner Protocol, and outside the algorithms'
own modules no code branches on an algorithm's name or on a kind of upload."""

import ast
import inspect
from pathlib import Path

import pytest

from fedkd.learner.cohort import CohortLearner
from fedkd.learner.protocol import Learner
from fedkd.learner.vectorised import VectorisedCohortLearner
from strategies.registry import BUILTIN

ROOT = Path(__file__).resolve().parents[1]
# Where no algorithm-specific branch may live: spec checks, assembly, apps, round loop,
# learners.
ENGINE = [
    ROOT / "fedkd" / "spec.py",
    ROOT / "fedkd" / "assembly.py",
    *sorted((ROOT / "fedkd" / "apps").glob("*.py")),
    *sorted((ROOT / "fedkd" / "rounds").glob("*.py")),
    *sorted((ROOT / "fedkd" / "learner").glob("*.py")),
]
# The upload kinds the learners and apps used to switch on ("none" too, but it is also the
# off-value of many spec keys, e.g. faults.attack, and no upload kind any more).
UPLOAD_KINDS = {"logits", "class_logits", "weights", "votes", "prototypes"}
PROTOCOL_METHODS = [
    name for name, value in vars(Learner).items() if callable(value) and not name.startswith("_")
]


@pytest.mark.parametrize("learner_cls", [CohortLearner, VectorisedCohortLearner])
def test_both_learners_implement_the_protocol(learner_cls):
    assert PROTOCOL_METHODS, "the Protocol declares methods"
    learner = learner_cls.__new__(learner_cls)
    learner.data = None  # an attribute the Protocol declares (set by __init__)
    assert isinstance(learner, Learner)
    for name in PROTOCOL_METHODS:
        declared = inspect.signature(getattr(Learner, name))
        implemented = inspect.signature(getattr(learner_cls, name))
        assert list(implemented.parameters) == list(declared.parameters), name


def _constants(node: ast.AST) -> set[str]:
    """String constants of a comparison operand (a literal, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return set().union(*(_constants(e) for e in node.elts)) if node.elts else set()
    return set()


def branches_on(path: Path, names: set[str]) -> list[str]:
    """``file:line`` of every comparison in `path` with one of `names` as a literal."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            literals = set().union(*(_constants(n) for n in [node.left, *node.comparators]))
            if literals & names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(literals & names)}")
    return found


def test_no_algorithm_name_or_upload_kind_is_tested_outside_the_algorithms():
    names = set(BUILTIN) | UPLOAD_KINDS
    found = [hit for path in ENGINE for hit in branches_on(path, names)]
    assert not found, f"algorithm-specific branches outside strategies/: {found}"
