"""Which way imports run: ``lit_bluelm/config`` knows no checkpoint and no model. Checked
statically (ast), so an import inside a function counts as much as one at the top of a file."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lit_bluelm"
FORBIDDEN = ("lit_bluelm.checkpoint", "lit_bluelm.checkpoint_io", "lit_bluelm.models")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool = False) -> Iterator[str]:
    """Every module ``source`` (the text of ``module``) may import, anywhere in the file:
    ``import a.b``, ``from a import b`` (both ``a`` and ``a.b``), relative forms resolved, and
    ``importlib.import_module`` / ``__import__`` of a constant name."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name
            yield from (f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.args[0].value


def forbidden(names: Iterator[str]) -> List[str]:
    return sorted({n for n in names for f in FORBIDDEN if n == f or n.startswith(f + ".")})


def file_imports(path: Path) -> Iterator[str]:
    return imported(path.read_text(), module_name(path), path.name == "__init__.py")


@pytest.mark.parametrize(
    "source, module",
    [
        ("from lit_bluelm.checkpoint import read_meta", "lit_bluelm.config.checks"),
        ("def f():\n    from lit_bluelm.checkpoint import saved_config", "lit_bluelm.config.load"),
        ("from lit_bluelm import checkpoint", "lit_bluelm.config.load"),
        ("from lit_bluelm import checkpoint_io", "lit_bluelm.config.load"),
        ("from ..checkpoint import read_meta", "lit_bluelm.config.checks"),
        ("from .. import models", "lit_bluelm.config.checks"),
        ("from ..models.llm import llm_config", "lit_bluelm.config.checks"),
        ("import lit_bluelm.models.vision as v", "lit_bluelm.config.schema"),
        ("class A:\n    def f(self):\n        import lit_bluelm.checkpoint", "lit_bluelm.config.schema"),
        ("import importlib\nimportlib.import_module('lit_bluelm.checkpoint')", "lit_bluelm.config.load"),
    ],
)
def test_the_checker_sees_every_form_of_import(source, module):
    assert forbidden(imported(source, module)), source


def test_the_checker_passes_allowed_imports():
    allowed = "from lit_bluelm.errors import ConfigError\nfrom .schema import Config\nimport checkpointing"
    assert forbidden(imported(allowed, "lit_bluelm.config.load")) == []
    # a package's own relative import resolves inside the package
    assert "lit_bluelm.config.checks" in set(
        imported("from .checks import validate", "lit_bluelm.config", True)
    )


def test_config_imports_no_checkpoint_and_no_model():
    files = sorted((PACKAGE / "config").rglob("*.py"))
    assert files, "no config modules found"
    bad = {str(p.relative_to(ROOT)): forbidden(file_imports(p)) for p in files}
    assert not {k: v for k, v in bad.items() if v}, bad


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_nothing_config_reaches_imports_a_checkpoint_or_a_model():
    """The config's sections live beside their objectives: what config imports, transitively
    (function bodies included), stays clear of checkpoints and models too."""
    seen: Set[str] = set()
    todo = [module_name(p) for p in (PACKAGE / "config").rglob("*.py")]
    chains = {name: [name] for name in todo}
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for dep in file_imports(path):
            if not dep.startswith("lit_bluelm"):
                continue
            assert not forbidden(iter([dep])), " -> ".join(chains[name] + [dep])
            parts = dep.split(".")
            for i in range(2, len(parts) + 1):  # importing a.b.c runs a/b/__init__ first
                parent = ".".join(parts[:i])
                if parent not in seen and parent not in chains:
                    chains[parent] = chains[name] + [parent]
                    todo.append(parent)
