"""Process-level tuning of calibration workers (singleframe.runtime)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from singleframe import runtime


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("SINGLEFRAME_MALLOC_TUNING", "0")
    assert runtime._apply() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuning_applies_on_glibc_and_is_idempotent(monkeypatch):
    monkeypatch.delenv("SINGLEFRAME_MALLOC_TUNING", raising=False)
    assert runtime._apply() is True  # mallopt accepted the threshold
    first = runtime.tune_memory_allocator()
    assert runtime.tune_memory_allocator() is first  # decided once per process


_THREAD_ARENAS = """
import ctypes, threading
import singleframe  # tunes the allocator on import
import numpy as np

def work():
    frame = np.ones((2048, 2048))  # 32 MB: larger than half a thread arena's 64 MB heap
    frame.sum()
    ctypes.CDLL("libc.so.6").malloc_stats()  # per-arena statistics, on stderr

thread = threading.Thread(target=work)
thread.start()
thread.join()
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_threads_started_after_import_share_the_main_arena():
    # A worker thread with an arena of its own mmaps (and page-faults) every frame-sized
    # temporary again; importing singleframe must tune the allocator before such threads exist.
    env = {k: v for k, v in os.environ.items() if k not in {"SINGLEFRAME_MALLOC_TUNING", "MALLOC_ARENA_MAX"}}
    done = subprocess.run([sys.executable, "-c", _THREAD_ARENAS], capture_output=True, text=True, env=env,
                          check=True, timeout=60)
    arenas = [line for line in done.stderr.splitlines() if line.startswith("Arena ")]
    assert arenas == ["Arena 0:"], done.stderr


def test_local_dask_workers_get_one_malloc_arena():
    pytest.importorskip("prefect_dask")
    import dask

    from singleframe.flows.calibrate import make_task_runner

    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
        make_task_runner(dask_workers=2)
        env = dask.config.get("distributed.nanny.pre-spawn-environ")
        assert env["MALLOC_ARENA_MAX"] == "1"
        assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 30  # above any 4096² frame


def test_thp_defrag_policy_is_the_bracketed_choice(tmp_path):
    path = tmp_path / "defrag"
    path.write_text("always defer defer+madvise [madvise] never\n")
    assert runtime.thp_defrag_policy(str(path)) == "madvise"
    path.write_text("[always] defer defer+madvise madvise never\n")
    assert runtime.thp_defrag_policy(str(path)) == "always"
    assert runtime.thp_defrag_policy(str(tmp_path / "absent")) is None  # not Linux, or no THP


def _numpy_hugepage_advice() -> bool:
    multiarray = runtime._numpy_multiarray()
    enabled = multiarray._set_madvise_hugepage(True)  # returns the previous setting
    multiarray._set_madvise_hugepage(enabled)
    return bool(enabled)


@pytest.fixture
def restore_numpy_hugepages():
    multiarray = runtime._numpy_multiarray()
    before = _numpy_hugepage_advice()
    yield
    multiarray._set_madvise_hugepage(before)


@pytest.mark.parametrize(("policy", "turned_off"), [("madvise", True), ("always", True), ("defer+madvise", True),
                                                    ("defer", False), ("never", False), (None, False)])
def test_numpy_hugepage_advice_is_off_only_where_faults_would_compact(monkeypatch, restore_numpy_hugepages,
                                                                      policy, turned_off):
    # Under "defer" or "never" a fault never waits for compaction: numpy's advice costs nothing there.
    multiarray = runtime._numpy_multiarray()
    multiarray._set_madvise_hugepage(True)
    monkeypatch.delenv("SINGLEFRAME_MALLOC_TUNING", raising=False)
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    monkeypatch.setattr(runtime, "thp_defrag_policy", lambda path=None: policy)
    assert runtime._apply_hugepages() is turned_off
    assert _numpy_hugepage_advice() is not turned_off


@pytest.mark.parametrize("env", [{"NUMPY_MADVISE_HUGEPAGE": "1"}, {"SINGLEFRAME_MALLOC_TUNING": "0"}])
def test_numpy_hugepage_advice_respects_explicit_settings(monkeypatch, restore_numpy_hugepages, env):
    multiarray = runtime._numpy_multiarray()
    multiarray._set_madvise_hugepage(True)
    for key in ("SINGLEFRAME_MALLOC_TUNING", "NUMPY_MADVISE_HUGEPAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(runtime, "thp_defrag_policy", lambda path=None: "madvise")
    assert runtime._apply_hugepages() is False
    assert _numpy_hugepage_advice() is True
