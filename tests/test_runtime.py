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


_DASK_WORKER_PROBE = """
import ctypes, os, sys, tempfile
from distributed import Client, LocalCluster

# Nothing from singleframe at module level: a worker re-imports this file as __mp_main__.

def probe(modules):
    # In the worker's task thread: were the modules imported before this task arrived (it
    # references none of them), and the allocator's arenas after a frame-sized allocation
    # (malloc_stats writes to fd 2, redirected to a file here).
    preloaded = all(name in sys.modules for name in modules)
    import numpy as np
    frame = np.ones((2048, 2048))
    frame.sum()
    with tempfile.TemporaryFile() as fh:
        saved = os.dup(2)
        os.dup2(fh.fileno(), 2)
        try:
            ctypes.CDLL("libc.so.6").malloc_stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        fh.seek(0)
        arenas = [line for line in fh.read().decode().splitlines() if line.startswith("Arena ")]
    return preloaded, arenas

if __name__ == "__main__":
    from singleframe.flows.calibrate import make_task_runner
    from singleframe.runtime import WORKER_PRELOAD
    runner = make_task_runner(dask_workers=1)
    with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        print(client.submit(probe, list(WORKER_PRELOAD)).result())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_local_dask_workers_are_forked_warm_with_one_malloc_arena(tmp_path):
    # make_task_runner's local cluster forks its workers from a server that has imported the
    # calibration (no per-worker import of distributed, Prefect and singleframe before the first
    # detector), and the allocator tuning of that import reaches the worker's task thread.
    pytest.importorskip("prefect_dask")
    script = tmp_path / "probe.py"
    script.write_text(_DASK_WORKER_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in {"SINGLEFRAME_MALLOC_TUNING", "MALLOC_ARENA_MAX"}}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "(True, ['Arena 0:'])", done.stdout + done.stderr[-2000:]


def test_thp_policy_is_the_bracketed_choice(tmp_path):
    (tmp_path / "defrag").write_text("always defer defer+madvise [madvise] never\n")
    (tmp_path / "enabled").write_text("[always] madvise never\n")
    assert runtime.thp_policy("defrag", str(tmp_path)) == "madvise"
    assert runtime.thp_policy("enabled", str(tmp_path)) == "always"
    assert runtime.thp_policy("defrag", str(tmp_path / "absent")) is None  # not Linux, or no THP


def _numpy_hugepage_advice() -> bool:
    from numpy._core import multiarray

    return bool(multiarray._get_madvise_hugepage())


@pytest.fixture
def numpy_advice_on(monkeypatch):
    """numpy's advice on, no explicit settings in the environment; numpy's state restored afterwards."""
    from numpy._core import multiarray

    before = _numpy_hugepage_advice()
    multiarray._set_madvise_hugepage(True)
    for key in ("SINGLEFRAME_MALLOC_TUNING", "NUMPY_MADVISE_HUGEPAGE"):
        monkeypatch.delenv(key, raising=False)
    yield
    multiarray._set_madvise_hugepage(before)


def _kernel(monkeypatch, enabled, defrag):
    monkeypatch.setattr(runtime, "thp_policy", lambda setting, directory=None: {"enabled": enabled,
                                                                                "defrag": defrag}[setting])


@pytest.mark.parametrize(("enabled", "defrag", "turned_off"), [
    ("madvise", "madvise", True), ("always", "madvise", True), ("madvise", "always", True),
    ("madvise", "defer+madvise", True),
    # A fault never waits for compaction under "defer" or "never": numpy's advice costs nothing there.
    ("madvise", "defer", False), ("always", "never", False),
    # No huge pages at all, or no THP in this kernel: nothing to turn off.
    ("never", "madvise", False), (None, None, False)])
def test_numpy_hugepage_advice_is_off_only_where_faults_would_compact(monkeypatch, numpy_advice_on,
                                                                      enabled, defrag, turned_off):
    _kernel(monkeypatch, enabled, defrag)
    assert runtime._apply_hugepages() is turned_off
    assert _numpy_hugepage_advice() is not turned_off


@pytest.mark.parametrize("env", [{"NUMPY_MADVISE_HUGEPAGE": "1"}, {"SINGLEFRAME_MALLOC_TUNING": "0"}])
def test_numpy_hugepage_advice_respects_explicit_settings(monkeypatch, numpy_advice_on, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _kernel(monkeypatch, "madvise", "madvise")
    assert runtime._apply_hugepages() is False
    assert _numpy_hugepage_advice() is True


def test_numpy_hugepage_tuning_is_decided_once_per_process(monkeypatch, numpy_advice_on):
    calls = []
    monkeypatch.setattr(runtime, "_apply_hugepages", lambda: calls.append(1) or True)
    monkeypatch.setattr(runtime, "_state", {})
    assert runtime.tune_numpy_hugepages() is True
    assert runtime.tune_numpy_hugepages() is True
    assert calls == [1]


_IMPORT_ADVICE = """
from numpy._core import multiarray
import singleframe
from singleframe import runtime
print(runtime.thp_policy("enabled"), runtime.thp_policy("defrag"), bool(multiarray._get_madvise_hugepage()))
"""


def test_importing_singleframe_applies_the_kernel_rule():
    env = {k: v for k, v in os.environ.items() if k not in {"SINGLEFRAME_MALLOC_TUNING", "NUMPY_MADVISE_HUGEPAGE"}}
    done = subprocess.run([sys.executable, "-c", _IMPORT_ADVICE], capture_output=True, text=True, env=env,
                          check=True, timeout=60)
    enabled, defrag, advice = done.stdout.split()
    if enabled == "None":
        pytest.skip("this kernel has no transparent huge pages")
    stalls = enabled != "never" and defrag in {"always", "madvise", "defer+madvise"}
    assert advice == str(not stalls), done.stdout  # numpy advises by default on Linux


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="no forkserver start method")
def test_worker_forkserver_starts_before_and_without_prefect():
    # `singleframe run --dask-workers` starts the workers' fork server before it imports Prefect,
    # so that the server's imports run beside the flow's: it must not import either itself.
    code = ("import sys, multiprocessing.forkserver as fs\n"
            "from singleframe.runtime import start_worker_forkserver\n"
            "assert start_worker_forkserver(('json',))\n"
            "assert fs._forkserver._forkserver_pid is not None\n"
            "print(sorted(m for m in ('prefect', 'distributed', 'dask') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
