"""The package's folders are its layers (docs/architecture.md): each imports only layers below it, and no
imports form a cycle, counting the imports inside functions too. Reads the source, imports nothing."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_magic"

# Top to bottom. A module may import its own layer and any layer below it.
LAYERS = ["package", "front", "api", "session", "tasks", "engine", "display", "core"]
# Besides the rank: what the front may touch (it reaches the session and the engine only through api).
FRONT_MAY_IMPORT = {"front", "api", "display", "core"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("_moved", "run"):
        return "package"
    if parts[1] in ("front", "tasks", "engine", "display"):
        return parts[1]
    if parts[1] in ("api", "session"):
        return parts[1]
    if parts[1] in ("config", "errors", "_version", "examples"):
        return "core"
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py and to docs/architecture.md")


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `module` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "qlora_magic"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "qlora_magic":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import api` names a module; `from .api import load` a name in one
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
    return {m for m in found if m != module}


def graph():
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_is_in_a_layer():
    for module in modules():
        layer(module)


def test_no_upward_imports():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if LAYERS.index(layer(target)) < LAYERS.index(layer(module)):
                upward.append(f"{module} -> {target}")
            if layer(module) == "front" and layer(target) not in FRONT_MAY_IMPORT:
                upward.append(f"{module} -> {target} (the front goes through api)")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    edges = graph()
    # A subpackage's __init__ runs before its modules; an import of the package by its own module is not a loop.
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_are_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert LAYERS.index(layer("qlora_magic.engine.data")) > LAYERS.index(layer("qlora_magic.tasks.finetune"))
    source = PACKAGE / "engine" / "data.py"
    known = set(modules())
    assert "qlora_magic.errors" in imports_of("qlora_magic.engine.data", source, known)
    assert "qlora_magic.engine.quiet" in imports_of("qlora_magic.engine.data", source, known)  # a function-local import


def test_architecture_doc_names_every_folder():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for folder in ("front/", "tasks/", "engine/", "display/"):
        assert folder in doc
    for module in modules():
        short = module.split(".")[-1]
        if short not in ("qlora_magic", "front", "tasks", "engine", "display", "examples"):
            assert f"{short}.py" in doc or f"`{short}`" in doc, f"docs/architecture.md does not mention {module}"
