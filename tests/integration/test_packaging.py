"""Cairn installed as a user installs it: a fresh virtual environment, the package without
extras (no test tools), and every module of it imported. A module that imports something at
run time that is only a test extra (boto3 was one) fails here.

pyfuse3 is the one exception: run.sh builds it with Cairn's patches, so the fresh venv is
given the build of the project's own .venv instead of compiling it again."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

IMPORT_ALL = """
import importlib, pkgutil, sys
from pathlib import Path
import cairn
roots = ["cairn", "cairn_meta", "cairn_nodeplugin", "cairn_provisioner", "cairn_attacher",
         "cairn_cache_syncer"]
failed = []
for root in roots:
    package = importlib.import_module(root)
    names = [root] + [m.name for m in pkgutil.walk_packages(package.__path__, root + ".")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            failed.append(f"{name}: {type(error).__name__}: {error}")
    where = package.__path__[0]
    assert "site-packages" in where, f"{root} imported from {where}, not the installed copy"
# imports made inside functions too (boto3 was one, in the s3:// store): each named module
import ast
seen = set()
for root in roots:
    for path in sorted(Path(importlib.import_module(root).__path__[0]).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                seen.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                seen.add(node.module.split(".")[0])
for name in sorted(seen - set(sys.stdlib_module_names)):
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"import {name} (somewhere in the package): {type(error).__name__}")
print("\\n".join(failed) or "ok")
sys.exit(1 if failed else 0)
"""


def run(*argv: str, cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # fmt: skip
    assert done.returncode == 0, f"{' '.join(argv[:4])}...:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_module_imports_with_the_runtime_dependencies_only(tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    python = str(venv / "bin" / "python")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    from importlib.metadata import requires

    deps = [d for d in project["dependencies"] if not d.lower().startswith("pyfuse3")]
    deps += [r for r in requires("pyfuse3") or [] if "extra ==" not in r]  # what it needs
    # the versions the project's .venv resolved, as constraints: the same answer at once,
    # without pip walking back through hundreds of botocore releases
    frozen = run(sys.executable, "-m", "pip", "freeze", "--exclude-editable", cwd=tmp_path)
    pins = [line for line in frozen.splitlines() if "==" in line and "+" not in line]
    (tmp_path / "constraints.txt").write_text("\n".join(pins) + "\n")
    run(python, "-m", "pip", "install", "-q", "-c", str(tmp_path / "constraints.txt"), *deps,
        cwd=tmp_path)  # fmt: skip
    run(python, "-m", "pip", "install", "-q", "--no-deps", str(ROOT), cwd=tmp_path)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=tmp_path).strip())  # fmt: skip
    import pyfuse3

    built = Path(pyfuse3.__file__).parent
    (site / "pyfuse3").symlink_to(built, target_is_directory=True)
    assert run(python, "-c", IMPORT_ALL, cwd=tmp_path).strip() == "ok"
