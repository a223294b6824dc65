"""Process-level tuning for calibration workers.

A 4096×4096 detector allocates a few dozen frame-sized temporaries (64–130 MB
each) as it passes through the steps. glibc's ``malloc`` serves every block
above its mmap threshold (dynamic, at most 32 MB) with a fresh ``mmap`` and
returns it to the kernel on ``free``, so each temporary is page-faulted and
zero-filled again: 0.3–1 s of a 2.5–3 s characterization of a 4096² frame
on one core of this VM (interleaved fresh-process runs, medians). Raising the
threshold keeps freed frames in the heap for the next step to reuse; the peak
RSS moved by +3 to +5 % on the benchmark frames. Every thread allocates from
that one heap (``M_ARENA_MAX`` 1): the stages of a flow run in Prefect's and
Dask's worker threads, whose per-thread arenas hold at most 64 MB and so would
``mmap`` every frame again (first characterization in a thread: 2.1–2.9 s →
1.5–1.9 s); the arena lock is taken a few hundred times per detector, by
large allocations only (Python's small objects have their own allocator).
The trim threshold is raised to the same 1 GiB: with glibc's default (128 kB,
fixed once the mmap threshold is set) every ``free`` at the top of the heap
returns those pages to the kernel, and the next stage faults them in again.
Once the characterization stopped allocating frame-sized temporaries it does
not need, that was most of what remained: interleaved fresh processes, whole
calibration of a first / next detector, 4096² typical 3.56 / 3.38 s →
3.48 / 3.14 s, poor seeing 4.11 / 3.68 → 3.64 / 3.26 s, 2048² crowded
2.79 / 2.67 → 2.54 / 2.32 s. (Measured before that change, the same setting
had made the calibration 0.3–0.6 s slower; measured after it, the calibration
is faster on every frame tried. Not everything around it is: the first Parquet
write of a process, through pyarrow's own allocator, went from 0.05 to 0.10 s
on a 2048² frame; a worker that reads, calibrates and writes the 4096² crowded
frame, interleaved, takes 9.61 s with it against 10.08 s without: calibration
−0.52 s, writing +0.10 s.) A worker's resident memory stays at its peak between
detectors, which the peak-memory bar already counts.

The arena limit only binds threads that have not allocated yet: a thread keeps
the arena it got on its first ``malloc``. :func:`tune_memory_allocator` is
therefore called once, when ``singleframe`` is imported, before the flow starts
its worker threads (a 4096² detector in a Prefect worker thread took 8.4 s when
the tuning came from inside the thread, 6.4 s with it at import). Dask workers of a
local cluster get ``MALLOC_ARENA_MAX=1`` in their environment instead, because
their task thread may allocate before the first task imports ``singleframe``,
and a trim threshold of 1 GiB, because Dask's nanny sets 64 kB (see
:func:`singleframe.flows.calibrate.make_task_runner`). Set
``SINGLEFRAME_MALLOC_TUNING=0`` to leave the allocator alone. It does nothing
outside glibc (macOS, musl), where the allocators behave differently.

Huge pages. On Linux numpy asks the kernel for transparent huge pages
(``madvise(MADV_HUGEPAGE)``) on every array of 4 MB or more. Whether that pays
depends on the kernel's ``/sys/kernel/mm/transparent_hugepage/defrag`` policy:
under ``always``, ``madvise`` (the kernel's default) or ``defer+madvise`` a
fault in such a region compacts memory synchronously to find a free 2 MB page,
and the faulting thread waits. With the heap kept (above), the advice also
lands on the heap that later holds the output buffers. On this VM (``enabled``
``madvise``, ``defrag`` ``madvise``: with the advice off, no huge pages at
all), read + calibrate + write of one detector in a fresh process, medians of
3 interleaved runs with the advice on → off: 4096² typical 5.28 → 3.85 s,
sparse 3.62 → 2.58 s, poor seeing 5.20 → 4.14 s, crowded 9.39 → 8.82 s,
2048² typical 1.41 → 1.26 s, of which the FITS and Parquet writes
0.72–0.88 → 0.22–0.48 s; the later detectors of a process 4.08 → 3.92 s
(4096² typical, medians of 16; ``benchmarks/results/hugepages-ab-20261127.md``).
:func:`tune_numpy_hugepages` therefore turns numpy's advice off under those
defrag policies, once, when ``singleframe`` is imported, in every process
that imports it (the advice is process-wide: other code in the process
allocates without it too). Under ``defer`` or ``never`` nothing waits, and
with ``enabled`` ``never`` the kernel gives no huge pages anyway: numpy is
left alone. With ``enabled`` ``always`` the arrays still get huge pages
where the kernel has them free, without waiting (not measured here). An
explicit ``NUMPY_MADVISE_HUGEPAGE`` in the environment (numpy's own switch)
always wins, and ``SINGLEFRAME_MALLOC_TUNING=0`` leaves this alone too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "WORKER_PRELOAD", "start_worker_forkserver", "thp_policy",
           "tune_memory_allocator", "tune_numpy_hugepages"]

#: Blocks below this size come from the heap and are reused after ``free``
#: (1 GiB: above any single frame of a 4k×4k detector in float64).
MMAP_THRESHOLD_BYTES = 1 << 30
#: Free memory at the top of the heap is returned to the kernel only above this size.
TRIM_THRESHOLD_BYTES = 1 << 30

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_lock = threading.Lock()
_state: dict[str, bool] = {}
#: The kernel's THP defrag policies under which a fault in a madvised region compacts synchronously.
_STALLING_DEFRAG_POLICIES = frozenset({"always", "madvise", "defer+madvise"})
_THP_DIR = "/sys/kernel/mm/transparent_hugepage"

#: Modules a local Dask cluster's worker processes have imported before they start: distributed,
#: the calibration with Prefect's task engine, and the diagnostic plot's matplotlib.
WORKER_PRELOAD = ("distributed", "singleframe.flows.calibrate", "matplotlib.figure", "matplotlib.backends.backend_agg")


def tune_memory_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds and use one arena for this process (idempotent); True when in effect."""
    with _lock:
        if "tuned" not in _state:
            _state["tuned"] = _apply()
        return _state["tuned"]


