"""Layers talk one way: no module of fedkd or strategies imports a module of a higher layer.

Top to bottom: run (CLI, deployment) -> Flower apps -> assembly (spec, spec-to-objects
assembly, results folder) -> strategies -> learner -> knowledge -> privacy -> data -> models ->
common helpers (DESIGN.md's order). The audit sits beside the run layer: it may import the
assembly and below, and only the run layer imports it. Every import counts, including those
inside functions and under ``TYPE_CHECKING``.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedkd", "strategies")

# Top to bottom; a layer may import itself and the layers after it.
ORDER = (
    "run",
    "apps",
    "assembly",
    "strategies",
    "learner",
    "knowledge",
    "privacy",
    "data",
    "models",
    "common",
)
# Module (or package prefix) -> layer; the longest matching prefix decides.
LAYER_OF = {
    "fedkd.run": "run",
    "fedkd.deploy": "run",
    "fedkd.audit": "audit",
    "fedkd.apps": "apps",
    "fedkd.assembly": "assembly",
    "fedkd.spec": "assembly",
    "fedkd.results": "assembly",
    "fedkd.rounds": "assembly",
    "strategies": "strategies",
    "fedkd.learner": "learner",
    "fedkd.faults": "learner",  # seeded draws (fedkd.learner.loop) on numpy uploads and data
    "fedkd.knowledge": "knowledge",
    "fedkd.privacy": "privacy",
    "fedkd.data": "data",
    "fedkd.models": "models",
    "fedkd": "common",  # the package root (its version) only; its subpackages are listed above
    "fedkd.provenance": "common",
    "fedkd.plots": "common",
    "fedkd.stats": "common",
}
MAY_IMPORT = {layer: {layer, *ORDER[i + 1 :]} for i, layer in enumerate(ORDER)}
MAY_IMPORT["run"].add("audit")
MAY_IMPORT["audit"] = {"audit", *MAY_IMPORT["assembly"]}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(path): path
    for package in PACKAGES
    for path in sorted((ROOT / package).rglob("*.py"))
}


def layer_of(module: str) -> str | None:
    """The layer of `module`, or None for a module outside the packages (or unassigned)."""
    prefixes = [p for p in LAYER_OF if module == p or module.startswith(p + ".")]
    if not prefixes or (max(prefixes, key=len) == "fedkd" and module != "fedkd"):
        return None
    return LAYER_OF[max(prefixes, key=len)]


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a module of the packages in `path`."""
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up `level - 1` packages
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"  # `from fedkd import assembly` imports a module
                found.append((node.lineno, sub if sub in MODULES else base))
    return [(line, name) for line, name in dict.fromkeys(found) if name.split(".")[0] in PACKAGES]


def test_every_module_has_a_layer():
    unassigned = sorted(m for m in MODULES if layer_of(m) is None)
    assert not unassigned, f"give these modules a layer in LAYER_OF: {unassigned}"


def higher_imports(module: str, path: Path) -> list[str]:
    """Each import in `path` (the source of `module`) of a layer above `module`'s."""
    source = layer_of(module)
    if source is None:
        return []  # reported by test_every_module_has_a_layer
    violations = []
    for line, target in imported_modules(module, path):
        layer = layer_of(target)
        if layer is not None and layer not in MAY_IMPORT[source]:
            violations.append(f"{path.name}:{line}: {source} imports {target} ({layer})")
    return violations


def test_no_module_imports_a_higher_layer():
    violations = [v for module, path in MODULES.items() for v in higher_imports(module, path)]
    assert not violations, "lower layers import higher ones:\n" + "\n".join(violations)


def test_knowledge_privacy_data_and_models_are_layers_in_that_order(tmp_path):
    """DESIGN.md's order: each may import those after it, never one before it."""
    path = tmp_path / "probe.py"
    path.write_text("from fedkd.privacy import noise\nfrom fedkd.models import zoo\n")
    assert higher_imports("fedkd.knowledge.probe", path) == []
    assert higher_imports("fedkd.data.probe", path) == [
        "probe.py:1: data imports fedkd.privacy.noise (privacy)"
    ]
    assert len(higher_imports("fedkd.models.probe", path)) == 1


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from fedkd.apps import server_app\n    from ..run import cli\n")
    assert imported_modules("fedkd.learner.probe", path) == [
        (2, "fedkd.apps.server_app"),
        (3, "fedkd.run.cli"),
    ]
    assert layer_of("fedkd.apps.server_app") == "apps" and layer_of("fedkd.apps") == "apps"
    assert layer_of("fedkd.nowhere") is None and layer_of("fedkd") == "common"
    assert "apps" not in MAY_IMPORT["learner"] and "apps" not in MAY_IMPORT["audit"]
