"""The layer order of DESIGN.md, read from the code: every module imports only what is at or below its layer.

Bottom to top: the domain records (atelier/jobs.py); the torch-free rules and tables the config
is built from; the config; the library (families, scheduling, staging, …); the processes (actors/,
broker.py, gpu_node.py); the frontends. An import that runs upward (one inside a function or
under TYPE_CHECKING too: it is an edge all the same) fails here with the module and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Lower numbers are lower layers; a module may import from its own layer or any below it.
LAYERS: list[tuple[int, str]] = [
    (0, "atelier.jobs"),
    # What the config validates against, without torch: the family table and the speed settings' rules.
    (1, "atelier.registry"),
    (1, "atelier.tuning"),
    (1, "atelier.samplers"),
    (2, "atelier.config"),
    (3, "atelier"),  # the rest of the library: families, scheduling, staging, media, …
    (4, "actors"),
    (4, "broker"),
    (4, "gpu_node"),
    (5, "frontends"),
]
PACKAGES = ("atelier", "actors", "frontends", "broker", "gpu_node")


def layer_of(module: str) -> int | None:
    """The layer of a module of this project (the most specific prefix wins); None for others'."""
    best: tuple[int, int] | None = None
    for rank, prefix in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), rank)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> list[Path]:
    files = [ROOT / "broker.py", ROOT / "gpu_node.py"]
    for package in ("atelier", "actors", "frontends"):
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def imported(tree: ast.AST, here: str) -> list[tuple[int, str]]:
    """(line, module) of every import in a module, wherever it stands; relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: -node.level]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from atelier import config`` imports atelier.config, which has a layer of its own.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if layer_of(f"{target}.{alias.name}") != layer_of(target)]
    return found


def upward_imports() -> list[str]:
    wrong = []
    for path in project_modules():
        here = module_name(path)
        mine = layer_of(here)
        assert mine is not None, f"{here} has no layer: add it to LAYERS"
        for line, target in imported(ast.parse(path.read_text(), str(path)), here):
            if target.split(".")[0] not in PACKAGES:
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {here} (layer {mine}) imports {target} "
                             f"(layer {theirs})")
    return wrong


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import():
    # The check itself: an atelier module importing the wire, as atelier/config.py once did, is caught.
    tree = ast.parse("from actors.messages import Name\n\ndef f():\n    from frontends import cli\n")
    targets = [target for _, target in imported(tree, "atelier.config")]
    assert [layer_of(t) for t in targets] == [4, 5]
    assert layer_of("atelier.config") == 2 and layer_of("atelier.jobs") == 0