def tune_numpy_hugepages() -> bool:
    """Stop numpy advising huge pages where the kernel would stall to provide them (idempotent).

    True when this call (or the first one in the process) turned numpy's advice off.
    """
    with _lock:
        if "hugepages_off" not in _state:
            _state["hugepages_off"] = _apply_hugepages()
        return _state["hugepages_off"]


def _opted_out() -> bool:
    return os.environ.get("SINGLEFRAME_MALLOC_TUNING", "1").strip().lower() in {"0", "false", "no", "off"}


def thp_policy(setting: str, directory: str = _THP_DIR) -> str | None:
    """The kernel's selected transparent-huge-page policy for ``setting`` (``enabled``, ``defrag``), or None.

    None where the file is absent or unreadable (not Linux, or a kernel without THP).
    """
    try:
        with open(os.path.join(directory, setting), encoding="ascii") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError):
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _apply_hugepages() -> bool:
    if _opted_out() or "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return False
    if thp_policy("enabled") in (None, "never") or thp_policy("defrag") not in _STALLING_DEFRAG_POLICIES:
        return False
    from numpy._core import multiarray  # numpy >= 1.26 (1.26 re-exports numpy.core's)

    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is None:
        return False
    setter(False)
    return True


def _apply() -> bool:
    if _opted_out():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return (bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
            and bool(mallopt(_M_ARENA_MAX, 1)))


def start_worker_forkserver(preload: tuple[str, ...] = WORKER_PRELOAD) -> bool:
    """Start the fork server that a local Dask cluster's workers are forked from (idempotent).

    The server imports ``preload`` once, in the background, and forks each worker ready to run
    (see :func:`singleframe.flows.calibrate.make_task_runner`). Importing them takes ~2.5 s of one
    core, and so does this process's own import of Prefect and the flow: call this first, before
    those imports, and the two run side by side on two cores instead of one after the other.
    It imports neither Prefect nor distributed itself.

    Returns False where the ``forkserver`` start method does not exist (Windows).
    """
    import multiprocessing
    import multiprocessing.forkserver

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    # The list is read when the server starts; a server already running keeps the one it has.
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    multiprocessing.forkserver.ensure_running()
    return True
