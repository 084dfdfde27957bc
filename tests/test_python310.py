"""Python 3.10 is declared (requires-python >= 3.10): no 3.11-only syntax, and tomllib falls back to tomli.

No 3.10 interpreter is available here, so this checks what can be checked on 3.11: the syntax against the 3.10
grammar, the declared dependency, and a run with `tomllib` missing and the tomli backport in its place.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # this suite itself on 3.10
    import tomli as tomllib


def test_sources_parse_with_the_python_310_grammar():
    bad = []
    for path in sorted((REPO / "tiered").rglob("*.py")):
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
        except SyntaxError as e:
            bad.append(f"{path.relative_to(REPO)}:{e.lineno}: {e.msg}")
    assert not bad, bad


def test_tomli_is_a_dependency_below_311_only():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.10"
    deps = [d.replace(" ", "").replace("'", '"') for d in meta["dependencies"]]
    assert any(d.startswith("tomli") and d.endswith(';python_version<"3.11"') for d in deps), deps


def test_runs_without_tomllib_using_tomli(tmp_path):
    """With `tomllib` absent (as on 3.10) and a `tomli` module present, the family specs load and inspect works."""
    shim = tmp_path / "shim"
    shim.mkdir()
    # tomli is the package tomllib was made from: same API. The stand-in re-exports the stdlib parser.
    (shim / "tomli.py").write_text("from importlib import util\n"
                                   "spec = util.find_spec('tomllib')\n"
                                   "mod = util.module_from_spec(spec)\n"
                                   "spec.loader.exec_module(mod)\n"
                                   "loads, load, TOMLDecodeError = mod.loads, mod.load, mod.TOMLDecodeError\n")
    code = ("import sys\n"
            "import tomli  # loaded before tomllib is blocked\n"
            "sys.modules['tomllib'] = None  # `import tomllib` now raises ModuleNotFoundError, as on 3.10\n"
            "from tiered.cli.main import main\n"
            "main(['inspect', '--json', sys.argv[1]])\n")
    from tiered.layout.families import default_model_path

    r = subprocess.run([sys.executable, "-c", code, str(default_model_path())], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{shim}"})
    assert r.returncode == 0, r.stderr
    assert '"family": "olmoe"' in r.stdout
