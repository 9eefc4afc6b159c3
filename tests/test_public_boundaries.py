"""Packages talk through public names: no `_private` name of one influencekit package is
imported by another (DESIGN.md), and the README's code runs as written."""

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "influencekit"


def _package_of(module: str) -> str:
    """``influencekit.grads.engine`` -> ``influencekit.grads`` (top-level modules: themselves)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[:-(level - 1)]
    return ".".join(base + ([module] if module else []))


def _cross_package_private_imports() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        importer = _module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                source = _resolve(importer, path.name == "__init__.py", node.level, node.module)
            elif node.module and node.module.startswith("influencekit"):
                source = node.module
            else:
                continue
            if _package_of(source) == _package_of(importer):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                hidden = any(p.startswith("_") for p in source.split(".")[1:])
                if private or hidden:
                    found.append(f"{path.relative_to(SRC.parent)}:{node.lineno} imports "
                                 f"{alias.name} from {source}")
    return found


def test_no_private_name_is_imported_across_packages():
    assert _cross_package_private_imports() == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The walker itself: a planted cross-package private import is reported."""
    fake = tmp_path / "influencekit"
    (fake / "a").mkdir(parents=True)
    (fake / "b").mkdir()
    (fake / "a" / "__init__.py").write_text("")
    (fake / "b" / "__init__.py").write_text("")
    (fake / "a" / "x.py").write_text("from ..b.y import _hidden\nfrom .z import _fine\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert len(_cross_package_private_imports()) == 1


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("name", ["storage", "grads", "response", "diagnostics", "correction",
                                  "evaluation", "conventions", "errors"])
def test_subpackages_are_attributes_of_the_package(name):
    import influencekit as ik

    assert getattr(ik, name).__name__ == f"influencekit.{name}"


def test_readme_names_exist():
    """Every ``ik.<name>`` the README's Python blocks use exists."""
    import influencekit as ik

    used = set()
    for block in _readme_blocks():
        used |= set(re.findall(r"\bik\.([A-Za-z_][A-Za-z0-9_.]*)", block))
    missing = []
    for dotted in sorted(used):
        obj = ik
        for part in dotted.split("."):
            if not hasattr(obj, part):
                missing.append(dotted)
                break
            obj = getattr(obj, part)
    assert used and missing == []
