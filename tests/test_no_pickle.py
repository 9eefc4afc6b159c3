"""No pickle anywhere: src/, benchmarks/ and tests/ are parsed and every way in is refused.

Refused: importing ``pickle`` (or ``_pickle``, ``cPickle``, ``dill``, ``cloudpickle``, ``joblib``,
``shelve``); ``torch.load`` without ``weights_only=True``; ``torch.save`` (it pickles whatever it
is given; tensors go to safetensors through ``influencekit.storage``); ``allow_pickle=True``;
any ``*pickle*`` function or method (``pandas.read_pickle``, ``.to_pickle``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("src", "benchmarks", "tests")
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def unsafe_serialisation(source: str) -> list[str]:
    """Every way into pickle in ``source``: ``"line N: what"``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLING_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if node.module == "torch" and any(a.name in ("load", "save") for a in node.names):
                found.append(f"{where}: from torch import load/save")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.load") or name == "torch.load":
                if not _keyword_is_true(node, "weights_only"):
                    found.append(f"{where}: {name}(...) without weights_only=True")
            elif name == "torch.save" or name.endswith(".torch.save"):
                found.append(f"{where}: torch.save (use safetensors / ik.storage.save_tensors)")
            if _keyword_is_true(node, "allow_pickle"):
                found.append(f"{where}: {name or 'call'}(..., allow_pickle=True)")
            if "pickle" in name.rsplit(".", 1)[-1].lower():
                found.append(f"{where}: {name}(...)")
    return found


def _python_files():
    for folder in FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "import cloudpickle as cp",
    "from pickle import loads",
    "from joblib import dump",
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "import torch\ntorch.save({'a': 1}, 'x.pt')",
    "from torch import load",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import pandas as pd\npd.read_pickle('x')",
    "frame.to_pickle('x')",
])
def test_the_checker_finds_each_way_in(snippet):
    assert unsafe_serialisation(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pt', weights_only=True)",
    "import numpy as np\nnp.load('x.npy')",
    "from safetensors.torch import save_file",
    "text = 'import pickle'",
])
def test_the_checker_allows_the_safe_forms(snippet):
    assert unsafe_serialisation(snippet) == []


def test_no_pickle_in_the_repository():
    files = list(_python_files())
    assert len(files) > 50  # the walk really sees the code
    offenders = {str(path.relative_to(ROOT)): uses for path in files
                 if (uses := unsafe_serialisation(path.read_text(encoding="utf-8")))}
    assert offenders == {}
