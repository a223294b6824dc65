"""What version of the code produced a dataset.

The package version (``singleframe.__version__``) only changes at a release, but a cached
output is stale as soon as any code that computes it changes. :func:`code_fingerprint` hashes
the source of every module a calibration can run, so the flows' cache keys change with the code
(an editable install being edited, or a new wheel) and a re-run recomputes exactly then. (The
flows add the versions of the numeric libraries: see ``singleframe.flows.calibrate.code_version``.)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

__all__ = ["code_fingerprint"]

#: Subpackages whose code computes calibration outputs (with the top-level modules). In a wheel
#: they sit under ``singleframe/``; an editable install maps them from the repository's top-level
#: folders, so each is located through the import system, not by walking one directory.
_CALIBRATION_SUBPACKAGES = ("steps", "io", "flows")


@functools.cache
def code_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the calibration source files, path and bytes.

    The package's top-level modules and every module of :data:`_CALIBRATION_SUBPACKAGES`;
    computed once per process (~80 small files, a few ms).
    """
    top = importlib.util.find_spec("singleframe")
    assert top is not None and top.submodule_search_locations
    files = {p.name: p for loc in top.submodule_search_locations for p in Path(loc).glob("*.py") if p.is_file()}
    for name in _CALIBRATION_SUBPACKAGES:
        spec = importlib.util.find_spec(f"singleframe.{name}")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"singleframe.{name} is not importable: the installation is incomplete; reinstall")
        found = {f"{name}/{p.relative_to(loc).as_posix()}": p for loc in spec.submodule_search_locations
                 for p in Path(loc).rglob("*.py") if p.is_file()}  # (editor lock files are dangling links)
        if not found:
            # A sourceless (.pyc-only or zipped) install: no fingerprint could follow the code.
            raise ImportError(f"singleframe.{name} has no .py source files at {list(spec.submodule_search_locations)}; "
                              "install singleframe from a wheel or source tree (the cache keys hash the source)")
        files.update(found)
    digest = hashlib.sha256()
    for rel in sorted(files):
        data = files[rel].read_bytes()
        digest.update(f"{rel}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()[:16]
