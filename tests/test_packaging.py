"""The package imports cleanly from an editable and a wheel install, from any working directory.

The design card puts ``io/`` at the repository root. The standard library owns
``io``, so the folder must only ever be importable as ``singleframe.io``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = (
    "import io, sys, singleframe, singleframe.io, singleframe.steps, singleframe.flows, singleframe.sim;"
    "assert io.__file__ is None or 'singleframe' not in io.__file__ and io.__name__ == 'io', io.__file__;"
    "assert hasattr(io, 'BytesIO');"
    "print(singleframe.__file__)"
)


@pytest.mark.parametrize("cwd", ["repo", "tmp"])
def test_editable_install_imports_from_any_directory(cwd: str, tmp_path: Path) -> None:
    where = REPO if cwd == "repo" else tmp_path
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=where, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (REPO / "core" / "__init__.py").resolve()


@pytest.mark.slow
def test_wheel_install_imports_from_repo_root(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(REPO)],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("singleframe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # Only the package namespace is shipped: no top-level io/, steps/ or flows/.
    assert not any(n.split("/")[0] in {"io", "steps", "flows", "core", "sim"} for n in names)
    assert "singleframe/io/store.py" in names and "singleframe/steps/pipeline.py" in names
    site = tmp_path / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, check=False,
    )
    assert inst.returncode == 0, inst.stderr
    # -I isolates from the editable install's finder; dependencies come from the venv site-packages.
    venv_site = next(p for p in sys.path if p.endswith("site-packages"))
    env = {"PYTHONPATH": f"{site}:{venv_site}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-S", "-c", CHECK], cwd=REPO, capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().is_relative_to(site.resolve())


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names.add(("." * node.level) + mod)
    return names


def test_steps_are_pure() -> None:
    """steps/ imports neither Prefect nor the io layer (style guideline 1)."""
    offenders = []
    for path in sorted((REPO / "steps").glob("*.py")):
        for name in _imports(path):
            if name.startswith(("prefect", "singleframe.io", "..io", "fsspec")) or name in {"pickle", "cloudpickle"}:
                offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders


def test_no_pickle_in_stored_data_layers() -> None:
    for folder in ("io", "steps", "flows", "sim"):
        for path in (REPO / folder).glob("*.py"):
            assert not ({"pickle", "cloudpickle"} & _imports(path)), path
