"""The package's import direction: each part imports only from parts below it (ARCHITECTURE: the house).

Order, bottom up: layout < store < kernels < model < predict < decode < engine < serve < cli. Every import in
tiered/ is checked, function-local ones included (ast walk); the lazy `tiered.load` in tiered/__init__.py is
the one allowed exception. A top-level import cycle would also show up here as an upward import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "tiered"
ORDER = ["layout", "store", "kernels", "model", "predict", "decode", "engine", "serve", "cli"]
RANK = {name: i for i, name in enumerate(ORDER)}
ALLOWED = {("tiered/__init__.py", "tiered.engine")}  # `tiered.load`, imported on first use


def part(module: str) -> str | None:
    """tiered.store.cache -> "store"; tiered.engine -> "engine"; None for the package root and data."""
    bits = module.split(".")
    if bits[0] != "tiered" or len(bits) < 2:
        return None
    return bits[1] if bits[1] in RANK else None


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in `path`, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[:-node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names if name == "tiered"]
    return out


def modules() -> list[tuple[Path, str]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent)
        mod = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out.append((p, mod))
    return out


def test_every_module_belongs_to_a_part():
    """A new top-level module must be placed in the order (or in a part's package)."""
    loose = [m for _, m in modules() if part(m) is None and m not in ("tiered", "tiered.__main__")
             and not m.startswith("tiered.data")]
    assert loose == [], f"modules outside the parts {ORDER}: {loose}"


def test_imports_only_go_down():
    bad = []
    for path, mod in modules():
        here = part(mod)
        rel = str(path.relative_to(PKG.parent))
        for line, target in imports(path, mod):
            there = part(target)
            if there is None or (rel, target) in ALLOWED:
                continue
            if here is None:  # tiered/__init__.py and __main__.py: only the entry points
                if mod == "tiered.__main__" and there == "cli":
                    continue
                bad.append(f"{rel}:{line} imports {target}")
            elif RANK[there] > RANK[here]:
                bad.append(f"{rel}:{line} ({here}) imports {target} ({there})")
    assert bad == [], "imports that go up the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("src, target", [("tiered.store.cache", "tiered.predict.prefetch"),
                                         ("tiered.predict.trace", "tiered.engine")])
def test_the_check_sees_an_upward_import(tmp_path, src, target):
    """The walk finds a function-local upward import (the kind the old tree had)."""
    f = tmp_path / "m.py"
    f.write_text(f"def f():\n    from {target} import x\n")
    found = [t for _, t in imports(f, src)]
    assert target in found and RANK[part(target)] > RANK[part(src)]
