"""The package's layers, as docs/ARCHITECTURE.md draws them, hold: imports go down, and never in a circle.

Every module's imports are read from its source, those inside functions included (an import in a
function is still an import), and checked against the layers the architecture page names. The
checker itself is tested on made-up graphs, so a broken checker cannot pass the real package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import celebbasis

SRC = Path(celebbasis.__file__).parent
DOC = Path(__file__).parents[1] / "docs" / "ARCHITECTURE.md"
PLUG_INS = ("toy",)  # known to the front ends only


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name below ``celebbasis`` (``"face.analyzer"``; a package's
    ``__init__.py`` is the package's name, the top one ``"__init__"``)."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (``from .x import y``: module ``x.y`` if
    there is one, else ``x``)."""
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "celebbasis"]
            found |= {".".join(t) or "__init__" for t in targets}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "celebbasis":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                sub = ".".join([*target, alias.name])
                found.add(sub if sub in known else ".".join(target) or "__init__")
    return found - {name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def documented_layers(text: str) -> dict[str, int]:
    """``### N. Title`` sections of the architecture page, and the module each bullet names first
    (``- `face/`: ...`` or ``- `models.py`: ...``), as {module or package: N}."""
    layers, current = {}, None
    for line in text.splitlines():
        heading = re.match(r"###\s+(\d+)\.", line)
        if heading:
            current = int(heading.group(1))
            continue
        if line.startswith("## "):
            current = None
        bullet = re.match(r"- `([\w/]+?)(\.py|/)`", line)
        if bullet and current is not None:
            layers[bullet.group(1).replace("/", ".")] = current
    return layers


def layer_of(name: str, layers: dict[str, int]) -> int | None:
    """A module's layer: its own bullet, else its package's (``face.analyzer`` is in ``face/``'s)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in layers:
            return layers[".".join(parts[:i])]
    return None


def upward_imports(edges: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Imports of a module from a higher layer (modules without a layer: ``test_the_architecture_page_names_...``)."""
    return sorted(f"{a} (layer {layer_of(a, layers)}) imports {b} (layer {layer_of(b, layers)})"
                  for a, targets in edges.items() for b in targets
                  if None not in (layer_of(a, layers), layer_of(b, layers)) and layer_of(b, layers) > layer_of(a, layers))


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


@pytest.fixture(scope="module")
def layers() -> dict[str, int]:
    return documented_layers(DOC.read_text(encoding="utf-8"))


def test_the_architecture_page_names_every_module_and_nothing_else(layers):
    mods = modules()
    assert not [m for m in mods if layer_of(m, layers) is None], "modules the page does not place in a layer"
    assert not sorted(set(layers) - set(mods)), "modules the page names that do not exist"
    assert layers["errors"] == 1 and layers["__init__"] == max(layers.values())


def test_imports_go_down_only(layers):
    assert upward_imports(graph(), layers) == []


def test_no_import_cycle_inside_functions_or_out():
    assert cycle(graph()) is None


def test_only_front_ends_know_the_plug_ins(layers):
    edges = graph()
    top = max(layers.values())
    for plug_in in PLUG_INS:
        users = {a for a, targets in edges.items() for b in targets
                 if b.split(".")[0] == plug_in and a.split(".")[0] != plug_in}
        assert users and all(layer_of(a, layers) == top for a in users), users


def test_the_checker_sees_what_it_must(tmp_path):
    """Planted faults: an import inside a function that closes a cycle, an upward import, relative imports."""
    probe = tmp_path / "a.py"
    probe.write_text("def f():\n    from .b import thing\n", encoding="utf-8")
    assert imports_of("a", probe, {"a", "b"}) == {"b"}
    probe.write_text("from ..families import family_of\nfrom . import geometry\nimport celebbasis.toy\n", encoding="utf-8")
    assert imports_of("face.x", probe, {"families", "face.geometry", "face.x", "toy"}) == {"families", "face.geometry", "toy"}
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    assert upward_imports({"low": {"high"}}, {"low": 1, "high": 2}) == ["low (layer 1) imports high (layer 2)"]
    assert documented_layers("### 2. X\n- `face/`: faces\n- `models.py`: m\n## Other\n- `x.py`: no") == {"face": 2, "models": 2}
